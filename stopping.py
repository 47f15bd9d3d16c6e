"""When training stops: a wall-clock budget, SIGINT/SIGTERM, no progress (early stopping), a non-finite loss."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch

from utils import Runtime

FINISH_RESERVE = 0.01  # of a time budget, kept for what follows the last epoch (the report, curves, closing files)
FINISH_RESERVE_SECONDS = 5.0  # ...or this, whichever is more: the last epoch's figures and the curves on a slow CPU
VALIDATION_SHARE = 0.1  # --val-every auto: validation takes at most this share of a run
FORWARD_SHARE = 1 / 3  # a forward pass's share of a training step (backward costs about twice the forward)


def validation_interval(train_seconds: float, validation_seconds: float) -> int:
    """--val-every auto: validating every k epochs costs v / (k t + v) of the run (t: an epoch's training, v: a
    validation); the smallest k that keeps that within VALIDATION_SHARE. 1 where validation is cheap."""
    needed = (1 - VALIDATION_SHARE) / VALIDATION_SHARE * validation_seconds / max(train_seconds, 1e-3)
    return max(1, math.ceil(needed - 1e-9))


@dataclass
class TimeBudget:
    """--time-budget: how far the run's schedule reaches in a wall-clock budget, in epochs to the step, planned
    once a few steps of the first epoch are timed and again after every epoch at the pace of the recent epochs
    (the slower of the last two, so epochs that slow down are caught after one). The run ends within the budget,
    and the schedule, a function of the epochs done and of that horizon, still reaches its end: a last epoch that
    does not fit whole is planned as far as it fits."""

    seconds: float
    started: float  # time.monotonic() when the run started: data scans and model building count too
    steps_per_epoch: int = 1
    validation_steps: float = 0.0  # a validation's cost in training steps, estimated until one has been timed
    recent: list[float] = field(default_factory=list)  # the last epochs' training seconds
    validation: float = 0.0  # the last validation's seconds (0: none timed yet)
    bookkeeping: float = 0.0  # the last epoch's seconds neither training nor validating: checkpoints, figures

    @property
    def finish(self) -> float:
        """When the last epoch must be done: the budget less what the final report is kept."""
        return self.started + self.seconds - max(self.seconds * FINISH_RESERVE, FINISH_RESERVE_SECONDS)

    @staticmethod
    def validation_cost(validation_pixels: float, step_pixels: float) -> float:
        """validation_steps from the pixels a validation and a training step see: the network's forward pass over
        every validation pixel, at FORWARD_SHARE of a training step's cost per pixel."""
        return validation_pixels / max(step_pixels, 1) * FORWARD_SHARE

    def out_of_time(self, epoch_seconds: float, steps: int) -> bool:
        """During an epoch, after `steps` steps: True once one more step and the last validation would end past
        the budget, so an epoch longer than the whole budget (slow hardware, large epochs) is cut short."""
        step = epoch_seconds / max(steps, 1)
        return time.monotonic() + step + self._validation(step) + self.bookkeeping > self.finish

    def epochs_that_fit(
        self, epochs_done: int, train_seconds: float, validation_seconds: float | None = None, val_every: int = 1
    ) -> float:
        """After an epoch: the horizon, those done and as many more as fit in what is left of the budget, each
        with its share of the validations (every val_every epochs) and one more validation kept for the last.
        validation_seconds: this epoch's validation, None where it was not validated."""
        self.recent = [*self.recent[-1:], train_seconds]
        self.validation = self.validation if validation_seconds is None else validation_seconds
        return self._fit(epochs_done, max(*self.recent, 1e-3), val_every)

    def first_plan(self, steps_done: int, step_seconds: float, val_every: int = 1) -> float:
        """During the first epoch: the horizon at the pace of its steps so far (step_seconds, timed after the
        first step, which may hold compilation), so the schedule spans the run from its start."""
        return self._fit(steps_done / self.steps_per_epoch, step_seconds * self.steps_per_epoch, val_every)

    def _validation(self, step_seconds: float) -> float:
        return self.validation or self.validation_steps * step_seconds

    def _fit(self, done: float, epoch_seconds: float, val_every: int) -> float:
        validation = self._validation(epoch_seconds / self.steps_per_epoch)
        left = self.finish - time.monotonic() - validation - self.bookkeeping  # the last epoch's are kept
        per_epoch = epoch_seconds + validation / val_every + self.bookkeeping
        steps = round(done * self.steps_per_epoch) + math.floor(max(0.0, left / per_epoch) * self.steps_per_epoch)
        return steps / self.steps_per_epoch


class NonFiniteLoss(RuntimeError):
    pass


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once. A time budget
    running out ends the epoch after the current step too (out_of_time), but the run then finishes as planned."""

    def __init__(self):
        self.signum: int | None = None
        self.out_of_time = False
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

    def agreed(self, runtime: Runtime, out_of_time: bool = False) -> bool:
        """Whether to end the epoch after this step (a signal, or this rank's time budget out_of_time). Under DDP
        every rank stops after the same step, or one would wait for the others for ever."""
        requested = self.requested
        if runtime.ddp.enabled:
            flags = torch.tensor([float(requested), float(out_of_time)], device=runtime.device)
            runtime.ddp.all_reduce_sum(flags)
            requested, out_of_time = (bool(flag) for flag in flags.tolist())
            if requested and self.signum is None:
                self.signum = signal.SIGTERM
        self.out_of_time = self.out_of_time or out_of_time
        return requested or out_of_time

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class EarlyStopping:
    """Counts validations without a better mIoU; patience 0 never stops."""

    def __init__(self, patience: int, best: float = -1.0):
        self.patience, self.best, self.epochs_without_gain = patience, best, 0

    def update(self, miou: float) -> bool:
        """Records a validation's mIoU; True if it is the best so far."""
        improved = miou > self.best
        self.best = max(self.best, miou)
        self.epochs_without_gain = 0 if improved else self.epochs_without_gain + 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.epochs_without_gain >= self.patience
