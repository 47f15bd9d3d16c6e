"""Signals that stop training early: SIGINT/SIGTERM, no progress (early stopping), a non-finite loss. (How long a run
lasts by plan, a time budget included: schedule.py.)"""

from __future__ import annotations

import signal

import torch

from utils import Runtime


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
