"""bench.py's large part: photos far larger than the training crop through an 81-class crop-trained model, as
inference.py runs them (sliding tiles), against the tiling used until 2026-12 and against resizing: seconds per
photo, forward passes, achieved GFLOP/s against the matmul rate, and peak memory, which must not grow with
height x width x classes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.data import write_checkpoint, write_photo
from benchmarks.measure import isolated, matmul_gflops, peak_memory_mb, timer
from checkpoints import inference_network, load_checkpoint, training_flags
from listing import list_images
from predictions import Outputs, segment_folder
from predictor import Predictor
from sampling import Sampling
from utils import PRECISION_DTYPES, Runtime, keep_freed_cpu_memory, resolve_precision

log = logging.getLogger(__name__)

LARGE_CLASSES = 81  # COCO's categories (--coco-mode categories)


def large_inference(device: torch.device, folder: Path, checkpoint: Path, output: Path, sampling: dict) -> dict:
    """inference.py's defaults on the large photos, in a process of its own so its peak RSS is its own."""
    runtime = Runtime.from_flags(device.type, "auto", channels_last=True)
    keep_freed_cpu_memory(runtime.device)
    predictor = Predictor.from_checkpoint(checkpoint, runtime, **sampling)
    timing = {}
    with timer(device, timing):
        segment_folder(predictor, list_images(folder), folder, Outputs(output))
    with Image.open(sorted((output / "masks").glob("*.png"))[0]) as mask:
        size = mask.size
    return {"seconds": timing["seconds"], "peak_mb": peak_memory_mb(device), "mask_size": size}


def forward_flops(checkpoint: Path, sampling: Sampling, size: tuple[int, int]) -> tuple[float, int]:
    """FLOPs of the network passes one image of (width, height) takes, and how many passes (tiles) it is."""
    width, height = size
    if sampling.mode == "resize":
        shapes = [(sampling.image_size, sampling.image_size)]
    else:
        tops, tile_h, lefts, tile_w = sampling.tile_grid(height, width)
        shapes = [(tile_h, tile_w)] * (len(tops) * len(lefts))
    model = inference_network(load_checkpoint(checkpoint), checkpoint)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, *shapes[0]))
    return counter.get_total_flops() * len(shapes), len(shapes)


def large_rows(
    root: Path, device: torch.device, *, count: int, size: tuple[int, int], widths: tuple[int, ...], crop: int
) -> tuple[str, float, dict[str, dict]]:
    """-> (precision, its matmul GFLOP/s, row label -> seconds per photo, passes, GFLOP/s and peak MB)."""
    folder = root / "large"
    folder.mkdir()
    for k in range(count):
        write_photo(folder / f"photo{k}.jpg", size, seed=k)
    checkpoint = root / "large.pt"
    write_checkpoint(checkpoint, classes=LARGE_CLASSES, widths=widths, image_size=crop, crop_size=crop)
    precision = resolve_precision("auto", device)
    ceiling = matmul_gflops(PRECISION_DTYPES[precision], device)
    defaults = Sampling.from_training_flags(training_flags(load_checkpoint(checkpoint)))
    variants = {
        f"slide (default: {defaults.image_size} high, up to {defaults.tile} px wide, overlap {defaults.overlap:g})": {},
        f"slide, {crop} px tiles, overlap 1/3 (until 2026-12)": {"tile": crop, "overlap": 1 / 3},
        "resize": {"mode": "resize"},
    }
    rows = {}
    for label, sampling in variants.items():
        result = isolated(large_inference, device, folder, checkpoint, root / "large-out" / label, sampling)
        flops, passes = forward_flops(checkpoint, replace(defaults, **sampling), size)
        seconds = result["seconds"] / count
        rows[label] = {
            "seconds": seconds,
            "passes": passes,
            "gflops": flops / seconds / 1e9,
            "peak_mb": result["peak_mb"],
        }
    return precision, ceiling, rows


def report_large(args, device: torch.device, root: Path) -> None:
    width, height = args.large_size
    size = dict(count=args.large_count, size=args.large_size, widths=args.widths, crop=args.image_size)
    precision, ceiling, rows = large_rows(root, device, **size)
    title = f"{args.large_count} photos {width}x{height}, {LARGE_CLASSES} classes, crop-trained at {args.image_size} px"
    log.info(f"\n{title}")
    log.info(
        f"{'':<56} {'s/image':>8} {'images/s':>9} {'passes':>7} {'GFLOP/s':>8} {'of ' + precision:>8} {'peak MB':>8}"
    )
    for label, row in rows.items():
        log.info(
            f"{label:<56} {row['seconds']:>8.2f} {1 / row['seconds']:>9.3f} {row['passes']:>7} {row['gflops']:>8.1f} "
            f"{row['gflops'] / ceiling:>8.0%} {row['peak_mb']:>8.0f}"
        )
