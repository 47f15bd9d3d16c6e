"""Image + mask folders -> (image, mask) tensors: pairing by file name, reading, bad-sample handling."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from errors import BadSampleError, DataError
from files import require_folder
from image_io import (
    DEFAULT_MAX_PIXELS,
    RGB,
    ImageReading,
    align_mask,
    conversion_for,
    read_image,
    read_mask,
)
from instances import SEPARATION_LEVELS, SIZE_SAMPLE, object_areas, separation_target
from intensity import Normalization, build_normalization, default_normalize
from labels import IGNORE_INDEX, LabelMapping, read_class_names, scan_masks
from listing import image_listing, list_images
from slide_io import SlideMask, first_readable, image_window, is_zarr, probe, slide_windows
from transforms import Crop, SeparationMap, build_transforms

log = logging.getLogger(__name__)

AREA_WINDOW = 2048  # px: the window of a slide's instance mask whose objects' areas set the smallest object kept


@dataclass(frozen=True)
class Source:
    """Where a read image's pixels came from, for its masks to follow: the orientation that turned a file's pixels
    upright, or the corner (top, left) of a slide's window."""

    orientation: int | None = None
    corner: tuple[int, int] | None = None


def pair_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """Pair images and masks by file stem; report unpaired files once."""
    for folder in (images_dir, masks_dir):
        require_folder(folder)
    images = {p.stem: p for p in list_images(images_dir, slides=True)}
    masks = {p.stem: p for p in list_images(masks_dir, slides=True)}
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


def choose_reading(
    images_dir: Path, channels: int | str, normalize: str, *, page: int = 0, convert: bool = False
) -> tuple[ImageReading, str]:
    """--in-channels auto and --normalize auto resolved from the first image's header, which must fit the model:
    one line now rather than every sample skipped later. Returns the reading rule and the normalisation's name."""
    images = image_listing(images_dir, slides=True).files  # pair_files names what is left out
    first = first_readable(images, page)  # None for an empty folder: the dataset will say so
    if first is None and images:
        probe(images[0], page)  # nothing readable (say, a --tiff-page past every file's end): say why
    found, dtype = (first[1].channels, first[1].dtype) if first else (3, "uint8")
    reading = ImageReading(found if channels == "auto" else channels, page, convert)
    if first:
        conversion_for(first[0], found, reading)
    return reading, default_normalize(reading.channels, dtype) if normalize == "auto" else normalize


class SegmentationFolder(Dataset):
    """Images and masks paired by stem; labels mapped through the training set's mapping; with an instance folder,
    each image's object ids too (paired by stem), for the separation target (training) or the object scores
    (validation)."""

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        image_size: int | None = 256,
        *,
        crop: Crop | None = None,
        mapping: LabelMapping | None = None,
        ignore_value: int = IGNORE_INDEX,
        binary: bool = False,
        augment: str = "none",
        unknown_labels: str = "error",
        reading: ImageReading = RGB,
        normalization: Normalization | None = None,
        normalize: str = "imagenet",
        scan_workers: int = 4,
        limit: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        instances_dir: str | Path | None = None,
        separation: str | None = None,
    ):
        """image_size None: items are the image as read (uint8 or float) and the mask, for validation at full size.
        crop: native-resolution training crops (None: whole images squashed to image_size).
        mapping: the training set's (None: found here); limit keeps the first N pairs, after the mapping.
        reading: how image files become the model's channels; normalization: the training set's (None: chosen here
        by the rule normalize names, see intensity.build_normalization). instances_dir: instance-id images by stem;
        separation: what training samples learn from them (instances.SEPARATIONS; None: validation keeps the ids)."""
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.separation = separation
        self.max_pixels, self.reading = max_pixels, reading
        self.pairs, per_image = self._readable_pairs(scan_workers)
        if mapping is None:
            totals: dict[int, int] = {}
            for counts in per_image:
                for value, n in counts.items():
                    totals[value] = totals.get(value, 0) + n
            mapping = LabelMapping.from_counts(totals, ignore_value, binary, read_class_names(self.masks_dir))
        elif unknown_labels == "error":
            self._refuse_unknown_values(mapping, per_image)
        self.mapping = mapping
        self.lut = mapping.lookup_table()
        self.normalization = normalization or build_normalization(
            normalize, [i for i, _ in self.pairs], reading, cache_folder=self.masks_dir, max_pixels=max_pixels
        )
        self.pairs, per_image = self.pairs[:limit], per_image[:limit]
        self.instance_paths = self._instance_files(Path(instances_dir)) if instances_dir is not None else None
        self.slides, self.window_side = {}, 0
        large = any(sum(raw.values()) > max_pixels for raw in per_image)  # a mask as large: its image may be a slide
        if large or any(is_zarr(image) for image, _ in self.pairs):
            per_image = self._list_slides(per_image, crop, training=image_size is not None)
        self.class_counts = self._class_counts(per_image)
        self.image_size = image_size
        self.transform = None
        if image_size is not None:
            labels = torch.from_numpy(self.lut)  # looked up after the geometry's gather, on the output's pixels
            self.transform = build_transforms(
                image_size, augment, self.normalization, crop=crop, photo=self.photo, labels=labels
            )

    def _readable_pairs(self, scan_workers: int) -> tuple[list[tuple[Path, Path]], list[dict[int, int]]]:
        """The pairs whose mask the label scan could read, and each one's raw value counts."""
        pairs = pair_files(self.images_dir, self.masks_dir)
        raw_counts = scan_masks([m for _, m in pairs], scan_workers, self.max_pixels)
        bad = {name: err for name, err in raw_counts.items() if isinstance(err, str)}
        for err in list(bad.values())[:5]:
            log.warning("%s", err)
        if bad:
            log.warning("%s: %d bad masks left out", self.masks_dir, len(bad))
        pairs = [(i, m) for i, m in pairs if m.name not in bad]
        if not pairs:
            raise DataError(f"{self.masks_dir}: no readable masks")
        return pairs, [raw_counts[m.name] for _, m in pairs]

    def _list_slides(self, per_image: list[dict[int, int]], crop: Crop | None, *, training: bool) -> list:
        """The slides among the pairs listed by windows (slide_io.slide_windows): training reads a window around
        each crop. Returns per_image to match the pairs."""
        side_and_scale = (crop.size, min(crop.scale_range)) if crop is not None and not crop.base_size else None
        listing = slide_windows(
            self.pairs,
            per_image,
            reading=self.reading,
            max_pixels=self.max_pixels,
            training=training,
            crop=side_and_scale,
        )
        self.pairs, self.slides, self.window_side = listing.pairs, listing.sizes, listing.window_side
        return listing.counts

    def _instance_files(self, folder: Path) -> dict[str, Path]:
        """Each image's instance mask by stem; images without one are named once (their objects are not learnt or
        scored: their separation target is ignored)."""
        found = {
            path.stem: path
            for path in list_images(require_folder(folder, "--train-instances/--val-instances"), slides=True)
        }
        missing = [image.stem for image, _ in self.pairs if image.stem not in found]
        if missing:
            log.warning(
                "%s: %d of %d images have no instance mask (e.g. %s); their objects are not used",
                folder,
                len(missing),
                len(self.pairs),
                ", ".join(missing[:3]),
            )
        return found

    def _refuse_unknown_values(self, mapping: LabelMapping, per_image: list[dict[int, int]]) -> None:
        for (_, mask_path), counts in zip(self.pairs, per_image, strict=True):
            unknown = mapping.unknown_values(counts)
            if unknown:
                raise DataError(
                    f"{mask_path}: mask value {unknown[0]} never occurs in the training masks "
                    f"(training values: {mapping.values}); pass --ignore-unknown-labels to ignore it"
                )

    def _class_counts(self, per_image: list[dict[int, int]]) -> np.ndarray:
        """(images, classes) pixel counts in class space, from the scan alone."""
        counts = np.zeros((len(per_image), self.mapping.num_classes), dtype=np.float64)
        for row, raw in enumerate(per_image):
            for value, n in raw.items():
                label = int(self.lut[value])  # the scan read only values read_mask allows
                if label != IGNORE_INDEX:
                    counts[row, label] += n
        return counts

    @property
    def photo(self) -> bool:
        """8-bit RGB, where colour jitter means something; judged by the first readable image's header."""
        first = first_readable([image for image, _ in self.pairs], self.reading.page)
        return self.reading.channels == 3 and (first is None or first[1].dtype == "uint8")

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

    def load(self, index: int, *, mapped: bool = True) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Decoded, full-size image (C, H, W) and mask (mapped: its values mapped to classes), before any transform."""
        return self._read(index, mapped)[:2]

    def _read(self, index: int, mapped: bool) -> tuple[tv_tensors.Image, tv_tensors.Mask, tuple[int, int], Source]:
        """load's image and mask (of a slide: a random window), and the pixels' (H, W) and source, which its
        instance mask follows."""
        image_path, mask_path = self.pairs[index]
        if image_path in self.slides:
            height, width = self.slides[image_path]
            side = self.window_side
            corner = tuple(int(torch.randint(0, max(size - side, 0) + 1, ())) for size in (height, width))
            image, source = image_window(image_path, self.reading, *corner, side), Source(corner=corner)
            mask = SlideMask(mask_path).window(*corner, *image.shape[:2])
        else:
            image, orientation = read_image(image_path, self.max_pixels, self.reading)
            source = Source(orientation=orientation)
            mask = align_mask(read_mask(mask_path, self.max_pixels), image.shape[:2], orientation, mask_path)
        values = self.lut.take(mask) if mapped else np.require(mask, requirements="W")  # take: faster than lut[mask]
        pixels = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        return pixels, tv_tensors.Mask(torch.from_numpy(values)), image.shape[:2], source

    def object_areas(self) -> np.ndarray:
        """The areas of the objects of up to SIZE_SAMPLE of the training set's instance masks, spread over the set
        (masks that cannot be read are left out: the samples that hold them are named when they are drawn)."""
        images = list(dict.fromkeys(image for image, _ in self.pairs if image.stem in (self.instance_paths or {})))
        areas = []
        for image in images[:: max(1, len(images) // SIZE_SAMPLE)][:SIZE_SAMPLE]:
            path = self.instance_paths[image.stem]
            try:
                if image in self.slides:  # a window at the centre
                    corner = [max(0, (size - AREA_WINDOW) // 2) for size in self.slides[image]]
                    ids = SlideMask(path, "instance mask").window(*corner, AREA_WINDOW, AREA_WINDOW)
                else:
                    ids = read_mask(path, self.max_pixels, "instance mask")
                areas.append(object_areas(ids))
            except BadSampleError:
                continue
        return np.concatenate(areas) if areas else np.zeros(0, np.int64)

    def load_instances(self, index: int, shape: tuple[int, int], source: Source) -> np.ndarray | None:
        """The image's object ids (int32), turned as the image was (of a slide: the same window); None where it has
        no instance mask."""
        path = self.instance_paths.get(self.pairs[index][0].stem) if self.instance_paths is not None else None
        if path is None:
            return None
        if source.corner is not None:
            ids = SlideMask(path, "instance mask").window(*source.corner, *shape)
            if ids.shape != tuple(shape):
                raise BadSampleError(f"{path}: the instance mask ends before its slide (at {ids.shape} of {shape})")
            return ids.astype(np.int32)
        ids = read_mask(path, self.max_pixels, kind="instance mask")
        return align_mask(ids, shape, source.orientation, path).astype(np.int32)

    def _samples(self, index: int) -> tuple:
        """What the geometry places: image, raw mask and, for instance training, the separation map (all ignored
        where the image has no instance mask)."""
        pixels, mask, shape, source = self._read(index, mapped=False)  # the geometry maps the labels
        if self.separation is None:
            return pixels, mask
        ids = self.load_instances(index, shape, source)
        target = np.full(shape, IGNORE_INDEX, np.uint8)
        if ids is not None:
            target = np.rint(separation_target(ids, self.separation) * SEPARATION_LEVELS).astype(np.uint8)
        return pixels, mask, SeparationMap(torch.from_numpy(target))

    def draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training sample before its colour stage: the placed pixels (as read: uint8 or float), the mask (with a
        separation, the (2, H, W) mask and map) and the colour's random numbers, for the training loop to finish per
        batch on the device (transforms.Augmentation)."""
        return self.transform.draw(*self._samples(index))

    def __getitem__(self, index: int) -> tuple:
        """The finished sample (the image normalised float32), or, with image_size None, the image as read and its
        mask, and with instances its object ids (None where it has none)."""
        if self.transform is not None:
            return self.transform(*self._samples(index))
        pixels, mask, shape, source = self._read(index, mapped=True)
        pixels, mask = pixels.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if self.instance_paths is None:
            return pixels, mask
        ids = self.load_instances(index, shape, source)
        return pixels, mask, None if ids is None else torch.from_numpy(ids)


class SkipBadSamples(Dataset):
    """Survives samples that fail to load, and says which files failed.

    Training replaces a bad sample by the next good one; validation ("blank") puts an all-ignore
    sample in its place, so no image is counted twice in the metrics. Items are
    (image, mask, skipped) where skipped names the failed files ("" if none), so the training
    loop can report them from any DataLoader worker. A key may be (seed, index): the seed then
    fixes the sample's augmentation (see EpochSampler).
    """

    def __init__(
        self,
        dataset: SegmentationFolder,
        strict: bool = False,
        replace: bool = True,
        max_tries: int = 10,
        *,
        before_colour: bool = False,
    ):
        """before_colour: items are (pixels, mask, colour draws, skipped), see SegmentationFolder.draw."""
        self.dataset, self.strict, self.replace, self.max_tries = dataset, strict, replace, max_tries
        self.fetch = dataset.draw if before_colour else dataset.__getitem__

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        if not isinstance(key, tuple):
            return self._first_good(key)
        seed, index = key
        # The transforms draw from torch's global generator: seed a private copy of it, not the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._first_good(index)

    def _first_good(self, index: int) -> tuple:
        skipped = []
        for attempt in range(self.max_tries if self.replace else 1):
            try:
                return *self.fetch((index + attempt) % len(self.dataset)), "\n".join(skipped)
            except BadSampleError as err:
                if self.strict:
                    raise
                skipped.append(str(err))
        if not self.replace:
            size = self.dataset.image_size or 1
            dtype = torch.float32 if self.dataset.image_size else torch.uint8
            blank = torch.zeros(self.dataset.reading.channels, size, size, dtype=dtype)
            ids = () if self.dataset.instance_paths is None else (None,)
            return blank, torch.full((size, size), IGNORE_INDEX, dtype=torch.uint8), *ids, skipped[0]
        raise BadSampleError(f"{self.max_tries} bad samples in a row: " + "; ".join(skipped))
