"""COCO instances annotations -> index masks, rendered with pycocotools.

Overlaps: in `groups` mode the higher-priority group wins a pixel (ties: the smaller object);
in `categories` mode the smaller object wins, as it usually lies in front; `binary` paints
every object 1. Crowd regions become 255 (ignore) unless crowd_as_object, and objects are
painted over them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from coco_groups import CATEGORY_GROUP, GROUP_MEMBERS, GROUP_PRIORITY
from errors import CocoError
from files import not_a_file, refuse_inside, replace_atomically, require_file, require_folder
from image_io import DEFAULT_MAX_PIXELS
from instances import write_instance_mask
from labels import IGNORE_INDEX
from utils import PALETTE

log = logging.getLogger(__name__)

COCO_CACHE = Path("data/coco_masks")  # where train.py keeps the masks it renders from COCO files
COCO_MODES = ("categories", "groups", "binary")


@dataclass
class ClassTable:
    """COCO category id -> (mask value, priority), and the names of the mask values."""

    values: dict[int, int]
    priorities: dict[int, float]
    names: dict[int, str]
    source_ids: dict[int, list[int]]
    known_ids: set[int]

    def to_json(self, mode: str) -> dict:
        return {
            "classes": {str(v): n for v, n in sorted(self.names.items())},
            "mode": mode,
            "source_category_ids": {str(v): ids for v, ids in sorted(self.source_ids.items())},
        }


@dataclass
class Summary:
    written: int = 0
    existing: int = 0
    annotations_used: int = 0
    skipped: Counter = field(default_factory=Counter)
    missing_images: list[str] = field(default_factory=list)
    oversized_images: list[str] = field(default_factory=list)

    def line(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        missing = f" (e.g. {', '.join(self.missing_images[:3])})" if self.missing_images else ""
        return (
            f"{self.written} masks written, {self.existing} already there; {self.annotations_used} annotations "
            f"used, {sum(self.skipped.values())} skipped ({reasons}); "
            f"{len(self.missing_images)} images missing or unreadable{missing}"
            + (f"; {len(self.oversized_images)} over --max-pixels" if self.oversized_images else "")
        )


def load_coco(path: Path) -> dict:
    require_file(path, "annotations file", CocoError, CocoError)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CocoError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise CocoError(f"{path}: not COCO instances format (needs lists 'images', 'annotations', 'categories')")
    for category in data["categories"]:
        if not (
            isinstance(category, dict) and type(category.get("id")) is int and isinstance(category.get("name"), str)
        ):
            raise CocoError(f"{path}: category {str(category)[:80]} needs an integer id and a name")
    return data


def class_table(categories: list[dict], mode: str, selected: list[str] | None = None) -> ClassTable:
    """Contiguous mask values 1..K; COCO ids run to 90 with gaps, so never index by position."""
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    if selected:
        unknown = sorted(set(selected) - set(by_id.values()))
        if unknown:
            raise CocoError(f"--categories: {', '.join(unknown)} not among the annotation file's categories")
        by_id = {i: n for i, n in by_id.items() if n in selected}
    values, priorities, names, sources = {}, {}, {0: "background"}, {}
    if mode == "categories":
        for value, (cat_id, name) in enumerate(sorted(by_id.items()), 1):
            values[cat_id], priorities[cat_id], names[value] = value, 0.0, name
    elif mode == "groups":
        group_value = {group: v for v, group in enumerate(GROUP_MEMBERS, 1)}
        names.update({v: g for g, v in group_value.items()})
        for cat_id, name in by_id.items():
            group = CATEGORY_GROUP.get(name)
            if group is not None:
                values[cat_id], priorities[cat_id] = group_value[group], GROUP_PRIORITY[group]
    elif mode == "binary":
        names[1] = "object"
        values = {cat_id: 1 for cat_id in by_id}
        priorities = {cat_id: 0.0 for cat_id in by_id}
    else:
        raise CocoError(f"unknown mode {mode!r}; choose one of {', '.join(COCO_MODES)}")
    for cat_id, value in values.items():
        sources.setdefault(value, []).append(cat_id)
    return ClassTable(values, priorities, names, sources, {int(c["id"]) for c in categories})


def compressed_counts(text: str) -> list[int] | None:
    """COCO's compressed RLE string -> run lengths, as pycocotools' rleFrString reads it; None if malformed.

    Each run is a variable-length number of 6-bit characters (offset 48): 5 value bits, a continuation
    bit, a sign bit in the last one; from the third run on, each is stored as a difference to the run two back.
    """
    counts, position = [], 0
    while position < len(text):
        value = shift = 0
        more = True
        while more:
            if position == len(text) or not 48 <= ord(text[position]) < 112:
                return None
            chunk = ord(text[position]) - 48
            value |= (chunk & 0x1F) << shift
            more, position, shift = bool(chunk & 0x20), position + 1, shift + 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def _well_formed_polygons(segmentation: list) -> list[list]:
    """Polygons of at least 3 points with an x and a y each; others are dropped from the annotation."""
    return [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def _is_coordinate(value, limit: int) -> bool:
    """A finite number within one image size of the image: pycocotools rasterises whatever it is given."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -limit <= value <= 2 * limit


def geometry_problem(segmentation, height: int, width: int) -> str | None:
    """Why pycocotools must not see this segmentation (it would crash, hang or allocate without bound), or None."""
    if isinstance(segmentation, list):
        polygons = _well_formed_polygons(segmentation)
        if not polygons:
            return "malformed polygon"
        for polygon in polygons:
            xs, ys = polygon[0::2], polygon[1::2]
            if not all(_is_coordinate(x, width) for x in xs) or not all(_is_coordinate(y, height) for y in ys):
                return "polygon coordinates not finite or far outside the image"
        return None
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        return "bad segmentation"
    counts = segmentation["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", "replace")
    if isinstance(counts, str):
        counts = compressed_counts(counts)
    valid = isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    if list(segmentation["size"]) != [height, width] or not valid or sum(counts) != height * width:
        return "bad RLE"
    return None


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray | str:
    """A binary mask, or the reason the annotation cannot be used."""
    problem = geometry_problem(segmentation, height, width)
    if problem is not None:
        return problem
    if isinstance(segmentation, list):
        polygons = _well_formed_polygons(segmentation)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width))
    counts = segmentation["counts"]
    return mask_utils.decode(
        {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    )


def render_mask(
    height: int, width: int, annotations: list[dict], table: ClassTable, crowd_as_object: bool = False
) -> tuple[np.ndarray, np.ndarray, int, Counter]:
    """One index mask from an image's annotations, and its instance mask (each object painted its own id, 1, 2,
    ... in painting order; crowds 0); returns both, annotations used, skipped reasons."""
    skipped: Counter = Counter()
    crowds, objects = [], []
    for ann in annotations:
        if ann.get("category_id") not in table.values:
            skipped[
                "category outside the chosen classes"
                if ann.get("category_id") in table.known_ids
                else "category id not in categories"
            ] += 1
            continue
        binary = decode_segmentation(ann.get("segmentation"), height, width)
        if isinstance(binary, str):
            skipped[binary] += 1
            continue
        binary = binary.astype(bool)
        if ann.get("iscrowd") and not crowd_as_object:
            crowds.append(binary)
        else:
            cat = ann["category_id"]
            objects.append((table.priorities[cat], -int(binary.sum()), table.values[cat], binary))
    mask, ids = np.zeros((height, width), np.uint8), np.zeros((height, width), np.int32)
    for binary in crowds:
        mask[binary] = IGNORE_INDEX
    # Painted in increasing priority, then decreasing area: the last painted wins a pixel.
    for index, (_, _, value, binary) in enumerate(sorted(objects, key=lambda o: (o[0], o[1])), 1):
        mask[binary], ids[binary] = value, index
    return mask, ids, len(crowds) + len(objects), skipped


def write_png_atomically(mask: np.ndarray, path: Path) -> None:
    """A temporary name, then a rename: a killed run never leaves a half-written mask."""
    image = Image.fromarray(mask, mode="L").convert("P")
    image.putpalette(PALETTE.ravel().tolist())
    with replace_atomically(path) as tmp:
        image.save(tmp, format="PNG")


def usable_image_entries(images: list, summary: Summary) -> list[dict]:
    """The entries of 'images' with an integer id, a file name and a positive height and width, by id;
    the others are counted with the missing images."""
    usable = []
    for info in images:
        fields = isinstance(info, dict) and [info.get(k) for k in ("id", "file_name", "height", "width")]
        if (
            fields
            and isinstance(fields[0], int)
            and isinstance(fields[1], str)
            and all(isinstance(n, int) and n > 0 for n in fields[2:])
        ):
            usable.append(info)
        else:
            summary.missing_images.append(f"bad image entry {str(info)[:60]}")
    return sorted(usable, key=lambda i: i["id"])


@dataclass(frozen=True)
class RenderTask:
    """One image's mask to render: what a render process needs, and nothing it must share."""

    image_path: Path
    out_path: Path
    height: int
    width: int
    annotations: list[dict]
    table: ClassTable
    crowd_as_object: bool
    max_pixels: int
    instances_path: Path | None = None  # also write the instance mask here


def _render_one(task: RenderTask) -> tuple[str, int, Counter, str | None]:
    """(image name, annotations used, skipped reasons, why the image was not rendered or None)."""
    if task.height * task.width > task.max_pixels:
        return task.image_path.name, 0, Counter(), "oversized"
    try:
        if not_a_file(task.image_path):  # a FIFO or device would block the header's read
            raise OSError(task.image_path)
        Image.open(task.image_path).close()  # reads the header only: the image is checked, never decoded
    except (OSError, SyntaxError):
        return task.image_path.name, 0, Counter(), "missing"
    mask, ids, used, skipped = render_mask(task.height, task.width, task.annotations, task.table, task.crowd_as_object)
    write_png_atomically(mask, task.out_path)
    if task.instances_path is not None:
        write_instance_mask(ids, task.instances_path)
    return task.image_path.name, used, skipped, None


def prepare_masks(
    images_dir: Path,
    annotations_file: Path,
    output_dir: Path,
    *,
    mode: str = "categories",
    categories: list[str] | None = None,
    max_images: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    crowd_as_object: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    instances_dir: Path | None = None,
) -> Summary:
    """Render one index PNG per image into output_dir (plus classes.json), and with instances_dir its instance mask
    (one id per annotation) there; existing masks are kept."""
    require_folder(images_dir)
    refuse_inside(output_dir, images_dir, f"{output_dir}: must not be inside the images folder {images_dir}")
    coco = load_coco(annotations_file)
    table = class_table(coco["categories"], mode, categories)
    with replace_atomically(output_dir / "classes.json") as tmp:
        tmp.write_text(json.dumps(table.to_json(mode), indent=1))
    by_image: dict[int, list[dict]] = {}
    summary = Summary()
    for ann in coco["annotations"]:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
        else:
            summary.skipped["annotation that is not an object"] += 1
    tasks = []
    for info in usable_image_entries(coco["images"], summary)[:max_images]:
        out_path = output_dir / f"{Path(info['file_name']).stem}.png"
        instances = instances_dir / out_path.name if instances_dir is not None else None
        if out_path.exists() and (instances is None or instances.exists()) and not overwrite:
            summary.existing += 1
            continue
        annotations = by_image.get(info["id"], [])
        image_path = images_dir / info["file_name"]
        size = info["height"], info["width"]
        task = RenderTask(image_path, out_path, *size, annotations, table, crowd_as_object, max_pixels, instances)
        tasks.append(task)
    for name, used, skipped, problem in tqdm(
        _render_all(tasks, workers),
        total=len(tasks),
        desc="rendering masks",
        dynamic_ncols=True,
        disable=len(tasks) < 100,
    ):
        if problem == "oversized":
            summary.oversized_images.append(name)
            continue
        if problem == "missing":
            summary.missing_images.append(name)
            continue
        summary.written += 1
        summary.annotations_used += used
        summary.skipped.update(skipped)
    return summary


def _render_all(tasks: list[RenderTask], workers: int):
    if workers == 0:
        yield from map(_render_one, tasks)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(_render_one, tasks, chunksize=16)


def cached_masks(
    annotations: Path, images: Path, mode: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, instances: bool = False
) -> tuple[Path, Path | None]:
    """Masks rendered from a COCO file once, under COCO_CACHE, keyed on the file, its images and the mode; with
    instances, each annotation's id too, in a folder beside them. Returns both folders (None: no instances)."""
    stat = annotations.stat() if annotations.is_file() else None
    key = hashlib.sha256(
        f"{os.path.realpath(annotations)}|{os.path.realpath(images)}|{mode}|"
        f"{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    masks = COCO_CACHE / f"{annotations.stem}-{mode}-{key}"
    objects = masks.with_name(f"{masks.name}-instances") if instances else None
    summary = prepare_masks(
        images, annotations, masks, mode=mode, workers=0, max_pixels=max_pixels, instances_dir=objects
    )
    log.info("%s: %s -> %s", annotations, summary.line(), masks)
    return masks, objects
