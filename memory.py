"""Will a training step fit in memory? Measure small steps, extrapolate, compare with what is free, so a
run that cannot fit stops with a message before it starts, never by the kernel's OOM killer."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import example_batch, train_step
from errors import UserError
from optimizer import build_optimizer
from utils import Runtime

HEADROOM = 0.85  # the share of the available memory a run may plan to use; the rest is for loaders and noise
GIB = 2**30


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                return int(limit) - int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a step could still take: free GPU memory on CUDA; on the CPU the kernel's MemAvailable, or the
    cgroup limit's room if smaller. None where neither can be read (the check is then skipped)."""
    if device.type == "cuda":
        return (
            torch.cuda.mem_get_info(device)[0]
            + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device)
        )
    room = [r for r in (_proc_kib("/proc/meminfo", "MemAvailable"), _cgroup_room()) if r is not None]
    return min(room) if room else None


class PeakMemory:
    """This process's memory high-water mark since reset(): CUDA's allocator statistics, or on the CPU the
    kernel's VmHWM, which writing 5 to /proc/self/clear_refs resets to the current RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return _proc_kib("/proc/self/status", "VmHWM") is not None

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_kib("/proc/self/status", "VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_kib("/proc/self/status", "VmHWM") or 0


@dataclass
class StepMemory:
    """A training step's memory: fixed bytes (gradients, optimiser state, workspace) + bytes per sample-pixel."""

    fixed: float
    per_pixel: float

    def bytes_for(self, batch: int, pixels: int) -> float:
        return self.fixed + self.per_pixel * batch * pixels

    def largest_batch(self, pixels: int, budget: float) -> int:
        return max(0, int((budget - self.fixed) // max(self.per_pixel * pixels, 1)))


def probe_step(step: Callable[[int], None], device: torch.device, side: int) -> StepMemory | None:
    """Peak memory of step(n) (one training step on 2 images of n x n) at side and 2 x side, after a warm-up
    step at side / 2 that allocates the optimiser state (the first step puts it where activations were freed,
    so only later peaks hold both). Freed memory stays in the heap and is reused, so each high-water mark
    is that step's peak over the same starting point. None where peaks cannot be read."""
    peak = PeakMemory(device)
    if not peak.reset():
        return None
    start = peak.current()
    step(side // 2)
    peaks = []
    for size in (side, 2 * side):
        step(size)
        peaks.append(peak.peak() - start)
    pixels = [2 * side**2, 2 * (2 * side) ** 2]
    per_pixel = max((peaks[1] - peaks[0]) / (pixels[1] - pixels[0]), 0.0)
    return StepMemory(fixed=max(peaks[0] - per_pixel * pixels[0], 0.0), per_pixel=per_pixel)


def measure_training_step(model: torch.nn.Module, loss_fn: torch.nn.Module, runtime: Runtime) -> StepMemory | None:
    """Real training steps on copies of the model and a fresh optimiser, so the run itself is untouched."""
    probe_model = copy.deepcopy(model).train()
    optimizer = build_optimizer(probe_model, 1e-4, runtime.device)

    def step(side: int) -> None:
        images, masks = example_batch(probe_model.config, 2, side, runtime)
        parts = dict(loss_fn=loss_fn, optimizer=optimizer, scaler=runtime.grad_scaler(), runtime=runtime)
        train_step(probe_model, images, masks, **parts)

    side = max(64, 2 * probe_model.stride)  # whole multiples of the stride: no padding in the probe
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        measured = probe_step(step, runtime.device, side)
    return measured  # the copies' memory, freed on return, stays cached for the run to reuse


def check_fits(
    memory: StepMemory, *, batch_size: int, side: int, available: int, size_flag: str, grad_checkpoint: bool
) -> str:
    """A one-line error naming what would fit, if a step of batch_size side x side images would not; else
    a line saying what the step needs."""
    budget, need = HEADROOM * available, memory.bytes_for(batch_size, side * side)
    if need <= budget:
        return f"a training step needs about {need / GIB:.1f} GiB of the {available / GIB:.1f} GiB available"
    largest = memory.largest_batch(side * side, budget)
    remedies = [f"--batch-size {largest}"] if largest else []
    remedies += [] if grad_checkpoint else ["--grad-checkpoint"]
    remedies.append(f"a smaller {size_flag}")
    raise UserError(
        f"--batch-size {batch_size} at {side} px needs about {need / GIB:.1f} GiB per training step, "
        f"{available / GIB:.1f} GiB is available: use " + " or ".join(remedies)
    )


def check_training_memory(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    runtime: Runtime,
    *,
    batch_size: int,
    side: int,
    size_flag: str,
    grad_checkpoint: bool,
) -> str:
    """Stop before the first epoch if a step of batch_size side x side inputs would not fit; else say what it needs."""
    available = available_bytes(runtime.device)
    measured = None if available is None else measure_training_step(model, loss_fn, runtime)
    if measured is None:
        return "memory not checked (no peak-memory counter here)"
    if runtime.device.type == "cpu":
        available //= runtime.ddp.world_size  # the ranks share the machine's memory
    return check_fits(
        measured,
        batch_size=batch_size,
        side=side,
        available=available,
        size_flag=size_flag,
        grad_checkpoint=grad_checkpoint,
    )
