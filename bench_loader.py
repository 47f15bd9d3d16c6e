"""bench.py's data loader rows: milliseconds per sample in each stage of the training pipeline and the images/s
of one loader process, for the pipeline as it is and as the loader issue found it (issue_time_pipeline)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from dataset import SegmentationFolder
from image_io import read_image
from intensity import IMAGENET_MEAN, IMAGENET_STD
from transforms import RandomGeometry

STAGES = ("decode", "mask + lookup", "geometry", "colour + normalise", "collate")
NOT_GEOMETRY = (v2.ToDtype, v2.ColorJitter, v2.RandomApply, v2.Normalize)  # where the colour stage starts
LOADER_VARIANTS = ("whole, before", "whole", "crop, before", "crop")


def issue_time_pipeline(transform: v2.Compose) -> v2.Compose:
    """The pipeline as the loader issue found it: torchvision's geometry classes one step at a time (every step
    resizing, padding, cropping, flipping and rotating image and mask in turn, the rotation a float grid_sample),
    colour jitter on uint8, then float and ImageNet's normalisation."""
    geometry, *rest = transform.transforms
    steps = geometry.stepwise() if isinstance(geometry, RandomGeometry) else [geometry]
    colour = [step for step in rest if not isinstance(step, (v2.ToDtype, v2.Lambda))]
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose([*steps, *colour, *normalise])


LOADER_PASSES = 3  # each figure is the best of this many passes: the least disturbed by the rest of the machine


def stage_seconds(dataset: SegmentationFolder, geometry: v2.Compose, colour: v2.Compose) -> dict:
    """One pass over the dataset, each stage timed on its own; the same random draws in every pass and row."""
    torch.manual_seed(0)
    seconds = dict.fromkeys(STAGES, 0.0)
    samples = []
    for index, (image_path, _) in enumerate(dataset.pairs):
        started = time.perf_counter()
        pixels, orientation = read_image(image_path)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
        decoded = time.perf_counter()
        mask = dataset.load_mask(index, pixels, orientation)
        loaded = time.perf_counter()
        image, mask = geometry(image, mask)
        moved = time.perf_counter()
        image, mask = colour(image, mask)
        samples.append((image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)))
        seconds["decode"] += decoded - started
        seconds["mask + lookup"] += loaded - decoded
        seconds["geometry"] += moved - loaded
        seconds["colour + normalise"] += time.perf_counter() - moved
    started = time.perf_counter()
    for first in range(0, len(samples), 8):
        default_collate(samples[first : first + 8])
    seconds["collate"] = time.perf_counter() - started
    return seconds


def loader_stages(images: Path, masks: Path, image_size: int, augment: str, variant: str) -> dict:
    """Milliseconds per sample in each stage, on one thread as in a DataLoader worker, and the images/s of
    one process running the whole pipeline through a DataLoader (what one worker delivers); each the best of
    LOADER_PASSES passes.
    variant: "whole" (--crop-size 0) or "crop" (the default --crop-size 256), each optionally followed by
    ", before" (issue_time_pipeline)."""
    torch.set_num_threads(1)
    crop = {"crop_size": image_size} if variant.startswith("crop") else None
    dataset = SegmentationFolder(images, masks, image_size, augment=augment, scan_workers=1, crop=crop)
    if variant.endswith("before"):
        dataset.transform = issue_time_pipeline(dataset.transform)
    steps = dataset.transform.transforms
    split = next((i for i, step in enumerate(steps) if isinstance(step, NOT_GEOMETRY)), len(steps))
    geometry, colour = v2.Compose(steps[:split]), v2.Compose(steps[split:])
    passes = [stage_seconds(dataset, geometry, colour) for _ in range(LOADER_PASSES)]
    per_sample = {stage: 1000 * min(p[stage] for p in passes) / len(dataset) for stage in STAGES}
    rates = []
    for _ in range(LOADER_PASSES):
        torch.manual_seed(0)
        loader = DataLoader(dataset, batch_size=8, shuffle=True)  # in this process: the rate of one worker
        started = time.perf_counter()
        count = sum(len(batch) for batch, _ in loader)
        rates.append(count / (time.perf_counter() - started))
    return {"ms": per_sample, "images_per_s": max(rates)}
