"""Helpers train.py and inference.py share: device, seeding, checkpoint I/O, colours."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

# Fixed palette so a class keeps its colour across runs, panels and overlays.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
        [170, 255, 195],
        [128, 128, 0],
        [255, 215, 180],
        [0, 0, 128],
        [128, 128, 128],
    ],
    dtype=np.uint8,
)
IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.uint8)


class UserError(Exception):
    """A mistake in flags, paths or files: reported as one line on stderr with exit status 2."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage dump: the mistake is the whole message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a script's main(); user mistakes become one line on stderr and exit status 2."""
    try:
        return main() or 0
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        message = str(err).strip()
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep its last line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        return 2


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return torch.device(name)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job; a plain `python train.py` is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, value):
        """Rank 0's value on every rank (for what each rank would otherwise choose on its own)."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def init_distributed(device_name: str, timeout_s: float) -> tuple[Distributed, torch.device]:
    """Join the torchrun job when its variables are set: gloo on CPUs, nccl with one GPU per process.

    The timeout makes a rank whose peer died fail instead of waiting for it for ever.
    """
    device = resolve_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(), device
    ddp = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return ddp, device


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work runs several times faster than fp32 there."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters, from malloc.h


def keep_freed_cpu_memory(device: torch.device) -> bool:
    """On the CPU, keep freed memory in the heap instead of handing it back to the OS after every tensor.

    PyTorch's CPU allocator does not cache, and glibc serves each block over 32 MB with a fresh
    mmap, so every large activation page-faults in anew on every step. Keeping freed blocks (as
    jemalloc or tcmalloc would) made a CPU training step about 1.6x and the inference forward about
    1.5x faster on the machine in the README, for 30-45% more peak memory. False, and nothing
    changed, on other devices or where the C library has no mallopt (macOS, Windows, musl).
    """
    if device.type != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where the hardware runs it natively, fp32 elsewhere; fp16 only on CUDA."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (it relies on a GradScaler); use bf16 or fp32")
    return name


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: NumPy and random follow torch's per-worker seed; Ctrl-C is the main process's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def colours(num_classes: int) -> np.ndarray:
    """num_classes RGB colours: the fixed palette, then seeded random ones."""
    if num_classes <= len(PALETTE):
        return PALETTE[:num_classes]
    extra = np.random.default_rng(0).integers(0, 256, (num_classes - len(PALETTE), 3), dtype=np.uint8)
    return np.concatenate([PALETTE, extra])


def colourise(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ignored pixels white."""
    table = np.tile(IGNORE_COLOUR, (256, 1))
    table[:num_classes] = colours(num_classes)
    return table[labels.astype(np.int64).clip(0, 255)]


@contextlib.contextmanager
def replace_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside path, renamed onto path once written: a crash or a kill never
    leaves a half-written file, and a failed write leaves no temporary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict, path: Path) -> None:
    with replace_atomically(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """weights_only=True: a checkpoint from elsewhere can hold tensors and plain data, never code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated, foreign or unsafe files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by train.py")
    return state
