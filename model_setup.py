"""train.py's model and what steps it (engine.Training), from the settings: the network (compiled, DDP-wrapped), the
optimiser, the loss, the weight average, the colour stage; and the memory check of one step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataset import SegmentationFolder
from engine import Training, example_batch, train_step
from errors import UserError
from instances import SEPARATION_CHANNELS
from losses import build_loss
from memory import check_training_memory
from model import ResidualAttnUNet
from optimizer import UpdateRule, build_optimizer, ema_model
from settings import ModelSettings, TrainSettings
from tuning import Candidate, Measured, candidates, fastest, timed, with_choice
from utils import Runtime


def build_model(
    settings: ModelSettings, in_channels: int, num_classes: int, runtime: Runtime, extra_outputs: int = 0
) -> tuple[nn.Module, nn.Module]:
    """The model to save (plain) and the one to step (compiled and/or DDP-wrapped); extra_outputs: a separation
    head's (instances)."""
    model = ResidualAttnUNet(in_channels, num_classes, settings.widths, settings.dropout, extra_outputs)
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
    extra = SEPARATION_CHANNELS if train_set.separation else 0
    model, step_model = build_model(settings.model, channels, train_set.num_classes, runtime, extra)
    optimizer = build_optimizer(model, optim.lr, runtime.device, name=optim.optimizer, weight_decay=optim.weight_decay)
    class_weights = train_set.class_weights.to(runtime.device)
    weights = dict(dice_weight=optim.dice_weight, ce_weight=optim.ce_weight)
    loss_fn = build_loss(
        optim.loss, class_weights, **weights, separation=train_set.separation, num_classes=train_set.num_classes
    )
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


def measured_runtime(
    settings: TrainSettings, train_set: SegmentationFolder, runtime: Runtime
) -> tuple[Runtime, Measured]:
    """The precision and layout (where --precision and --channels-last leave them open) whose training step is
    fastest here, timed on a throwaway copy of the run's model, loss and optimiser at its batch and sample size
    (tuning.py); rank 0 measures, every rank runs its choice."""
    extra = SEPARATION_CHANNELS if train_set.separation else 0
    config = dict(in_channels=train_set.reading.channels, num_classes=train_set.num_classes)
    config.update(widths=settings.model.widths, extra_outputs=extra)
    weights = train_set.class_weights.to(runtime.device)

    def make_loss() -> nn.Module:
        loss = build_loss(
            settings.optim.loss, weights, separation=train_set.separation, num_classes=config["num_classes"]
        )
        return loss.to(runtime.device)

    choices = candidates(runtime, settings.run.precision, settings.run.channels_last)
    samples = settings.samples
    measured = None
    if runtime.ddp.is_main:
        measured = fastest_training_step(runtime, choices, config, make_loss, samples.batch_size, samples.side)
    measured = runtime.ddp.broadcast(measured)
    return with_choice(runtime, measured.chosen), measured


def fastest_training_step(
    runtime: Runtime, choices: list[Candidate], config: dict, make_loss: Callable[[], nn.Module], batch: int, side: int
) -> Measured:
    """tuning.fastest over choices, each timed on a fresh model of config (ResidualAttnUNet's arguments), a fresh
    loss and optimiser, and a random batch of batch x side x side: what start-up and bench.py's default row run."""

    def seconds_per_step(choice: Candidate) -> float:
        trial = with_choice(runtime, choice)
        # Its own random numbers: the run's weights and samples are the same however many candidates were timed.
        with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
            model = ResidualAttnUNet(**config).to(runtime.device, memory_format=trial.memory_format).train()
            images, masks = example_batch(model.config, batch, side, trial)
            parts = dict(loss_fn=make_loss(), optimizer=build_optimizer(model, 1e-4, runtime.device))
            parts.update(scaler=trial.grad_scaler(), runtime=trial)
            return timed(lambda: train_step(model, images, masks, **parts), runtime.device)

    return fastest(choices, seconds_per_step)
