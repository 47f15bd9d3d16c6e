"""An instance model's objects on disk: per image, the instance label image (16-bit PNG, or a 32-bit TIFF past 65,535
objects), its rows of the object table and its COCO results; per folder, objects.csv and coco_results.json merged
from those (so a run that stopped, run again, keeps what it wrote), with coco_images.json, the images and categories
that pycocotools' COCO reads them against (COCO(coco_images.json).loadRes(coco_results.json))."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from files import replace_atomically
from instances import object_table, write_instance_mask
from labels import LabelMapping
from predictor import Objects
from records import write_csv


def object_rle(inside: np.ndarray, top: int, left: int, shape: tuple[int, int]) -> dict:
    """COCO's compressed RLE of an object over the whole image, from its box alone (inside: the box's pixels that
    are the object): the column-major runs of its pixels, so the cost is the object's, not the image's."""
    from pycocotools import mask as mask_utils  # here: inference.py starts without pycocotools (test_layout)

    height, width = shape
    rows, cols = np.nonzero(inside)
    positions = np.sort((cols + left) * height + rows + top)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([positions[:1], positions[breaks]])
    ends = np.concatenate([positions[breaks - 1], positions[-1:]]) + 1
    runs = np.empty(2 * len(starts) + 1, np.int64)
    runs[0], runs[1:-1:2], runs[2:-1:2], runs[-1] = (
        starts[0],
        ends - starts,
        starts[1:] - ends[:-1],
        height * width - ends[-1],
    )
    rle = mask_utils.frPyObjects({"counts": runs.tolist(), "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def coco_annotations(ids: np.ndarray, rows: list[dict], mapping: LabelMapping) -> list[dict]:
    """Each object as a COCO result: compressed RLE, its class's mask value as category id, its confidence as
    score, its box and area (image_id filled in when the folder's results are merged)."""
    category = {name: value for name, value in zip(mapping.names, mapping.values, strict=True)}
    found = []
    for row in rows:
        window = ids[row["bbox_top"] : row["bbox_bottom"], row["bbox_left"] : row["bbox_right"]]
        rle = object_rle(window == row["id"], row["bbox_top"], row["bbox_left"], ids.shape)
        box = [
            row["bbox_left"],
            row["bbox_top"],
            row["bbox_right"] - row["bbox_left"],
            row["bbox_bottom"] - row["bbox_top"],
        ]
        found.append(
            {
                "category_id": int(category[row["class"]]),
                "segmentation": rle,
                "score": row["confidence"],
                "bbox": box,
                "area": row["area"],
            }
        )
    return found


def write_objects(image: np.ndarray, objects: Objects, targets: dict[str, Path], mapping: LabelMapping, name: str):
    """One image's instance labels, object rows and COCO results. image: (H, W, C) as read (the intensities the
    table averages); name: the image's path under the input folder."""
    rows = object_table(objects.ids, objects.labels, image, objects.confidence, mapping.names)
    write_instance_mask(objects.ids, targets["instances"])
    write_csv([{"image": name, **row} for row in rows], table_columns(image.shape[2]), targets["objects"])
    record = {"file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1])}
    with replace_atomically(targets["coco"]) as tmp:
        tmp.write_text(json.dumps(record | {"annotations": coco_annotations(objects.ids, rows, mapping)}))


def table_columns(channels: int) -> tuple[str, ...]:
    base = ("image", "id", "class", "area", "centroid_y", "centroid_x", "bbox_top", "bbox_left", "bbox_bottom")
    base += ("bbox_right", "equivalent_diameter")
    return (*base, *(f"mean_intensity_{c}" for c in range(channels)), "confidence")


def merge_objects(root: Path, per_image: list[dict[str, Path]], mapping: LabelMapping) -> int:
    """objects.csv, coco_results.json and coco_images.json of the folder, from every image's files in order (image
    ids 1, 2, ... in that order); returns the objects counted."""
    tables, images, results = [], [], []
    for image_id, targets in enumerate((t for t in per_image if t["coco"].exists()), 1):
        record = json.loads(targets["coco"].read_text())
        images.append({"id": image_id, **{key: record[key] for key in ("file_name", "height", "width")}})
        results += [{"image_id": image_id, **annotation} for annotation in record["annotations"]]
        tables.append(targets["objects"].read_text(encoding="utf-8"))
    header = tables[0].split("\n", 1)[0] if tables else ",".join(table_columns(1))
    with replace_atomically(root / "objects.csv") as tmp:
        tmp.write_text(header + "\n" + "".join(table.split("\n", 1)[1] for table in tables), encoding="utf-8")
    categories = [{"id": value, "name": name} for value, name in zip(mapping.values, mapping.names, strict=True)]
    for name, content in (
        ("coco_results.json", results),
        ("coco_images.json", {"images": images, "categories": categories}),
    ):
        with replace_atomically(root / name) as tmp:
            tmp.write_text(json.dumps(content))
    return len(results)
