"""Joint image/mask transforms: where a training sample is cut from (a random rescale and crop, or a random resized
crop), its flips and rotation; and the colour stage that follows them (colour.py).

The geometry draws its random numbers exactly as torchvision's classes do, in the same order, so it makes the same
samples as RandomScale + RandomCrop (or RandomResizedCrop), RandomHorizontalFlip, RandomVerticalFlip and
RandomRotation in a row; but it resizes the image once and gathers every output pixel once, instead of resizing,
padding, cropping, flipping and rotating image and mask one step at a time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from colour import AUGMENT_LEVELS, AugmentLevel, BatchColour, ColourDraws
from intensity import IMAGENET, Normalization
from labels import IGNORE_INDEX


class SeparationMap(tv_tensors.Mask):
    """An instance-trained sample's separation target (uint8: the map in 0..1 as 0..254, 255 ignored), placed as its
    mask is (the same gather) but never through the mask's label lookup."""


FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX, SeparationMap: IGNORE_INDEX}  # rotated in, padded


class RandomScale(v2.Transform):
    """Image and mask rescaled by one random factor, aspect ratio kept: relative to the native size, or
    relative to base_size for the shorter side (torchvision's segmentation reference)."""

    def __init__(self, scale_range: tuple[float, float], base_size: int | None = None):
        super().__init__()
        self.scale_range, self.base_size = tuple(scale_range), base_size

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        factor = float(torch.empty(()).uniform_(*self.scale_range))
        if self.base_size:
            factor *= self.base_size / min(height, width)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=True)  # masks: nearest


def size_stand_in(height: int, width: int) -> list:
    """What a torchvision transform's make_params reads an image's size from, without the image."""
    return [tv_tensors.Mask(torch.empty((), dtype=torch.uint8).expand(height, width))]


@functools.lru_cache(maxsize=4096)
def nearest_sources(out_size: int, in_size: int) -> torch.Tensor:
    """The input index torch's "nearest" resize (masks in TF.resize) reads for each output index, in its float32
    arithmetic, so that a gather through it equals the resized mask exactly. Cached: a set's few image sizes and
    the random scales' sizes come back every epoch (callers must not write into it)."""
    if out_size == in_size:
        return torch.arange(out_size)
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    return (torch.arange(out_size, dtype=torch.float32) * scale).floor_().long().clamp_max_(in_size - 1)


def rotation_sources(
    angle: float, side: int, *, flips: tuple[bool, bool] = (False, False), offset: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel of a side x side crop rotated by angle degrees about its centre (counter-clockwise, as
    torchvision's rotate turns it), the (row, column) of its nearest source pixel, which may lie outside the crop.
    flips: the crop was flipped (horizontally, vertically) before the rotation; offset: the crop's top-left corner
    in the image it is cut from, whose coordinates are returned. Each coordinate is a sum of a row and a column
    term, so flips and offset change two vectors, not two images."""
    theta, centre = math.radians(angle), side / 2 - 0.5
    steps = torch.arange(side, dtype=torch.float64) - centre
    cols_by_x, cols_by_y = math.cos(theta) * steps + centre, -math.sin(theta) * steps
    rows_by_x, rows_by_y = math.sin(theta) * steps, math.cos(theta) * steps + centre
    if flips[0]:
        cols_by_x, cols_by_y = (side - 1) - cols_by_x, -cols_by_y
    if flips[1]:
        rows_by_x, rows_by_y = -rows_by_x, (side - 1) - rows_by_y
    rows = (rows_by_y + offset[0])[:, None] + rows_by_x[None, :]
    cols = (cols_by_x + offset[1])[None, :] + cols_by_y[:, None]
    return rows.round_().int(), cols.round_().int()  # int32: the index arithmetic after runs faster


def clamp_within(rows: torch.Tensor, cols: torch.Tensor, row_range: tuple[int, int], col_range: tuple[int, int]):
    """Each (row, column) clamped into [low, high) of its range, and whether it lay there already: a clamped pixel
    reads a pixel of the image, which is then overwritten by the fill."""
    clamped_rows, clamped_cols = rows.clamp(row_range[0], row_range[1] - 1), cols.clamp(col_range[0], col_range[1] - 1)
    return clamped_rows, clamped_cols, (clamped_rows == rows) & (clamped_cols == cols)


def lookup(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """table[positions] for a small table (index_select: several times faster than advanced indexing)."""
    return table.index_select(0, positions.flatten()).view(positions.shape)


def position_dtype(pixels: int) -> torch.dtype:
    """int32 for flat positions in an image of this many pixels (the index arithmetic runs faster on it), int64
    where int32 would overflow (--max-pixels raised past 2**31)."""
    return torch.int32 if pixels <= torch.iinfo(torch.int32).max else torch.int64


def crop_window(offset: tuple[int, int], side: int, resized: list[int]) -> tuple[tuple[int, int], ...]:
    """The rows and columns ([low, high) each) of the resized image that a side x side crop at offset covers."""
    return tuple((max(start, 0), min(start + side, extent)) for start, extent in zip(offset, resized, strict=True))


def resize_sources(outputs: tuple[int, int], in_size: int, out_size: int) -> tuple[int, int]:
    """The inputs [low, high) that a bilinear resize from in_size to out_size reads for outputs [first, stop): the
    filter's support, widened by the factor where antialiasing shrinks, and a pixel to spare each side."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    low = math.floor((outputs[0] + 0.5) * scale - support) - 1
    return max(low, 0), min(math.ceil((outputs[1] - 0.5) * scale + support) + 1, in_size)


def resized_part(in_size: tuple[int, int], out_size: list[int], window: tuple) -> tuple[tuple[int, int], ...]:
    """What to resize (rows and columns of the resized image): the window, where resizing only it is less work
    (resize_window), else all of it."""
    (height, width), (out_height, out_width) = in_size, out_size
    low, high = resize_sources(window[0], height, out_height)
    whole_work = 0 if (height, width) == tuple(out_size) else (height + out_height) * out_width
    window_work = (high - low) * out_width + (height + out_height) * (window[1][1] - window[1][0])
    return window if window_work < whole_work else ((0, out_height), (0, out_width))


def resize_window(pixels: torch.Tensor, size: list[int], rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """rows x cols of TF.resize(pixels, size, antialias=True), pixel for pixel, resizing only what they need. Torch
    resizes every row's width, then every column's height, each row and column on its own (uint8 rounded in
    between, as two calls round): so the width is resized on the rows that the window's rows read, the height on
    the window's columns, and the rows no window row reads are left zero."""
    height, (out_height, out_width) = pixels.shape[-2], size
    low, high = resize_sources(rows, height, out_height)
    whole = (rows, cols) == ((0, out_height), (0, out_width))
    if whole or cols[1] - cols[0] < 2 or high - low < 2:  # torch's float resize of a 1-pixel-wide image is wrong
        return TF.resize(pixels, list(size), antialias=True)[..., rows[0] : rows[1], cols[0] : cols[1]]
    across = TF.resize(pixels[..., low:high, :], [high - low, out_width], antialias=True)[..., cols[0] : cols[1]]
    tall = across.new_zeros((*across.shape[:-3], height, cols[1] - cols[0], across.shape[-3])).movedim(-1, -3)
    tall[..., low:high, :] = across  # channels last, as decoded: torch's fast uint8 resize
    return TF.resize(tall, [out_height, cols[1] - cols[0]], antialias=True)[..., rows[0] : rows[1], :]


def gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, N): the pixels at flat positions row * W + col, a channel at a time (index_select, on
    channels-last pixels too: a fraction of one gather over all the channels)."""
    return torch.stack([channel.index_select(0, index) for channel in source.reshape(source.shape[0], -1)])


class RandomGeometry(v2.Transform):
    """Placement (a random rescale and crop, a random resized crop, or the whole image squashed), flips and rotation
    in one pass.

    The image is resized once (the whole image to the random scale, or the random box to the output size: the same
    resize torchvision makes, of only the window the output covers: resize_window), then each output pixel is
    gathered once through one index map holding crop, padding, flips and the nearest-neighbour rotation. The mask is
    gathered straight from the original through that map and the resize's nearest-neighbour map, so it is never
    resized whole; with labels (a lookup table of raw mask value -> class), its raw values are mapped after the
    gather, on the output's pixels rather than the whole mask's.
    """

    def __init__(
        self,
        size: int,
        *,
        crop: tuple[RandomScale, v2.RandomCrop] | None = None,
        resized_crop: v2.RandomResizedCrop | None = None,
        hflip: bool = False,
        vflip: bool = False,
        degrees: float = 0.0,
        labels: torch.Tensor | None = None,
    ):
        """crop or resized_crop: the transforms whose random numbers place the sample (neither: the whole image)."""
        super().__init__()
        self.size, self.crop, self.resized_crop, self.hflip, self.vflip = size, crop, resized_crop, hflip, vflip
        self.rotation = v2.RandomRotation(degrees) if degrees else None
        self.labels = labels

    def stepwise(self) -> list[v2.Transform]:
        """torchvision's transforms that make the same samples one step at a time: what this class reproduces."""
        steps = [*self.crop] if self.crop is not None else [self.resized_crop]
        if self.crop is None and self.resized_crop is None:
            steps = [v2.Resize((self.size, self.size), antialias=True)]
        steps += [v2.RandomHorizontalFlip()] if self.hflip else []
        steps += [v2.RandomVerticalFlip()] if self.vflip else []
        return steps + ([v2.RandomRotation(self.rotation.degrees, fill=FILL)] if self.rotation is not None else [])

    def _placement(self, flat_inputs: list) -> dict:
        """What the image is resized to and from, where the output lies in the resized image (offset: its top-left
        corner, window: the rows and columns it covers), and the original's width (the mask's row stride)."""
        height, width = v2.query_size(flat_inputs)
        if self.crop is not None:
            scale, crop = self.crop
            resized = scale.make_params(flat_inputs)["size"]
            placed = crop.make_params(size_stand_in(*resized))
            pad_left, pad_top = placed["padding"][:2]
            offset = (placed["top"] - pad_top, placed["left"] - pad_left)
            window = crop_window(offset, self.size, resized)
            return dict(box=(0, 0, height, width), resized=resized, offset=offset, width=width, window=window)
        whole = dict(resized=[self.size] * 2, offset=(0, 0), width=width, window=((0, self.size), (0, self.size)))
        if self.resized_crop is None:
            return dict(box=(0, 0, height, width), **whole)
        box = self.resized_crop.make_params(flat_inputs)
        return dict(box=(box["top"], box["left"], box["height"], box["width"]), **whole)

    def _window(self, flips: list[bool], angle: float | None, params: dict) -> tuple:
        """Each output pixel's (row, column) in the resized image, clamped into the window, and whether it is inside
        both the crop (not rotated in) and the resized image (not padding). Without a rotation they are a column and
        a row vector, so every step after costs a vector, not an image."""
        side, (top, left), window = self.size, params["offset"], params["window"]
        fits = window == ((top, top + side), (left, left + side))
        if angle is None:
            rows, cols = torch.arange(side, dtype=torch.int32), torch.arange(side, dtype=torch.int32)
            rows, cols = (side - 1 - rows if flips[1] else rows) + top, (side - 1 - cols if flips[0] else cols) + left
            rows, cols = rows[:, None], cols[None, :]
            return (rows, cols, None) if fits else clamp_within(rows, cols, *window)
        rows, cols = rotation_sources(angle, side, flips=(flips[0], flips[1]), offset=(top, left))
        return clamp_within(rows, cols, *window)  # rotated in from outside the crop, or padding: filled

    def make_params(self, flat_inputs: list) -> dict:
        params = self._placement(flat_inputs)
        flips = [flip and bool(torch.rand(1) < 0.5) for flip in (self.hflip, self.vflip)]  # as RandomFlip draws
        angle = None if self.rotation is None else self.rotation.make_params(flat_inputs)["angle"]
        rows, cols, inside = self._window(flips, angle, params)
        resized_height, resized_width = params["resized"]
        top, left, box_height, box_width = params["box"]
        params["part"] = resized_part((box_height, box_width), params["resized"], params["window"])
        (row_low, _), (col_low, col_high) = params["part"]
        corner, part_width = row_low * (col_high - col_low) + col_low, col_high - col_low
        mask_positions = position_dtype((top + box_height) * params["width"])
        row_starts = ((nearest_sources(resized_height, box_height) + top) * params["width"]).to(mask_positions)
        mask_cols = (nearest_sources(resized_width, box_width) + left).to(mask_positions)
        moved = angle is not None or any(flips) or params["offset"] != (0, 0)
        squash = not moved and params["resized"] == [self.size] * 2
        params.update(
            keep=None if inside is None else inside.flatten(),
            image_index=None if squash else cols.add(rows, alpha=part_width).sub_(corner).flatten(),  # None: resized
            mask_index=lookup(row_starts, rows).add(lookup(mask_cols, cols)).flatten(),
        )
        return params

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            source, index, fill = inpt.as_subclass(torch.Tensor), params["mask_index"], FILL[type(inpt)]
            picked = source.reshape(-1).index_select(0, index)
            if self.labels is not None and not isinstance(inpt, SeparationMap):
                picked = self.labels.index_select(0, picked.int())
        else:
            top, left, height, width = params["box"]
            pixels = inpt.as_subclass(torch.Tensor)[..., top : top + height, left : left + width]
            source = resize_window(pixels, params["resized"], *params["part"])
            index, fill = params["image_index"], FILL[tv_tensors.Image]
            if index is None:
                return tv_tensors.wrap(source, like=inpt)
            picked = gather(source, index)
        keep = params["keep"]
        if keep is not None:  # multiplications: a fraction of masked_fill_'s or torch.where's time
            picked = picked * keep if fill == 0 else picked * keep + (~keep).to(picked.dtype) * fill
        return tv_tensors.wrap(picked.view(*source.shape[:-2], self.size, self.size), like=inpt)


# crops: random rescale factors; narrower than torchvision's references' 0.5-2, chosen by measurement (docs/results.md)
SCALE_RANGE = (0.75, 1.33)


@dataclass(frozen=True)
class Crop:
    """Native-resolution training: each image rescaled by a random factor in scale_range (relative to a shorter
    side of base_size px, or to its own size), then a random size x size crop, padded where the image is smaller."""

    size: int
    scale_range: tuple[float, float] = SCALE_RANGE
    base_size: int | None = None


def build_geometry(
    image_size: int, level: AugmentLevel, crop: Crop | None, labels: torch.Tensor | None = None
) -> RandomGeometry:
    """Native-resolution crops or whole images (squashed, or a random resized crop), then the augmentation's flips
    and rotation. labels: see RandomGeometry."""
    motion = dict(hflip=level.hflip, vflip=level.vflip, degrees=level.degrees)
    if crop is not None:
        steps = (RandomScale(crop.scale_range, crop.base_size), v2.RandomCrop(crop.size, pad_if_needed=True, fill=FILL))
        return RandomGeometry(crop.size, crop=steps, **motion, labels=labels)
    if level.resized_crop_scale >= 1:
        return RandomGeometry(image_size, labels=labels)  # the whole image squashed, as v2.Resize
    resized_crop = v2.RandomResizedCrop(image_size, scale=(level.resized_crop_scale, 1.0), antialias=True)
    return RandomGeometry(image_size, resized_crop=resized_crop, **motion, labels=labels)


@dataclass(frozen=True)
class Augmentation:
    """A training sample's geometry, run per sample in the loader, and its colour stage, run per batch on the
    device (colour.BatchColour); called on one sample, both in a row."""

    geometry: v2.Transform
    colour: BatchColour

    def draw(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask, separation: SeparationMap | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, ColourDraws]:
        """The placed pixels (as read: uint8 or float), the mask, and the colour stage's random numbers. With a
        separation map, the "mask" is the (2, H, W) stack of the placed mask and map (losses.InstanceLoss)."""
        if separation is None:
            image, mask = self.geometry(image, mask)
        else:
            image, mask, separation = self.geometry(image, mask, separation)
            mask = torch.stack([mask, separation])
        draws = self.colour.draw(image.shape[0])
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), draws  # uint8: widened on the device

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask, separation: SeparationMap | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, mask, draws = self.draw(image, mask, separation)
        return self.colour(pixels[None], draws.one())[0], mask


def build_transforms(
    image_size: int,
    augment: str = "none",
    normalization: Normalization = IMAGENET,
    *,
    crop: Crop | None = None,
    photo: bool = True,
    labels: torch.Tensor | None = None,
) -> Augmentation:
    """Joint image/mask geometry (masks resize nearest, and pad and rotate in the ignore label), then colour.

    crop: native-resolution training crops instead of the whole image squashed to image_size.
    photo: 8-bit RGB, whose colours ColorJitter may shift; other images get brightness and contrast per channel.
    labels: raw mask value -> class, applied by the geometry after its gather (masks then come in raw).
    """
    if augment not in AUGMENT_LEVELS:
        raise ValueError(f"unknown augmentation {augment!r}; choose {', '.join(AUGMENT_LEVELS)}")
    level = AUGMENT_LEVELS[augment]
    geometry = build_geometry(image_size, level, crop, labels)
    return Augmentation(geometry, BatchColour(level, normalization, photo=photo))
