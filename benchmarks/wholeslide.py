"""bench.py's wholeslide part: tiled pyramidal BigTIFFs generated on the fly (a texture, not a constant), segmented
by tiles (slides.py) in a fresh process each: MP/s, peak RSS, and the share of time spent reading tiles, in the
network, writing the labels and their pyramid, and the rest (blending, labels); against the in-memory path on the
same pixels where they fit (as inference.py takes it: decoded whole, segmented, the mask written)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from benchmarks.data import write_checkpoint
from benchmarks.measure import isolated, peak_memory_mb
from predictor import Predictor
from slide_io import LazyImage, open_slide
from slides import SlideOutput, segment_slide
from utils import Runtime, keep_freed_cpu_memory

log = logging.getLogger(__name__)

TILE = 512


def texture_tile(top: int, left: int, size: int, step: int = 1) -> np.ndarray:
    """A (size, size, 3) uint8 tile of a smooth texture with blobs, the same wherever it is asked for (so every
    pyramid level shows the same picture, step times coarser)."""
    yy, xx = np.mgrid[top : top + size * step : step, left : left + size * step : step].astype(np.float32)
    wave = np.sin(yy / 37.0) * np.cos(xx / 53.0) + 0.5 * np.sin((yy + xx) / 91.0)
    blobs = (np.sin(yy / 211.0) * np.sin(xx / 173.0) > 0.6).astype(np.float32)
    pixels = np.stack([wave * 60 + 120 + blobs * 60, wave * 40 + 100, 180 - blobs * 90], -1)
    return pixels.clip(0, 255).astype(np.uint8)


def write_slide(path: Path, width: int, height: int, levels: int = 3) -> None:
    """A tiled, pyramidal BigTIFF written tile by tile: never whole in memory."""

    def tiles(step: int):
        for top in range(0, -(-height // step), TILE):
            for left in range(0, -(-width // step), TILE):
                yield texture_tile(top * step, left * step, TILE, step)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            step = 2**level
            shape = (-(-height // step), -(-width // step), 3)
            options = dict(shape=shape, dtype=np.uint8, tile=(TILE, TILE), compression="zlib", photometric="rgb")
            tif.write(tiles(step), **(dict(subifds=levels - 1) if level == 0 else dict(subfiletype=1)), **options)


def timed_calls(owner, name: str, timings: dict, key: str) -> None:
    """Wraps owner.name so that the seconds spent in it add up under timings[key]."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            timings[key] += time.perf_counter() - started

    setattr(owner, name, wrapper)


def slide_row(path: Path, checkpoint: Path, output: Path) -> dict:
    """One slide through slides.segment_slide in this (fresh) process: seconds, the time split, peak RSS."""
    device = torch.device("cpu")
    keep_freed_cpu_memory(device)
    predictor = Predictor.from_checkpoint(checkpoint, Runtime.from_flags("cpu", "auto", None))
    timings = {"reading": 0.0, "network": 0.0, "writing": 0.0}
    timed_calls(LazyImage, "__getitem__", timings, "reading")
    timed_calls(Predictor, "batch_logits", timings, "network")
    import slides

    for name in ("build_pyramid", "write_pyramidal_tiff", "write_overview"):
        timed_calls(slides, name, timings, "writing")
    slide = open_slide(path, predictor.reading, device)
    started = time.perf_counter()
    done = segment_slide(predictor, slide, SlideOutput(output), overwrite=True)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "megapixels": done["megapixels"], "peak_mb": peak_memory_mb(device), **timings}


def in_memory_row(path: Path, checkpoint: Path, output: Path) -> dict:
    """The same pixels through the in-memory path as inference.py takes it, in this (fresh) process: decoded whole,
    Predictor.segment, the label image written as a PNG mask; the same time split as slide_row."""
    device = torch.device("cpu")
    keep_freed_cpu_memory(device)
    predictor = Predictor.from_checkpoint(checkpoint, Runtime.from_flags("cpu", "auto", None))
    timings = {"reading": 0.0, "network": 0.0, "writing": 0.0}
    timed_calls(Predictor, "batch_logits", timings, "network")
    started = time.perf_counter()
    pixels = torch.from_numpy(tifffile.imread(path)).permute(2, 0, 1)
    timings["reading"] = time.perf_counter() - started
    labels = predictor.segment([pixels])[0]
    written = time.perf_counter()
    Image.fromarray(predictor.mapping.value_array()[labels.numpy()]).save(output, compress_level=6)
    timings["writing"] = time.perf_counter() - written
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "megapixels": pixels[0].numel() / 1e6, "peak_mb": peak_memory_mb(device), **timings}


def row_line(name: str, row: dict) -> str:
    """MP/s, peak RSS and the shares of the time: reading, the network, writing, the rest (blending, labels)."""
    other = row["seconds"] - row["reading"] - row["network"] - row["writing"]
    shares = [row[key] / row["seconds"] for key in ("reading", "network", "writing")] + [other / row["seconds"]]
    rate = row["megapixels"] / row["seconds"]
    return f"{name:<16} {rate:>7.2f} {row['peak_mb']:>12.0f} " + " ".join(f"{share:>8.0%}" for share in shares)


def report_wholeslide(args, root: Path) -> None:
    checkpoint = root / "slide-model.pt"
    write_checkpoint(checkpoint, classes=2, widths=args.slide_widths, image_size=256, crop_size=256)
    widths = ",".join(map(str, args.slide_widths))
    log.info(f"\nwholeslide: generated tiled pyramidal BigTIFFs through a crop-trained model (widths {widths})")
    log.info(f"{'slide':<16} {'MP/s':>7} {'peak RSS MB':>12} {'reading':>8} {'network':>8} {'writing':>8} {'other':>7}")
    for width, height in args.slide_sizes:
        path = root / f"slide-{width}x{height}.tif"
        write_slide(path, width, height)
        row = isolated(slide_row, path, checkpoint, root / f"slide-{width}x{height}-mask.tif")
        log.info(row_line(f"{width}x{height}", row))
        path.unlink()
    width, height = args.slide_sizes[0]
    path = root / "in-memory.tif"
    write_slide(path, width, height, levels=1)
    row = isolated(in_memory_row, path, checkpoint, root / "in-memory-mask.png")
    log.info(row_line("in memory", row) + f"  ({width}x{height} decoded whole, its mask written as a PNG)")
