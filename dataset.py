"""Image + mask folders -> (image, mask) tensors; the label mapping; sampling weights; the demo data."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from coco import decode_segmentation, write_png_atomically
from utils import UserError, replace_atomically

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
IGNORE_INDEX = 255  # ignore label after mapping; raw masks name theirs with ignore_value
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCAN_CACHE_NAME = ".label_scan.json"
LUT_SIZE = 65536  # covers 8- and 16-bit masks


class DataError(UserError):
    """Data that cannot be used as it is; the message names the file or folder."""


class BadSampleError(DataError):
    """One image or mask that cannot be used; the message names the file."""


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def pair_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """Pair images and masks by file stem; report unpaired files once."""
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder" if folder.exists() else f"{folder}: no such folder")
    images = {p.stem: p for p in list_images(images_dir)}
    masks = {p.stem: p for p in list_images(masks_dir)}
    for folder, only, kind in (
        (images_dir, images.keys() - masks.keys(), "images without a mask"),
        (masks_dir, masks.keys() - images.keys(), "masks without an image"),
    ):
        if only:
            log.warning("%s: %d %s (e.g. %s)", folder, len(only), kind, ", ".join(sorted(only)[:5]))
    stems = sorted(images.keys() & masks.keys())
    if not stems:
        raise DataError(f"no image/mask pairs: {images_dir} and {masks_dir} share no file names")
    return [(images[s], masks[s]) for s in stems]


def read_mask(path: Path) -> np.ndarray:
    """A 2-D integer array of label values; colour masks are refused, not guessed at."""
    try:
        with Image.open(path) as mask:
            mask.load()
    except (OSError, SyntaxError) as err:
        raise BadSampleError(f"{path}: unreadable mask ({err})") from None
    if mask.mode in ("RGB", "RGBA", "LA"):
        array = np.asarray(mask)
        if mask.mode == "LA" or (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            return array[..., 0]
        raise BadSampleError(f"{path}: colour ({mask.mode}) mask; masks must hold one label value per pixel")
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    array = np.asarray(mask)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise BadSampleError(f"{path}: unsupported mask mode {mask.mode}")
    return array


# EXIF orientation tag -> the transpose that shows the image upright (as ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_image(path: Path) -> tuple[Image.Image, Image.Transpose | None]:
    """RGB, shown upright, and the EXIF transpose that did it (masks may need the same).

    Palette, grey, RGBA, CMYK and 16-bit images all convert.
    """
    try:
        with Image.open(path) as image:
            image.load()
            upright = _UPRIGHT.get(image.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{path}: unreadable image ({err})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        scale = 1 / 256 if array.max() > 255 else 1
        image = Image.fromarray((array * scale).clip(0, 255).astype(np.uint8))
    elif image.mode in ("P", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    image = image.convert("RGB")
    return (image.transpose(upright) if upright is not None else image), upright


def _count_values(path: Path) -> dict[int, int] | str:
    try:
        counts = np.bincount(read_mask(path).ravel().astype(np.int64))
    except BadSampleError as err:
        return str(err)
    values = counts.nonzero()[0]
    return {int(v): int(counts[v]) for v in values}


def _scan_key(mask_paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in mask_paths:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def scan_masks(mask_paths: list[Path], workers: int = 4) -> dict[str, dict[int, int] | str]:
    """Per-mask pixel counts of each raw value (or an error string), cached beside the masks.

    The cache is keyed on names, sizes and mtimes so that a second run reads one small file
    instead of every mask.
    """
    from tqdm import tqdm

    cache = mask_paths[0].parent / SCAN_CACHE_NAME
    key = _scan_key(mask_paths)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return {
                name: c if isinstance(c, str) else {int(v): n for v, n in c.items()}
                for name, c in cached["counts"].items()
            }
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        results = list(
            tqdm(
                pool.map(_count_values, mask_paths),
                total=len(mask_paths),
                desc=f"scanning {mask_paths[0].parent}",
                leave=False,
                disable=len(mask_paths) < 500,
            )
        )
    counts = {path.name: result for path, result in zip(mask_paths, results)}
    try:
        with replace_atomically(cache) as tmp:
            tmp.write_text(json.dumps({"key": key, "counts": counts}))
    except OSError:
        log.info("%s: cannot write the label-scan cache; the next run scans again", cache)
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
    ignore_value: int = 255
    binary: bool = False

    @classmethod
    def from_counts(
        cls, counts: dict[int, int], ignore_value: int = 255, binary: bool = False, names: dict[int, str] | None = None
    ) -> "LabelMapping":
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

    def unknown_values(self, counts: dict[int, int]) -> list[int]:
        if self.binary:
            return []
        known = set(self.values) | {self.ignore_value}
        return sorted(v for v in counts if v not in known)

    def to_dict(self) -> dict:
        return {"values": self.values, "names": self.names, "ignore_value": self.ignore_value, "binary": self.binary}

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMapping":
        return cls(list(data["values"]), list(data["names"]), int(data["ignore_value"]), bool(data["binary"]))


def normalize_images() -> v2.Compose:
    """uint8 images (plain tensors and batches too) to the model's float input; masks pass untouched."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def build_transforms(image_size: int, augment: str = "none", normalize: bool = True) -> v2.Compose:
    """Joint image/mask transforms; masks resize nearest and rotate in the ignore label.

    normalize=False stops at resized uint8 images, for inference to normalise whole batches on the device.
    """
    size = (image_size, image_size)
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    if augment == "none":
        geometry = [v2.Resize(size, antialias=True)]
    elif augment in ("basic", "strong"):
        strong = augment == "strong"
        geometry = [
            v2.RandomResizedCrop(size, scale=(0.25 if strong else 0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *([v2.RandomVerticalFlip()] if strong else []),
            v2.RandomRotation(15, fill=fill),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05 if strong else 0.0),
            *([v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3)] if strong else []),
        ]
    else:
        raise ValueError(f"unknown augmentation {augment!r}; choose none, basic or strong")
    return v2.Compose([*geometry, *(normalize_images().transforms if normalize else [])])


def align_mask(mask: np.ndarray, image: Image.Image, upright: Image.Transpose | None, mask_path: Path) -> np.ndarray:
    """Masks match the upright image; one drawn on the stored (pre-EXIF) pixels is turned the same way."""
    width, height = image.size
    if mask.shape == (height, width):
        return mask
    if upright is not None and mask.shape == (width, height):
        return np.asarray(Image.fromarray(mask).transpose(upright))
    raise BadSampleError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")


class SegmentationFolder(Dataset):
    """Images and masks paired by stem; labels mapped through the training set's mapping."""

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        image_size: int = 256,
        mapping: LabelMapping | None = None,
        ignore_value: int = 255,
        binary: bool = False,
        augment: str = "none",
        unknown_labels: str = "error",
        scan_workers: int = 4,
        limit: int | None = None,
    ):
        """limit keeps the first N pairs (after the label mapping is found on all of them)."""
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        pairs = pair_files(self.images_dir, self.masks_dir)
        raw_counts = scan_masks([m for _, m in pairs], scan_workers)
        bad = {name: err for name, err in raw_counts.items() if isinstance(err, str)}
        for err in list(bad.values())[:5]:
            log.warning("%s", err)
        if bad:
            log.warning("%s: %d bad masks left out", self.masks_dir, len(bad))
        self.pairs = [(i, m) for i, m in pairs if m.name not in bad]
        if not self.pairs:
            raise DataError(f"{self.masks_dir}: no readable masks")
        per_image = [raw_counts[m.name] for _, m in self.pairs]
        if mapping is None:
            totals: dict[int, int] = {}
            for counts in per_image:
                for value, n in counts.items():
                    totals[value] = totals.get(value, 0) + n
            mapping = LabelMapping.from_counts(totals, ignore_value, binary, read_class_names(self.masks_dir))
        elif unknown_labels == "error":
            for (_, mask_path), counts in zip(self.pairs, per_image):
                unknown = mapping.unknown_values(counts)
                if unknown:
                    raise DataError(
                        f"{mask_path}: mask value {unknown[0]} never occurs in the training masks "
                        f"(training values: {mapping.values}); pass --ignore-unknown-labels to ignore it"
                    )
        self.mapping = mapping
        self.lut = mapping.lookup_table()
        self.pairs, per_image = self.pairs[:limit], per_image[:limit]
        self.class_counts = self._class_counts(per_image)
        self.image_size = image_size
        self.transform = build_transforms(image_size, augment)

    def _class_counts(self, per_image: list[dict[int, int]]) -> np.ndarray:
        """(images, classes) pixel counts in class space, from the scan alone."""
        counts = np.zeros((len(per_image), self.mapping.num_classes), dtype=np.float64)
        for row, raw in enumerate(per_image):
            for value, n in raw.items():
                label = int(self.lut[value]) if value < LUT_SIZE else IGNORE_INDEX
                if label != IGNORE_INDEX:
                    counts[row, label] += n
        return counts

    @property
    def num_classes(self) -> int:
        return self.mapping.num_classes

    @property
    def class_weights(self) -> torch.Tensor:
        """1 / pixel frequency per class, normalised to mean 1 over the classes present."""
        totals = self.class_counts.sum(axis=0)
        present = totals > 0
        weights = np.zeros_like(totals)
        weights[present] = totals.sum() / totals[present]
        weights[present] /= weights[present].mean()
        return torch.tensor(weights, dtype=torch.float32)

    def sample_weights(self) -> torch.Tensor:
        """Each image weighs the mean class weight of the classes in its mask."""
        class_weights = self.class_weights.double().numpy()
        present = self.class_counts > 0
        fallback = class_weights[class_weights > 0].mean()
        per_image = [class_weights[row].mean() if row.any() else fallback for row in present]
        return torch.tensor(per_image, dtype=torch.double)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Decoded, mapped, full-size image and mask, before any transform."""
        image_path, mask_path = self.pairs[index]
        image, upright = read_image(image_path)
        mask = align_mask(read_mask(mask_path), image, upright, mask_path)
        if mask.max() >= LUT_SIZE:
            raise BadSampleError(f"{mask_path}: mask value {mask.max()} is out of range")
        labels = self.lut[mask]
        return tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(labels))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.transform(*self.load(index))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


class SkipBadSamples(Dataset):
    """Survives samples that fail to load, and says which files failed.

    Training replaces a bad sample by the next good one; validation ("blank") puts an all-ignore
    sample in its place, so no image is counted twice in the metrics. Items are
    (image, mask, skipped) where skipped names the failed files ("" if none), so the training
    loop can report them from any DataLoader worker. A key may be (seed, index): the seed then
    fixes the sample's augmentation (see EpochSampler).
    """

    def __init__(self, dataset: SegmentationFolder, strict: bool = False, replace: bool = True, max_tries: int = 10):
        self.dataset, self.strict, self.replace, self.max_tries = dataset, strict, replace, max_tries

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        if isinstance(key, tuple):
            seed, index = key
            torch.manual_seed(seed)
        else:
            index = key
        skipped = []
        for attempt in range(self.max_tries if self.replace else 1):
            try:
                image, mask = self.dataset[(index + attempt) % len(self.dataset)]
                return image, mask, "\n".join(skipped)
            except BadSampleError as err:
                if self.strict:
                    raise
                skipped.append(str(err))
        if not self.replace:
            size = self.dataset.image_size
            return torch.zeros(3, size, size), torch.full((size, size), IGNORE_INDEX, dtype=torch.long), skipped[0]
        raise BadSampleError(f"{self.max_tries} bad samples in a row: " + "; ".join(skipped))


def epoch_seed(*parts: int) -> int:
    """A non-negative 63-bit seed from integers (int tuple hashes are the same in every process)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler(Sampler):
    """Yields (seed, index) pairs whose order and augmentation depend only on (run seed, epoch, rank).

    set_epoch() re-seeds the wrapped sampler (its own set_epoch, or its generator); each position in
    the epoch gets its own augmentation seed. A resumed run, or one with another number of workers,
    sees the same samples augmented the same way as an uninterrupted one.
    """

    def __init__(self, sampler: Sampler, seed: int, generator: torch.Generator | None = None, rank: int = 0):
        self.sampler, self.seed, self.generator, self.rank, self.epoch = sampler, seed, generator, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        else:
            self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            yield epoch_seed(self.seed, self.epoch, self.rank, position), index


class DistributedWeightedSampler(Sampler):
    """The weighted sampler under DDP: every rank draws the same weighted sample of the epoch
    (a seed shared through set_epoch) and keeps every world_size-th draw starting at its rank.
    """

    def __init__(self, weights: torch.Tensor, num_replicas: int, rank: int, seed: int = 0):
        self.weights, self.num_replicas, self.rank, self.seed, self.epoch = weights, num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.num_samples * self.num_replicas, True, generator=generator)
        return iter(draws[self.rank :: self.num_replicas].tolist())


def make_weighted_sampler(
    dataset: SegmentationFolder, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draw images holding rare classes more often (the inverse-frequency rule)."""
    return WeightedRandomSampler(
        dataset.sample_weights(), num_samples=len(dataset), replacement=True, generator=generator
    )


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


def make_demo_data(
    root: str | Path, num_train: int = 600, num_val: int = 150, size: int = 96, seed: int = 0, style: str = "colour"
) -> Path:
    """Build (once, deterministically) the demo set: JPEG images, index-PNG masks and COCO json.

    Layout: root/images/{train,val}/*.jpg, root/masks/{train,val}/*.png, root/masks/classes.json,
    root/annotations/instances_{train,val}.json. Built in a temporary folder and renamed, so an
    interrupted build never leaves a half-made dataset.
    """
    import shutil

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
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in DEMO_CLASSES.items()]
    for split, count in (("train", num_train), ("val", num_val)):
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
        (staging / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (staging / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    names = {"0": "background", **{str(k): v for k, v in DEMO_CLASSES.items()}}
    (staging / "masks" / "classes.json").write_text(json.dumps(names, indent=1))
    (staging / "demo.json").write_text(json.dumps(recipe))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():  # a demo built by another recipe: generated data, safe to replace
        shutil.rmtree(root)
    os.replace(staging, root)
    return root
