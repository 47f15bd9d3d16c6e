"""Segment every image in a folder: flags -> checkpoint -> mask and overlay PNGs on disk.

Masks are written at each image's original size and hold the original mask values the model
was trained on, so they compare directly with the training masks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dataset import (
    IMAGE_EXTENSIONS,
    BadSampleError,
    LabelMapping,
    build_transforms,
    normalize_images,
    list_images,
    read_image,
    read_mask,
)
from metrics import ConfusionMatrix
from model import ResidualAttnUNet
from utils import (
    PRECISION_DTYPES,
    ArgumentParser,
    UserError,
    colours,
    init_worker,
    keep_freed_cpu_memory,
    load_checkpoint,
    replace_atomically,
    resolve_device,
    resolve_precision,
    run_cli,
)

log = logging.getLogger("inference")


def get_args_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input_dir", "--input-dir", type=Path, required=True, help="folder of images to segment")
    p.add_argument("--checkpoint", type=Path, help="default: best.pt of the most recently written run in runs/")
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        help="default: <run>/predictions/<input folder name>; never inside --input_dir",
    )
    p.add_argument("--recursive", action="store_true", help="also segment images in subfolders")
    p.add_argument(
        "--masks_dir",
        "--masks-dir",
        type=Path,
        help="ground-truth masks (same file stems): also print mIoU, mean Dice and pixel accuracy",
    )
    p.add_argument("--tta", action="store_true", help="average the softmax of the image and its horizontal flip")
    p.add_argument("--save-probs", action="store_true", help="also write per-class probabilities as float16 .npy")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist (default: skip them)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--workers",
        type=int,
        help="processes decoding images; default 2 on a GPU, 0 on the CPU, whose cores the model already fills",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    return p


def decoding_workers(requested: int | None, device: torch.device) -> int:
    """On the CPU, decoding processes take cores from the model (7.0-9.1 vs 9.9-10.5 images/s on 2 cores)."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else 2


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    """The best.pt written most recently (by time, not by sorting names)."""
    candidates = list(runs.glob("*/checkpoints/best.pt"))
    if not candidates:
        raise UserError(f"{runs}: no run with checkpoints/best.pt; train first or pass --checkpoint")
    return max(candidates, key=lambda p: p.stat().st_mtime)


@dataclass
class Predictor:
    model: torch.nn.Module
    mapping: LabelMapping
    image_size: int
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    normalize: v2.Compose = field(default_factory=normalize_images)  # on the device, a batch at a time

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device, precision: str, channels_last: bool) -> "Predictor":
        state = load_checkpoint(path)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = ResidualAttnUNet(**state["model_args"])
        model.load_state_dict(state["model"], assign=True)
        # Weights cast once to the inference dtype: autocast would cast every weight on every batch.
        model.eval().fold_batchnorm().to(device, PRECISION_DTYPES[precision], memory_format=memory_format)
        return cls(
            model, LabelMapping.from_dict(state["mapping"]), int(state["image_size"]), device, precision, memory_format
        )

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, sizes: list[tuple[int, int]], tta: bool) -> list[torch.Tensor]:
        """Softmax at each image's original (height, width), as (classes, H, W) float32."""
        images = self.normalize(images.to(self.device, non_blocking=True))  # uint8 travels, a quarter of float
        images = images.to(PRECISION_DTYPES[self.precision], memory_format=self.memory_format)
        logits = self.model(images)
        if tta:
            flipped = self.model(images.flip(-1)).flip(-1)
        probs = logits.float().softmax(1)
        if tta:
            probs = (probs + flipped.float().softmax(1)) / 2
        # Interpolate class scores, not labels, to the full size (labels would turn blocky).
        return [
            F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0].cpu()
            for p, size in zip(probs, sizes)
        ]


class InputImages(Dataset):
    """Decoded and resized in DataLoader workers; an unreadable file becomes an error string."""

    def __init__(self, paths: list[Path], image_size: int):
        self.paths = paths
        self.transform = build_transforms(image_size, "none", normalize=False)  # validation's resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image, _ = read_image(self.paths[index])
        except BadSampleError as err:
            return index, None, str(err)
        pixels = TF.pil_to_tensor(image)
        resized = self.transform(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)
        return index, resized, pixels  # the original travels along for the overlay


def collate(items):
    good = [item for item in items if item[1] is not None]
    bad = [(index, message) for index, image, message in items if image is None]
    if not good:
        return [], None, [], bad
    indices, images, originals = zip(*good)
    return list(indices), torch.stack(images), list(originals), bad


def overlay_with_legend(image: Image.Image, labels: np.ndarray, class_names: list[str]) -> Image.Image:
    """Half-transparent class colours over the image (background left clear), legend on the right."""
    palette = colours(len(class_names))
    picture = np.asarray(image, dtype=np.float32)
    painted = labels != 0 if class_names[0] == "background" else np.ones_like(labels, bool)
    picture[painted] = 0.5 * picture[painted] + 0.5 * palette[labels[painted]]
    row = 14
    legend_width = 8 + 7 * max(len(n) for n in class_names) + 20
    canvas = Image.new("RGB", (image.width + legend_width, max(image.height, row * len(class_names) + 8)), "white")
    canvas.paste(Image.fromarray(picture.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(class_names):
        top = 4 + k * row
        draw.rectangle([image.width + 4, top, image.width + 14, top + 10], fill=tuple(int(c) for c in palette[k]))
        draw.text((image.width + 18, top), name, fill="black")
    return canvas


@dataclass
class Outputs:
    root: Path

    def paths(self, relative: Path) -> dict[str, Path]:
        stem = relative.with_suffix("")
        return {
            "mask": self.root / "masks" / f"{stem}.png",
            "overlay": self.root / "overlays" / f"{stem}.png",
            "probs": self.root / "probs" / f"{stem}.npy",
        }


def write_prediction(
    original: torch.Tensor,
    targets: dict[str, Path],
    labels: np.ndarray,
    probs: np.ndarray | None,
    mapping: LabelMapping,
) -> None:
    """Mask of original values, overlay and optional probabilities, each written to a temp name and renamed."""
    values = np.array(mapping.values)[labels]
    values = values.astype(np.uint8 if values.max(initial=0) < 256 else np.uint16)
    image = Image.fromarray(original.permute(1, 2, 0).numpy())
    files = {"mask": Image.fromarray(values), "overlay": overlay_with_legend(image, labels, mapping.names)}
    # Overlays are for looking at: zlib level 1 writes them 4-5x faster than the default 6, 13% larger.
    compress_level = {"mask": 6, "overlay": 1}
    for kind, content in files.items():
        with replace_atomically(targets[kind]) as tmp:
            content.save(tmp, format="PNG", compress_level=compress_level[kind])
    if probs is not None:
        with replace_atomically(targets["probs"]) as tmp, open(tmp, "wb") as handle:
            np.save(handle, probs.astype(np.float16))


def evaluate_against(mask_path: Path, labels: np.ndarray, lut: np.ndarray, matrix: ConfusionMatrix) -> bool:
    """Add one prediction to the confusion matrix; a mask that cannot be compared is named and skipped."""
    try:
        truth = lut[read_mask(mask_path)]
    except BadSampleError as err:
        log.warning("not evaluated: %s", err)
        return False
    if truth.shape != labels.shape:
        log.warning(
            "not evaluated: %s is %dx%d, its image %dx%d",
            mask_path,
            truth.shape[1],
            truth.shape[0],
            labels.shape[1],
            labels.shape[0],
        )
        return False
    matrix.update(torch.from_numpy(labels), torch.from_numpy(truth.astype(np.int64)))
    return True


def find_inputs(input_dir: Path, recursive: bool) -> list[Path]:
    if not input_dir.exists():
        raise UserError(f"{input_dir}: no such folder")
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: --input_dir must be a folder, not a file")
    files = list_images(input_dir, recursive)
    if not files:
        raise UserError(f"{input_dir}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def resolve_output_dir(args: argparse.Namespace, checkpoint: Path) -> Path:
    output = args.output_dir or checkpoint.resolve().parent.parent / "predictions" / args.input_dir.resolve().name
    inside = output.resolve()
    if inside == args.input_dir.resolve() or args.input_dir.resolve() in inside.parents:
        raise UserError(
            f"{output}: --output_dir must not be inside --input_dir {args.input_dir} (inputs are never modified)"
        )
    return output


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = get_args_parser().parse_args(argv)
    inputs = find_inputs(args.input_dir, args.recursive)
    if args.masks_dir is not None and not args.masks_dir.is_dir():
        raise UserError(f"{args.masks_dir}: --masks_dir is not a folder")
    checkpoint = args.checkpoint or newest_checkpoint()
    device = resolve_device(args.device)
    keep_freed_cpu_memory(device)
    predictor = Predictor.from_checkpoint(
        checkpoint, device, resolve_precision(args.precision, device), args.channels_last
    )
    outputs = Outputs(resolve_output_dir(args, checkpoint))
    relative = [p.relative_to(args.input_dir) for p in inputs]
    evaluating = args.masks_dir is not None
    done = [
        all(path.exists() for kind, path in outputs.paths(r).items() if kind != "probs" or args.save_probs)
        for r in relative
    ]
    todo = [i for i, d in enumerate(done) if args.overwrite or evaluating or not d]
    masks = {p.stem: p for p in list_images(args.masks_dir)} if evaluating else {}
    matrix = ConfusionMatrix(predictor.mapping.num_classes)
    lut = predictor.mapping.lookup_table()
    loader = DataLoader(
        InputImages([inputs[i] for i in todo], predictor.image_size),
        args.batch_size,
        num_workers=decoding_workers(args.workers, device),
        collate_fn=collate,
        worker_init_fn=init_worker,
        pin_memory=device.type == "cuda",
    )
    written = unreadable = evaluated = 0
    with ThreadPoolExecutor(max_workers=2) as writer:
        pending: deque[Future] = deque()
        for indices, images, originals, bad in tqdm(loader, desc="segmenting", dynamic_ncols=True):
            for _, message in bad:
                log.warning("skipped: %s", message)
            unreadable += len(bad)
            if not indices:
                continue
            sizes = [tuple(original.shape[-2:]) for original in originals]
            for index, original, probs in zip(indices, originals, predictor.probabilities(images, sizes, args.tta)):
                item = todo[index]
                labels = probs.max(0).indices.numpy()  # max().indices: argmax over dim 0 is ~15x slower on CPUs
                if inputs[item].stem in masks:
                    evaluated += evaluate_against(masks[inputs[item].stem], labels, lut, matrix)
                if args.overwrite or not done[item]:
                    probs_out = probs.numpy() if args.save_probs else None
                    targets = outputs.paths(relative[item])
                    pending.append(
                        writer.submit(write_prediction, original, targets, labels, probs_out, predictor.mapping)
                    )
                    written += 1
                while len(pending) > 4 * args.batch_size:  # bounded: a huge folder never piles up in memory
                    pending.popleft().result()
        for future in pending:
            future.result()
    skipped_existing = len(inputs) - len(todo) + sum(1 for i in todo if done[i] and not args.overwrite)
    print(
        f"{written} images segmented into {outputs.root}; {skipped_existing} already done (--overwrite to redo); "
        f"{unreadable} unreadable"
    )
    if evaluating:
        if evaluated == 0:
            print(f"no prediction had a mask of the same name in {args.masks_dir}")
        else:
            result = matrix.compute()
            print(
                f"evaluation on {evaluated} images: mIoU {result['miou']:.4f}  mean Dice {result['mdice']:.4f}  "
                f"pixel accuracy {result['pixel_acc']:.4f}"
            )
    return 1 if todo and unreadable == len(todo) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
