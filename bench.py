"""The numbers in the README: training and inference throughput against what the hardware allows.

All rows come from one run, so their ratios hold on a noisy machine: measured fp32 and bf16
matrix-multiply ceilings, training images/s and achieved GFLOP/s (counted with FlopCounterMode)
for the naive fp32 NCHW eager step, the default fast path and torch.compile, inference over a
folder for a naive per-image loop and for inference.py (PyTorch fp32 and default precision, and
onnxruntime on the CPU), its peak memory on four 24-megapixel photos, and the data loader's time per stage
and images/s per worker process on COCO-sized JPEGs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.folder_inference import report_folder
from benchmarks.large import report_large
from benchmarks.loader import report_loader
from benchmarks.objects import report_objects
from benchmarks.scale import report_scale
from benchmarks.training import report_training
from benchmarks.wholeslide import report_wholeslide
from cli import (
    ArgumentParser,
    add_device_flag,
    image_size_type,
    non_negative_int,
    positive_int,
    positive_int_upto,
    setup_logging,
    size_type,
    widths_type,
)
from demo import make_demo_data
from model import DEFAULT_WIDTHS
from presets import REFERENCE_WIDTHS
from utils import resolve_device

log = logging.getLogger(__name__)


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--widths", type=widths_type, default=REFERENCE_WIDTHS, help="encoder widths (default: the reference design's)"
    )
    p.add_argument("--image-size", type=image_size_type, default=256)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--classes", type=positive_int_upto(255), default=10)
    p.add_argument("--steps", type=positive_int, default=4, help="timed training steps per row")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="untimed steps before each row")
    p.add_argument("--images", type=positive_int, default=64, help="images in the inference and loader folder")
    add_device_flag(p)
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--rows", default="", help="comma-separated words: only the training rows whose label has one")
    p.add_argument(
        "--parts",
        default="training,inference,onnx,large,loader,scale,objects",
        help="comma-separated parts to run (onnx: CPU only; wholeslide, not by default: hours on a CPU)",
    )
    p.add_argument("--large-count", type=positive_int, default=4, help="large: how many photos")
    p.add_argument("--large-size", type=size_type, default=(6000, 4000), help="large, objects: photo WIDTHxHEIGHT")
    p.add_argument("--object-spacing", type=positive_int, default=100, help="objects: px between disc centres")
    p.add_argument(
        "--slide-sizes",
        type=lambda text: [size_type(part) for part in text.split(",")],
        default=[(20000, 20000), (60000, 60000)],
        help="wholeslide: comma-separated WIDTHxHEIGHT of the generated slides (the first also in memory)",
    )
    p.add_argument("--slide-widths", type=widths_type, default=DEFAULT_WIDTHS, help="wholeslide: the model's widths")
    p.add_argument("--scale-train", type=positive_int, default=5000, help="scale: training image/mask pairs")
    p.add_argument("--scale-val", type=positive_int, default=2000, help="scale: validation image/mask pairs")
    p.add_argument(
        "--scale-coco", type=non_negative_int, default=5000, help="scale: images prepare_masks.py renders (0: none)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    parts = set(args.parts.split(","))
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    log.info(
        f"device: {device.type} ({name}); widths {','.join(map(str, args.widths))}, {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} timed steps; torch {torch.__version__}"
    )
    if "training" in parts:
        report_training(args, device)
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        data = make_demo_data(root / "data", num_train=args.images, num_val=1, size=int(args.image_size * 1.25))
        report_folder(args, device, root, data / "images" / "train", parts)
        if "large" in parts:
            report_large(args, device, root)
        if "loader" in parts:
            report_loader(args, device, root)
        if "scale" in parts:
            report_scale(args, root / "scale")
        if "objects" in parts:
            report_objects(args)
        if "wholeslide" in parts:
            report_wholeslide(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
