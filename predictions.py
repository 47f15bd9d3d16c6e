"""A folder of images -> mask, overlay and probability files on disk, optionally scored against true masks.

Masks are written at each image's original size and hold the original mask values the model was trained
on, so they compare directly with the training masks.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from dataset import build_transforms
from image_io import DEFAULT_MAX_PIXELS, BadSampleError, read_image, read_mask
from labels import LabelMapping
from metrics import ConfusionMatrix
from predictor import Predictor
from utils import colours, init_worker, replace_atomically

log = logging.getLogger("inference")


class InputImages(Dataset):
    """Decoded and resized in DataLoader workers; an unreadable file becomes an error string."""

    def __init__(self, paths: list[Path], image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.max_pixels = paths, max_pixels
        self.transform = build_transforms(image_size, "none", normalize=False)  # validation's resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image, _ = read_image(self.paths[index], self.max_pixels)
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
    indices, images, originals = zip(*good, strict=True)
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
    save_probs: bool = False

    def paths(self, relative: Path) -> dict[str, Path]:
        stem = relative.with_suffix("")
        return {
            "mask": self.root / "masks" / f"{stem}.png",
            "overlay": self.root / "overlays" / f"{stem}.png",
            "probs": self.root / "probs" / f"{stem}.npy",
        }

    def done(self, relative: Path) -> bool:
        """Every file this run would write for the image exists already."""
        return all(p.exists() for kind, p in self.paths(relative).items() if kind != "probs" or self.save_probs)


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


def evaluate_against(
    mask_path: Path, labels: np.ndarray, lut: np.ndarray, matrix: ConfusionMatrix, *, max_pixels: int
) -> bool:
    """Add one prediction to the confusion matrix; a mask that cannot be compared is named and skipped."""
    try:
        truth = lut[read_mask(mask_path, max_pixels)]
    except BadSampleError as err:
        log.warning("not evaluated: %s", err)
        return False
    if truth.shape != labels.shape:
        height, width = labels.shape
        log.warning("not evaluated: %s is %dx%d, its image %dx%d", mask_path, *truth.shape[::-1], width, height)
        return False
    matrix.update(torch.from_numpy(labels), torch.from_numpy(truth.astype(np.int64)))
    return True


def decoding_workers(requested: int | None, device: torch.device) -> int:
    """On the CPU, decoding processes take cores from the model (7.0-9.1 vs 9.9-10.5 images/s on 2 cores)."""
    if requested is not None:
        return requested
    return 0 if device.type == "cpu" else 2


@dataclass
class FolderResult:
    written: int = 0
    already_done: int = 0
    unreadable: int = 0
    evaluated: int = 0
    todo: int = 0
    matrix: ConfusionMatrix | None = None


def segment_folder(
    predictor: Predictor,
    inputs: list[Path],
    input_root: Path,
    outputs: Outputs,
    *,
    true_masks: dict[str, Path] | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    tta: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FolderResult:
    """Every image in inputs (paths under input_root) -> files under outputs; existing ones are kept unless
    overwrite. true_masks (by file stem): also score the predictions, which then run even where files exist."""
    relative = [p.relative_to(input_root) for p in inputs]
    done = [outputs.done(r) for r in relative]
    todo = [i for i, d in enumerate(done) if overwrite or true_masks is not None or not d]
    result = FolderResult(todo=len(todo), matrix=ConfusionMatrix(predictor.mapping.num_classes))
    result.already_done = len(inputs) - len(todo) + sum(1 for i in todo if done[i] and not overwrite)
    lut = predictor.mapping.lookup_table()
    loader = DataLoader(
        InputImages([inputs[i] for i in todo], predictor.image_size, max_pixels),
        batch_size,
        num_workers=decoding_workers(workers, predictor.runtime.device),
        collate_fn=collate,
        worker_init_fn=init_worker,
        pin_memory=predictor.runtime.device.type == "cuda",
    )
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=2) as writer:
        for indices, images, originals, bad in tqdm(loader, desc="segmenting", dynamic_ncols=True):
            for _, message in bad:
                log.warning("skipped: %s", message)
            result.unreadable += len(bad)
            if not indices:
                continue
            sizes = [tuple(original.shape[-2:]) for original in originals]
            batch_probs = predictor.probabilities(images, sizes, tta)
            for index, original, probs in zip(indices, originals, batch_probs, strict=True):
                item = todo[index]
                labels = probs.max(0).indices.numpy()  # max().indices: argmax over dim 0 is ~15x slower on CPUs
                if true_masks and inputs[item].stem in true_masks:
                    true_mask = true_masks[inputs[item].stem]
                    result.evaluated += evaluate_against(true_mask, labels, lut, result.matrix, max_pixels=max_pixels)
                if overwrite or not done[item]:
                    probs_out = probs.numpy() if outputs.save_probs else None
                    targets = outputs.paths(relative[item])
                    pending.append(
                        writer.submit(write_prediction, original, targets, labels, probs_out, predictor.mapping)
                    )
                    result.written += 1
                while len(pending) > 4 * batch_size:  # bounded: a huge folder never piles up in memory
                    pending.popleft().result()
        while pending:
            pending.popleft().result()
    return result
