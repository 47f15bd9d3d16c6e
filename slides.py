"""Images larger than memory: whole-slide and survey-size images (tiled TIFF, BigTIFF, OME-TIFF; zarr and OME-Zarr
folders) read by tiles through zarr, and their labels written by tiles into a resumable zarr store, then a tiled,
compressed, pyramidal BigTIFF (or kept as OME-Zarr), so that peak memory is set by the tile size, the model and the
classes, never by the slide."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import zarr
from PIL import Image
from tqdm import tqdm

from errors import BadSampleError, UserError
from files import replace_atomically
from labels import LabelMapping
from memory import GIB, HEADROOM, available_bytes
from predictor import Predictor, slide_blocks
from slide_io import LazyImage, open_slide
from utils import colours

log = logging.getLogger("inference")

SLIDE_TILE = 512  # px: the output store's chunks and the BigTIFF's tiles
THUMBNAIL = 2048  # px: the overview PNG's longer side at most
GLASS_SPREAD = 4.0  # --skip-background: a tile whose low-level pixels vary less than this (0..255) is glass


def glass_test(slide: LazyImage, spread: float = GLASS_SPREAD):
    """--skip-background: a function telling whether a tile (top, left, height, width of the level the model sees)
    is glass, judged on the slide's smallest pyramid level (uniform there: every pixel within a few levels of
    the tile's mean). None where the slide has no smaller level to judge on."""
    lowest = len(slide.levels) - 1
    if lowest <= slide.level:
        return None
    (height, width), (low_h, low_w) = slide.size(slide.level), slide.size(lowest)
    small = slide.window(0, low_h, 0, low_w, level=lowest).astype(np.float32)
    scale_y, scale_x = low_h / height, low_w / width

    def is_glass(top: int, left: int, tile_h: int, tile_w: int) -> bool:
        rows = slice(int(top * scale_y), max(int(top * scale_y) + 1, math.ceil((top + tile_h) * scale_y)))
        cols = slice(int(left * scale_x), max(int(left * scale_x) + 1, math.ceil((left + tile_w) * scale_x)))
        return float(small[rows, cols].std()) < spread

    return is_glass


@dataclass
class SlideOutput:
    """Where a slide's labels go: the resumable store (levels of uint8/uint16 labels, chunked by SLIDE_TILE, and a
    progress file naming the steps done), then the final file: a pyramidal BigTIFF, or the store kept as
    OME-Zarr."""

    final: Path

    @property
    def store(self) -> Path:
        return self.final.with_name(f".{self.final.name}.partial.zarr")

    @property
    def overview(self) -> Path:
        return self.final.with_name(f"{self.final.name.split('.')[0]}.overview.png")

    @property
    def progress(self) -> Path:
        return self.final.with_name(f".{self.final.name}.progress.json")

    def steps_done(self, key: dict) -> int:
        """Steps (Predictor.slide_bands: a tile row of a block of columns) already written by an earlier run of the
        same slide, model and tiling (0: start over)."""
        try:
            done = json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return 0
        return int(done["steps"]) if done.get("key") == key and self.store.is_dir() else 0

    def mark(self, key: dict, steps: int) -> None:
        with replace_atomically(self.progress) as tmp:
            tmp.write_text(json.dumps({"key": key, "steps": steps}))


def segment_slide(
    predictor: Predictor,
    slide: LazyImage,
    output: SlideOutput,
    *,
    skip_background: bool = False,
    overwrite: bool = False,
) -> dict:
    """Labels of the whole slide, tile row by tile row, into output's store (resuming after the rows an earlier run
    wrote), then its pyramid and the final file. Returns what it did."""
    _, height, width = slide.shape
    values = predictor.mapping.value_array()
    tops, _, lefts, _ = predictor.sampling.tile_grid(height, width)
    key = {"slide": str(slide.path), "level": slide.level, "values": predictor.mapping.values, "tops": tops}
    blocks = slide_blocks(width)
    key |= {"lefts": lefts, "blocks": [list(block) for block in blocks]}  # as JSON gives them back
    first = 0 if overwrite else output.steps_done(key)
    if first == 0:
        shutil.rmtree(output.store, ignore_errors=True)
        group = zarr.open_group(str(output.store), mode="w")
        group.create_array("0", shape=(height, width), chunks=(SLIDE_TILE, SLIDE_TILE), dtype=values.dtype)
    group = zarr.open_group(str(output.store), mode="r+")
    labels = group["0"]
    skip = glass_test(slide) if skip_background else None
    started, pixels = time.monotonic(), 0
    steps = len(blocks) * len(tops)  # Predictor.slide_bands: each block's tile rows
    with tqdm(total=steps, initial=first, desc=f"segmenting {slide.path.name}", unit="tile row") as bar:
        for step, (top, left, band) in enumerate(predictor.slide_bands(slide, first, skip), first):
            labels[top : top + band.shape[0], left : left + band.shape[1]] = values[band.cpu().numpy()]
            output.mark(key, step + 1)
            pixels += band.numel()
            bar.set_postfix(MP_per_s=f"{pixels / 1e6 / max(time.monotonic() - started, 1e-6):.2f}")
            bar.update()
    levels = build_pyramid(group)
    write_overview(group, levels, predictor.mapping, output.overview)
    if output.final.suffix == ".zarr":
        write_ome_metadata(group, levels)
        shutil.rmtree(output.final, ignore_errors=True)
        output.store.rename(output.final)
    else:
        write_pyramidal_tiff(group, levels, output.final)
        shutil.rmtree(output.store)
    output.progress.unlink(missing_ok=True)
    return {"steps_resumed": first, "steps": steps, "megapixels": height * width / 1e6}


def build_pyramid(group) -> int:
    """Levels 1, 2, ... of the labels, each half the one above (nearest: labels stay labels), until one fits in a
    tile; made a tile of the new level at a time from the level above, so memory stays flat. Returns the number of
    levels."""
    level = 0
    while max(group[str(level)].shape) > SLIDE_TILE:
        above = group[str(level)]
        height, width = (math.ceil(side / 2) for side in above.shape)
        below = group.create_array(
            str(level + 1), shape=(height, width), chunks=(SLIDE_TILE, SLIDE_TILE), dtype=above.dtype, overwrite=True
        )
        for top in range(0, height, SLIDE_TILE):
            for left in range(0, width, SLIDE_TILE):
                rows, cols = slice(2 * top, 2 * (top + SLIDE_TILE), 2), slice(2 * left, 2 * (left + SLIDE_TILE), 2)
                below[top : top + SLIDE_TILE, left : left + SLIDE_TILE] = above[rows, cols]
        level += 1
    return level + 1


def tiles(array, tile: int):
    """A zarr array's tiles in the order TIFF stores them (row by row), each read alone and padded to the tile
    size."""
    height, width = array.shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            block = np.zeros((tile, tile), array.dtype)
            part = array[top : top + tile, left : left + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def write_pyramidal_tiff(group, levels: int, path: Path) -> None:
    """The labels as a tiled, zlib-compressed BigTIFF with the smaller levels as sub-IFDs (what QuPath, napari and
    OpenSlide-based viewers read as a pyramid), written tile by tile under a temporary name."""
    with replace_atomically(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(levels):
            array = group[str(level)]
            options = dict(shape=array.shape, dtype=array.dtype, tile=(SLIDE_TILE, SLIDE_TILE), compression="zlib")
            if level == 0:
                tif.write(tiles(array, SLIDE_TILE), subifds=levels - 1, **options)
            else:
                tif.write(tiles(array, SLIDE_TILE), subfiletype=1, **options)


def write_ome_metadata(group, levels: int) -> None:
    """OME-Zarr's multiscales metadata: each level half the one above."""
    datasets = [
        {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": [2.0**level, 2.0**level]}]}
        for level in range(levels)
    ]
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]


def write_overview(group, levels: int, mapping: LabelMapping, path: Path) -> None:
    """A PNG of the labels at the first pyramid level under THUMBNAIL px, in the class colours, to look at."""
    small = next(
        group[str(level)] for level in range(levels) if max(group[str(level)].shape) <= THUMBNAIL or level == levels - 1
    )
    values = np.asarray(small[:])
    classes = np.zeros(values.shape, np.int64)
    for index, value in enumerate(mapping.values):
        classes[values == value] = index
    with replace_atomically(path) as tmp:
        Image.fromarray(colours(mapping.num_classes)[classes]).save(tmp, format="PNG")


def check_slide_memory(predictor: Predictor, slide: LazyImage) -> str:
    """A one-line error if a block's row of tiles (its pixels, the summed logits and weights: a block of columns and
    the tiles that reach into it, Predictor.slide_bands) would not fit in the memory available; else what it needs.
    It is the same for every slide wider than a block: memory is flat in the slide's size."""
    channels, height, width = slide.shape
    _, tile_h, _, tile_w = predictor.sampling.tile_grid(height, width)
    columns = min(width, max(right - left for left, right in slide_blocks(width)) + 2 * tile_w)
    need = tile_h * columns * 4 * (channels + 2 * predictor.outputs + 1)  # pixels, logits, their band, weights
    available = available_bytes(predictor.runtime.device)
    if available is not None and need > HEADROOM * available:
        raise UserError(
            f"{slide.path}: a row of tiles {columns:,} px wide needs about {need / GIB:.1f} GiB, "
            f"{available / GIB:.1f} GiB is available: use --level 1 or higher (the slide's pyramid) or fewer classes"
        )
    return f"a row of tiles needs about {need / GIB:.2f} GiB"


@dataclass
class SlidesResult:
    written: int = 0
    already_done: int = 0
    unreadable: int = 0


def segment_slides(
    predictor: Predictor,
    slides: list[Path],
    input_root: Path,
    masks: Path,
    *,
    level: int = 0,
    skip_background: bool = False,
    zarr_output: bool = False,
    overwrite: bool = False,
) -> SlidesResult:
    """Each slide -> masks/<name>.tif (a pyramidal BigTIFF of the mask values) or masks/<name>.zarr, beside an
    overview PNG; a slide whose file exists is kept unless overwrite; one a run left half done is resumed."""
    sampling = predictor.sampling
    if sampling.mode != "slide" or sampling.scale != 1 or sampling.base_size:
        raise UserError(
            "slides are segmented by sliding tiles at the pixels of a pyramid level: a --crop-size model at its "
            "native scale (rescale by choosing --level instead of --scale)"
        )
    result = SlidesResult()
    for path in slides:
        name = path.relative_to(input_root).with_suffix("")
        output = SlideOutput(masks / f"{name}{'.zarr' if zarr_output else '.tif'}")
        if output.final.exists() and not overwrite:
            result.already_done += 1
            continue
        try:
            slide = open_slide(path, predictor.reading, predictor.runtime.device, level)
            note = check_slide_memory(predictor, slide)
            channels, height, width = slide.shape
            log.info("%s: level %d, %dx%d, %s", path, level, width, height, note)
            done = segment_slide(predictor, slide, output, skip_background=skip_background, overwrite=overwrite)
        except BadSampleError as err:
            log.warning("skipped: %s", err)
            result.unreadable += 1
            continue
        if done["steps_resumed"]:
            log.info("%s: resumed after %d of %d tile rows", path, done["steps_resumed"], done["steps"])
        result.written += 1
    return result
