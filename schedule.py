"""How long a run lasts and when it validates: the epoch plan (the horizon the learning-rate schedule spans, the
validation interval), each epoch's pace through its steps, the wall-clock --time-budget and --val-every auto, with
their constants. Decided once a few steps are timed and again after every epoch, the same on every rank."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from optimizer import scheduled_lr
from settings import OptimSettings
from utils import Runtime

FINISH_RESERVE = 0.01  # of a time budget, kept for what follows the last epoch (the report, curves, closing files)
FINISH_RESERVE_SECONDS = 5.0  # ...or this, whichever is more: the last epoch's figures and the curves on a slow CPU
VALIDATION_SHARE = 0.1  # --val-every auto: validation takes at most this share of a run
FORWARD_SHARE = 1 / 3  # a forward pass's share of a training step (backward costs about twice the forward)
FIRST_PLAN_STEP = 4  # a time budget's first plan: after this many steps of the first epoch (the first is not timed)


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
    planned_bookkeeping: float = 0.0  # what the plan in force assumed of it

    @property
    def finish(self) -> float:
        """When the last epoch must be done, as the plans see it: the budget less what the final report is kept."""
        return self.started + self.seconds - self._reserve

    @property
    def deadline(self) -> float:
        """When an epoch is cut short whatever the plan: half of the final report's reserve may go to what no plan
        could see coming (a numbered epoch's figures, written after the plan that made the next epoch the last)."""
        return self.started + self.seconds - self._reserve / 2

    @property
    def _reserve(self) -> float:
        return max(self.seconds * FINISH_RESERVE, FINISH_RESERVE_SECONDS)

    @staticmethod
    def validation_cost(validation_pixels: float, step_pixels: float) -> float:
        """validation_steps from the pixels a validation and a training step see: the network's forward pass over
        every validation pixel, at FORWARD_SHARE of a training step's cost per pixel."""
        return validation_pixels / max(step_pixels, 1) * FORWARD_SHARE

    def out_of_time(self, epoch_seconds: float, steps: int) -> bool:
        """During an epoch, after `steps` steps: True once one more step and the last validation would end past the
        deadline, so an epoch longer than the whole budget (slow hardware, large epochs) is cut short. It checks the
        plan's pace, with the bookkeeping the plan assumed."""
        step = epoch_seconds / max(steps, 1)
        return time.monotonic() + step + self._validation(step) + self.planned_bookkeeping > self.deadline

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
        self.planned_bookkeeping = self.bookkeeping
        left = self.finish - time.monotonic() - validation - self.bookkeeping  # the last epoch's are kept
        per_epoch = epoch_seconds + validation / val_every + self.bookkeeping
        steps = round(done * self.steps_per_epoch) + math.floor(max(0.0, left / per_epoch) * self.steps_per_epoch)
        return steps / self.steps_per_epoch


@dataclass(frozen=True)
class Plan:
    """What a run decides as it goes, recorded beside its settings: the horizon, the epochs the learning-rate
    schedule spans (planned again as a --time-budget's clock runs, and fractional where the budget ends the run
    partway through an epoch), and the validation interval (--val-every auto: every epoch until the first
    validation is timed, then chosen from its cost)."""

    horizon: float
    val_every: int
    interval_pending: bool = False  # --val-every auto, before its first validation

    @classmethod
    def start(cls, epochs: int, val_every: int | str) -> Plan:
        """The plan before anything is timed, from --epochs and --val-every (where its auto becomes the interval the
        run validates at, and the fact that it is still to be chosen)."""
        pending = val_every == "auto"
        return cls(float(epochs), 1 if pending else val_every, interval_pending=pending)

    @property
    def epochs(self) -> int:
        return math.ceil(self.horizon - 1e-9)

    def steps(self, epoch: int, steps_per_epoch: int) -> int:
        """The epoch's steps: all of them but in a last epoch that the horizon ends partway through."""
        return min(steps_per_epoch, round((self.horizon - (epoch - 1)) * steps_per_epoch))

    def validates(self, epoch: int) -> bool:
        """Every val_every-th epoch and the last."""
        return epoch % self.val_every == 0 or epoch == self.epochs


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
                horizon = self.runtime.ddp.broadcast(self.budget.first_plan(done, step, self.plan.val_every))
                self.plan = replace(self.plan, horizon=horizon)
        if done >= self.plan.steps(self.epoch, self.steps):
            return True
        return self.budget is not None and self.budget.out_of_time(seconds, done)


def next_plan(
    plan: Plan,
    budget: TimeBudget | None,
    epoch: int,
    train_seconds: float,
    validation_seconds: float | None,
    *,
    runtime: Runtime,
    cut: bool = False,
) -> tuple[Plan, list[str]]:
    """After an epoch: the validation interval (--val-every auto, from the first validation's cost) and the
    horizon a --time-budget fits now, each the same on every rank; and a line for each that changed.
    validation_seconds: this epoch's validation (None: not validated). cut: this epoch ended before the loader's end
    (the horizon or the budget's clock, agreed by every rank), which makes it the last."""
    val_every, horizon, said = plan.val_every, plan.horizon, []
    if plan.interval_pending:
        val_every = runtime.ddp.broadcast(validation_interval(train_seconds, validation_seconds))
        said.append(
            f"--val-every auto: {f'every {val_every} epochs' if val_every > 1 else 'every epoch'} "
            f"(training {train_seconds:.1f} s, validation {validation_seconds:.1f} s an epoch)"
        )
    if budget is not None and cut:
        said.append(f"--time-budget {budget.seconds / 60:g} min: epoch {epoch} cut short, the last")
        return Plan(epoch, val_every), said
    if budget is not None:
        horizon = runtime.ddp.broadcast(budget.epochs_that_fit(epoch, train_seconds, validation_seconds, val_every))
        if epoch == 1 or horizon != plan.horizon:
            said.append(
                f"--time-budget {budget.seconds / 60:g} min: {horizon:.4g} epochs fit (planned after epoch {epoch})"
            )
    return Plan(horizon, val_every), said


def time_budget(
    minutes: float, started: float, steps_per_epoch: int, *, validation_pixels: float, step_pixels: int
) -> TimeBudget:
    """--time-budget's plan, with a validation's cost estimated from the pixels it and a training step see until the
    first validation is timed."""
    steps = TimeBudget.validation_cost(validation_pixels, step_pixels)
    return TimeBudget(minutes * 60, started, steps_per_epoch, validation_steps=steps)


def validation_reason() -> str:
    """Why --val-every auto waits, for the start-up line."""
    return f"after the first validation (at most {VALIDATION_SHARE:.0%} of the run)"


def budget_reason(minutes: float) -> str:
    """What a --time-budget plans, for the start-up line."""
    return (
        f"as many as fit in {minutes:g} min, to the step (planned after {FIRST_PLAN_STEP} steps, again after every "
        "epoch; the learning-rate schedule spans them)"
    )
