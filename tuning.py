"""Start-up choices measured on the machine at hand: the memory layout (NCHW or channels_last) and the precision
(fp32, or bf16 where it runs natively) that a training step, or an inference pass, runs fastest in, timed on the real
model and batch. A rule written from one CPU (oneDNN's NHWC backward slower on one AMD EPYC) cost 12% of every step
on another; a few timed steps cost a few seconds, and a flag the user gave is never timed against."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from utils import Runtime, native_bf16

TIMED_STEPS = 2  # per candidate, after one untimed step (which allocates and picks kernels)


@dataclass(frozen=True)
class Candidate:
    precision: str
    channels_last: bool

    def __str__(self) -> str:
        return f"{self.precision} {'channels_last' if self.channels_last else 'NCHW'}"


@dataclass(frozen=True)
class Measured:
    """The candidate chosen and each candidate's seconds a step (empty where the flags left one candidate)."""

    chosen: Candidate
    seconds: dict[Candidate, float]

    def describe(self, what: str = "a step") -> str:
        """ "bf16 channels_last 0.41 s a step (measured; fp32 NCHW 0.93 s, ...)" for the start-up line."""
        if not self.seconds:
            return f"{self.chosen} (the flags left no other)"
        others = ", ".join(f"{c} {s:.3g} s" for c, s in self.seconds.items() if c != self.chosen)
        return f"{self.chosen} {self.seconds[self.chosen]:.3g} s {what} (measured; {others})"


def candidates(runtime: Runtime, precision_flag: str, channels_last_flag: bool | None) -> list[Candidate]:
    """What start-up may choose among: the precisions that run natively here (fp32 always; bf16 on GPUs and CPUs
    that have it), the two layouts; a flag the user gave fixes its dimension (--precision, --channels-last)."""
    if precision_flag != "auto":
        precisions = [runtime.precision]
    else:
        precisions = ["bf16", "fp32"] if native_bf16(runtime.device) else ["fp32"]
    layouts = [True, False] if channels_last_flag is None else [channels_last_flag]
    return [Candidate(precision, layout) for precision in precisions for layout in layouts]


def fastest(choices: list[Candidate], seconds_per_step: Callable[[Candidate], float]) -> Measured:
    """The candidate whose step takes least time (seconds_per_step times one), or the only one, untimed."""
    if len(choices) == 1:
        return Measured(choices[0], {})
    seconds = {choice: seconds_per_step(choice) for choice in choices}
    return Measured(min(seconds, key=seconds.get), seconds)


def with_choice(runtime: Runtime, choice: Candidate) -> Runtime:
    return replace(runtime, precision=choice.precision, channels_last=choice.channels_last)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds a step takes: one untimed, then the mean of TIMED_STEPS, the device synchronised around them."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / TIMED_STEPS
