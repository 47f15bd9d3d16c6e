"""How bench.py measures: each row in a fresh process, wall time with the device synchronised, peak memory, and
the matrix-multiply rate that rows are compared with."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import torch

from memory import PeakMemory


def isolated(function, *args):
    """Run in a fresh process: its peak memory and allocator settings are its own, and no row warms the next."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def timer(device: torch.device, result: dict):
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    result["seconds"] = time.perf_counter() - started


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA; on the CPU, the process's peak RSS (VmHWM: getrusage's ru_maxrss would count the
    RSS of the parent bench.py process at the fork that spawned this row's)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return PeakMemory(device).peak() / 2**20


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 8) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    timing = {}
    with timer(device, timing):
        for _ in range(repeats):
            a @ b
    return 2 * n**3 * repeats / timing["seconds"] / 1e9
