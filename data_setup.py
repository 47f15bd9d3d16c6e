"""train.py's data from its settings: the four folders (COCO files rendered to mask folders), the training and
validation sets (label mapping, reading rule and normalisation found on the training set), the demo built and the
labels scanned by rank 0 first, and the loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from torch.utils.data import DataLoader

from checkpoints import DataSpec
from coco import cached_masks
from dataset import SegmentationFolder, choose_reading
from demo import DEMO_IMAGES, DEMO_ROOTS, make_demo_data
from errors import UserError
from files import require_folder
from instances import ObjectRule
from intensity import check_display_channel
from loaders import build_loaders
from sampling import Sampling
from settings import DataSettings, SampleSettings, TrainSettings
from transforms import Crop
from utils import Runtime

log = logging.getLogger(__name__)


@dataclass
class DataPaths:
    train_images: Path
    train_masks: Path
    val_images: Path
    val_masks: Path
    train_instances: Path | None = None  # instance masks: the run learns objects where the training set has them
    val_instances: Path | None = None


def instance_folder(data: DataSettings, root: Path | None, split: str) -> Path | None:
    """--{split}-instances, else ROOT/masks_instance/{split} where it exists; None with --instances off."""
    if data.instances == "off":
        return None
    typed = getattr(data, f"{split}_instances")
    default = root / "masks_instance" / split if root is not None else None
    return typed or (default if default is not None and default.is_dir() else None)


def data_paths(data: DataSettings) -> DataPaths:
    """The four folders, rendering COCO annotations into cached mask folders where given."""
    root = DEMO_ROOTS[data.demo_style] if data.demo else data.data_root
    if root is not None:
        require_folder(root, "--data-root")
    paths, coco_instances = {}, {}
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            flag = f"{split}_{kind}"
            paths[flag] = getattr(data, flag) or (root / kind / split if root else None)
        coco_file = getattr(data, f"{split}_coco")
        if coco_file is not None and paths[f"{split}_images"] is not None:
            images = paths[f"{split}_images"]
            rendered = cached_masks(
                coco_file, images, data.coco_mode, max_pixels=data.max_pixels, instances=data.instances != "off"
            )
            paths[f"{split}_masks"], coco_instances[split] = rendered
        for kind in ("images", "masks"):
            if paths[f"{split}_{kind}"] is None:
                raise UserError(f"--{split}-{kind} is needed (or --data-root, or --{split}-coco with --{split}-images)")
        paths[f"{split}_instances"] = instance_folder(data, root, split) or coco_instances.get(split)
    if paths["train_instances"] is None:
        paths["val_instances"] = None  # objects are scored only by a model that learnt them
    return DataPaths(**paths)


def build_datasets(
    data: DataSettings, samples: SampleSettings, spec: DataSpec | None, separation: str
) -> tuple[SegmentationFolder, SegmentationFolder]:
    """The training set finds the label mapping and normalisation (unless resuming); validation reuses them.
    The input channels and normalisation they chose are the training set's reading and normalization. Where the
    training set has instance masks, its samples carry the separation map too, and validation its object ids."""
    paths = data_paths(data)
    reading, normalize = choose_reading(
        paths.train_images, data.in_channels, data.normalize, page=data.tiff_page, convert=data.convert_channels
    )
    check_display_channel(data.display_channel, reading.channels)
    labels = dict(ignore_value=data.ignore_value, binary=data.binary, max_pixels=data.max_pixels, reading=reading)
    crop = Crop(samples.crop_size, samples.scale_range, samples.base_size) if samples.crop_size else None
    train_set = SegmentationFolder(
        paths.train_images,
        paths.train_masks,
        samples.image_size,
        crop=crop,
        mapping=spec.mapping if spec else None,
        normalization=spec.normalization if spec else None,
        normalize=normalize,
        augment=samples.augment,
        limit=data.train_subset,
        instances_dir=paths.train_instances,
        separation=separation if paths.train_instances else None,
        **labels,
    )
    val_set = SegmentationFolder(
        paths.val_images,
        paths.val_masks,
        None,  # validation sees each image at its own size, as inference does
        mapping=train_set.mapping,
        normalization=train_set.normalization,
        unknown_labels="ignore" if data.ignore_unknown_labels else "error",
        instances_dir=paths.val_instances,
        **labels,
    )
    return train_set, val_set


def prepare_data(
    settings: TrainSettings, checkpoint: dict | None, runtime: Runtime
) -> tuple[SegmentationFolder, SegmentationFolder]:
    """Rank 0 builds the demo, renders COCO masks and scans labels first; the others then read its caches."""
    data, samples = settings.data, settings.samples
    spec = DataSpec.from_state(checkpoint) if checkpoint else None
    if data.demo and runtime.ddp.is_main:
        log.info(
            f"demo run: data {DEMO_ROOTS[data.demo_style]} ({DEMO_IMAGES['num_train']} train, "
            f"{DEMO_IMAGES['num_val']} val images), image size {samples.image_size}, "
            f"widths {','.join(map(str, settings.model.widths))}, {settings.optim.epochs} epochs, "
            f"batch {samples.batch_size}"
        )
    for turn in ("main", "others"):
        if (turn == "main") == runtime.ddp.is_main:
            if data.demo:
                make_demo_data(DEMO_ROOTS[data.demo_style], **DEMO_IMAGES, style=data.demo_style)
            datasets = build_datasets(data, samples, spec, settings.model.separation)
        runtime.ddp.barrier()
    return datasets


def data_spec(train_set: SegmentationFolder) -> DataSpec:
    """What the training set found, as the checkpoint saves it: the label mapping, reading rule, normalisation."""
    objects = (
        ObjectRule.for_separation(train_set.separation, train_set.object_areas()) if train_set.separation else None
    )
    return DataSpec(train_set.mapping, train_set.reading, train_set.normalization, objects)


def training_loaders(
    settings: TrainSettings, train_set: SegmentationFolder, val_set: SegmentationFolder, runtime: Runtime
) -> tuple[DataLoader, DataLoader]:
    """loaders.build_loaders as the settings ask for them."""
    samples = settings.samples
    return build_loaders(
        train_set,
        val_set,
        batch_size=samples.batch_size,
        workers=samples.workers,
        weighted=samples.sampler == "weighted",
        seed=settings.run.seed,
        strict=settings.data.strict,
        runtime=runtime,
        min_epoch_samples=samples.min_epoch_samples,
    )


def validation_sampling(samples: SampleSettings) -> Sampling:
    """What inference.py will do with this model by default, unless --val-mode says otherwise."""
    sampling = Sampling.for_training(samples.image_size, samples.crop_size, samples.base_size)
    return replace(sampling, mode=samples.val_mode) if samples.val_mode else sampling


def validation_pixels(samples: SampleSettings, val_set: SegmentationFolder) -> float:
    """The pixels one validation shows the network, for a time budget's estimate of its cost."""
    if validation_sampling(samples).mode == "resize":
        return len(val_set) * samples.image_size**2
    return float(val_set.class_counts.sum())  # labelled pixels: about every pixel of the images
