"""Reading images larger than memory by windows: whole-slide and survey-size images (tiled TIFF, BigTIFF, OME-TIFF
through tifffile's zarr store; zarr and OME-Zarr folders) and their masks, so that inference (slides.py) and training
crops (dataset.py) read only the pixels they use."""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
import zarr

from errors import BadSampleError, DataError, UserError
from image_io import (
    TIFF_EXTENSIONS,
    ImageInfo,
    ImageReading,
    checked_mask,
    fit_channels,
    pixel_values,
    probe_image,
    unreadable,
)
from listing import ZARR_SUFFIX

log = logging.getLogger(__name__)

MAX_SLIDE_PIXELS = 20 * 10**9  # 20 gigapixels, a 140,000 x 140,000 slide: a header declaring more is broken
SCAN_ROWS = 2048  # rows of a slide mask counted at a time: memory set by the slide's width, not its height
STRIP_COLUMNS = 20480  # px: the widest strip read at once, a block of Predictor.slide_bands with its tiles (one read)
OPEN_SLIDES = 16  # slides (and their masks) a process keeps open for training windows, each with its file handle


def is_zarr(path: Path) -> bool:
    """A zarr or OME-Zarr folder: read by windows whatever its size (no reader takes it whole)."""
    return path.suffix.lower() == ZARR_SUFFIX and path.is_dir()


def is_slide(path: Path, max_pixels: int) -> bool:
    """A zarr folder, or a tiled TIFF larger than max_pixels (smaller ones are read whole, as any image)."""
    if is_zarr(path):
        return True
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].keyframe
            return page.is_tiled and page.imagelength * page.imagewidth > max_pixels
    except (OSError, ValueError, IndexError, KeyError, TypeError, tifffile.TiffFileError):
        return False  # read as any image: its reader names what is wrong


@dataclass
class LazyImage:
    """One pyramid level of a slide as the model's (channels, H, W) input: slicing reads only the pixels asked for
    (a strip of rows up to STRIP_COLUMNS wide is kept, since the sliding window asks for a tile row's tiles one
    after another)."""

    levels: list  # zarr arrays, (H, W[, C]) or (C, H, W), the largest first
    level: int
    channel_axis: int | None  # None: one channel
    reading: ImageReading
    device: torch.device
    path: Path
    strip: tuple[int, int, int, int, np.ndarray] | None = None  # (top, bottom, left, right, (rows, cols, C) pixels)

    @property
    def array(self):
        return self.levels[self.level]

    @property
    def shape(self) -> tuple[int, int, int]:
        height, width = self.size(self.level)
        return self.reading.channels, height, width

    def size(self, level: int) -> tuple[int, int]:
        return plane_size(self.levels[level].shape, self.channel_axis)

    def window(self, top: int, bottom: int, left: int, right: int, level: int | None = None) -> np.ndarray:
        """(rows, cols, C) stored pixels of a window of a level (this one by default)."""
        array = self.levels[self.level if level is None else level]
        if self.channel_axis == 0:
            pixels = np.moveaxis(array[:, top:bottom, left:right], 0, -1)
        else:
            pixels = array[top:bottom, left:right]
        return pixels if pixels.ndim == 3 else pixels[..., None]

    def __getitem__(self, key: tuple) -> torch.Tensor:
        _, rows, cols = key
        _, height, width = self.shape
        if self.strip is None or not self.strip_holds(rows, cols):
            bottom, right = min(rows.stop, height), min(max(cols.stop, cols.start + STRIP_COLUMNS), width)
            try:
                stored = self.window(rows.start, bottom, cols.start, right)
            except (OSError, ValueError, RuntimeError) as err:
                raise unreadable(self.path, "slide", f"rows {rows.start}..{bottom}: {err}") from None
            pixels = fit_channels(pixel_values(stored, self.path), self.reading, self.path)
            self.strip = (rows.start, bottom, cols.start, right, pixels)
        top, _, left, _, pixels = self.strip
        part = pixels[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
        return torch.from_numpy(np.ascontiguousarray(part)).permute(2, 0, 1).to(self.device)

    def strip_holds(self, rows: slice, cols: slice) -> bool:
        top, bottom, left, right, _ = self.strip
        return top <= rows.start and rows.stop <= bottom and left <= cols.start and cols.stop <= right


def plane_size(shape: tuple[int, ...], channel_axis: int | None) -> tuple[int, int]:
    """(height, width) of a level's shape, its channel axis (None: there is none) left out."""
    height, width = (side for axis, side in enumerate(shape) if axis != channel_axis)
    return height, width


def slide_levels(path: Path) -> tuple[list, int | None]:
    """A slide's levels as (H, W[, C]) or (C, H, W) arrays, the largest first, and their channel axis (None: one
    channel)."""
    levels = open_levels(path)
    shape = levels[0].shape if levels else ()
    if not 2 <= len(shape) <= 3 and not (len(shape) == 5 and shape[0] == shape[2] == 1):
        raise BadSampleError(f"{path}: a {shape} array; slides are (H, W), (H, W, C), (C, H, W) or (1, C, 1, H, W)")
    if len(shape) == 5:  # OME-Zarr's (t, c, z, y, x), one time point and one plane
        levels = [array[0, :, 0] for array in levels]
    return levels, None if levels[0].ndim == 2 else (0 if levels[0].shape[0] < levels[0].shape[-1] else 2)


def probe(path: Path, page: int = 0) -> ImageInfo:
    """image_io.probe_image's channels, stored type and size from the header alone, of a zarr folder too."""
    if not is_zarr(path):
        return probe_image(path, page)
    levels, axis = slide_levels(path)
    channels = 1 if axis is None else levels[0].shape[axis]
    return ImageInfo(channels, np.dtype(levels[0].dtype).name, *plane_size(levels[0].shape, axis))


def first_readable(paths: list[Path], page: int = 0) -> tuple[Path, ImageInfo] | None:
    """The first image (or slide) whose header can be read, and what it says; None if there is none."""
    for path in paths:
        try:
            return path, probe(path, page)
        except BadSampleError:
            continue
    return None


def open_slide(path: Path, reading: ImageReading, device: torch.device, level: int = 0) -> LazyImage:
    """A slide's pyramid levels (one where the file has one), read lazily; level: which one the model sees."""
    levels, axis = slide_levels(path)
    slide = LazyImage(levels, 0, axis, reading, device, path)
    height, width = slide.size(0)
    if height * width > MAX_SLIDE_PIXELS:
        raise BadSampleError(
            f"{path}: {width}x{height} declared, over {MAX_SLIDE_PIXELS:,} pixels (no scanner makes it)"
        )
    for other in range(1, len(levels)):  # a pyramid whose levels disagree is not one
        (above_h, above_w), (low_h, low_w) = slide.size(other - 1), slide.size(other)
        if not (0 < low_h <= above_h and 0 < low_w <= above_w):
            raise BadSampleError(
                f"{path}: pyramid level {other} is {low_w}x{low_h}, the level above {above_w}x{above_h}"
            )
    if not 0 <= level < len(levels):
        raise UserError(f"--level {level}: {path} has levels 0..{len(levels) - 1}")
    slide.level = level
    stored = slide.array.dtype
    channels = 1 if axis is None else levels[0].shape[axis]
    fit_channels(pixel_values(np.zeros((1, 1, channels), stored), path), reading, path)  # channels that fit
    return slide


def open_levels(path: Path) -> list:
    """The file's zarr arrays, the largest first (one where it has no pyramid)."""
    try:
        if path.suffix.lower() == ".zarr":
            found = zarr.open(str(path), mode="r")
        else:
            found = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        return [found] if isinstance(found, zarr.Array) else [found[key] for key in sorted(found.array_keys(), key=int)]
    except (OSError, ValueError, KeyError, TypeError, tifffile.TiffFileError) as err:
        raise unreadable(path, "slide", f"{type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class SlideMask:
    """A slide's mask (labels) or instance mask (object ids), read by windows: level 0 of its file, one label per
    pixel."""

    path: Path
    kind: str = "mask"

    def level(self):
        return _mask_level(self.path, self.kind, os.getpid())

    def size(self) -> tuple[int, int]:
        return tuple(self.level().shape)

    def window(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """The (height, width) values at (top, left), checked as read_mask checks a whole mask."""
        try:
            values = np.asarray(self.level()[top : top + height, left : left + width])
        except (OSError, ValueError, RuntimeError) as err:
            raise unreadable(self.path, self.kind, f"rows {top}..{top + height}: {err}") from None
        return checked_mask(values, self.path, self.kind)

    def value_counts(self) -> dict[int, int]:
        """Pixels of each value, counted SCAN_ROWS rows at a time (the label scan of a mask too large to read)."""
        height, width = self.size()
        counts = np.zeros(0, np.int64)
        for top in range(0, height, SCAN_ROWS):
            found = np.bincount(self.window(top, 0, SCAN_ROWS, width).ravel().astype(np.int64))
            counts = np.pad(counts, (0, max(0, len(found) - len(counts))))
            counts[: len(found)] += found
        return {int(value): int(counts[value]) for value in counts.nonzero()[0]}


@dataclass(frozen=True)
class SlideListing:
    """A set's pairs with its slides listed by windows: each slide once per crop's worth of its pixels (so an epoch
    covers it about once and the sampler weighs it by its area), with its share of the label counts."""

    pairs: list[tuple[Path, Path]]
    counts: list[dict[int, float]]
    sizes: dict[Path, tuple[int, int]]  # each slide's (H, W)
    window_side: int  # the side of the window read around a crop: every crop the geometry may take, rescaled, rotated


def slide_windows(
    pairs: list[tuple[Path, Path]],
    per_image: list[dict[int, int]],
    *,
    reading: ImageReading,
    max_pixels: int,
    training: bool,
    crop: tuple[int, float] | None,
) -> SlideListing:
    """The slides among pairs (is_slide: every zarr folder, tiled TIFFs over max_pixels) listed by windows, for
    training from crops at native resolution, crop: (side, smallest scale); validation, which reads images whole,
    leaves them out, named, as it does a slide whose mask cannot be read by windows at the slide's size.
    per_image: each pair's label counts."""
    kept, counts, sizes, left_out = [], [], {}, []
    for (image, mask), raw in zip(pairs, per_image, strict=True):
        if not is_slide(image, max_pixels):
            kept.append((image, mask))
            counts.append(raw)
            continue
        try:
            info = probe(image, reading.page)
            fits = SlideMask(mask).size() == (info.height, info.width)
        except BadSampleError as err:
            left_out.append(f"{image.name} ({err})")
            continue
        if not training or not fits:
            left_out.append(f"{image.name} ({'its mask is not its size' if not fits else 'read whole'})")
            continue
        if crop is None:
            raise DataError(
                f"{image}: a slide ({info.width}x{info.height}) trains from crops at its own resolution: "
                "give --crop-size and leave out --base-size"
            )
        sizes[image] = (info.height, info.width)
        windows = max(1, round(info.height * info.width / crop[0] ** 2))
        kept.extend([(image, mask)] * windows)
        counts.extend([{value: n / windows for value, n in raw.items()}] * windows)
    folder = pairs[0][0].parent
    if left_out:
        log.warning("%s: slides left out (%d): %s", folder, len(left_out), ", ".join(left_out[:3]))
    if not kept:
        raise DataError(f"{folder}: no image to read (slides left out: {', '.join(left_out[:3])})")
    side = math.ceil(crop[0] / crop[1] * math.sqrt(2)) + 2 if sizes else 0
    return SlideListing(kept, counts, sizes, side)


@functools.lru_cache(maxsize=OPEN_SLIDES)
def _mask_level(path: Path, kind: str, process: int):
    """A slide mask's level 0, opened once per process (process: os.getpid(), so that a forked loader worker opens
    its own file handle instead of sharing its parent's position in the file)."""
    levels = open_levels(path)
    array = levels[0] if levels else None
    if array is None or array.ndim != 2:
        shape = "no array" if array is None else f"a {array.shape} array"
        raise BadSampleError(f"{path}: {shape}; a slide {kind} holds one value per pixel (H, W)")
    return array


@functools.lru_cache(maxsize=OPEN_SLIDES)
def _slide_for_windows(path: Path, reading: ImageReading, process: int) -> LazyImage:
    """open_slide once per process for the training windows read from it (process: as _mask_level's)."""
    return open_slide(path, reading, torch.device("cpu"))


def image_window(path: Path, reading: ImageReading, top: int, left: int, side: int) -> np.ndarray:
    """(rows, cols, reading.channels) pixels of a slide's level 0 at (top, left), at most side x side, as
    read_image gives a whole image (uint8, or float32)."""
    slide = _slide_for_windows(path, reading, os.getpid())
    _, height, width = slide.shape
    try:
        stored = slide.window(top, min(top + side, height), left, min(left + side, width))
    except (OSError, ValueError, RuntimeError) as err:
        raise unreadable(path, "slide", f"rows {top}..{top + side}: {err}") from None
    return fit_channels(pixel_values(stored, path), reading, path)


def window_pixels(path: Path, reading: ImageReading, rng: np.random.Generator, windows: int = 8, side: int = 512):
    """(pixels, channels) of `windows` windows of side x side at random places of a slide's level 0 (the dataset
    statistics of an image too large to read whole)."""
    _, height, width = _slide_for_windows(path, reading, os.getpid()).shape
    tops = rng.integers(0, max(height - side, 0) + 1, windows)
    lefts = rng.integers(0, max(width - side, 0) + 1, windows)
    parts = [image_window(path, reading, int(top), int(left), side) for top, left in zip(tops, lefts, strict=True)]
    return np.concatenate([part.reshape(-1, part.shape[2]) for part in parts])
