"""Export a checkpoint to ONNX: flags -> checkpoint -> an .onnx file checked under onnxruntime against PyTorch.

The file holds what inference needs (label values and names, input normalisation, the training size or crop)
in its metadata, so `inference.py --onnx` and `Predictor.from_onnx` use it as they use the checkpoint. It is
written only if onnxruntime's labels agree with PyTorch's fp32 labels on random and real images at two sizes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from checkpoints import DataSpec, default_checkpoint, inference_network, load_checkpoint, training_flags
from cli import ArgumentParser, add_ema_flag, positive_int, run_cli, setup_logging
from demo import DEMO_ROOTS
from errors import BadSampleError, OnnxError, UserError
from files import check_writable_folder, replace_atomically, require_folder
from image_io import ImageReading, read_image
from listing import list_images
from onnx_model import OnnxModel, compare_networks, export_metadata, export_network
from predictor import stack_pixels
from sampling import Sampling

log = logging.getLogger(__name__)

MIN_LABEL_AGREEMENT = 0.999


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="default: best.pt of the most recently written run in runs/")
    p.add_argument("--output", type=Path, help="default: the checkpoint's path with .onnx")
    p.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--images", type=Path, help="real images to check the export on (default: the run's validation images)"
    )
    p.add_argument("--check-count", type=positive_int, default=4, help="how many of those images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_ema_flag(p)
    return p


def validation_folder(flags: dict) -> Path | None:
    """Where the run's validation images were, if they are still there."""
    if flags.get("val_images"):
        folder = Path(flags["val_images"])
    elif flags.get("demo"):
        folder = DEMO_ROOTS[flags.get("demo_style", "colour")] / "images/val"
    elif flags.get("data_root"):
        folder = Path(flags["data_root"]) / "images/val"
    else:
        return None
    return folder if folder.is_dir() else None


def read_check_images(folder: Path | None, count: int, reading: ImageReading) -> list[torch.Tensor]:
    """The first count readable images of folder as (C, H, W) pixels, read as the model reads files; unreadable
    ones are passed over."""
    images = []
    for path in list_images(folder) if folder else []:
        try:
            images.append(torch.from_numpy(read_image(path, reading=reading)[0]).permute(2, 0, 1))
        except BadSampleError:
            continue
        if len(images) == count:
            break
    return images


def check_batches(images: list[torch.Tensor], side: int, normalize, *, channels: int, stride: int) -> list:
    """Random inputs and the real images, each at the side the network was trained on and at an off-stride,
    non-square size, so the export is checked where its shapes are not the traced ones."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for size in ((side, side), (side * 3 // 4 + stride // 2 + 1, side * 5 // 4 + 3)):
        batches.append(torch.randn(2, channels, *size, generator=generator))
        if images:
            batches.append(normalize(stack_pixels([TF.resize(image, list(size), antialias=True) for image in images])))
    return batches


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = get_args_parser().parse_args(argv)
    checkpoint = args.checkpoint or default_checkpoint()
    output = args.output or checkpoint.with_suffix(".onnx")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it")
    check_writable_folder(output.parent, "--output")
    state = load_checkpoint(checkpoint)
    model = inference_network(state, checkpoint, ema=args.ema)
    flags, spec = training_flags(state), DataSpec.from_state(state)
    sampling = Sampling.from_training_flags(flags)
    folder = require_folder(args.images, "--images") if args.images else validation_folder(flags)
    images = read_check_images(folder, args.check_count, spec.reading)
    if not images:
        log.info("no real images found to check on (--images DIR): checking on random inputs only")
    side = sampling.image_size  # the training square or crop
    channels = model.config["in_channels"]
    batches = check_batches(images, side, spec.normalization, channels=channels, stride=model.stride)
    with replace_atomically(output) as tmp:
        export_network(model, tmp, metadata=export_metadata(state), opset=args.opset)
        agreement = compare_networks(model, OnnxModel.open(tmp), batches, classes=model.config["num_classes"])
        sizes = ", ".join(sorted({"x".join(map(str, b.shape[-2:])) for b in batches}))
        log.info(
            "onnxruntime vs PyTorch fp32 on %d real images and random inputs (%s): %s", len(images), sizes, agreement
        )
        if agreement.label_agreement < MIN_LABEL_AGREEMENT:
            raise OnnxError(
                f"{output}: not written: labels agree on {agreement.label_agreement:.4%} of pixels, "
                f"under {MIN_LABEL_AGREEMENT:.1%}"
            )
    log.info("wrote %s (python inference.py --onnx %s --input_dir DIR)", output, output)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
