"""How an image is shown to the network (MMSegmentation's test modes, nnU-Net's sliding window): the whole image
squashed to the training square (resize), or overlapping tiles at native resolution (slide): the tile grid, the
Gaussian weights that blend tiles, and the row-by-row resampling of logits back to the image's size."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

SAMPLING_MODES = ("resize", "slide")
TILE_FACTOR = 2  # slide: tiles up to this many times the training crop wide; the network is fully convolutional
TILE_OVERLAP = 1 / 16  # slide: at least this share of a tile side computed twice (nnU-Net: 1/2, MMSegmentation: 1/3)


@dataclass(frozen=True)
class Sampling:
    """How an image is shown to the network; the training flags in a checkpoint choose the default."""

    mode: str = "resize"
    image_size: int = 256  # resize: the side of the training square; slide: the training crop's, a tile's height
    tile: int = TILE_FACTOR * 256  # slide: the largest width of a tile
    overlap: float = TILE_OVERLAP  # slide: the least fraction of a tile shared with each neighbour
    scale: float = 1.0  # slide: images are rescaled by this first...
    base_size: int | None = None  # ...or so that their shorter side is this (crop training's --base-size)

    @classmethod
    def for_training(cls, image_size: int, crop_size: int, base_size: int | None = None) -> Sampling:
        """Crop-trained models slide tiles larger than their crop (fewer pixels computed twice: the masks agree with
        crop-sized tiles', docs/inference.md); square-resize models see the square."""
        if crop_size:
            return cls("slide", crop_size, tile=TILE_FACTOR * crop_size, base_size=base_size)
        return cls("resize", image_size, tile=image_size)

    @classmethod
    def from_training_flags(cls, flags: dict) -> Sampling:
        """for_training from the flags a checkpoint or ONNX file recorded."""
        return cls.for_training(int(flags["image_size"]), int(flags.get("crop_size") or 0), flags.get("base_size"))

    @classmethod
    def for_model(cls, flags: dict, **typed) -> Sampling:
        """The training flags' choice, with the fields a user typed (None: not typed) replacing it."""
        chosen = replace(cls.from_training_flags(flags), **{k: v for k, v in typed.items() if v is not None})
        if typed.get("scale") is not None:
            chosen = replace(chosen, base_size=None)  # a typed --scale replaces the training's --base-size
        return chosen

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the network sees an image of this size at."""
        if self.mode == "resize":
            return self.image_size, self.image_size
        factor = self.base_size / min(height, width) if self.base_size else self.scale
        return max(1, round(height * factor)), max(1, round(width * factor))

    def tile_grid(self, height: int, width: int) -> tuple[list[int], int, list[int], int]:
        """slide, over a working-size image: (tile tops, tile height, tile lefts, tile width)."""
        tops, tile_h = tile_spans(height, self.image_size, self.overlap)
        lefts, tile_w = tile_spans(width, self.tile, self.overlap)
        return tops, tile_h, lefts, tile_w


def tile_spans(length: int, tile: int, overlap: float, multiple: int = 16) -> tuple[list[int], int]:
    """Tiles along one axis: (first pixel of each, their common size). As few tiles as cover the length with
    neighbours sharing at least `overlap` of a tile, then shrunk (rounded up to `multiple`, the model's stride, so
    none is padded) and spaced evenly, as nnU-Net spaces its tiles: fewer pixels are computed twice."""
    if length <= tile:
        return [0], length
    shared = min(round(tile * overlap), tile - 1)
    count = math.ceil((length - shared) / (tile - shared))
    size = min(tile, math.ceil((length + (count - 1) * shared) / count / multiple) * multiple)
    return [round(i * (length - size) / (count - 1)) for i in range(count)], size


def gaussian_weights(height: int, width: int, device: torch.device) -> torch.Tensor:
    """nnU-Net's tile weighting: sigma 1/8 of the side around the centre, so seams carry little weight."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 8)) ** 2)

    return axis(height)[:, None] * axis(width)[None, :]


class RowResampler:
    """Bilinear resizing (F.interpolate's align_corners=False rule) of rows that arrive in order,
    emitted in bands: an output row needs two input rows only, so a band computed alone equals the
    same rows of the whole image computed at once, and only a few input rows are ever held."""

    def __init__(self, source: tuple[int, int], target: tuple[int, int], band_rows: int):
        (height, self.width), (out_height, self.out_width) = source, target
        position = ((torch.arange(out_height) + 0.5) * (height / out_height) - 0.5).clamp_min(0)
        self.identity = height == out_height
        self.lower = position.floor().long().clamp_max(height - 1)
        self.upper = self.lower if self.identity else (self.lower + 1).clamp_max(height - 1)  # identity: no 2nd row
        self.fraction = (position - self.lower).float()
        self.band_rows, self.out_height = band_rows, out_height
        self.held, self.first_held, self.next_row = None, 0, 0

    def push(self, rows: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """rows: the next (C, k, width) input rows -> (first output row, (C, m, out_width)) bands now complete."""
        held_rows = 0 if self.held is None else self.held.shape[1]
        self.held = torch.cat([self.held, rows], 1) if held_rows else rows  # no copy where nothing is held
        received = self.first_held + self.held.shape[1]
        ready = int(torch.searchsorted(self.upper, received))  # output rows whose inputs have all arrived
        while self.next_row < ready:
            stop = min(self.next_row + self.band_rows, ready)
            yield self.next_row, self._band(self.next_row, stop)
            self.next_row = stop
        if self.next_row < self.out_height:
            drop = min(int(self.lower[self.next_row]) - self.first_held, self.held.shape[1])
            # a copy: rows arrive as views of a buffer the producer reuses (Predictor._slide)
            self.held, self.first_held = self.held[:, drop:].clone(), self.first_held + drop

    def _band(self, start: int, stop: int) -> torch.Tensor:
        if self.identity:
            rows = self.held[:, start - self.first_held : stop - self.first_held]
        else:
            device = self.held.device
            lower = self.held[:, (self.lower[start:stop] - self.first_held).to(device)]
            upper = self.held[:, (self.upper[start:stop] - self.first_held).to(device)]
            fraction = self.fraction[start:stop].to(device)[:, None]
            rows = lower * (1 - fraction) + upper * fraction
        if self.width == self.out_width:
            return rows
        return F.interpolate(rows[None], size=(stop - start, self.out_width), mode="bilinear", align_corners=False)[0]
