"""train.py's flags: their names, types, defaults and help, in groups (config.py fills them in and resolves
them into settings)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import (
    WORKERS_HELP,
    ArgumentParser,
    add_channel_flags,
    add_hardware_flags,
    crop_size_type,
    float_in,
    image_size_type,
    in_channels_type,
    mask_value_type,
    non_negative_int,
    positive_int,
    seed_type,
    val_every_type,
    widths_type,
    workers_type,
)
from coco import COCO_MODES
from colour import AUGMENT_LEVELS
from demo import DEMO_STYLES
from image_io import DEFAULT_MAX_PIXELS
from instances import DEFAULT_SEPARATION, SEPARATIONS
from intensity import NORMALIZE_CHOICES
from labels import IGNORE_INDEX
from losses import LOSSES
from model import DEFAULT_WIDTHS
from optimizer import OPTIMIZERS, SCHEDULES
from presets import PRESETS
from transforms import SCALE_RANGE


def add_data_flags(p: ArgumentParser) -> None:
    data = p.add_argument_group("data (none given: the built-in demo under data/demo or data/demo-texture)")
    data.add_argument(
        "--demo-style",
        choices=DEMO_STYLES,
        default="colour",
        help="the demo's classes differ in colour and texture, or (texture) in texture and outline only: harder, "
        "a small slice overfits",
    )
    data.add_argument("--data-root", type=Path, help="reads DIR/images/{train,val} and DIR/masks/{train,val}")
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            data.add_argument(f"--{split}-{kind}", type=Path, help=f"{split} {kind} folder (overrides --data-root)")
    for split in ("train", "val"):
        data.add_argument(
            f"--{split}-instances",
            type=Path,
            help=f"{split} instance masks: one id per object, 0 background (default: DIR/masks_instance/{split} where "
            "it exists)",
        )
    data.add_argument(
        "--instances",
        choices=("auto", "off"),
        default="auto",
        help="auto: learn separate objects (a separation head beside the classes) wherever instance masks are found; "
        "off: classes only",
    )
    data.add_argument("--train-coco", type=Path, help="COCO instances json of the training images (rendered once)")
    data.add_argument("--val-coco", type=Path, help="COCO instances json for the validation images")
    data.add_argument(
        "--coco-mode",
        choices=COCO_MODES,
        default="categories",
        help="classes rendered from COCO: one per category, the 9 super-groups, or binary",
    )
    data.add_argument("--binary", action="store_true", help="every nonzero, non-ignore mask value becomes class 1")
    data.add_argument(
        "--ignore-value", type=mask_value_type, default=IGNORE_INDEX, help="mask value that marks pixels to ignore"
    )
    data.add_argument(
        "--ignore-unknown-labels",
        action="store_true",
        help="ignore validation mask values the training set never had, instead of stopping",
    )
    data.add_argument(
        "--train-subset", type=positive_int, help="train on the first N training images only (classes from all)"
    )
    data.add_argument("--strict", action="store_true", help="stop at a bad sample instead of skipping it")
    data.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images and masks are bad samples (skipped and named), never decoded",
    )


def add_image_flags(p: ArgumentParser) -> None:
    """How files become the model's input channels and values (image_io.ImageReading, intensity.Normalization)."""
    images = p.add_argument_group("image channels and values")
    images.add_argument(
        "--in-channels",
        type=in_channels_type,
        default=3,
        metavar="N|auto",
        help="the model's input channels: 3 reads every image as RGB; auto: as many as the first training image "
        "has (grey 1, colour 3, a TIFF stack its own)",
    )
    images.add_argument(
        "--normalize",
        choices=("auto", *NORMALIZE_CHOICES),
        default="auto",
        help="imagenet: ImageNet's mean and std; dataset: each channel's mean and std over the training images "
        "(16-bit and float data clipped to their 0.5-99.5 percentiles first); none: 8-bit scaled to 0..1, 16-bit "
        "to 0..1, floats as stored. auto: imagenet for 8-bit RGB, dataset otherwise",
    )
    images.add_argument(
        "--tiff-page",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="which image of a multi-image TIFF (pages, z or time planes) to read",
    )
    add_channel_flags(images)


def add_input_flags(p: ArgumentParser) -> None:
    """How samples reach the model: size, augmentation, sampling, loader processes."""
    inputs = p.add_argument_group("inputs")
    inputs.add_argument(
        "--image-size",
        type=image_size_type,
        default=256,
        help="with --crop-size 0: whole images and masks are squashed to this square",
    )
    inputs.add_argument(
        "--crop-size",
        type=crop_size_type,
        default=256,
        help="train on random N x N crops at native resolution (aspect ratio kept); validation and inference slide "
        "N px tiles over each image. 0: squash whole images to --image-size instead (the reference design)",
    )
    inputs.add_argument(
        "--scale-range",
        type=float_in(0, 16, low_open=True),
        nargs=2,
        default=SCALE_RANGE,
        metavar=("LOW", "HIGH"),
        help="--crop-size: each training image is first rescaled by a random factor in this range",
    )
    inputs.add_argument(
        "--base-size",
        type=image_size_type,
        help="--crop-size: the scale factors are relative to a shorter side of this many px (default: native)",
    )
    inputs.add_argument(
        "--val-mode",
        choices=("resize", "slide"),
        help="how validation shows images to the model (default: slide, or resize with --crop-size 0); "
        "either way it is scored at each image's original size, as inference.py scores",
    )
    inputs.add_argument(
        "--augment",
        choices=tuple(AUGMENT_LEVELS),
        default="basic",
        help="joint image/mask augmentation of the training set",
    )
    inputs.add_argument(
        "--sampler",
        choices=("weighted", "uniform"),
        default="weighted",
        help="weighted: images holding rare classes are drawn more often",
    )
    inputs.add_argument(
        "--min-epoch-samples",
        type=non_negative_int,
        default=100,
        metavar="N",
        help="an epoch draws at least N images: smaller sets are drawn several times per epoch, so validation and "
        "checkpoints do not take most of a tiny set's time (0: one pass)",
    )
    inputs.add_argument("--workers", type=workers_type, default="auto", metavar="N|auto", help=WORKERS_HELP)


def add_model_flags(p: ArgumentParser) -> None:
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--widths", type=widths_type, default=DEFAULT_WIDTHS, help="encoder widths, comma-separated")
    model.add_argument(
        "--separation",
        choices=SEPARATIONS,
        default=DEFAULT_SEPARATION,
        help="with instance masks, what the separation head learns: boundary, each object's edge pixels; distance, "
        "each pixel's distance to its object's edge (over the largest); seeded watershed turns either into objects",
    )
    model.add_argument(
        "--dropout",
        type=float_in(0, 1, high_open=True),
        default=0.0,
        help="Dropout2d in the bottleneck and decoder blocks",
    )
    model.add_argument(
        "--loss",
        choices=LOSSES,
        default="dice_ce",
        help="dice_ce: soft Dice + cross-entropy; weighted_ce: class weights from mask statistics",
    )
    model.add_argument("--dice-weight", type=float_in(0), default=1.0, help="weight of the Dice term of dice_ce")
    model.add_argument("--ce-weight", type=float_in(0), default=1.0, help="weight of the cross-entropy term of dice_ce")
    model.add_argument("--epochs", type=positive_int, default=50)
    model.add_argument(
        "--time-budget",
        type=float_in(0, low_open=True),
        metavar="MINUTES",
        help="train for this wall-clock time instead of --epochs: the epochs that fit (to the step) are planned a few "
        "steps into the first epoch and again after every epoch (validation included), and the schedule spans them",
    )
    model.add_argument("--batch-size", type=positive_int, default=4)
    model.add_argument(
        "--lr",
        type=float_in(0, low_open=True),
        default=1e-3,
        help="initial learning rate (reached after --warmup-epochs), then annealed by --schedule",
    )
    model.add_argument(
        "--early-stop",
        type=non_negative_int,
        default=0,
        help="stop after N validations without a better val mIoU (0: never)",
    )


def add_recipe_flags(p: ArgumentParser) -> None:
    """The knobs segmentation papers turn; each off by default, so the reference recipe (Adam, cosine) stays."""
    recipe = p.add_argument_group("training recipe (defaults: the reference design's Adam + cosine)")
    recipe.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default="adam",
        help="sgd: nnU-Net's, Nesterov momentum 0.99 (its recipe: --lr 1e-2 --schedule poly)",
    )
    recipe.add_argument(
        "--weight-decay",
        type=float_in(0),
        default=0.0,
        help="on convolution weights only (adam, sgd: L2; adamw: decoupled)",
    )
    recipe.add_argument("--warmup-epochs", type=non_negative_int, default=0, help="linear warmup to --lr over N epochs")
    recipe.add_argument(
        "--schedule", choices=SCHEDULES, default="cosine", help="decay after warmup: cosine to 0, or poly (power 0.9)"
    )
    recipe.add_argument(
        "--ema",
        type=float_in(0, 1, low_open=True, high_open=True),
        metavar="DECAY",
        help="keep an exponential moving average of the weights (e.g. 0.999): validated, saved, used by inference",
    )
    recipe.add_argument(
        "--accumulate", type=positive_int, default=1, help="gradient accumulation: one update every N batches"
    )
    recipe.add_argument(
        "--clip-grad", type=float_in(0, low_open=True), metavar="NORM", help="clip the gradient norm to NORM"
    )


def add_run_flags(p: ArgumentParser) -> None:
    run = p.add_argument_group("hardware and bookkeeping")
    add_hardware_flags(run)
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute each block's activations in the backward pass: far less memory, about a third slower",
    )
    run.add_argument(
        "--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over all ranks"
    )
    run.add_argument(
        "--dist-timeout",
        type=positive_int,
        default=600,
        help="seconds a rank waits for the others before the job fails (torchrun)",
    )
    run.add_argument("--seed", type=seed_type, default=0)
    run.add_argument("--run-dir", type=Path, help="default runs/<data>-<time>: events, checkpoints/, samples/")
    run.add_argument("--save-every", type=positive_int, default=10, help="checkpoint and sample panel every N epochs")
    run.add_argument(
        "--val-every",
        type=val_every_type,
        default="auto",
        metavar="N|auto",
        help="validate every N epochs, the first and the last always; auto: every epoch where validation is cheap, "
        "else as often as keeps it to a tenth of the run (from what the first validation cost)",
    )
    run.add_argument(
        "--resume",
        metavar="PATH|auto",
        help="continue from a checkpoint; auto: last.pt of --run-dir, or of the newest run in runs/",
    )


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(
        description="Train the residual self-attention U-Net. With no data flags it trains on the built-in demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="reference: the reference design's recipe (whole images squashed to --image-size 256, plain "
        "cross-entropy, batch 8, 50 epochs); flags typed with it still win",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="a YAML file of flags (a run's config.yaml replays it); flags typed on the command line win",
    )
    for add_flags in (
        add_data_flags,
        add_image_flags,
        add_input_flags,
        add_model_flags,
        add_recipe_flags,
        add_run_flags,
    ):
        add_flags(p)
    return p
