"""What the training loop does: the state it steps (Training: what a checkpoint saves and --resume restores), one
optimiser step, one pass over the training data, one validation pass."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoints import DataSpec, load_model_weights, training_state
from colour import BatchColour, ColourDraws
from errors import CheckpointError
from instances import SEPARATION_LEVELS
from labels import IGNORE_INDEX
from metrics import ConfusionMatrix, InstanceScores
from optimizer import ONE_UPDATE_PER_BATCH, UpdateRule
from predictor import Predictor
from sampling import Sampling
from schedule import EpochPace
from stopping import GracefulStop, NonFiniteLoss
from utils import Runtime

log = logging.getLogger(__name__)

PANEL_SAMPLES = 4  # validation images kept for the sample panel


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
        """progress: epoch, flags, spec, best_miou, best_confusion, history (see checkpoints.training_state)."""
        return training_state(
            model=self.model, optimizer=self.optimizer, scaler=self.scaler, ema=self.updates.ema, **progress
        )

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


def example_batch(config: dict, batch: int, side: int, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and targets for a model of this config (model.config): what the probes that measure or time a
    training step feed it (an instance model's targets are class masks and separation maps, losses.InstanceLoss)."""
    images = torch.randn(batch, config["in_channels"], side, side, device=runtime.device)
    masks = torch.randint(0, config["num_classes"], (batch, side, side), device=runtime.device)
    if config.get("extra_outputs"):
        masks = torch.stack([masks, torch.randint_like(masks, 0, SEPARATION_LEVELS + 1)], 1)
    return images.contiguous(memory_format=runtime.memory_format), masks


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    updates: UpdateRule = ONE_UPDATE_PER_BATCH,
    update: bool = True,
) -> torch.Tensor:
    """Forward in the chosen precision, loss in fp32, backward; with update, the optimiser step on the
    gradients accumulated so far (clipped), then the EMA. The loss stays on the device."""
    between_updates = not update and isinstance(model, DistributedDataParallel)
    with model.no_sync() if between_updates else contextlib.nullcontext():  # all-reduce once per update
        with runtime.autocast():
            logits = model(images)
        loss = loss_fn(logits, masks)
        scaler.scale(loss / updates.accumulate).backward()
    if update:
        if updates.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), updates.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if updates.ema is not None:
            updates.ema.update_parameters(model)  # DDP and compiled wrappers list the same parameters
    return loss.detach()


class DataWait:
    """How much of an epoch the loop spent blocked on the loader. The first batch (workers starting up) is left
    out; with sync, a CUDA step is waited for, so its queued work is not counted as waiting."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync = device, sync and device.type == "cuda"
        self.waited = self.elapsed = 0.0
        self.step_done_at: float | None = None

    def batch_arrived(self) -> None:
        if self.step_done_at is not None:
            self.waited += time.perf_counter() - self.step_done_at

    def step_done(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.step_done_at is not None:
            self.elapsed += now - self.step_done_at
        self.step_done_at = now

    def describe(self, workers: int) -> str:
        share = self.waited / self.elapsed if self.elapsed else 0.0
        advice = "the step waits for data: add --workers if cores are free"
        if self.device.type == "cpu":  # the step fills the cores: a worker process would only take them from it
            advice = "the step waits for data: more --workers help only where cores sit idle"
        advice = "the loader keeps up" if share < 0.1 else advice
        return f"first epoch: {share:.0%} of the time waiting for data with --workers {workers}; {advice}"


def finish_batch(
    pixels: torch.Tensor, masks: torch.Tensor, draws: ColourDraws, *, colour: BatchColour, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch as the loader gives it (pixels before their colour stage, see SkipBadSamples' before_colour;
    uint8 masks) -> the model's input and int64 masks on the device: uint8 until here, a quarter and an eighth of
    the bytes to collate and copy."""
    images = colour(pixels.to(runtime.device, non_blocking=True), draws)
    masks = masks.to(runtime.device, non_blocking=True).long()
    return images.contiguous(memory_format=runtime.memory_format), masks


def train_one_epoch(
    training: Training,
    loader: DataLoader,
    *,
    runtime: Runtime,
    stop: GracefulStop,
    pace: EpochPace,
    first: bool = False,
) -> tuple[float, list[str]]:
    """One pass over the sampler; returns the mean loss and the bad samples that were skipped.

    pace: the epoch, each step's learning rate, and whether the epoch ends before the loader's end (the schedule's
    horizon or a time budget: stop.out_of_time tells the caller).
    first: the first epoch of this process, which says how much of the epoch waited for the loader (see DataWait)
    and, with --compile, how long the first step (the compilation) took.
    """
    model, optimizer = training.step_model, training.optimizer
    model.train()
    total_loss = torch.zeros((), device=runtime.device)
    first_bad_step = torch.zeros((), dtype=torch.long, device=runtime.device)
    skipped: list[str] = []
    steps = 0
    bar = tqdm(
        loader, desc=f"epoch {pace.epoch} train", leave=False, dynamic_ncols=True, disable=not runtime.ddp.is_main
    )
    data_wait = DataWait(runtime.device, sync=first)
    step_parts = dict(loss_fn=training.loss_fn, optimizer=optimizer, scaler=training.scaler, runtime=runtime)
    epoch_started = time.monotonic()
    for steps, (pixels, masks, draws, skipped_here) in enumerate(bar, 1):
        data_wait.batch_arrived()
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images, masks = finish_batch(pixels, masks, draws, colour=training.colour, runtime=runtime)
        pace.set_lr(optimizer, steps - 1)
        step_started = time.perf_counter()
        update = steps % training.updates.accumulate == 0 or steps == len(loader)  # a short last group still steps
        loss = train_step(model, images, masks, **step_parts, updates=training.updates, update=update)
        if first and training.compiled and steps == 1 and runtime.ddp.is_main:
            loss.item()  # waits for the step: once per run
            log.info("first step, torch.compile included: %.1f s", time.perf_counter() - step_started)
        data_wait.step_done()
        # Recorded on the device and read at log points only: no host sync per step.
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), steps, first_bad_step)
        total_loss += loss
        if steps % 10 == 0 or steps == len(loader) or stop.requested:
            if first_bad_step.item():
                raise NonFiniteLoss(f"non-finite loss at epoch {pace.epoch}, step {first_bad_step.item()}")
            bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}")  # a host sync point
        cut = steps < len(loader) and pace.ends(time.monotonic() - epoch_started, steps)
        if stop.agreed(runtime, cut):
            break
    if first and runtime.ddp.is_main:
        log.info(data_wait.describe(loader.num_workers))
    return total_loss.item() / max(steps, 1), skipped


class PixelCrossEntropy:
    """-log p(true class), summed over labelled pixels as the full-size probability bands are computed."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.pixels = torch.zeros((), device=device)
        self.masks: list[torch.Tensor] = []  # the current batch's, on the device

    def __call__(self, index: int, top: int, probs: torch.Tensor) -> None:
        truth = self.masks[index][top : top + probs.shape[1]]
        labelled = truth != IGNORE_INDEX
        picked = probs.gather(0, truth.where(labelled, 0)[None])[0]
        self.total -= picked.clamp_min(1e-12).log().where(labelled, 0).sum()
        self.pixels += labelled.sum()


@torch.inference_mode()
def evaluate(
    predictor: Predictor, loader: DataLoader, *, num_classes: int, runtime: Runtime, epoch: int
) -> tuple[float, ConfusionMatrix, tuple, list[str], InstanceScores | None]:
    """Validation as inference.py sees it: each image at its original size through the same Predictor,
    so the logged mIoU is what `inference.py --masks_dir` reports. The loss is the pixel cross-entropy of
    those full-size probabilities, whichever loss trains. Returns the loss and confusion matrix over the
    whole set (all ranks), a few (image, mask, prediction) samples, the bad files, and for a model with a
    separation head on a set with instance masks, the object scores over the images that have them."""
    matrix = ConfusionMatrix(num_classes, device=runtime.device)
    loss = PixelCrossEntropy(runtime.device)
    samples, skipped = ([], [], []), []
    objects = InstanceScores() if predictor.objects is not None else None
    bar = tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True, disable=not runtime.ddp.is_main)
    for images, masks, *instances, skipped_here in bar:  # instances: each image's ids, where the set has them
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        loss.masks = masks = [mask.to(runtime.device, non_blocking=True).long() for mask in masks]
        if objects is None or not instances:
            preds = predictor.segment(images, on_band=loss)
        else:
            found = predictor.segment_objects(images, on_band=loss)
            for truth, image_objects in zip(instances[0], found, strict=True):
                if truth is not None:
                    objects.update(truth.numpy(), image_objects.ids)
            preds = [torch.from_numpy(image_objects.labels) for image_objects in found]
        for pred, mask in zip(preds, masks, strict=True):
            matrix.update(pred, mask)
        for kept, new in zip(samples, (images, masks, preds), strict=True):
            kept.extend(item.cpu() for item in new[: PANEL_SAMPLES - len(kept)])
    matrix.reduce(runtime.ddp)
    if objects is not None:
        objects.reduce(runtime.ddp, runtime.device)
    runtime.ddp.all_reduce_sum(loss.total)
    runtime.ddp.all_reduce_sum(loss.pixels)
    return (loss.total / loss.pixels.clamp_min(1)).item(), matrix, samples, skipped, objects


def validate(
    training: Training, loader: DataLoader, *, spec: DataSpec, sampling: Sampling, runtime: Runtime, epoch: int
) -> Validation:
    """evaluate() with the EMA's weights where there is one (what best.pt's users, inference and export, will run),
    timed."""
    started = time.monotonic()
    model = training.model if training.updates.ema is None else training.updates.ema.module
    model.eval()
    predictor = Predictor.for_validation(model, spec.mapping, sampling, runtime, spec.normalization, spec.objects)
    classes = spec.mapping.num_classes
    loss, matrix, panel, skipped, objects = evaluate(
        predictor, loader, num_classes=classes, runtime=runtime, epoch=epoch
    )
    scores = matrix.compute() | (objects.compute() if objects is not None and objects.true_objects else {})
    return Validation(loss, matrix, scores, panel, skipped, time.monotonic() - started)
