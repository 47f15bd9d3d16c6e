"""Segment every image in a folder: flags -> checkpoint -> mask and overlay PNGs on disk.

Masks are written at each image's original size and hold the original mask values the model
was trained on, so they compare directly with the training masks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from checkpoints import default_checkpoint
from cli import (
    ArgumentParser,
    add_channel_flags,
    add_ema_flag,
    add_hardware_flags,
    float_in,
    image_size_type,
    non_negative_int,
    positive_int,
    run_cli,
    setup_logging,
)
from errors import UserError
from files import check_writable_folder, refuse_inside, require_folder
from image_io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, conversion_for
from listing import list_images
from predictions import Outputs, segment_folder
from predictor import Predictor
from records import format_report, write_report
from sampling import SAMPLING_MODES
from slide_io import first_readable, is_slide
from slides import SlidesResult, segment_slides
from utils import keep_freed_cpu_memory

log = logging.getLogger(__name__)


def add_sampling_flags(p: ArgumentParser) -> None:
    """How images are shown to the network; each default comes from the checkpoint (predictor.Sampling)."""
    p.add_argument(
        "--mode",
        choices=SAMPLING_MODES,
        help="resize: the whole image squashed to the training square; slide: overlapping tiles at native "
        "resolution (default: slide for --crop-size models, resize otherwise)",
    )
    p.add_argument(
        "--tile",
        type=image_size_type,
        help="slide: largest tile width in px; tiles are the training crop high (default: twice the crop)",
    )
    p.add_argument(
        "--overlap",
        type=float_in(0, 1, high_open=True),
        help="slide: least fraction of a tile its neighbours share (1/16); tiles are then spaced evenly",
    )
    p.add_argument(
        "--scale",
        type=float_in(0, 16, low_open=True),
        help="slide: rescale images by this first (default 1, or the training --base-size)",
    )


def add_object_flags(p: ArgumentParser) -> None:
    """How an instance model's maps become objects; each default is the checkpoint's (instances.ObjectRule)."""
    p.add_argument(
        "--min-object-size",
        type=positive_int,
        metavar="PIXELS",
        help="instance models: smaller objects are dropped (default: the checkpoint's, from its training objects)",
    )
    p.add_argument(
        "--seed-threshold",
        type=float_in(0, 1, low_open=True, high_open=True),
        help="instance models: where the separation map seeds objects (distance: above it; boundary: below it; "
        "default: the checkpoint's)",
    )


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_dir", type=Path, required=True, help="folder of images to segment")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, help="default: best.pt of the most recently written run in runs/")
    model.add_argument("--onnx", type=Path, help="an export.py file, run by onnxruntime on the CPU, instead")
    p.add_argument(
        "--output_dir",
        type=Path,
        help="default: <run>/predictions/<input folder name>; never inside --input_dir",
    )
    p.add_argument("--recursive", action="store_true", help="also segment images in subfolders")
    p.add_argument(
        "--masks_dir",
        type=Path,
        help="ground-truth masks (same file stems): also score the predictions (mIoU, per-class report.csv/.json, "
        "confusion matrix)",
    )
    add_sampling_flags(p)
    add_slide_flags(p)
    p.add_argument("--tta", action="store_true", help="average the logits of the image and its horizontal flip")
    add_object_flags(p)
    add_ema_flag(p)
    add_channel_flags(p)
    p.add_argument("--save-probs", action="store_true", help="also write per-class probabilities as float16 .npy")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist (default: skip them)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help="images per forward pass (resize); slide: tiles holding as many pixels as this many training crops; "
        "default 8 on a GPU, 2 on the CPU (larger passes are hardly faster there and hold more memory)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        help="processes decoding images; default 2 on a GPU, 0 on the CPU, whose cores the model already fills",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are skipped and named, never decoded",
    )
    add_hardware_flags(p)
    return p


def find_inputs(input_dir: Path, recursive: bool) -> list[Path]:
    files = list_images(require_folder(input_dir, "--input_dir"), recursive, slides=True)
    if not files:
        raise UserError(f"{input_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}, or .zarr slides)")
    return files


def add_slide_flags(p: ArgumentParser) -> None:
    """Slides: zarr folders and tiled TIFFs over --max-pixels, read and written by tiles (slides.py)."""
    p.add_argument(
        "--level",
        type=non_negative_int,
        default=0,
        help="slides: the pyramid level to segment (0: full resolution; the level the model was trained at)",
    )
    p.add_argument(
        "--skip-background",
        action="store_true",
        help="slides: tiles that are uniform on the slide's smallest pyramid level (glass) are not run, but labelled "
        "background",
    )
    p.add_argument(
        "--slide-format",
        choices=("tif", "zarr"),
        default="tif",
        help="slides: their masks as a tiled, pyramidal BigTIFF or an OME-Zarr folder",
    )


def resolve_output_dir(args: argparse.Namespace, model_file: Path) -> Path:
    """Default: <run>/predictions/<input folder> for a model file in <run>/checkpoints, else beside the file."""
    folder = Path(os.path.realpath(model_file)).parent
    run = folder.parent if folder.name == "checkpoints" else folder
    output = args.output_dir or run / "predictions" / Path(os.path.realpath(args.input_dir)).name
    refuse_inside(
        output,
        args.input_dir,
        f"{output}: --output_dir must not be inside --input_dir {args.input_dir} (inputs are never modified)",
    )
    return output


def scale_text(sampling) -> str:
    if sampling.base_size:
        return f"images rescaled to a shorter side of {sampling.base_size} px"
    return "images at native resolution" if sampling.scale == 1 else f"images rescaled by {sampling.scale:g}"


def check_channels(inputs: list[Path], predictor: Predictor, display_channel: int | None) -> None:
    """A folder the model cannot take (colour photos for a 1-channel model) is one line, not a warning per file."""
    first = first_readable(inputs, predictor.reading.page)
    if first is not None:
        conversion_for(first[0], first[1].channels, predictor.reading)
    if display_channel is not None and display_channel >= predictor.reading.channels:
        raise UserError(
            f"--display-channel {display_channel}: the model has channels 0..{predictor.reading.channels - 1}"
        )


def load_predictor(args: argparse.Namespace, model_file: Path) -> Predictor:
    options = {"tta": args.tta, "batch_size": args.batch_size, "convert": args.convert_channels}
    options["objects"] = {"min_size": args.min_object_size, "seed_threshold": args.seed_threshold}
    sampling = {"mode": args.mode, "tile": args.tile, "overlap": args.overlap, "scale": args.scale}
    if args.onnx is None:
        predictor, measured = Predictor.measured(
            model_file, args.device, args.precision, args.channels_last, ema=args.ema, **options, **sampling
        )
        if measured.seconds:
            log.info(f"start-up chose: {measured.describe('a forward pass')}")
        return predictor
    if args.device not in ("auto", "cpu") or args.precision not in ("auto", "fp32"):
        raise UserError(
            "--onnx runs on onnxruntime's CPU provider in fp32; --device and --precision apply to --checkpoint"
        )
    predictor = Predictor.from_onnx(model_file, **options, **sampling)
    log.info(f"running {model_file} with onnxruntime ({', '.join(predictor.network.session.get_providers())}), fp32")
    return predictor


def run_slides(args: argparse.Namespace, predictor: Predictor, slides: list[Path], masks: Path) -> SlidesResult:
    """slides.segment_slides as the flags ask, and the line that says what it did."""
    options = dict(level=args.level, skip_background=args.skip_background, overwrite=args.overwrite)
    done = segment_slides(predictor, slides, args.input_dir, masks, zarr_output=args.slide_format == "zarr", **options)
    log.info(f"{done.written} slides segmented; {done.already_done} already done; {done.unreadable} unreadable")
    return done


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    inputs = find_inputs(args.input_dir, args.recursive)
    true_masks = None
    if args.masks_dir is not None:
        true_masks = {p.stem: p for p in list_images(require_folder(args.masks_dir, "--masks_dir"))}
    model_file = args.onnx or args.checkpoint or default_checkpoint()
    predictor = load_predictor(args, model_file)
    check_channels(inputs, predictor, args.display_channel)
    output_dir = check_writable_folder(resolve_output_dir(args, model_file), "--output_dir")
    objects = predictor.objects is not None
    outputs = Outputs(output_dir, save_probs=args.save_probs, display_channel=args.display_channel, objects=objects)
    keep_freed_cpu_memory(predictor.runtime.device)
    sampling = predictor.sampling
    slide_only = [flag for flag in ("tile", "overlap", "scale") if getattr(args, flag) is not None]
    if sampling.mode == "resize" and slide_only:
        raise UserError(f"--{slide_only[0]} applies to --mode slide only (this checkpoint resizes; add --mode slide)")
    if sampling.mode == "slide":
        tiles = f"{sampling.image_size} px high, up to {sampling.tile} wide, overlap at least {sampling.overlap:.3g}"
        log.info(f"sliding tiles {tiles}, {scale_text(sampling)}")
    slides = [path for path in inputs if is_slide(path, args.max_pixels)]
    done = run_slides(args, predictor, slides, outputs.root / "masks") if slides else SlidesResult()
    images = [path for path in inputs if path not in slides]
    result = segment_folder(
        predictor,
        images,
        args.input_dir,
        outputs,
        true_masks=true_masks,
        workers=args.workers,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
    )
    log.info(
        f"{result.written} images segmented into {outputs.root}; {result.already_done} already done "
        f"(--overwrite to redo); {result.unreadable} unreadable"
    )
    if objects and images:
        log.info(f"{result.objects} objects: {outputs.root / 'objects.csv'}, coco_results.json, instances/")
    if true_masks is not None and result.evaluated == 0:
        log.info(f"no prediction had a mask of the same name in {args.masks_dir}")
    elif true_masks is not None:
        scores = result.matrix.compute()
        rows = write_report(result.matrix, predictor.mapping.names, outputs.root)
        log.info(
            f"evaluation on {result.evaluated} images: mIoU {scores['miou']:.4f}  mean Dice {scores['mdice']:.4f}  "
            f"pixel accuracy {scores['pixel_acc']:.4f}\n{format_report(rows)}\n"
            f"written: {outputs.root / 'report.csv'}, report.json, confusion_matrix.png"
        )
    todo, unreadable = result.todo + len(slides) - done.already_done, result.unreadable + done.unreadable
    return 1 if todo and unreadable == todo else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
