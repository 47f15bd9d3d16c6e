"""The model and everything that steps it (what a checkpoint saves and --resume restores), built from the
settings: the optimiser, loss, weight average and colour stage; one validation pass timed; the run's plan."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoints import DataSpec, load_model_weights, training_state
from colour import BatchColour
from dataset import SegmentationFolder
from engine import evaluate, train_one_epoch
from errors import CheckpointError, UserError
from losses import build_loss
from memory import check_training_memory
from metrics import ConfusionMatrix
from model import ResidualAttnUNet
from optimizer import UpdateRule, build_optimizer, ema_model, scheduled_lr
from predictor import Predictor, Sampling
from settings import ModelSettings, OptimSettings, SampleSettings, TrainSettings
from stopping import GracefulStop, TimeBudget
from utils import Runtime

FIRST_PLAN_STEP = 4  # a time budget's first plan: after this many steps of the first epoch (the first is not timed)


@dataclass
class Validation:
    """One validation pass: the loss and confusion matrix over the whole set, its scores, a few samples for the
    panel, the files left out, and what it cost."""

    loss: float
    matrix: ConfusionMatrix
    metrics: dict
    panel: tuple
    skipped: list[str]
    seconds: float


@dataclass(frozen=True)
class Plan:
    """What a run decides as it goes, recorded beside its settings: the horizon, the epochs the learning-rate
    schedule spans (planned again as a --time-budget's clock runs, and fractional where the budget ends the run
    partway through an epoch), and the validation interval (--val-every auto: chosen after the first validation)."""

    horizon: float
    val_every: int | str

    @property
    def epochs(self) -> int:
        return math.ceil(self.horizon - 1e-9)

    def steps(self, epoch: int, steps_per_epoch: int) -> int:
        """The epoch's steps: all of them but in a last epoch that the horizon ends partway through."""
        return min(steps_per_epoch, round((self.horizon - (epoch - 1)) * steps_per_epoch))

    def validates(self, epoch: int) -> bool:
        """The first validation (auto), every val_every-th epoch and the last."""
        return self.val_every == "auto" or epoch % self.val_every == 0 or epoch == self.epochs


@dataclass
class EpochPace:
    """One epoch's steps under the run's plan: each step's learning rate (the schedule spans plan.horizon), where
    the epoch ends (the horizon, or a time budget running out) and, in a budgeted run's first epoch, the first
    plan once a few steps are timed, so that the schedule spans the run from its start."""

    plan: Plan
    epoch: int
    steps: int  # a whole epoch's
    optim: OptimSettings
    runtime: Runtime
    budget: TimeBudget | None = None
    first_step_seconds: float = 0.0

    def lr(self, done: int) -> float:
        """The learning rate of the step after `done` steps of this epoch."""
        optim = self.optim
        done_epochs = self.epoch - 1 + done / self.steps
        return scheduled_lr(
            done_epochs, base=optim.lr, epochs=self.plan.horizon, warmup=optim.warmup_epochs, schedule=optim.schedule
        )

    def set_lr(self, optimizer: torch.optim.Optimizer, done: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr(done)

    def ends(self, seconds: float, done: int) -> bool:
        """After `done` steps, `seconds` into the epoch: whether the epoch ends here. The same on every rank: the
        first plan is rank 0's, and the budget's clock is agreed by GracefulStop.agreed."""
        if self.budget is not None and self.epoch == 1:
            if done == 1:
                self.first_step_seconds = seconds
            elif done == FIRST_PLAN_STEP:
                step = (seconds - self.first_step_seconds) / (done - 1)
                val_every = 1 if self.plan.val_every == "auto" else self.plan.val_every
                horizon = self.runtime.ddp.broadcast(self.budget.first_plan(done, step, val_every))
                self.plan = replace(self.plan, horizon=horizon)
        if done >= self.plan.steps(self.epoch, self.steps):
            return True
        return self.budget is not None and self.budget.out_of_time(seconds, done)


@dataclass
class Training:
    """The model and everything that steps it: what a checkpoint saves and --resume restores."""

    model: torch.nn.Module  # plain: what is saved and validated
    step_model: torch.nn.Module  # compiled and/or DDP-wrapped: what is trained
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    updates: UpdateRule  # accumulation, clipping, the EMA
    colour: BatchColour  # the training samples' colour stage, run per batch on the device
    compiled: bool = False  # the first step's time (compilation included) is worth printing

    def state(self, **progress) -> dict:
        """progress: epoch, flags, rules, best_miou, best_confusion, history (see checkpoints.training_state)."""
        return training_state(
            model=self.model, optimizer=self.optimizer, scaler=self.scaler, ema=self.updates.ema, **progress
        )

    def train_epoch(self, loader, *, runtime: Runtime, epoch: int, stop: GracefulStop, first: bool, pace=None):
        """first: the first epoch of this process, which says what the first step cost (with compile) and how
        much of the epoch waited for data. pace: an EpochPace, see engine.train_one_epoch."""
        return train_one_epoch(
            self.step_model,
            loader,
            loss_fn=self.loss_fn,
            optimizer=self.optimizer,
            scaler=self.scaler,
            colour=self.colour,
            runtime=runtime,
            epoch=epoch,
            stop=stop,
            updates=self.updates,
            pace=pace,
            time_first_step=first and self.compiled,
            report_data_wait=first,
        )

    def validate(self, loader, *, rules: DataSpec, sampling: Sampling, runtime: Runtime, epoch: int) -> Validation:
        """The EMA's weights where there is one: what best.pt's users (inference, export) will run."""
        started = time.monotonic()
        model = self.model if self.updates.ema is None else self.updates.ema.module
        model.eval()
        predictor = Predictor.for_validation(model, rules.mapping, sampling, runtime, rules.normalization)
        classes = rules.mapping.num_classes
        loss, matrix, panel, skipped = evaluate(predictor, loader, num_classes=classes, runtime=runtime, epoch=epoch)
        return Validation(loss, matrix, matrix.compute(), panel, skipped, time.monotonic() - started)

    def restore(self, checkpoint: dict) -> None:
        path, classes = checkpoint["path"], checkpoint["model_args"].get("num_classes")
        if classes != self.model.config["num_classes"]:
            raise CheckpointError(f"{path}: has {classes} classes, the data {self.model.config['num_classes']}")
        load_model_weights(self.model, checkpoint, path)
        parts = {
            "optimizer": self.optimizer.load_state_dict,
            "scaler": self.scaler.load_state_dict,
            "rng": torch.set_rng_state,
        }
        for name, load in parts.items():
            try:
                load(checkpoint[name])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{path}: its {name} state does not fit this run ({err})") from None
        ema = self.updates.ema
        if ema is not None and "ema" in checkpoint:  # else the average starts from the resumed weights
            load_model_weights(ema.module, checkpoint, path, key="ema")
            ema.n_averaged.fill_(int(checkpoint["ema_updates"]))


def build_model(
    settings: ModelSettings, in_channels: int, num_classes: int, runtime: Runtime
) -> tuple[nn.Module, nn.Module]:
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped)."""
    model = ResidualAttnUNet(in_channels, num_classes, settings.widths, settings.dropout)
    model.grad_checkpoint = settings.grad_checkpoint
    if settings.sync_bn:
        if runtime.device.type != "cuda" or not runtime.ddp.enabled:
            raise UserError("--sync-bn needs a torchrun job on CUDA GPUs (SyncBatchNorm does not run on the CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device, memory_format=runtime.memory_format)
    step_model = torch.compile(model) if settings.compile else model
    if runtime.ddp.enabled:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        step_model = DistributedDataParallel(step_model, device_ids=device_ids)
    return model, step_model


def check_memory(training: Training, settings: TrainSettings, runtime: Runtime) -> str:
    """memory.check_training_memory for a step at the chosen batch and size: a one-line error if it cannot fit."""
    return check_training_memory(
        training.model,
        training.loss_fn,
        runtime,
        batch_size=settings.samples.batch_size,
        side=settings.samples.side,
        size_flag="--crop-size" if settings.samples.crop_size else "--image-size",
        grad_checkpoint=settings.model.grad_checkpoint,
    )


def build_training(settings: TrainSettings, train_set: SegmentationFolder, runtime: Runtime) -> Training:
    optim = settings.optim
    channels = train_set.reading.channels
    model, step_model = build_model(settings.model, channels, train_set.num_classes, runtime)
    optimizer = build_optimizer(model, optim.lr, runtime.device, name=optim.optimizer, weight_decay=optim.weight_decay)
    class_weights = train_set.class_weights.to(runtime.device)
    loss_fn = build_loss(optim.loss, class_weights, dice_weight=optim.dice_weight, ce_weight=optim.ce_weight)
    ema = ema_model(model, optim.ema) if optim.ema else None
    return Training(
        model=model,
        step_model=step_model,
        optimizer=optimizer,
        scaler=runtime.grad_scaler(),
        loss_fn=loss_fn.to(runtime.device),
        updates=UpdateRule(accumulate=optim.accumulate, clip_grad=optim.clip_grad, ema=ema),
        colour=train_set.transform.colour,
        compiled=settings.model.compile,
    )


def validation_sampling(samples: SampleSettings) -> Sampling:
    """What inference.py will do with this model by default, unless --val-mode says otherwise."""
    sampling = Sampling.for_training(samples.image_size, samples.crop_size, samples.base_size)
    return replace(sampling, mode=samples.val_mode) if samples.val_mode else sampling


def time_budget(
    settings: TrainSettings, val_set: SegmentationFolder, steps_per_epoch: int, started: float
) -> TimeBudget:
    """--time-budget's plan, with a validation's cost estimated from its pixels until the first is timed."""
    samples = settings.samples
    side = samples.crop_size or samples.image_size
    if validation_sampling(samples).mode == "resize":
        pixels = len(val_set) * samples.image_size**2
    else:
        pixels = float(val_set.class_counts.sum())  # labelled pixels: about every pixel of the images
    steps = TimeBudget.validation_cost(pixels, samples.batch_size * side**2)
    return TimeBudget(settings.optim.time_budget * 60, started, steps_per_epoch, validation_steps=steps)
