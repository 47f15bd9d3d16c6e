"""Inputs bench.py generates rather than downloads: photo-like JPEGs, index masks, untrained checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import FORMAT_VERSION, DataSpec, save_checkpoint
from image_io import RGB
from intensity import IMAGENET
from labels import LabelMapping
from model import ResidualAttnUNet

LOADER_PHOTOS = {"count": 64, "size": (640, 480), "classes": 5}  # COCO-sized JPEGs and their index masks


def write_checkpoint(path: Path, *, classes: int, widths: tuple[int, ...], image_size: int, crop_size: int = 0) -> None:
    """An untrained model in a checkpoint inference can read: speed does not depend on the weights.
    crop_size 0: trained on whole images (inference resizes); otherwise on crops (inference slides tiles)."""
    model = ResidualAttnUNet(3, classes, widths)
    mapping = LabelMapping(list(range(classes)), [f"class {k}" for k in range(classes)])
    state = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        **DataSpec(mapping, RGB, IMAGENET).to_state(),
        "model_args": model.config,
        "args": {"image_size": image_size, "crop_size": crop_size, "base_size": None},
    }
    save_checkpoint(state, path)


def write_photo(path: Path, size: tuple[int, int], seed: int) -> None:
    """Smooth colour gradients with texture: JPEG-compresses like a photo, unlike pure noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[:height, :width]
    channels = [(np.sin(x / rng.uniform(200, 900) + y / rng.uniform(200, 900) + c) + 1) * 100 for c in range(3)]
    pixels = np.stack(channels, -1) + rng.integers(0, 40, (height, width, 1))
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def write_loader_data(root: Path) -> tuple[Path, Path]:
    images, masks = root / "loader/images", root / "loader/masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    width, height = LOADER_PHOTOS["size"]
    rng = np.random.default_rng(0)
    for k in range(LOADER_PHOTOS["count"]):
        write_photo(images / f"{k:03d}.jpg", LOADER_PHOTOS["size"], seed=k)
        mask = np.zeros((height, width), np.uint8)
        for label in range(1, LOADER_PHOTOS["classes"]):
            top, left = rng.integers(0, height - 100), rng.integers(0, width - 100)
            mask[top : top + rng.integers(50, 200), left : left + rng.integers(50, 300)] = label
        Image.fromarray(mask).save(masks / f"{k:03d}.png")
    return images, masks
