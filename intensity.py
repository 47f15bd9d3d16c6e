"""Pixel values -> the model's input and back to something to look at: per-channel normalisation (ImageNet's, the
training set's own statistics, or none), those statistics and their cache, and images stretched for display.

Values are as image_io reads them: uint8 as stored (scaled to 0..1 here), uint16 already in 0..1, other types as
stored; so one normalisation serves 8-bit photos, 16-bit micrographs and float reflectances alike.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import BadSampleError, DataError
from files import files_key, read_json_cache, write_json_cache
from image_io import DEFAULT_MAX_PIXELS, ImageReading, read_image
from slide_io import is_slide, window_pixels

NORMALIZE_CHOICES = ("imagenet", "dataset", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_PERCENTILES = (0.5, 99.5)  # nnU-Net's for CT: outliers (hot pixels, saturated spots) do not set the scale
SAMPLED_VALUES = 1 << 22  # pixels drawn from the whole training set for the statistics, per channel
MIN_STD = 1e-3  # a constant channel stays finite after normalisation
STATS_CACHE_NAME = ".image_stats.json"
DISPLAY_PERCENTILES = (0.5, 99.5)
DISPLAY_SAMPLES = 1 << 20


@dataclass(frozen=True)
class Normalization:
    """(clip(x, low, high) - mean) / std per channel, x the pixel as image_io reads it, uint8 scaled to 0..1."""

    name: str  # imagenet, dataset or none: how the numbers were chosen
    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...] | None = None  # clip bounds: the dataset's percentiles for 16-bit and float data
    high: tuple[float, ...] | None = None

    @classmethod
    def imagenet(cls, channels: int = 3) -> Normalization:
        """ImageNet's statistics; one channel takes their mean (timm's rule for grey inputs)."""
        if channels == 3:
            return cls("imagenet", IMAGENET_MEAN, IMAGENET_STD)
        if channels == 1:
            return cls("imagenet", (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),))
        raise DataError(f"--normalize imagenet: ImageNet statistics exist for 1 or 3 channels, not {channels}")

    @classmethod
    def none(cls, channels: int) -> Normalization:
        return cls("none", (0.0,) * channels, (1.0,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) uint8 or float pixels -> float32 model input, on their device."""
        x = unit_range(images)
        options = dict(device=x.device, dtype=torch.float32)
        column = (-1, 1, 1)
        if self.low is not None:
            x = x.clamp(torch.tensor(self.low, **options).view(column), torch.tensor(self.high, **options).view(column))
        return (x - torch.tensor(self.mean, **options).view(column)) / torch.tensor(self.std, **options).view(column)

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std), "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict) -> Normalization:
        bounds = [None if data[key] is None else tuple(map(float, data[key])) for key in ("low", "high")]
        return cls(str(data["name"]), tuple(map(float, data["mean"])), tuple(map(float, data["std"])), *bounds)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels scaled to 0..1 in float32; others as float32 (16-bit images are read as 0..1 already)."""
    return images.float() * (1 / 255) if images.dtype == torch.uint8 else images.float()


IMAGENET = Normalization.imagenet()  # what models trained before normalisation was a choice used


def default_normalize(channels: int, dtype: str) -> str:
    """--normalize auto: ImageNet's statistics fit 8-bit RGB photos; anything else is normalised by its own."""
    return "imagenet" if channels == 3 and dtype == "uint8" else "dataset"


def _sample_values(path: Path, reading: ImageReading, count: int, max_pixels: int) -> tuple[np.ndarray, bool] | str:
    """count random pixels (seeded by the file name) of one image (of a slide: of random windows), (count, C), and
    whether it is 8-bit; or why not."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    try:
        if is_slide(path, max_pixels):
            pixels = window_pixels(path, reading, rng)
        else:
            pixels = read_image(path, max_pixels, reading)[0].reshape(-1, reading.channels)
    except BadSampleError as err:
        return str(err)
    picked = pixels if len(pixels) <= count else pixels[rng.integers(0, len(pixels), count)]
    return picked.astype(np.float32) * (1 / 255 if pixels.dtype == np.uint8 else 1), pixels.dtype == np.uint8


def compute_statistics(paths: list[Path], reading: ImageReading, *, max_pixels: int, workers: int = 4) -> Normalization:
    """Per-channel mean and std of pixels drawn from every training image; 16-bit and float data are first clipped
    to their 0.5 and 99.5 percentiles (nnU-Net's rule), which are kept as the clip bounds."""
    per_image = max(256, SAMPLED_VALUES // max(len(paths), 1))
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = list(
            tqdm(
                pool.map(partial(_sample_values, reading=reading, count=per_image, max_pixels=max_pixels), paths),
                total=len(paths),
                desc="image statistics",
                leave=False,
                disable=len(paths) < 100,
            )
        )
    good = [result for result in results if not isinstance(result, str)]
    if not good:
        raise DataError(f"{paths[0].parent}: no readable image to compute --normalize dataset statistics from")
    values = np.concatenate([samples for samples, _ in good])
    low = high = None
    if not all(eight_bit for _, eight_bit in good):
        low, high = (tuple(map(float, bound)) for bound in np.percentile(values, CLIP_PERCENTILES, axis=0))
        values = values.clip(np.array(low, np.float32), np.array(high, np.float32))
    std = np.maximum(values.std(axis=0, dtype=np.float64), MIN_STD)
    return Normalization(
        "dataset", tuple(map(float, values.mean(axis=0, dtype=np.float64))), tuple(map(float, std)), low, high
    )


def dataset_statistics(
    paths: list[Path], reading: ImageReading, *, cache_folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Normalization:
    """compute_statistics, cached in cache_folder (beside the label scan) while the files and reading stay the same."""
    cache = cache_folder / STATS_CACHE_NAME
    key = files_key(paths, "statistics", reading.to_dict(), max_pixels, CLIP_PERCENTILES, SAMPLED_VALUES)
    cached = read_json_cache(cache, key)
    if isinstance(cached, dict):
        return Normalization.from_dict(cached)
    normalization = compute_statistics(paths, reading, max_pixels=max_pixels)
    write_json_cache(cache, key, normalization.to_dict())
    return normalization


def build_normalization(
    name: str, paths: list[Path], reading: ImageReading, *, cache_folder: Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Normalization:
    """--normalize NAME for a training set of these images."""
    if name == "imagenet":
        return Normalization.imagenet(reading.channels)
    if name == "none":
        return Normalization.none(reading.channels)
    return dataset_statistics(paths, reading, cache_folder=cache_folder, max_pixels=max_pixels)


def check_display_channel(channel: int | None, channels: int) -> None:
    """Checked when a run starts, not when its first figure is drawn."""
    if channel is not None and not 0 <= channel < channels:
        raise DataError(f"--display-channel {channel}: the model's input has channels 0..{channels - 1}")


def display_rgb(image: torch.Tensor | np.ndarray, channel: int | None = None) -> np.ndarray:
    """(C, H, W) model pixels -> (H, W, 3) uint8 to look at: 8-bit images as they are, any other percentile-
    stretched; the first three channels as RGB (two: red and green), or one channel (`channel`, or the only one)
    as grey."""
    pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    check_display_channel(channel, pixels.shape[0])
    shown = pixels[[channel]] if channel is not None else pixels[:3]
    if shown.dtype != np.uint8:
        shown = stretch(shown)
    if shown.shape[0] == 1:
        shown = np.repeat(shown, 3, axis=0)
    elif shown.shape[0] == 2:
        shown = np.concatenate([shown, np.zeros_like(shown[:1])])
    return np.ascontiguousarray(shown.transpose(1, 2, 0))


def stretch(channels: np.ndarray) -> np.ndarray:
    """(C, H, W) reals -> uint8, each channel's 0.5..99.5 percentiles (of up to a million pixels) to 0..255."""
    flat = channels.reshape(channels.shape[0], -1)
    step = max(1, flat.shape[1] // DISPLAY_SAMPLES)
    low, high = np.percentile(flat[:, ::step], DISPLAY_PERCENTILES, axis=1).astype(np.float32)
    scale = np.float32(255) / np.maximum(high - low, np.float32(1e-12))
    stretched = (channels - low[:, None, None]) * scale[:, None, None]  # float32: one copy of the image
    return stretched.clip(0, 255, out=stretched).astype(np.uint8)
