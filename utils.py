"""Helpers every script shares: device, precision and where tensors run (Runtime), seeding, the torchrun
job, the CPU allocator setting, atomic writes, JSON caches keyed on files, path checks, class colours."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError, WriteError

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


def printable(text: str) -> str:
    """text with the bytes of a file name that is not valid UTF-8 (lone surrogates to Python) shown as U+FFFD, for
    the writers that need real UTF-8 (TensorBoard, YAML, folder names made from a name)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def require_folder(path: Path, flag: str = "") -> Path:
    """The one wording for a missing folder or a file where a folder belongs; flag names the option."""
    label = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise UserError(f"{label}: no such folder")
    if not path.is_dir():
        raise UserError(f"{label}: not a folder")
    return path


def refuse_inside(output: Path, inputs: Path, message: str) -> None:
    """Outputs never land inside an input folder, so inputs are never modified or read back as inputs."""
    target, source = output.resolve(), inputs.resolve()
    if target == source or source in target.parents:
        raise UserError(message)


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


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: device, precision, memory format and the torchrun job, passed as one."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    ddp: Distributed = Distributed()

    @classmethod
    def from_flags(cls, device: str, precision: str, channels_last: bool, dist_timeout: float | None = None):
        """Resolves auto choices; with dist_timeout, joins the torchrun job when one is running."""
        if dist_timeout is None:
            resolved, ddp = resolve_device(device), Distributed()
        else:
            ddp, resolved = init_distributed(device, dist_timeout)
        return cls(resolved, resolve_precision(precision, resolved), channels_last, ddp)

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


def _fsync_folder(folder: Path) -> None:
    """Makes a rename inside folder survive a power cut; some systems cannot sync a folder, which is fine there."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replace_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside path, renamed onto path once written and synced to disk.

    A crash, a kill or a power cut leaves the old file or the new one under path, never a half-written or
    empty one. A failing write (disk full, read-only, no permission) raises WriteError naming path and the
    cause, leaves the old file as it was, and no temporary behind.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def files_key(paths: list[Path], *settings) -> str:
    """A digest of the files' names, sizes and modification times and of the settings a result depends on: a
    cache key that changes when any of them does. Names are hashed as the bytes on disk, so a name that is not
    valid UTF-8 hashes too."""
    digest = hashlib.sha256(repr(settings).encode())
    for path in paths:
        stat = path.stat()
        digest.update(os.fsencode(path.name) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())  # bytes-safe
    return digest.hexdigest()


def read_json_cache(path: Path, key: str):
    """The value cached under key in path; None if the file is missing, unreadable or holds another key."""
    try:
        cached = json.loads(path.read_text())
        return cached["value"] if cached.get("key") == key else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def write_json_cache(path: Path, key: str, value) -> None:
    """A cache that cannot be written (a read-only data folder) only costs the next run the work again."""
    try:
        with replace_atomically(path) as tmp:
            tmp.write_text(json.dumps({"key": key, "value": value}))
    except WriteError:
        logging.getLogger(__name__).info("%s: cannot write this cache; the next run computes it again", path)
