"""Raw mask values -> classes: the cached scan of the training masks, class names, and the LabelMapping."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import BadSampleError, DataError
from files import files_key, read_json_cache, write_json_cache
from image_io import DEFAULT_MAX_PIXELS, MAX_MASK_VALUE, read_mask
from slide_io import SlideMask, is_slide

IGNORE_INDEX = 255  # the ignore label, after mapping; also the default raw value that marks ignored pixels
SCAN_CACHE_NAME = ".label_scan.json"
LUT_SIZE = MAX_MASK_VALUE + 1  # every value read_mask lets through


def _count_values(path: Path, max_pixels: int) -> dict[int, int] | str:
    """A mask's pixels of each value (a slide's counted by windows), or why it cannot be read."""
    try:
        if is_slide(path, max_pixels):
            return SlideMask(path).value_counts()
        counts = np.bincount(read_mask(path, max_pixels).ravel().astype(np.int64))
    except BadSampleError as err:
        return str(err)
    values = counts.nonzero()[0]
    return {int(v): int(counts[v]) for v in values}


def scan_masks(
    mask_paths: list[Path], workers: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, dict[int, int] | str]:
    """Per-mask pixel counts of each raw value (or an error string), cached beside the masks.

    The cache is keyed on names, sizes and mtimes so that a second run reads one small file
    instead of every mask.
    """
    cache = mask_paths[0].parent / SCAN_CACHE_NAME
    key = files_key(mask_paths, "max_pixels", max_pixels)
    cached = read_json_cache(cache, key)
    if isinstance(cached, dict):
        return {name: c if isinstance(c, str) else {int(v): n for v, n in c.items()} for name, c in cached.items()}
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = list(
            tqdm(
                pool.map(partial(_count_values, max_pixels=max_pixels), mask_paths),
                total=len(mask_paths),
                desc=f"scanning {mask_paths[0].parent}",
                leave=False,
                disable=len(mask_paths) < 500,
            )
        )
    counts = {path.name: result for path, result in zip(mask_paths, results, strict=True)}
    write_json_cache(cache, key, counts)
    return counts


def read_class_names(masks_dir: Path) -> dict[int, str]:
    """Names from a classes.json (mask value -> name) in the mask folder or its parent, if any."""
    for folder in (masks_dir, masks_dir.parent):
        path = folder / "classes.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                names = data.get("classes", data)
                return {int(value): str(name) for value, name in names.items()}
            except (ValueError, AttributeError) as err:
                raise DataError(f"{path}: not a mask value -> class name mapping ({err})") from None
    return {}


@dataclass
class LabelMapping:
    """Raw mask values -> contiguous class indices 0..K-1, found on the training set only."""

    values: list[int]  # values[k] is the raw mask value of class k
    names: list[str]
    ignore_value: int = IGNORE_INDEX
    binary: bool = False

    @classmethod
    def from_counts(
        cls,
        counts: dict[int, int],
        ignore_value: int = IGNORE_INDEX,
        binary: bool = False,
        names: dict[int, str] | None = None,
    ) -> LabelMapping:
        if binary:
            return cls([0, 1], ["background", "foreground"], ignore_value, True)
        values = sorted(v for v in counts if v != ignore_value)
        if len(values) > IGNORE_INDEX:
            raise DataError(f"{len(values)} distinct mask values; at most {IGNORE_INDEX} classes are supported")
        names = names or {}
        labels = [names.get(v, "background" if v == 0 else f"class {v}") for v in values]
        return cls(values, labels, ignore_value, False)

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def lookup_table(self, unknown: int = IGNORE_INDEX) -> np.ndarray:
        """raw value -> class index, applied to a whole mask with one fancy-index."""
        lut = np.full(LUT_SIZE, unknown, dtype=np.uint8)
        if self.binary:
            lut[0], lut[1:] = 0, 1
        else:
            lut[self.values] = np.arange(len(self.values), dtype=np.uint8)
        if 0 <= self.ignore_value < LUT_SIZE:
            lut[self.ignore_value] = IGNORE_INDEX
        return lut

    def value_array(self) -> np.ndarray:
        """class index -> raw mask value (uint8 where all fit), to write a label map's values in one fancy-index."""
        return np.asarray(self.values, dtype=np.uint8 if max(self.values) < 256 else np.uint16)

    def unknown_values(self, counts: dict[int, int]) -> list[int]:
        if self.binary:
            return []
        known = set(self.values) | {self.ignore_value}
        return sorted(v for v in counts if v not in known)

    def to_dict(self) -> dict:
        return {"values": self.values, "names": self.names, "ignore_value": self.ignore_value, "binary": self.binary}

    @classmethod
    def from_dict(cls, data: dict) -> LabelMapping:
        return cls(list(data["values"]), list(data["names"]), int(data["ignore_value"]), bool(data["binary"]))
