"""bench.py's objects part: what turning an instance model's maps into objects costs on a large photo with many
objects that touch, beside the network's pass over the same photo (the large part's): the seeded watershed, the
object table and the COCO results, each timed on their own."""

from __future__ import annotations

import logging
import time

import numpy as np

from instances import ObjectRule, object_table, objects_from, separation_target
from labels import LabelMapping

log = logging.getLogger(__name__)


def touching_discs(size: tuple[int, int], spacing: int, seed: int) -> np.ndarray:
    """Object ids of discs on a jittered grid, each touching its neighbours (radius 0.6 of the spacing), as cells in
    a dense culture or grains in a gravel bed."""
    width, height = size
    rng = np.random.default_rng(seed)
    ids = np.zeros((height, width), np.int32)
    radius = int(0.6 * spacing)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disc = yy**2 + xx**2 <= radius**2
    index = 0
    for top in range(radius, height - radius, spacing):
        for left in range(radius, width - radius, spacing):
            jitter = rng.integers(-spacing // 8, spacing // 8 + 1, size=2)
            y, x = (
                min(max(top + jitter[0], radius), height - radius - 1),
                min(max(left + jitter[1], radius), width - radius - 1),
            )
            index += 1
            window = ids[y - radius : y + radius + 1, x - radius : x + radius + 1]
            window[disc & (window == 0)] = index
    return ids


def object_rows(size: tuple[int, int], spacing: int) -> dict:
    """Seconds for each step from a boundary map to files, on a photo of touching discs (the maps a perfect model
    would give, so the object count is known)."""
    from object_files import coco_annotations

    ids = touching_discs(size, spacing, seed=0)
    boundary = separation_target(ids, "boundary")
    foreground, classes = ids > 0, (ids > 0).astype(np.uint8)
    image = np.random.default_rng(1).integers(0, 256, (*ids.shape, 3), dtype=np.uint8)
    confidence = foreground.astype(np.float32)
    mapping = LabelMapping([0, 1], ["background", "object"])
    timings, started = {}, time.perf_counter()
    found = objects_from(foreground, boundary, ObjectRule("boundary", 0.3, 16))
    timings["watershed_s"], started = time.perf_counter() - started, time.perf_counter()
    rows = object_table(found, classes, image, confidence, mapping.names)
    timings["table_s"], started = time.perf_counter() - started, time.perf_counter()
    coco_annotations(found, rows, mapping)
    timings["coco_s"] = time.perf_counter() - started
    return timings | {"true_objects": int(ids.max()), "found_objects": len(rows), "megapixels": ids.size / 1e6}


def report_objects(args) -> None:
    width, height = args.large_size
    row = object_rows(args.large_size, spacing=args.object_spacing)
    total = row["watershed_s"] + row["table_s"] + row["coco_s"]
    log.info(
        f"\nobjects: a {width}x{height} photo ({row['megapixels']:.0f} MP) of {row['true_objects']} touching discs "
        f"({row['found_objects']} found from their boundary map): watershed {row['watershed_s']:.1f} s, object table "
        f"{row['table_s']:.1f} s, COCO RLE {row['coco_s']:.1f} s, {total:.1f} s in all"
    )
