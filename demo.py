"""The built-in demo dataset: shapes on textured backgrounds, index masks and COCO files, made on the spot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from coco import decode_segmentation, write_png_atomically
from errors import DataError

DEMO_ROOTS = {"colour": Path("data/demo"), "texture": Path("data/demo-texture")}
DEMO_IMAGES = {"num_train": 600, "num_val": 150, "size": 96}  # what `python train.py` builds
DEMO_CLASSES = {1: "ellipse", 2: "rectangle", 3: "triangle", 4: "star"}  # star is the rare class
DEMO_RARE_PROBABILITY = 0.08
DEMO_STYLES = ("colour", "texture")


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _demo_polygon(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Vertices of one object, wholly inside the image, as an (N, 2) array."""
    radius = size * rng.uniform(0.12, 0.24)
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    turn = rng.uniform(0, 2 * np.pi)
    if kind == 1:  # ellipse
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radii = np.stack([np.full(48, radius), np.full(48, radius * rng.uniform(0.5, 0.9))], 1)
        local = radii * np.stack([np.cos(angles), np.sin(angles)], 1)
    elif kind == 2:  # rectangle
        half = np.array([radius, radius * rng.uniform(0.45, 0.9)]) / np.sqrt(2) * 1.3
        local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    elif kind == 3:  # triangle
        angles = np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        local = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    else:  # five-pointed star
        angles = np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        local = radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return local @ rotation.T + [cx, cy]


def _demo_texture(kind: int, rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    """Each class has its own texture: stripes, checks, speckles, a radial glow.

    In the colour style each class also has its own colour, so even a few images generalise; in the
    texture style the colour is random, the model has to learn texture and outline, and a small
    slice overfits as real data does.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if style == "colour":
        base = {1: (200, 50, 50), 2: (50, 80, 200), 3: (50, 170, 70), 4: (240, 200, 40)}[kind]
        colour = np.array(base, np.float32) * rng.uniform(0.8, 1.15)
    else:
        colour = rng.uniform(40, 240, 3).astype(np.float32)
    if kind == 1:
        pattern = 0.75 + 0.25 * np.sin(yy * rng.uniform(0.8, 1.2))
    elif kind == 2:
        period = rng.integers(4, 8)
        pattern = np.where(((xx // period) + (yy // period)) % 2 == 0, 1.0, 0.7)
    elif kind == 3:
        pattern = 0.7 + 0.3 * rng.random((size, size))
    else:
        pattern = 1.0 - 0.3 * np.hypot(xx - size / 2, yy - size / 2) / size
    texture = colour * pattern[..., None] + rng.normal(0, 8, (size, size, 3))
    return texture.clip(0, 255).astype(np.uint8)


def _demo_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth low-frequency colour blotches plus pixel noise."""
    coarse = rng.uniform(60, 170, (6, 6, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    grey = smooth.mean(axis=2, keepdims=True)
    return (0.6 * grey + 0.4 * smooth + rng.normal(0, 14, (size, size, 3))).clip(0, 255).astype(np.uint8)


def _demo_sample(
    rng: np.random.Generator, size: int, style: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image, its index mask and its objects, larger objects first so smaller ones lie in front.

    Objects are rasterised by pycocotools, as their COCO polygons will be, so the index masks and
    the COCO file describe exactly the same pixels.
    """
    kinds = [int(k) for k in rng.integers(1, 4, rng.integers(2, 5))]
    if rng.random() < DEMO_RARE_PROBABILITY:
        kinds.append(4)
    objects = sorted(((k, _demo_polygon(k, rng, size)) for k in kinds), key=lambda o: -_polygon_area(o[1]))
    image = _demo_background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for kind, polygon in objects:
        inside = decode_segmentation([polygon.ravel().tolist()], size, size).astype(bool)
        image[inside] = _demo_texture(kind, rng, size, style)[inside]
        mask[inside] = kind
    return image, mask, objects


def _coco_annotation(ann_id: int, image_id: int, kind: int, polygon: np.ndarray) -> dict:
    x0, y0 = polygon.min(0)
    x1, y1 = polygon.max(0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(kind),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in polygon.ravel()]],
        "area": round(_polygon_area(polygon), 2),
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
    }


def _write_split(staging: Path, split: str, count: int, rng: np.random.Generator, *, size: int, style: str) -> None:
    """count images and masks of one split, and the COCO file that describes the same objects."""
    (staging / "images" / split).mkdir(parents=True)
    (staging / "masks" / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image, mask, objects = _demo_sample(rng, size, style)
        name = f"{split}_{index:05d}"
        Image.fromarray(image).save(staging / "images" / split / f"{name}.jpg", quality=92)
        write_png_atomically(mask, staging / "masks" / split / f"{name}.png")
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size})
        for kind, polygon in objects:
            annotations.append(_coco_annotation(len(annotations) + 1, image_id, kind, polygon))
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in DEMO_CLASSES.items()]
    (staging / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (staging / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def make_demo_data(
    root: str | Path,
    *,
    num_train: int = DEMO_IMAGES["num_train"],
    num_val: int = DEMO_IMAGES["num_val"],
    size: int = DEMO_IMAGES["size"],
    seed: int = 0,
    style: str = "colour",
) -> Path:
    """Build (once, deterministically) the demo set: JPEG images, index-PNG masks and COCO json.

    Layout: root/images/{train,val}/*.jpg, root/masks/{train,val}/*.png, root/masks/classes.json,
    root/annotations/instances_{train,val}.json. Built in a temporary folder and renamed, so an
    interrupted build never leaves a half-made dataset.
    """
    root = Path(root)
    if style not in DEMO_STYLES:
        raise ValueError(f"unknown demo style {style!r}; choose {' or '.join(DEMO_STYLES)}")
    recipe = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed, "style": style, "version": 2}
    marker = root / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return root
    if root.exists() and not marker.is_file():
        raise DataError(f"{root}: exists but is not a demo dataset; move it away or choose another folder")
    staging = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        _write_split(staging, split, count, rng, size=size, style=style)
    names = {"0": "background", **{str(k): v for k, v in DEMO_CLASSES.items()}}
    (staging / "masks" / "classes.json").write_text(json.dumps(names, indent=1))
    (staging / "demo.json").write_text(json.dumps(recipe))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():  # a demo built by another recipe: generated data, safe to replace
        shutil.rmtree(root)
    os.replace(staging, root)
    return root
