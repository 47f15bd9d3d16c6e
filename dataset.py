"""Image + mask folders -> (image, mask) tensors: pairing by file name, the transforms, bad-sample handling."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from image_io import (
    DEFAULT_MAX_PIXELS,
    RGB,
    BadSampleError,
    DataError,
    Reading,
    align_mask,
    conversion_for,
    first_readable,
    list_images,
    read_image,
    read_mask,
)
from intensity import IMAGENET, Normalization, build_normalization, default_normalize
from labels import IGNORE_INDEX, LabelMapping, read_class_names, scan_masks
from utils import require_folder

log = logging.getLogger(__name__)


def pair_files(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """Pair images and masks by file stem; report unpaired files once."""
    for folder in (images_dir, masks_dir):
        require_folder(folder)
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


def choose_reading(
    images_dir: Path, channels: int | str, normalize: str, *, page: int = 0, convert: bool = False
) -> tuple[Reading, str]:
    """--in-channels auto and --normalize auto resolved from the first image's header, which must fit the model:
    one line now rather than every sample skipped later. Returns the reading rule and the normalisation's name."""
    first = first_readable(list_images(images_dir), page)  # None: the dataset will say what is wrong
    found, dtype = (first[1].channels, first[1].dtype) if first else (3, "uint8")
    reading = Reading(found if channels == "auto" else channels, page, convert)
    if first:
        conversion_for(first[0], found, reading)
    return reading, default_normalize(reading.channels, dtype) if normalize == "auto" else normalize


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


def rotation_sources(angle: float, height: int, width: int) -> torch.Tensor:
    """For each pixel of an image rotated by angle degrees about its centre (counter-clockwise, as torchvision's
    rotate turns it), the flat index of its nearest source pixel; height * width where that lies outside."""
    theta = math.radians(angle)
    ys = torch.arange(height, dtype=torch.float64) + 0.5 - height / 2
    xs = torch.arange(width, dtype=torch.float64) + 0.5 - width / 2
    cols = ((math.cos(theta) * xs + (width / 2 - 0.5))[None, :] - (math.sin(theta) * ys)[:, None]).round_()
    rows = ((math.sin(theta) * xs)[None, :] + (math.cos(theta) * ys + (height / 2 - 0.5))[:, None]).round_()
    outside = (rows < 0) | (rows > height - 1) | (cols < 0) | (cols > width - 1)
    return rows.mul_(width).add_(cols).masked_fill_(outside, height * width).long().flatten()


def gather_pixels(inpt: torch.Tensor, sources: torch.Tensor, fill) -> torch.Tensor:
    """inpt (..., H, W) with each pixel taken from the flat source index (H * W: the fill value); contiguous, as
    the colour transforms after it run several times slower on a channels-last layout."""
    *channels, height, width = inpt.shape
    pixels = inpt.movedim((-2, -1), (0, 1)).reshape(height * width, *channels)
    filler = torch.as_tensor(0 if fill is None else fill, dtype=pixels.dtype).expand(1, *channels)
    picked = torch.cat((pixels, filler)).index_select(0, sources)
    return picked.view(height, width, *channels).movedim((0, 1), (-2, -1)).contiguous()


class RandomRotation(v2.RandomRotation):
    """torchvision's RandomRotation (nearest, the same angle draws, the same pixels), with one sampling grid for
    the image and its mask: each output pixel's source is computed once and gathered from both as integers,
    instead of a float grid_sample of each with an extra channel for the fill."""

    def make_params(self, flat_inputs: list) -> dict:
        params = super().make_params(flat_inputs)
        params["sources"] = rotation_sources(params["angle"], *v2.query_size(flat_inputs))
        return params

    def transform(self, inpt, params: dict):
        rotated = gather_pixels(inpt.as_subclass(torch.Tensor), params["sources"], self._fill[type(inpt)])
        return tv_tensors.wrap(rotated, like=inpt)


class ChannelJitter(v2.Transform):
    """Brightness and contrast drawn for each channel on its own, x -> b * (m + c * (x - m)) with m the channel's
    mean: the colour jitter of images whose channels are not an RGB photo's (hue and saturation mean nothing
    there). uint8 images stay uint8 (rounded, clamped); masks pass untouched."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3):
        super().__init__()
        self.brightness, self.contrast = brightness, contrast

    def make_params(self, flat_inputs: list) -> dict:
        channels = v2.query_chw(flat_inputs)[0]
        draw = [
            torch.empty(channels, 1, 1).uniform_(1 - spread, 1 + spread) for spread in (self.brightness, self.contrast)
        ]
        return {"brightness": draw[0], "contrast": draw[1]}

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        pixels = inpt.as_subclass(torch.Tensor)
        values = pixels if pixels.is_floating_point() else pixels.float()
        mean = values.mean((-2, -1), keepdim=True)
        jittered = params["brightness"] * (mean + params["contrast"] * (values - mean))
        if not pixels.is_floating_point():
            jittered = jittered.round_().clamp_(0, 255).to(pixels.dtype)
        return tv_tensors.wrap(jittered, like=inpt)


def build_transforms(
    image_size: int,
    augment: str = "none",
    normalization: Normalization | None = IMAGENET,
    *,
    crop_size: int | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    photo: bool = True,
) -> v2.Compose:
    """Joint image/mask transforms; masks resize nearest, and pad and rotate in the ignore label.

    crop_size: native-resolution training, a random rescale then a random crop_size square (padded where
    the image is smaller), instead of the whole image squashed to image_size.
    normalization None: no conversion to float and no normalisation (uint8 images stay uint8).
    photo: 8-bit RGB, whose colours ColorJitter may shift; other images get brightness and contrast per channel.
    """
    if augment not in ("none", "basic", "strong"):
        raise ValueError(f"unknown augmentation {augment!r}; choose none, basic or strong")
    size, strong = (image_size, image_size), augment == "strong"
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    if crop_size:
        geometry = [RandomScale(scale_range, base_size), v2.RandomCrop(crop_size, pad_if_needed=True, fill=fill)]
    elif augment == "none":
        geometry = [v2.Resize(size, antialias=True)]
    else:
        geometry = [v2.RandomResizedCrop(size, scale=(0.25 if strong else 0.5, 1.0), antialias=True)]
    colour = []
    if augment != "none":
        geometry += [
            v2.RandomHorizontalFlip(),
            *([v2.RandomVerticalFlip()] if strong else []),
            RandomRotation(15, fill=fill),
        ]
        colour = [
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05 if strong else 0.0) if photo else ChannelJitter(0.3, 0.3),
            *([v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.3)] if strong else []),
        ]
    if normalization is None:
        return v2.Compose([*geometry, *colour])
    # Colour on float: on uint8 every jitter op converts to float and back (four times the work).
    to_float = v2.ToDtype(torch.float32, scale=True)  # uint8 to 0..1; float pixels are left as they are
    return v2.Compose([*geometry, to_float, *colour, v2.Lambda(normalization, tv_tensors.Image)])


class SegmentationFolder(Dataset):
    """Images and masks paired by stem; labels mapped through the training set's mapping."""

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        image_size: int | None = 256,
        *,
        crop: dict | None = None,
        mapping: LabelMapping | None = None,
        ignore_value: int = IGNORE_INDEX,
        binary: bool = False,
        augment: str = "none",
        unknown_labels: str = "error",
        reading: Reading = RGB,
        normalization: Normalization | None = None,
        normalize: str = "imagenet",
        scan_workers: int = 4,
        limit: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """image_size None: items are the image as read (uint8 or float) and the mask, for validation at full size.
        crop: build_transforms' crop_size, scale_range and base_size, for native-resolution crops.
        mapping: the training set's (None: found here); limit keeps the first N pairs, after the mapping.
        reading: how image files become the model's channels; normalization: the training set's (None: chosen here
        by the rule normalize names, see intensity.build_normalization)."""
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
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
        self.class_counts = self._class_counts(per_image)
        self.image_size = image_size
        self.transform = None
        if image_size is not None:
            crop = crop or {}
            self.transform = build_transforms(image_size, augment, self.normalization, photo=self.photo, **crop)

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

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Decoded, mapped, full-size image (C, H, W) and mask, before any transform."""
        image, orientation = read_image(self.pairs[index][0], self.max_pixels, self.reading)
        return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), self.load_mask(index, image, orientation)

    def load_mask(self, index: int, image: np.ndarray, orientation: int | None) -> tv_tensors.Mask:
        """The mask of a decoded (H, W, C) image, turned as the image was, its values mapped to class indices."""
        mask_path = self.pairs[index][1]
        mask = align_mask(read_mask(mask_path, self.max_pixels), image.shape[:2], orientation, mask_path)
        return tv_tensors.Mask(torch.from_numpy(self.lut[mask]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index) if self.transform is None else self.transform(*self.load(index))
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
        if not isinstance(key, tuple):
            return self._first_good(key)
        seed, index = key
        # The transforms draw from torch's global generator: seed a private copy of it, not the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._first_good(index)

    def _first_good(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
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
            size = self.dataset.image_size or 1
            dtype = torch.float32 if self.dataset.image_size else torch.uint8
            blank = torch.zeros(self.dataset.reading.channels, size, size, dtype=dtype)
            return blank, torch.full((size, size), IGNORE_INDEX, dtype=torch.long), skipped[0]
        raise BadSampleError(f"{self.max_tries} bad samples in a row: " + "; ".join(skipped))
