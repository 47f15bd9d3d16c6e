"""A folder of images -> mask, overlay and probability files on disk, optionally scored against true masks.

Masks are written at each image's original size and hold the original mask values the model was trained
on, so they compare directly with the training masks.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from errors import BadSampleError
from files import replace_atomically
from image_io import DEFAULT_MAX_PIXELS, ImageReading, read_image, read_mask
from intensity import display_rgb
from labels import LabelMapping
from metrics import ConfusionMatrix
from object_files import merge_objects, write_objects
from predictor import Objects, Predictor
from utils import colours, init_worker, release_freed_cpu_memory

log = logging.getLogger("inference")


class InputImages(Dataset):
    """Decoded in DataLoader workers at their original size, as (C, H, W) pixels read by the model's rule; an
    unreadable file (or one whose channels the model cannot take) becomes an error string."""

    def __init__(self, paths: list[Path], reading: ImageReading, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.reading, self.max_pixels = paths, reading, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image, _ = read_image(self.paths[index], self.max_pixels, self.reading)
        except BadSampleError as err:
            return index, None, str(err)
        return index, torch.from_numpy(image).permute(2, 0, 1), ""


def collate(items):
    """-> (indices, uint8 images of their own sizes, (index, message) of the unreadable ones)."""
    good = [(index, image) for index, image, _ in items if image is not None]
    bad = [(index, message) for index, image, message in items if image is None]
    indices, images = (list(column) for column in zip(*good, strict=True)) if good else ([], [])
    return indices, images, bad


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Image.Image:
    """Half-transparent class colours over the (H, W, 3) uint8 image (background left clear), legend on the
    right; uint8 throughout, so a 24-megapixel image needs no float copy beyond its display stretch."""
    palette = colours(len(class_names)).astype(np.uint8)
    tinted = Image.blend(Image.fromarray(image), Image.fromarray(palette[labels]), 0.5)
    height, width = labels.shape
    if class_names[0] == "background":
        tinted = Image.composite(tinted, Image.fromarray(image), Image.fromarray(labels != 0))
    row = 14
    legend_width = 8 + 7 * max(len(n) for n in class_names) + 20
    canvas = Image.new("RGB", (width + legend_width, max(height, row * len(class_names) + 8)), "white")
    canvas.paste(tinted, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, name in enumerate(class_names):
        top = 4 + k * row
        draw.rectangle([width + 4, top, width + 14, top + 10], fill=tuple(int(c) for c in palette[k]))
        draw.text((width + 18, top), name, fill="black")
    return canvas


@dataclass
class Outputs:
    root: Path
    save_probs: bool = False
    display_channel: int | None = None  # overlays show this channel as grey (default: the first three as RGB)
    objects: bool = False  # an instance model's: instance labels, object rows, COCO results (object_files.py)

    def paths(self, relative: Path) -> dict[str, Path]:
        stem = relative.with_suffix("")
        return {
            "mask": self.root / "masks" / f"{stem}.png",
            "overlay": self.root / "overlays" / f"{stem}.png",
            "probs": self.root / "probs" / f"{stem}.npy",
            "instances": self.root / "instances" / f"{stem}.png",  # .tif past 65,535 objects
            "objects": self.root / "objects" / f"{stem}.csv",
            "coco": self.root / "objects" / f"{stem}.json",
        }

    def wanted(self, kind: str) -> bool:
        return (kind != "probs" or self.save_probs) and (kind not in OBJECT_FILES or self.objects)

    def done(self, relative: Path) -> bool:
        """Every file this run would write for the image exists already."""
        paths = self.paths(relative)
        return all(
            path.exists() or (kind == "instances" and path.with_suffix(".tif").exists())
            for kind, path in paths.items()
            if self.wanted(kind)
        )

    def write(
        self, original: torch.Tensor, relative: Path, labels: np.ndarray, mapping: LabelMapping, objects=None
    ) -> None:
        """The image's mask and overlay (write_prediction) under this folder, and an instance model's objects
        (object_files.write_objects)."""
        targets = self.paths(relative)
        outlines = None
        if objects is not None:
            write_objects(original.permute(1, 2, 0).numpy(), objects, targets, mapping, relative.as_posix())
            outlines = find_boundaries(objects.ids, mode="inner")
        write_prediction(original, targets, labels, mapping, self.display_channel, outlines)


OBJECT_FILES = ("instances", "objects", "coco")


def write_prediction(
    original: torch.Tensor,
    targets: dict[str, Path],
    labels: np.ndarray,
    mapping: LabelMapping,
    display_channel: int | None = None,
    outlines: np.ndarray | None = None,
):
    """Mask of original values and overlay (on intensity.display_rgb's picture of the image; with outlines, each
    object's edge drawn white), each written to a temporary name and renamed."""
    values = mapping.value_array()[labels]
    image = display_rgb(original, display_channel)
    overlay = overlay_with_legend(image, labels, mapping.names)
    if outlines is not None:
        pixels = np.asarray(overlay).copy()
        pixels[: outlines.shape[0], : outlines.shape[1]][outlines] = 255
        overlay = Image.fromarray(pixels)
    files = {"mask": Image.fromarray(values), "overlay": overlay}
    # Overlays are for looking at: zlib level 1 writes them 4-5x faster than the default 6, 13% larger.
    compress_level = {"mask": 6, "overlay": 1}
    for kind, content in files.items():
        with replace_atomically(targets[kind]) as tmp:
            content.save(tmp, format="PNG", compress_level=compress_level[kind])


class ProbabilityFiles(contextlib.ExitStack):
    """Class probabilities written band by band into float16 .npy files mapped from disk (never whole in
    memory); on leaving the block each complete file is renamed into place, and none is on an error."""

    def __init__(self):
        super().__init__()
        self.arrays: dict[int, np.memmap] = {}

    def open(self, key: int, path: Path, shape: tuple[int, int, int]) -> None:
        tmp = self.enter_context(replace_atomically(path))
        self.arrays[key] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)

    def write(self, key: int, top: int, band: torch.Tensor) -> None:
        if key in self.arrays:
            self.arrays[key][:, top : top + band.shape[1]] = band.half().cpu().numpy()

    def __exit__(self, *exc) -> bool:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()  # unmapped before the renames
        return super().__exit__(*exc)


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
    objects: int = 0  # over every image's object files: this run's and an earlier run's


WRITE_QUEUE_BYTES = 64 << 20  # images whose files the writer threads have yet to write


class WriteQueue:
    """Files written by two threads while the model works on the next images. At most WRITE_QUEUE_BYTES of
    images wait: small ones are written while the next are segmented, a large one before the next (the
    overlay's memory and the stitching's would add up), its freed heap handed back before the next decode."""

    def __init__(self, writer: ThreadPoolExecutor, device: torch.device):
        self.writer, self.device = writer, device
        self.pending: deque[tuple[Future, int]] = deque()

    def submit(self, nbytes: int, write: Callable, *args) -> None:
        self.pending.append((self.writer.submit(write, *args), nbytes))
        while sum(size for _, size in self.pending) > WRITE_QUEUE_BYTES:
            self.pending.popleft()[0].result()
            release_freed_cpu_memory(self.device)

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft()[0].result()


def segment_to_files(
    predictor: Predictor, images: list[torch.Tensor], probs: list[Path | None], objects: bool
) -> tuple[list[np.ndarray], list[Objects | None]]:
    """predictor.segment (with objects, segment_objects), with each image's probabilities written band by band to its
    path in probs (None: not). Returns each image's labels and objects (None without)."""
    with ProbabilityFiles() as probs_files:
        for key, (image, path) in enumerate(zip(images, probs, strict=True)):
            if path is not None:
                probs_files.open(key, path, (predictor.mapping.num_classes, *image.shape[-2:]))
        if objects:
            found = predictor.segment_objects(images, on_band=probs_files.write)
            labels = [image_objects.labels for image_objects in found]
        else:
            labels, found = [label.numpy() for label in predictor.segment(images, on_band=probs_files.write)], None
    if predictor.sampling.mode == "slide":
        release_freed_cpu_memory(predictor.runtime.device)  # the stitching's freed heap, before the writers need it
    return labels, found or [None] * len(labels)


def segment_folder(
    predictor: Predictor,
    inputs: list[Path],
    input_root: Path,
    outputs: Outputs,
    *,
    true_masks: dict[str, Path] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FolderResult:
    """Every image in inputs (paths under input_root) -> files under outputs; existing ones are kept unless
    overwrite. true_masks (by file stem): also score the predictions, which then run even where files exist.
    Resizing decodes predictor.pass_size images together; sliding decodes one at a time, since its passes hold
    tiles of one image, and a batch of large photos would be held whole."""
    relative = [p.relative_to(input_root) for p in inputs]
    done = [outputs.done(r) for r in relative]
    todo = [i for i, d in enumerate(done) if overwrite or true_masks is not None or not d]
    result = FolderResult(todo=len(todo), matrix=ConfusionMatrix(predictor.mapping.num_classes))
    result.already_done = len(inputs) - len(todo) + sum(1 for i in todo if done[i] and not overwrite)
    lut, device = predictor.mapping.lookup_table(), predictor.runtime.device
    loader = DataLoader(
        InputImages([inputs[i] for i in todo], predictor.reading, max_pixels),
        predictor.pass_size if predictor.sampling.mode == "resize" else 1,  # slide batches tiles, not images
        num_workers=decoding_workers(workers, device),
        collate_fn=collate,
        worker_init_fn=init_worker,
        pin_memory=device.type == "cuda",
    )
    with ThreadPoolExecutor(max_workers=2) as writer:
        queue = WriteQueue(writer, device)
        for indices, images, bad in tqdm(loader, desc="segmenting", dynamic_ncols=True):
            for _, message in bad:
                log.warning("skipped: %s", message)
            result.unreadable += len(bad)
            items = [todo[index] for index in indices]
            writes = [overwrite or not done[item] for item in items]
            probs = [
                outputs.paths(relative[item])["probs"] if write and outputs.save_probs else None
                for item, write in zip(items, writes, strict=True)
            ]
            labels, found = segment_to_files(predictor, images, probs, outputs.objects)
            for item, image, image_labels, image_objects, write in zip(
                items, images, labels, found, writes, strict=True
            ):
                if true_masks and inputs[item].stem in true_masks:
                    true_mask = true_masks[inputs[item].stem]
                    result.evaluated += evaluate_against(
                        true_mask, image_labels, lut, result.matrix, max_pixels=max_pixels
                    )
                if write:
                    nbytes = image.numel() * image.element_size() + image_labels.nbytes
                    args = (image, relative[item], image_labels, predictor.mapping, image_objects)
                    queue.submit(nbytes, outputs.write, *args)
                    result.written += 1
        queue.drain()
    if outputs.objects:
        result.objects = merge_objects(outputs.root, [outputs.paths(r) for r in relative], predictor.mapping)
    return result
