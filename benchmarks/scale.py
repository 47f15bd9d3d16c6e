"""bench.py's scale part: the reference design's workload shape (640x480 JPEG + 10-class PNG pairs, thousands of
them, generated on the fly) through train.py's start-up, a training step, validation, and prepare_masks.py.

The set is SCALE_DISTINCT distinct photos and masks, each file of the set a hard link to one of them: any count
costs seconds to make and no disk, every file is its own name to list, stat, pair and read, and the reads come
from the page cache (as on a machine whose set fits in memory).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.data import write_photo
from benchmarks.measure import isolated, peak_memory_mb
from config import parse_args
from data_setup import data_spec, prepare_data, training_loaders, validation_sampling
from engine import finish_batch, train_step, validate
from labels import SCAN_CACHE_NAME
from model_setup import build_training, check_memory
from schedule import validation_interval
from utils import Runtime, keep_freed_cpu_memory

log = logging.getLogger(__name__)

SCALE_PHOTO = (640, 480)  # COCO's size
SCALE_CLASSES = 10  # background and the reference design's nine groups
SCALE_DISTINCT = 64
TIMED_STEPS = 4
TIMED_VALIDATION_IMAGES = 8


def scale_mask(rng: np.random.Generator) -> np.ndarray:
    width, height = SCALE_PHOTO
    mask = np.zeros((height, width), np.uint8)
    for label in rng.integers(1, SCALE_CLASSES, 6):
        top, left = rng.integers(0, height - 60), rng.integers(0, width - 60)
        mask[top : top + rng.integers(30, 200), left : left + rng.integers(30, 300)] = label
    return mask


def write_scale_data(root: Path, train_pairs: int, val_pairs: int) -> Path:
    """root/images/{train,val}/NNNNNNN.jpg and root/masks/{train,val}/NNNNNNN.png, hard links to distinct files."""
    rng = np.random.default_rng(0)
    sources = root / "distinct"
    sources.mkdir(parents=True)
    for k in range(SCALE_DISTINCT):
        write_photo(sources / f"{k}.jpg", SCALE_PHOTO, seed=k)
        Image.fromarray(scale_mask(rng)).save(sources / f"{k}.png")
    for split, count in (("train", train_pairs), ("val", val_pairs)):
        for kind, suffix in (("images", "jpg"), ("masks", "png")):
            folder = root / kind / split
            folder.mkdir(parents=True)
            for index in range(count):
                os.link(sources / f"{index % SCALE_DISTINCT}.{suffix}", folder / f"{index:07d}.{suffix}")
    return root


def start_up(root: Path, run_dir: Path) -> dict:
    """train.py's start-up with the defaults, phase by phase, in this (fresh) process: the label scans, the
    loaders, the model and the memory check, the first batch and step; then the cost of more steps and of
    validating full-size images, from which an epoch's validation share follows."""
    started = time.perf_counter()
    settings, _ = parse_args(["--data-root", str(root), "--run-dir", str(run_dir)])
    runtime = Runtime.from_flags("auto", "auto", True)
    keep_freed_cpu_memory(runtime.device)
    train_set, val_set = prepare_data(settings, None, runtime)
    scanned = time.perf_counter()
    samples = settings.samples
    loaders = training_loaders(settings, train_set, val_set, runtime)
    training = build_training(settings, train_set, runtime)
    check_memory(training, settings, runtime)
    batches = iter(loaders[0])

    def step() -> None:
        pixels, masks, draws, _ = next(batches)
        images, masks = finish_batch(pixels, masks, draws, colour=training.colour, runtime=runtime)
        parts = dict(loss_fn=training.loss_fn, optimizer=training.optimizer, scaler=training.scaler)
        train_step(training.step_model, images, masks, **parts, runtime=runtime).item()

    step()
    first_step = time.perf_counter()
    # getrusage, not VmHWM: the memory check resets VmHWM, and this start-up's peak is above the parent's RSS
    startup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(TIMED_STEPS):
        step()
    crop_seconds = (time.perf_counter() - first_step) / (TIMED_STEPS * samples.batch_size)
    val_set.pairs = val_set.pairs[:TIMED_VALIDATION_IMAGES]
    val_loader = training_loaders(settings, train_set, val_set, runtime)[1]
    sampling = validation_sampling(samples)
    validated = validate(training, val_loader, spec=data_spec(train_set), sampling=sampling, runtime=runtime, epoch=1)
    image_seconds = validated.seconds / len(val_set.pairs)
    return {
        "scan_seconds": scanned - started,
        "first_step_seconds": first_step - started,
        "startup_rss_mb": startup_rss,
        "crop_seconds": crop_seconds,
        "image_seconds": image_seconds,
        "epoch_crops": max(len(train_set), samples.min_epoch_samples),
    }


def validation_share(result: dict, val_images: int) -> dict:
    """An epoch's training and validation seconds at the measured costs, and validation's share of the run when
    every epoch is validated and with --val-every auto's interval."""
    training = result["epoch_crops"] * result["crop_seconds"]
    validation = val_images * result["image_seconds"]
    every = validation_interval(training, validation)
    return {
        "every_epoch": validation / (training + validation),
        "auto_every": every,
        "auto": validation / (every * training + validation),
        "training_s": training,
        "validation_s": validation,
    }


def coco_file(root: Path, images: int, path: Path) -> Path:
    """A COCO instances file for the first images of root/images/train: 6 rectangles each, in 9 categories."""
    rng = np.random.default_rng(1)
    width, height = SCALE_PHOTO
    entries, annotations = [], []
    for image_id in range(images):
        entries.append({"id": image_id, "file_name": f"{image_id:07d}.jpg", "width": width, "height": height})
        for _ in range(6):
            x, y = float(rng.integers(0, width - 60)), float(rng.integers(0, height - 60))
            w, h = float(rng.integers(20, 200)), float(rng.integers(20, 200))
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            category = int(rng.integers(1, 10))
            shape = {"segmentation": [polygon], "area": w * h, "bbox": [x, y, w, h], "iscrowd": 0}
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, **shape})
    categories = [{"id": k, "name": f"class {k}", "supercategory": "thing"} for k in range(1, 10)]
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def render_masks(images_dir: Path, annotations: Path, output: Path) -> dict:
    """prepare_masks.py's work in this (fresh) process, with its default workers."""
    from coco import prepare_masks

    started = time.perf_counter()
    summary = prepare_masks(images_dir, annotations, output, workers=os.cpu_count() or 1)
    seconds, peak = time.perf_counter() - started, peak_memory_mb(torch.device("cpu"))
    return {"seconds": seconds, "written": summary.written, "peak_rss_mb": peak}


def forget_scan_caches(root: Path) -> None:
    for cache in root.glob(f"masks/*/{SCAN_CACHE_NAME}"):
        cache.unlink()


def scale_rows(root: Path, *, val_images: int, coco_images: int) -> dict:
    """First and cached start-up (each in a fresh process), and prepare_masks on the first coco_images."""
    forget_scan_caches(root)
    rows = {"first": isolated(start_up, root, root / "run-first")}
    rows["cached"] = isolated(start_up, root, root / "run-cached")
    rows["share"] = validation_share(rows["first"], val_images)
    if coco_images:
        annotations = coco_file(root, coco_images, root / "instances.json")
        rows["coco"] = isolated(render_masks, root / "images/train", annotations, root / "coco-masks")
    for run in ("run-first", "run-cached", "coco-masks"):
        shutil.rmtree(root / run, ignore_errors=True)
    return rows


def report_scale(args, root: Path) -> None:
    """The reference design's workload shape: start-up at its size, validation's share of an epoch, COCO masks."""
    started = time.perf_counter()
    write_scale_data(root, args.scale_train, args.scale_val)
    made = time.perf_counter() - started
    masks = args.scale_train + args.scale_val
    width, height = SCALE_PHOTO
    log.info(
        f"\nscale: {args.scale_train} training and {args.scale_val} validation pairs ({width}x{height} JPEG + "
        f"{SCALE_CLASSES}-class PNG; hard links to {SCALE_DISTINCT} distinct files, made in {made:.0f} s)"
    )
    rows = scale_rows(root, val_images=args.scale_val, coco_images=min(args.scale_coco, args.scale_train))
    log.info(f"{'train.py start-up':<30} {'label scan s':>13} {'masks/s':>9} {'first step s':>13} {'peak RSS MB':>12}")
    for label in ("first", "cached"):
        row = rows[label]
        rate = masks / row["scan_seconds"]
        log.info(
            f"{label + (' (no caches)' if label == 'first' else ''):<30} {row['scan_seconds']:>13.1f} {rate:>9.0f} "
            f"{row['first_step_seconds']:>13.1f} {row['startup_rss_mb']:>12.0f}"
        )
    share, first = rows["share"], rows["first"]
    log.info(
        f"an epoch with the defaults: {first['epoch_crops']} crops at {first['crop_seconds']:.3f} s "
        f"({share['training_s']:.0f} s), {args.scale_val} validation images at {first['image_seconds']:.3f} s "
        f"({share['validation_s']:.0f} s): validation is {share['every_epoch']:.0%} of the run validating every "
        f"epoch, {share['auto']:.0%} with --val-every auto (every {share['auto_every']} epochs)"
    )
    if "coco" in rows:
        coco = rows["coco"]
        log.info(
            f"prepare_masks.py: {coco['written']} masks in {coco['seconds']:.1f} s "
            f"({coco['written'] / coco['seconds']:.0f} images/s), peak RSS {coco['peak_rss_mb']:.0f} MB"
        )
