"""bench.py's data loader rows: milliseconds per sample in each stage of the training pipeline and the images/s
of one loader process, for ours and for torchvision's v2 classes run as its segmentation references run them
(torchvision_reference): a fixed external reference drawing the same random numbers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from benchmarks.data import LOADER_PHOTOS, write_loader_data
from benchmarks.measure import isolated
from colour import BLUR, BatchColour
from dataset import SegmentationFolder
from image_io import pil_pixels, read_image, read_mask
from intensity import IMAGENET_MEAN, IMAGENET_STD
from transforms import Augmentation, Crop

log = logging.getLogger(__name__)

STAGES = ("decode", "mask + lookup", "geometry", "colour + normalise", "collate")
LOADER_PIPELINES = ("whole", "crop")
LOADER_PASSES = 5  # each figure is the best of this many passes: the least disturbed by the rest of the machine
BATCH = 8


def torchvision_reference(augmentation: Augmentation) -> tuple[v2.Compose, v2.Compose]:
    """torchvision's v2 classes making the same samples as ours, all of it in the loader worker, as torchvision's
    segmentation references run them: the geometry one step at a time (each step resizing, padding, cropping,
    flipping and rotating image and mask in turn), then colour jitter on uint8, float and normalisation."""
    geometry, colour = augmentation.geometry, augmentation.colour
    jitter = [colour.jitter] if colour.jitter is not None else []
    blur = [v2.RandomApply([colour.blur], p=BLUR["p"])] if colour.blur is not None else []
    normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(geometry.stepwise()), v2.Compose([*jitter, *blur, *normalise])


def worker_stages(dataset: SegmentationFolder, reference: bool) -> tuple:
    """What a loader worker runs after decoding: the geometry, and the rest of the sample (the reference: colour and
    normalisation, the whole sample; ours: only the colour's random draws, the pixels stay uint8)."""
    if reference:
        geometry, colour = torchvision_reference(dataset.transform)
        return geometry, lambda image, mask: tuple(t.as_subclass(torch.Tensor) for t in colour(image, mask))
    draw = dataset.transform.colour.draw
    return dataset.transform.geometry, lambda image, mask: (image, mask, draw(image.shape[0]))


def read_pixels(dataset: SegmentationFolder, index: int, reference: bool) -> np.ndarray:
    """The decoded (H, W, 3) image: by PIL, as torchvision's references read it, or as training reads it."""
    if not reference:
        return read_image(dataset.pairs[index][0])[0]
    with Image.open(dataset.pairs[index][0]) as image:
        return pil_pixels(image)


def read_mask_values(dataset: SegmentationFolder, index: int, reference: bool) -> tv_tensors.Mask:
    """The mask: by PIL, its values mapped whole (the reference); or as training reads it, raw, for the geometry to
    map after its gather (the bench's photos are upright: no orientation to follow)."""
    if not reference:
        return tv_tensors.Mask(torch.from_numpy(np.require(read_mask(dataset.pairs[index][1]), requirements="W")))
    with Image.open(dataset.pairs[index][1]) as mask:
        return tv_tensors.Mask(torch.from_numpy(dataset.lut.take(np.asarray(mask))))


def read_sample(dataset: SegmentationFolder, index: int, reference: bool) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    pixels = read_pixels(dataset, index, reference)
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
    return image, read_mask_values(dataset, index, reference)


def stage_seconds(dataset: SegmentationFolder, reference: bool) -> tuple[dict, list]:
    """One pass over the dataset, each stage timed on its own; the same random draws in every pass and row.
    Returns the seconds per stage and the collated batches. Masks are mapped to classes as they are read (the
    reference), or by the geometry after its gather (ours)."""
    geometry, finish = worker_stages(dataset, reference)
    torch.manual_seed(0)
    seconds = dict.fromkeys(STAGES, 0.0)
    samples = []
    for index in range(len(dataset)):
        started = time.perf_counter()
        pixels = read_pixels(dataset, index, reference)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
        decoded = time.perf_counter()
        mask = read_mask_values(dataset, index, reference)
        loaded = time.perf_counter()
        image, mask = geometry(image, mask)
        moved = time.perf_counter()
        samples.append(tuple(t.as_subclass(torch.Tensor) for t in finish(image, mask)))
        seconds["decode"] += decoded - started
        seconds["mask + lookup"] += loaded - decoded
        seconds["geometry"] += moved - loaded
        seconds["colour + normalise"] += time.perf_counter() - moved
    started = time.perf_counter()
    batches = [default_collate(samples[first : first + BATCH]) for first in range(0, len(samples), BATCH)]
    seconds["collate"] = time.perf_counter() - started
    return seconds, batches


class WorkerItems(Dataset):
    """What one loader worker computes for each sample, read, placed and finished by worker_stages."""

    def __init__(self, dataset: SegmentationFolder, reference: bool):
        self.dataset, self.reference, (self.geometry, self.finish) = (
            dataset,
            reference,
            worker_stages(dataset, reference),
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return self.finish(*self.geometry(*read_sample(self.dataset, index, self.reference)))


def device_colour_ms(colour: BatchColour, batches: list, device: torch.device) -> float:
    """Milliseconds per image of the colour stage run per batch on the training device (best of the passes)."""
    moved = [(pixels.to(device), draws) for pixels, _, draws in batches]
    images = sum(len(pixels) for pixels, _ in moved)
    best = float("inf")
    for _ in range(LOADER_PASSES + 1):  # the first pass warms the device up
        torch.manual_seed(0)
        started = time.perf_counter()
        for pixels, draws in moved:
            colour(pixels, draws)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / images


def loader_pair(images: Path, masks: Path, image_size: int, augment: str, pipeline: str, device: str) -> dict:
    """The loader's rows, torchvision's reference and ours, measured in turns: each pass of one is followed by the
    same pass of the other, so that a slow spell of the machine slows both and their ratio holds. A row:
    milliseconds per sample in each stage, on one thread as in a DataLoader worker; the images/s of one process
    running the worker's part through a DataLoader (what one worker delivers) and with one worker process; each
    the best of LOADER_PASSES passes; and our colour stage per batch on the device. pipeline: "whole"
    (--crop-size 0) or "crop" (the default --crop-size 256)."""
    torch.set_num_threads(1)
    crop = Crop(image_size) if pipeline == "crop" else None
    dataset = SegmentationFolder(images, masks, image_size, augment=augment, scan_workers=1, crop=crop)
    passes = {"torchvision": [], "ours": []}
    for _ in range(LOADER_PASSES):
        for name, found in passes.items():
            found.append(stage_seconds(dataset, reference=name == "torchvision"))
    rates = loader_rates({name: WorkerItems(dataset, reference=name == "torchvision") for name in passes})
    rows = {}
    for name, found in passes.items():
        per_sample = {stage: 1000 * min(p[stage] for p, _ in found) / len(dataset) for stage in STAGES}
        rows[name] = {"ms": per_sample, **rates[name]}
    rows["ours"]["device_ms"] = device_colour_ms(dataset.transform.colour, passes["ours"][0][1], torch.device(device))
    return rows


def loader_rates(items: dict[str, WorkerItems]) -> dict:
    """For each pipeline, images/s through a DataLoader in this process (the work of one worker, nothing else) and
    with one worker process (its batches crossing to this process through shared memory), each the best of
    LOADER_PASSES passes taken in turns with the other pipeline's; the workers are started by a pass not counted."""
    worker = dict(num_workers=1, persistent_workers=True, multiprocessing_context="fork")  # as train.py's on Linux
    loaders = {
        name: {
            "images_per_s": DataLoader(dataset, batch_size=BATCH, shuffle=True),
            "worker_images_per_s": DataLoader(dataset, batch_size=BATCH, shuffle=True, **worker),
        }
        for name, dataset in items.items()
    }
    rates = {name: {column: 0.0 for column in columns} for name, columns in loaders.items()}
    for columns in loaders.values():
        next(iter(columns["worker_images_per_s"]))
    for _ in range(LOADER_PASSES):
        for column in ("images_per_s", "worker_images_per_s"):
            for name, columns in loaders.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                count = sum(len(batch[0]) for batch in columns[column])
                rates[name][column] = max(rates[name][column], count / (time.perf_counter() - started))
    return rates


def report_loader(args, device: torch.device, root: Path) -> None:
    images, masks = write_loader_data(root)
    width, height = LOADER_PHOTOS["size"]
    log.info(f"\ndata loader: {LOADER_PHOTOS['count']} JPEGs {width}x{height} -> {args.image_size} px, ms per image")
    columns = [*STAGES, "images/s", "1 worker", f"colour on {device.type}"]
    log.info(f"{'augment':<40}" + "".join(f"{column:>19}" for column in columns))
    for augment in ("none", "basic", "strong"):
        for pipeline in LOADER_PIPELINES:
            rows = isolated(loader_pair, images, masks, args.image_size, augment, pipeline, str(device))
            for name, result in rows.items():
                row = "".join(f"{result['ms'][stage]:>19.2f}" for stage in STAGES)
                row += f"{result['images_per_s']:>19.1f}{result['worker_images_per_s']:>19.1f}"
                on_device = f"{result['device_ms']:>19.2f}" if "device_ms" in result else ""
                label = f"{augment}, {pipeline}" + (", torchvision" if name == "torchvision" else "")
                log.info(f"{label:<40}{row}{on_device}")
            rates = ("images_per_s", "worker_images_per_s")
            speedups = [rows["ours"][rate] / rows["torchvision"][rate] for rate in rates]
            log.info(
                f"{'':<40}ours vs torchvision: {speedups[0]:.2f}x in one process, {speedups[1]:.2f}x with one worker"
            )
