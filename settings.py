"""train.py's settings, resolved once by config.py (typed flags, a --config file, the checkpoint being resumed,
a preset, the demo's values, the defaults) into frozen parts, one per job: the modules below take a part or
plain values, never the command line. What a run discovers (channels, normalisation, the epochs a time budget
fits) is returned where it is found and recorded beside these (recorded_flags), never written into them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class DataSettings:
    """Where the images and masks are and how files become labels and input channels."""

    demo: bool  # no data flags: the built-in demo
    demo_style: str
    data_root: Path | None
    train_images: Path | None
    train_masks: Path | None
    val_images: Path | None
    val_masks: Path | None
    train_coco: Path | None
    val_coco: Path | None
    train_instances: Path | None
    val_instances: Path | None
    instances: str  # auto: learn objects wherever instance masks are found; off: classes only
    coco_mode: str
    binary: bool
    ignore_value: int
    ignore_unknown_labels: bool
    train_subset: int | None
    strict: bool
    max_pixels: int
    in_channels: int | str  # a count, or "auto": the first training image's
    normalize: str  # auto, imagenet, dataset or none
    tiff_page: int
    convert_channels: bool
    display_channel: int | None


@dataclass(frozen=True)
class SampleSettings:
    """How training samples are cut, augmented, drawn and batched, and how validation shows images."""

    image_size: int
    crop_size: int  # 0: whole images squashed to image_size
    scale_range: tuple[float, float]
    base_size: int | None
    val_mode: str | None
    augment: str
    sampler: str
    min_epoch_samples: int
    workers: int | str  # a count, or "auto"
    batch_size: int

    @property
    def side(self) -> int:
        """The side of a training sample."""
        return self.crop_size or self.image_size


@dataclass(frozen=True)
class ModelSettings:
    """The network and how it runs."""

    widths: tuple[int, ...]
    dropout: float
    separation: str  # what the separation head learns where instances are trained (instances.SEPARATIONS)
    grad_checkpoint: bool
    sync_bn: bool
    compile: bool


@dataclass(frozen=True)
class OptimSettings:
    """The loss, the optimiser and its schedule, and how long training lasts."""

    loss: str
    dice_weight: float
    ce_weight: float
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: int
    schedule: str
    ema: float | None
    accumulate: int
    clip_grad: float | None
    epochs: int
    time_budget: float | None  # minutes
    early_stop: int


@dataclass(frozen=True)
class RunSettings:
    """Hardware, seeding and bookkeeping."""

    preset: str | None
    config: Path | None
    device: str
    precision: str
    channels_last: bool | None  # None: measured at start-up (model_setup.measured_runtime)
    dist_timeout: int
    seed: int
    run_dir: Path
    save_every: int
    val_every: int | str  # an epoch interval, or "auto": chosen after the first validation
    resume: str | None


PARTS = {
    "data": DataSettings,
    "samples": SampleSettings,
    "model": ModelSettings,
    "optim": OptimSettings,
    "run": RunSettings,
}


@dataclass(frozen=True)
class TrainSettings:
    data: DataSettings
    samples: SampleSettings
    model: ModelSettings
    optim: OptimSettings
    run: RunSettings

    @classmethod
    def from_flags(cls, flags: dict) -> TrainSettings:
        """Each part takes its fields by flag name; a flag no part names is a programming error."""
        parts = {name: part(**{f.name: flags[f.name] for f in fields(part)}) for name, part in PARTS.items()}
        unused = set(flags) - {f.name for part in PARTS.values() for f in fields(part)}
        if unused:
            raise TypeError(f"flags that no settings part holds: {sorted(unused)}")
        return cls(**parts)

    def flags(self) -> dict:
        """Every setting by its flag name, as one flat dict."""
        return {name: value for part in PARTS for name, value in asdict(getattr(self, part)).items()}


def plain_flags(flags: dict) -> dict:
    """Flags as strings, numbers and lists, so they load with weights_only=True and write as YAML."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}


def recorded_flags(settings: TrainSettings, **discovered) -> dict:
    """What the run's checkpoints and config.yaml record: the settings with what the run discovered in place of
    "auto" (in_channels, normalize, val_every) and the epochs a time budget planned."""
    unknown = set(discovered) - set(settings.flags())
    if unknown:
        raise TypeError(f"discovered values for no setting: {sorted(unknown)}")
    return plain_flags({**settings.flags(), **discovered})
