"""Where and how tensors run, which every script shares: the device, the precision, the torchrun job (Runtime),
the CPU allocator setting, seeding, and the class colours every picture uses."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import random
import signal
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError

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


def first_line(err: BaseException) -> str:
    """An exception's first line for a one-line error (libraries raise pages); its type where it has no text."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (whose malloc the two functions below tune), else None. Looked up once:
    find_library runs ldconfig, and release_freed_cpu_memory is called after every large image."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_cpu_memory(device: torch.device) -> bool:
    """On the CPU, keep freed memory in the heap instead of handing it back to the OS after every tensor.

    PyTorch's CPU allocator does not cache, and glibc serves each block over 32 MB with a fresh
    mmap, so every large activation page-faults in anew on every step. Keeping freed blocks (as
    jemalloc or tcmalloc would) made a CPU training step about 1.6x and the inference forward about
    1.5x faster on the machine in the README, for 30-45% more peak memory. False, and nothing
    changed, on other devices or where the C library is not glibc (macOS, Windows, musl).
    """
    libc = glibc() if device.type == "cpu" else None
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def release_freed_cpu_memory(device: torch.device) -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim) between phases that do not share it:
    after keep_freed_cpu_memory, a large image's stitching leaves up to 1 GB free in the main heap, which the
    threads that write its files (each with a heap of its own) cannot use. A no-op off the CPU or without glibc."""
    libc = glibc() if device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively here: a CUDA GPU that supports it, a CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 where the hardware runs it natively, fp32 elsewhere; fp16 only on CUDA."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU (it relies on a GradScaler); use bf16 or fp32")
    return name


def precision_reason(precision: str, device: torch.device) -> str:
    """Why resolve_precision's auto chose what it did, for the start-up line."""
    if device.type == "cuda":
        return "this GPU runs bf16" if precision == "bf16" else "this GPU has no bf16"
    if precision == "bf16":
        return "this CPU has native bf16 (AVX-512 BF16 or AMX)"
    return "this CPU has no native bf16 (AVX-512 BF16 or AMX), where emulated bf16 is slower than fp32"


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: device, precision, memory format and the torchrun job, passed as one."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    ddp: Distributed = Distributed()

    @classmethod
    def from_flags(
        cls,
        device: str,
        precision: str,
        channels_last: bool | None,
        dist_timeout: float | None = None,
    ):
        """Resolves auto choices: the device, and the precision by its rule (bf16 where native). channels_last None
        is NHWC until train.py and inference.py replace it by what they measure (tuning.py); with dist_timeout,
        joins the torchrun job when one is running."""
        if dist_timeout is None:
            resolved, ddp = resolve_device(device), Distributed()
        else:
            ddp, resolved = init_distributed(device, dist_timeout)
        precision = resolve_precision(precision, resolved)
        return cls(resolved, precision, True if channels_last is None else channels_last, ddp)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; bf16 and fp32 keep fp32's exponent range."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def describe(self) -> str:
        return f"{self.device.type}, {self.precision}, {'channels_last' if self.channels_last else 'NCHW'}"


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
