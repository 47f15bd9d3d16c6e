"""A trained network as a function of whole images: uint8 images of any size -> labels (and class
probabilities) at that size, computed in bands of rows so memory never grows with height x width x classes.
Tiles, flips and resampling combine logits, as nnU-Net's sliding window does: labels are their argmax, and the
softmax is computed only for a caller that asks for probabilities.

Two ways to show an image to the network (MMSegmentation's test modes, nnU-Net's sliding window):
- resize: squashed to the training square, as square-resize models were trained;
- slide: overlapping tiles at native resolution (or rescaled), weighted towards tile centres, as
  crop-trained models were trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from checkpoints import DataSpec, inference_network, load_checkpoint, training_flags
from errors import CheckpointError, OnnxError
from image_io import DEFAULT_MAX_PIXELS, RGB, ImageReading, fit_channels, pil_pixels, pixel_values, read_image
from instances import SEPARATION_CHANNELS, ObjectRule, object_table, objects_from
from intensity import IMAGENET, Normalization
from labels import LabelMapping
from onnx_model import OnnxModel
from sampling import RowResampler, Sampling, gaussian_weights
from tuning import Candidate, Measured, candidates, fastest, timed, with_choice
from utils import PRECISION_DTYPES, Runtime

BAND_BYTES = 32 << 20  # float32 class logits held at the output size at once
BACKGROUND_LOGIT = 20.0  # a skipped tile's (slides: glass) logit for the background class, 0 for the others
SLIDE_COLUMNS = 16384  # px: the widest block of output columns a slide's tile row holds at once (slide_bands)


def default_batch_size(device: torch.device) -> int:
    """Images (resize) or training crops' worth of tile pixels (slide) per forward pass: 8 on a GPU, 2 on the
    CPU, where a larger pass is hardly faster and holds several times the memory (docs/memory.md)."""
    return 2 if device.type == "cpu" else 8


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """One batch; 8-bit images beside others (8- and 16-bit files in one folder) as float 0..1, as image_io reads
    16-bit ones."""
    if len({image.dtype for image in images}) > 1:
        images = [TF.to_dtype(image, torch.float32, scale=True) for image in images]
    return torch.stack(images)


def softmax_(band: torch.Tensor) -> torch.Tensor:
    """Softmax over a band's classes (dim 0) in place: no second copy of the logits."""
    band.sub_(band.amax(0, keepdim=True)).exp_()
    return band.div_(band.sum(0, keepdim=True))


def object_rule(saved: ObjectRule | None, typed: dict | None) -> ObjectRule | None:
    """A model's object rule with the fields a user typed (None: not typed) in place of the saved ones."""
    if saved is None:
        return None
    return replace(saved, **{name: value for name, value in (typed or {}).items() if value is not None})


def band_rows(num_classes: int, width: int) -> int:
    return max(1, BAND_BYTES // (4 * num_classes * width))


def input_array(
    image: str | Path | Image.Image | np.ndarray, reading: ImageReading = RGB, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The Python API's images -> (H, W, channels) model pixels: a path (read as inference.py reads files), a PIL
    image, or an (H, W[, C]) array of integers or reals (uint8 and uint16 as stored in files; (H, W, 4) uint8 is
    RGBA for a 3-channel model)."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image), max_pixels, reading)[0]
    if isinstance(image, Image.Image):
        pixels = pil_pixels(image)
    elif isinstance(image, np.ndarray) and image.ndim in (2, 3) and image.dtype.kind in "buif":
        pixels = image[..., None] if image.ndim == 2 else image
        if pixels.shape[2] == 4 and pixels.dtype == np.uint8 and reading.channels == 3:
            pixels = pixels[..., :3]  # RGBA, as a PIL image of it would be read
    elif isinstance(image, np.ndarray):
        raise ValueError(f"a {image.dtype} array of shape {image.shape}; expected (H, W) or (H, W, C) numbers")
    else:
        raise TypeError(f"expected a path, a PIL image or a NumPy array, not {type(image).__name__}")
    where = Path(f"<{type(image).__name__}>")
    return np.array(fit_channels(pixel_values(pixels, where), reading, where))  # a copy: writable for torch


@dataclass(frozen=True)
class Objects:
    """One image's objects: their ids (int32 (H, W), 0 outside objects), each pixel's class, and the model's
    confidence that the pixel is foreground (its probability of any class but the background)."""

    ids: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


@dataclass
class Predictor:
    network: Callable[[torch.Tensor], torch.Tensor]  # normalised float batch -> logits
    mapping: LabelMapping
    sampling: Sampling
    runtime: Runtime
    input_dtype: torch.dtype = torch.float32
    tta: bool = False  # also average the horizontal flip's logits
    batch_size: int | None = None  # images per pass (resize), or tiles as many crops' pixels (slide); None: default
    normalize: Normalization = IMAGENET  # on the device, a batch at a time
    reading: ImageReading = RGB  # how files and arrays become the network's channels
    objects: ObjectRule | None = None  # a model with a separation head: how its maps become objects

    @property
    def outputs(self) -> int:
        """The network's output channels: the classes, and the separation map of an instance model."""
        return self.mapping.num_classes + (SEPARATION_CHANNELS if self.objects is not None else 0)

    @property
    def background(self) -> int:
        """The class objects are not: the one of mask value 0, else the first."""
        return self.mapping.values.index(0) if 0 in self.mapping.values else 0

    @classmethod
    def from_checkpoint(
        cls,
        path: Path,
        runtime: Runtime | None = None,
        *,
        tta: bool = False,
        batch_size: int | None = None,
        ema: bool = True,
        convert: bool = False,
        objects: dict | None = None,
        **sampling,
    ):
        """runtime: default the best device and precision at hand. ema: the moving-average weights where the run
        kept them (--ema). convert: convert images whose channels differ from the model's (image_io.ImageReading), even
        if training did not. objects: ObjectRule fields to override (None values keep the checkpoint's).
        sampling: Sampling fields to override (None keeps the checkpoint's choice)."""
        path, runtime = Path(path), runtime or Runtime.from_flags("auto", "auto", channels_last=True)
        state = load_checkpoint(path)
        dtype = PRECISION_DTYPES[runtime.precision]
        model = inference_network(
            state, path, ema=ema, device=runtime.device, dtype=dtype, memory_format=runtime.memory_format
        )
        try:
            spec = DataSpec.from_state(state)
            chosen = Sampling.for_model(training_flags(state), **sampling)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: no usable label mapping, image size or input rule ({err!r})") from None
        reading = replace(spec.reading, convert=spec.reading.convert or convert)
        options = dict(input_dtype=dtype, tta=tta, batch_size=batch_size, normalize=spec.normalization)
        rule = object_rule(spec.objects, objects)
        return cls(model, spec.mapping, chosen, runtime, reading=reading, objects=rule, **options)

    @classmethod
    def measured(
        cls, path: Path, device: str, precision: str, channels_last: bool | None, **options
    ) -> tuple[Predictor, Measured]:
        """from_checkpoint in the precision and layout (where the flags leave them open) whose forward pass over one
        of its own passes of tiles (or squashed images) is fastest here (tuning.py)."""
        base = Runtime.from_flags(device, precision, channels_last)
        built: dict[Candidate, Predictor] = {}

        def seconds_per_pass(choice: Candidate) -> float:
            predictor = built[choice] = cls.from_checkpoint(path, with_choice(base, choice), **options)
            side, tile = predictor.sampling.image_size, predictor.sampling.tile
            count = predictor.pass_size if predictor.sampling.mode == "resize" else 1
            shape = (count, predictor.reading.channels, side, tile)
            pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            return timed(lambda: predictor.batch_logits(pixels), predictor.runtime.device)

        measured = fastest(candidates(base, precision, channels_last), seconds_per_pass)
        chosen = built.get(measured.chosen) or cls.from_checkpoint(path, with_choice(base, measured.chosen), **options)
        return chosen, measured

    @classmethod
    def from_onnx(
        cls,
        path: Path,
        *,
        tta: bool = False,
        batch_size: int | None = None,
        convert: bool = False,
        objects: dict | None = None,
        **sampling,
    ):
        """An export.py file run by onnxruntime on the CPU; pre- and post-processing as from_checkpoint."""
        network = OnnxModel.open(Path(path))
        try:
            chosen = Sampling.for_model(network.training, **sampling)
        except (KeyError, TypeError, ValueError) as err:
            raise OnnxError(f"{path}: unusable training metadata ({err!r})") from None
        reading = replace(network.reading, convert=network.reading.convert or convert)
        options = dict(tta=tta, batch_size=batch_size, normalize=network.normalize, reading=reading)
        rule = object_rule(network.objects, objects)
        return cls(network, network.mapping, chosen, Runtime(torch.device("cpu")), objects=rule, **options)

    @classmethod
    def for_validation(
        cls,
        model: torch.nn.Module,
        mapping: LabelMapping,
        sampling: Sampling,
        runtime: Runtime,
        normalize: Normalization = IMAGENET,
        objects: ObjectRule | None = None,
    ):
        """The model being trained (in eval mode), run under the training's autocast."""

        def network(images: torch.Tensor) -> torch.Tensor:
            with runtime.autocast():
                return model(images)

        return cls(network, mapping, sampling, runtime, normalize=normalize, objects=objects)

    @property
    def pass_size(self) -> int:
        """batch_size as typed, or the device's default_batch_size."""
        return self.batch_size or default_batch_size(self.runtime.device)

    def predict(self, image) -> np.ndarray:
        """A path, PIL image or (H, W[, C]) array -> (H, W) map of the original mask values.

        Raises FileNotFoundError for a path that does not exist, OSError for a file that cannot be decoded,
        ValueError for pixels the model cannot take (empty, NaN only, a channel count it was not trained on, a
        shape that is no image) and TypeError for an object that is no image; each with a one-line message."""
        labels = self.segment([self._as_tensor(image)])[0]
        return self.mapping.value_array()[labels.numpy()]

    def predict_proba(self, image) -> np.ndarray:
        """A path, PIL image or (H, W[, C]) array -> (classes, H, W) float32 softmax, classes in the
        order of self.mapping.values. Raises as predict does."""
        tensor = self._as_tensor(image)
        probs = np.empty((self.mapping.num_classes, *tensor.shape[-2:]), dtype=np.float32)

        def keep(_, top: int, band: torch.Tensor) -> None:
            probs[:, top : top + band.shape[1]] = band.cpu().numpy()

        self.segment([tensor], on_band=keep)
        return probs

    def predict_objects(self, image) -> tuple[np.ndarray, list[dict]]:
        """A path, PIL image or (H, W[, C]) array -> (H, W) int32 object ids (0 background) and one row per object
        (instances.object_table: id, class, area, centroid, box, equivalent diameter, mean intensity per channel,
        confidence). Needs a model trained with instance masks; raises as predict does."""
        pixels = input_array(image, self.reading)
        found = self.segment_objects([torch.from_numpy(pixels).permute(2, 0, 1)])[0]
        return found.ids, object_table(found.ids, found.labels, pixels, found.confidence, self.mapping.names)

    def _as_tensor(self, image) -> torch.Tensor:
        return torch.from_numpy(input_array(image, self.reading)).permute(2, 0, 1)

    @torch.inference_mode()
    def batch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, channels, h, w) pixels (uint8 or float) -> float32 logits (B, classes, h, w) on the device; with tta,
        the mean of the image's and its horizontal flip's."""
        images = self.normalize(images.to(self.runtime.device, non_blocking=True))  # uint8: a quarter of float
        images = images.to(self.input_dtype, memory_format=self.runtime.memory_format)
        logits = self.network(images).float()
        if self.tta:
            logits = logits.add_(self.network(images.flip(-1)).flip(-1).float()).mul_(0.5)
        return logits

    @torch.inference_mode()
    def segment(
        self, images: list[torch.Tensor], on_band: Callable[[int, int, torch.Tensor], None] | None = None
    ) -> list[torch.Tensor]:
        """(channels, H, W) images (uint8 or float pixels, image_io) -> (H, W) label indices on the CPU, each at its
        image's size.

        on_band(image index, first row, probabilities (C, rows, W)) sees every band, for files or losses; only then
        is the softmax computed.
        """
        return [labels for labels, _ in self._segment(images, on_band, maps=False)]

    @torch.inference_mode()
    def segment_objects(
        self, images: list[torch.Tensor], on_band: Callable[[int, int, torch.Tensor], None] | None = None
    ) -> list[Objects]:
        """segment(), and each image's objects from the separation map (instances.objects_from over the classes'
        foreground): touching objects get ids of their own, and an object across tile seams one id, since the maps
        are blended over the whole image before the watershed runs."""
        if self.objects is None:
            raise ValueError("this model has no separation head: it was trained without instance masks")
        found = []
        for labels, (separation, confidence) in self._segment(images, on_band, maps=True):
            labels = labels.numpy()
            ids = objects_from(labels != self.background, separation, self.objects)
            found.append(Objects(ids, labels, confidence))
        return found

    def _segment(self, images: list[torch.Tensor], on_band, *, maps: bool) -> Iterator[tuple]:
        """Each image's labels, and with maps its separation map (sigmoid) and foreground confidence, (H, W)
        float32 arrays filled band by band."""
        if not images:
            return
        working = [self.sampling.working_size(*image.shape[-2:]) for image in images]
        classes = self.mapping.num_classes
        for index, (image, size, rows) in enumerate(
            zip(images, working, self._working_rows(images, working), strict=True)
        ):
            height, width = image.shape[-2:]
            out = torch.empty(height, width, dtype=torch.uint8)  # at most 255 classes (labels.py)
            separation = np.empty((height, width), np.float32) if maps else None
            confidence = np.empty((height, width), np.float32) if maps else None
            resampler = RowResampler(size, (height, width), band_rows(self.outputs, width))
            for chunk in rows:
                for top, band in resampler.push(chunk):
                    rows_here = slice(top, top + band.shape[1])
                    out[rows_here] = band[:classes].max(0).indices.to(torch.uint8)  # max: argmax is slow
                    if maps:
                        separation[rows_here] = band[classes].sigmoid().cpu().numpy()
                    if on_band is not None or maps:
                        probs = softmax_(band[:classes])  # in place: the band is not read again
                        if maps:
                            confidence[rows_here] = (1 - probs[self.background]).cpu().numpy()
                        if on_band is not None:
                            on_band(index, top, probs)
            yield out, (separation, confidence)

    def _working_rows(self, images: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[Iterator]:
        """Each image's logits at its working size, as chunks of rows in order (lazily when sliding)."""
        scaled = [
            image if tuple(image.shape[-2:]) == size else TF.resize(image, list(size), antialias=True)
            for image, size in zip((im.to(self.runtime.device) for im in images), sizes, strict=True)
        ]
        if self.sampling.mode == "resize":
            return [iter([logits]) for logits in self.batch_logits(stack_pixels(scaled))]
        return [self._slide(image) for image in scaled]

    def slide_bands(
        self, image, first_step: int = 0, skip: Callable[[int, int, int, int], bool] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """A lazy (channels, H, W) image (slides.LazyImage: slicing reads only those pixels) -> (top, left, (rows,
        columns) labels) for each step: the rows of a tile row of the sliding window within a block of at most
        SLIDE_COLUMNS columns, each block top to bottom, the blocks left to right, from step first_step on. Only one
        block's tile row of logits is ever held, so memory stays flat however wide or tall the image. A block also
        runs the tiles that reach into it from its neighbours (a tile at each seam twice), so every pixel sums the
        same tiles, in the same order, as a pass over the whole width. skip(top, left, height, width): a tile known
        to be background (glass), which is not run through the network."""
        height, width = image.shape[-2:]
        tops = self.sampling.tile_grid(height, width)[0]
        for block, columns in enumerate(slide_blocks(width)):
            first_row = first_step - block * len(tops)
            if first_row >= len(tops):
                continue
            rows = self._slide(image, max(first_row, 0), skip, columns)
            for row, logits in enumerate(rows, max(first_row, 0)):
                yield tops[row], columns[0], logits[: self.mapping.num_classes].max(0).indices.to(torch.uint8)

    def _slide(self, image, first_row: int = 0, skip=None, columns: tuple[int, int] | None = None) -> Iterator:
        """Gaussian-weighted overlapping tiles, summed into one buffer a tile high and as wide as the tiles that reach
        into the output columns (left, right) (default: the whole width): the rows no later tile covers are yielded
        for those columns (a view, valid until the next is asked for), the rest move up and the tiles below add on.
        Tiles are the training crop high (the buffer's height) and up to `tile` wide. first_row: yield from that
        tile row on (the one before is run again for its share of the first rows); skip: see slide_bands (a skipped
        tile adds background logits)."""
        height, width = image.shape[-2:]
        tops, tile_h, lefts, tile_w = self.sampling.tile_grid(height, width)
        left, right = columns or (0, width)
        lefts = [x for x in lefts if x < right and x + tile_w > left]
        origin = lefts[0]  # the buffer's first column, in the image
        weight = gaussian_weights(tile_h, tile_w, image.device)
        logits_sum = torch.zeros(self.outputs, tile_h, lefts[-1] + tile_w - origin, device=image.device)
        weight_sum = torch.zeros(tile_h, logits_sum.shape[-1], device=image.device)
        background = torch.zeros(self.outputs, 1, 1, device=image.device)
        background[self.background] = BACKGROUND_LOGIT
        per_pass = max(1, self.pass_size * self.sampling.image_size**2 // (tile_h * tile_w))
        wanted = slice(left - origin, right - origin)
        for row in range(max(first_row - 1, 0), len(tops)):
            top = tops[row]
            skipped = [x for x in lefts if skip is not None and skip(top, x, tile_h, tile_w)]
            for x in skipped:
                logits_sum[:, :, x - origin : x - origin + tile_w].addcmul_(background, weight)
                weight_sum[:, x - origin : x - origin + tile_w] += weight
            run = [x for x in lefts if x not in skipped]
            for start in range(0, len(run), per_pass):
                chunk = run[start : start + per_pass]
                tiles = torch.stack([image[:, top : top + tile_h, x : x + tile_w] for x in chunk])
                for x, logits in zip(chunk, self.batch_logits(tiles), strict=True):
                    logits_sum[:, :, x - origin : x - origin + tile_w].addcmul_(logits, weight)  # weighted, added
                    weight_sum[:, x - origin : x - origin + tile_w] += weight
            done = (tops[row + 1] if row + 1 < len(tops) else height) - top
            if row >= first_row:
                yield logits_sum[:, :done, wanted].div_(weight_sum[:done, wanted])
            kept = tile_h - done  # rows the next row of tiles adds to
            logits_sum[:, :kept] = logits_sum[:, done:].clone() if kept > done else logits_sum[:, done:]
            weight_sum[:kept] = weight_sum[done:].clone()
            logits_sum[:, kept:], weight_sum[kept:] = 0, 0


def slide_blocks(width: int) -> list[tuple[int, int]]:
    """The blocks of output columns (left, right) Predictor.slide_bands takes in turn: SLIDE_COLUMNS wide, the last
    what is left."""
    return [(left, min(left + SLIDE_COLUMNS, width)) for left in range(0, width, SLIDE_COLUMNS)]
