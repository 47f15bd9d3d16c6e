"""What the training loop does: one optimiser step, one pass over the training data, one validation pass;
when it stops (signals, early stopping, a non-finite loss)."""

from __future__ import annotations

import signal
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from labels import IGNORE_INDEX
from metrics import ConfusionMatrix
from predictor import Predictor
from utils import Runtime

PANEL_SAMPLES = 4  # validation images kept for the sample panel


def build_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The reference design's Adam; the fused kernel where PyTorch has one."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cuda", "cpu"))


class NonFiniteLoss(RuntimeError):
    pass


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> GracefulStop:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, runtime: Runtime) -> bool:
        """Under DDP every rank stops after the same step, or one would wait for the others for ever."""
        if not runtime.ddp.enabled:
            return self.requested
        flag = torch.tensor(float(self.requested), device=runtime.device)
        runtime.ddp.all_reduce_sum(flag)
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM
        return bool(flag.item())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class EarlyStopping:
    """Counts epochs without a better validation mIoU; patience 0 never stops."""

    def __init__(self, patience: int, best: float = -1.0):
        self.patience, self.best, self.epochs_without_gain = patience, best, 0

    def update(self, miou: float) -> bool:
        """Records an epoch's mIoU; True if it is the best so far."""
        improved = miou > self.best
        self.best = max(self.best, miou)
        self.epochs_without_gain = 0 if improved else self.epochs_without_gain + 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.epochs_without_gain >= self.patience


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
) -> torch.Tensor:
    """Forward in the chosen precision, loss in fp32, backward, update; the loss stays on the device."""
    with runtime.autocast():
        logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    epoch: int,
    stop: GracefulStop,
    time_first_step: bool = False,
) -> tuple[float, list[str]]:
    """One pass over the sampler; returns the mean loss and the bad samples that were skipped.

    time_first_step: say how long the first step took, which with --compile holds the compilation.
    """
    model.train()
    total_loss = torch.zeros((), device=runtime.device)
    first_bad_step = torch.zeros((), dtype=torch.long, device=runtime.device)
    skipped: list[str] = []
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True, disable=not runtime.ddp.is_main)
    for steps, (images, masks, skipped_here) in enumerate(bar, 1):
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        images = images.to(runtime.device, non_blocking=True, memory_format=runtime.memory_format)
        masks = masks.to(runtime.device, non_blocking=True)
        step_started = time.perf_counter()
        loss = train_step(model, images, masks, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, runtime=runtime)
        if time_first_step and steps == 1 and runtime.ddp.is_main:
            loss.item()  # waits for the step: once per run
            tqdm.write(f"first step, torch.compile included: {time.perf_counter() - step_started:.1f} s")
        # Recorded on the device and read at log points only: no host sync per step.
        first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss), steps, first_bad_step)
        total_loss += loss
        if steps % 10 == 0 or steps == len(loader) or stop.requested:
            if first_bad_step.item():
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {first_bad_step.item()}")
            bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}")  # a host sync point
        if stop.agreed(runtime):
            break
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
) -> tuple[float, ConfusionMatrix, tuple, list[str]]:
    """Validation as inference.py sees it: each image at its original size through the same Predictor,
    so the logged mIoU is what `inference.py --masks_dir` reports. The loss is the pixel cross-entropy of
    those full-size probabilities, whichever loss trains. Returns the loss and confusion matrix over the
    whole set (all ranks), a few (image, mask, prediction) samples and the bad files."""
    matrix = ConfusionMatrix(num_classes, device=runtime.device)
    loss = PixelCrossEntropy(runtime.device)
    samples, skipped = ([], [], []), []
    bar = tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True, disable=not runtime.ddp.is_main)
    for images, masks, skipped_here in bar:
        skipped.extend(line for s in skipped_here for line in s.splitlines())
        loss.masks = masks = [mask.to(runtime.device, non_blocking=True) for mask in masks]
        preds = predictor.segment(images, on_band=loss)
        for pred, mask in zip(preds, masks, strict=True):
            matrix.update(pred, mask)
        for kept, new in zip(samples, (images, masks, preds), strict=True):
            kept.extend(item.cpu() for item in new[: PANEL_SAMPLES - len(kept)])
    matrix.reduce()
    runtime.ddp.all_reduce_sum(loss.total)
    runtime.ddp.all_reduce_sum(loss.pixels)
    return (loss.total / loss.pixels.clamp_min(1)).item(), matrix, samples, skipped
