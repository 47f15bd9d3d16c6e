"""When training stops: a wall-clock budget, SIGINT/SIGTERM, no progress (early stopping), a non-finite loss."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field

import torch

from utils import Runtime

FINISH_RESERVE = 0.01  # of a time budget, kept for what follows the last epoch (the report, curves, closing files)
VALIDATION_SHARE = 0.1  # --val-every auto: validation takes at most this share of a run


def validation_interval(train_seconds: float, validation_seconds: float) -> int:
    """--val-every auto: validating every k epochs costs v / (k t + v) of the run (t: an epoch's training, v: a
    validation); the smallest k that keeps that within VALIDATION_SHARE. 1 where validation is cheap."""
    needed = (1 - VALIDATION_SHARE) / VALIDATION_SHARE * validation_seconds / max(train_seconds, 1e-3)
    return max(1, math.ceil(needed - 1e-9))


@dataclass
class TimeBudget:
    """--time-budget: the epochs that fit in a wall-clock budget, planned again after every epoch at the pace of
    the recent epochs (the slower of the last two, so epochs that slow down are caught after one). The run ends
    within the budget, and the schedule, a function of the epoch and of the planned epochs, still reaches its
    end: the last epoch is always planned as the last."""

    seconds: float
    started: float  # time.monotonic() when the run started: data scans and model building count too
    recent: list[float] = field(default_factory=list)  # the last epochs' training seconds
    validation: float = 0.0  # the last validation's seconds

    def epochs_that_fit(
        self, epochs_done: int, train_seconds: float, validation_seconds: float | None = None, val_every: int = 1
    ) -> int:
        """The run's epochs: those done and as many more as fit in what is left of the budget, each with its
        share of the validations (every val_every epochs) and one more validation kept for the last epoch.
        validation_seconds: this epoch's validation, None where it was not validated."""
        self.recent = [*self.recent[-1:], train_seconds]
        self.validation = self.validation if validation_seconds is None else validation_seconds
        left = self.seconds * (1 - FINISH_RESERVE) - (time.monotonic() - self.started) - self.validation
        per_epoch = max(*self.recent, 1e-3) + self.validation / val_every
        return epochs_done + max(0, int(left // per_epoch))


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
