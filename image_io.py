"""Image and mask files -> arrays: images as upright (H, W, C) arrays with the channels a model takes (every
PIL mode; TIFF stacks of any channel count and type through tifffile), masks as label values; and the errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from errors import BadSampleError, ChannelMismatch, MissingFile, UnreadableFile
from fast_decode import fast_pixels
from files import not_a_file

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
# Larger images are bad samples (--max-pixels). 100 MP is a 12000x8000 photo: 0.3 GB as uint8 RGB and 1.2 GB
# as float, which fits beside the model on a 16 GB machine; a 20000x20000 scan (400 MP) does not.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_MASK_VALUE = 2**16 - 1  # labels are 8- or 16-bit values; a 32-bit mask outside that range is a bad sample
MAX_INSTANCE_ID = 2**31 - 1  # object ids: 16-bit PNGs, or 32-bit TIFFs past 65,535 objects (read as int32)
Image.MAX_IMAGE_PIXELS = None  # our limit replaces PIL's decompression-bomb check, so both never disagree

GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # one channel (alpha dropped)
PIL_DTYPES = {"I": "int32", "F": "float32", "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I;16N": "uint16"}
# TIFF colour models that are not plain channels (palette, CMYK, Lab, ...) are read by PIL as photos are.
TIFFFILE_PHOTOMETRIC = {tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.RGB}
ORIENTATION_TAG = 274  # EXIF and TIFF: how the stored pixels are turned to be shown upright
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's convert("L")


@dataclass(frozen=True)
class ImageReading:
    """How an image file becomes a model's input; checkpoints record it, so inference reads files as training did.

    channels: what the model takes. Grey images are repeated for 3-channel models (as photos always were read);
    any other difference is refused unless convert: colour -> grey (luminance) for 1-channel models, a grey
    channel repeated, or the first `channels` of a file that has more.
    page: which image of a multi-image TIFF (pages, z or time planes; then further series), the first by default.
    """

    channels: int = 3
    page: int = 0
    convert: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ImageReading:
        return cls(int(data["channels"]), int(data["page"]), bool(data["convert"]))


RGB = ImageReading()  # photos


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says, before any pixel is decoded."""

    channels: int
    dtype: str  # as stored: uint8, uint16, float32, ...
    height: int
    width: int


def check_pixels(path: Path, width: int, height: int, max_pixels: int, kind: str) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise BadSampleError(
            f"{path}: {width}x{height} {kind} has {pixels:,} pixels, over the limit of {max_pixels:,} (--max-pixels)"
        )


def unreadable(path: Path, kind: str, err: Exception | str) -> UnreadableFile:
    """The one wording for a file that cannot be read; a path that does not exist is a MissingFile."""
    if isinstance(err, FileNotFoundError):
        return MissingFile(f"{path}: no such {kind} file")
    return UnreadableFile(f"{path}: unreadable {kind} ({err})")


def require_file(path: Path, kind: str) -> None:
    """An UnreadableFile for a path that is no file (files.not_a_file) before anything opens it: a FIFO or a device
    named like an image would block a reader or never end."""
    problem = not_a_file(path)
    if problem:
        raise unreadable(path, kind, problem)


def _decode(path: Path, max_pixels: int, kind: str) -> tuple[Image.Image, np.ndarray | None]:
    """Opens the file, checks the size its header gives, and only then decodes the pixels: with TorchCodec where it
    can (the pixels are returned beside the image's header), else into the PIL image (None beside it)."""
    require_file(path, kind)
    try:
        with Image.open(path) as image:
            check_pixels(path, image.width, image.height, max_pixels, kind)
            pixels = fast_pixels(path, image, kind)
            if pixels is None:
                image.load()
    except BadSampleError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable(path, kind, err) from None
    return image, pixels


def read_mask(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, kind: str = "mask") -> np.ndarray:
    """A 2-D integer array of label values; colour masks are refused, not guessed at. kind "instance mask": object
    ids, 0..MAX_INSTANCE_ID (32-bit files), else labels 0..MAX_MASK_VALUE."""
    mask, pixels = _decode(path, max_pixels, kind)
    if pixels is not None:
        return pixels[..., 0]
    if mask.mode in ("RGB", "RGBA", "LA"):
        array = np.asarray(mask)
        if mask.mode == "LA" or (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            return array[..., 0]
        raise BadSampleError(f"{path}: colour ({mask.mode}) {kind}; masks must hold one label value per pixel")
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    return checked_mask(np.asarray(mask), path, kind, f"unsupported mask mode {mask.mode}")


def checked_mask(
    array: np.ndarray, path: Path, kind: str = "mask", why: str = "labels are whole numbers"
) -> np.ndarray:
    """A decoded mask (or a window of one) refused unless it is a 2-D array of values in range: object ids
    0..MAX_INSTANCE_ID (kind "instance mask"), else labels 0..MAX_MASK_VALUE."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        values = "object ids are whole numbers" if kind == "instance mask" else why
        raise BadSampleError(f"{path}: {array.dtype} {kind} ({values})")
    high, what = (MAX_INSTANCE_ID, "object ids") if kind == "instance mask" else (MAX_MASK_VALUE, "labels")
    wide = array.dtype.kind == "i" or array.dtype.itemsize > 2  # 8- and 16-bit masks cannot be out of range
    if wide and array.size and (array.min() < 0 or array.max() > high):
        raise BadSampleError(f"{path}: {kind} values {array.min()}..{array.max()}; {what} must be 0..{high}")
    return array


# EXIF/TIFF orientation -> the numpy view that shows the stored (H, W, ...) pixels upright (ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def upright(array: np.ndarray, orientation: int | None) -> np.ndarray:
    """The (H, W, ...) array turned as its orientation tag says (a contiguous copy), or as it is."""
    turn = _UPRIGHT.get(orientation)
    return array if turn is None else np.ascontiguousarray(turn(array))


def pixel_values(array: np.ndarray, path: Path) -> np.ndarray:
    """uint8 kept (the fast path for photos); uint16 scaled to 0..1 in float32 (torchvision's ToDtype rule); any
    other type float32 as stored, with non-finite values (no-data) set to 0. An image with no pixels, or none
    that is a finite number, holds nothing to segment."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if array.size == 0:
        raise BadSampleError(f"{path}: an empty image ({'x'.join(map(str, array.shape))}); it holds no pixels")
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "u" and size == 1:
        return array
    if kind not in "uif":
        raise BadSampleError(f"{path}: {array.dtype} pixels; images hold integers or real numbers")
    if kind == "u" and size == 2:
        return array.astype(np.float32) / np.float32(65535)
    values = array.astype(np.float32)
    if kind == "f":
        finite = np.isfinite(values)
        if not finite.any():
            raise BadSampleError(f"{path}: every pixel is NaN or infinite; the image holds no values")
        if not finite.all():
            np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return values


def channel_conversion(have: int, want: int, convert: bool) -> str | None:
    """How an image of `have` channels becomes a `want`-channel input (see ImageReading); None: it cannot."""
    if have == want:
        return "keep"
    if have == 1 and (want == 3 or convert):
        return "repeat"
    if convert and want == 1 and have == 3:
        return "luminance"
    if convert and have > want:
        return "first"
    return None


def mismatch_message(path: Path, have: int, want: int) -> str:
    remedy = {"repeat": "repeats the grey channel", "luminance": "converts colour to grey (luminance)"}
    fix = channel_conversion(have, want, convert=True)
    advice = f"; --convert-channels {remedy.get(fix, f'keeps the first {want}')}" if fix else ""
    return f"{path}: {have} channel{'s' * (have != 1)}, the model takes {want}{advice}"


def conversion_for(path: Path, have: int, reading: ImageReading) -> str:
    """channel_conversion, or ChannelMismatch naming the file and the remedy."""
    conversion = channel_conversion(have, reading.channels, reading.convert)
    if conversion is None:
        raise ChannelMismatch(mismatch_message(path, have, reading.channels))
    return conversion


def fit_channels(array: np.ndarray, reading: ImageReading, path: Path) -> np.ndarray:
    """(H, W, C) pixels -> (H, W, reading.channels), as channel_conversion allows."""
    want = reading.channels
    conversion = conversion_for(path, array.shape[2], reading)
    if conversion == "repeat":
        return np.repeat(array, want, axis=2)
    if conversion == "first":
        return np.ascontiguousarray(array[..., :want])
    if conversion == "luminance":
        grey = array.astype(np.float32) @ LUMINANCE
        return (np.rint(grey).astype(np.uint8) if array.dtype == np.uint8 else grey)[..., None]
    return array


def pil_pixels(image: Image.Image) -> np.ndarray:
    """(H, W, C) of a PIL image: grey modes one channel (16-bit and float kept), every other mode RGB (palette,
    transparency and CMYK resolved as photos always were)."""
    if image.mode in GREY_MODES:
        return np.array(image.getchannel(0) if image.mode in ("LA", "La") else image)[..., None]
    if image.mode != "RGB":
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert("RGB")
    return np.array(image)


@dataclass(frozen=True)
class TiffImage:
    """Where one image of a TIFF file lies: its series, the pages holding it (one, or one per channel)."""

    series: tifffile.TiffPageSeries
    pages: list[int]
    info: ImageInfo

    @property
    def samples_first(self) -> bool:
        return self.series.keyframe.axes == "SYX"  # one page, channel-first (planar configuration "separate")


def page_channel_axis(series: tifffile.TiffPageSeries, lead_axes: str) -> int | None:
    """Which of the axes across pages holds channels: C where the file names its axes (ImageJ, OME); in an array
    tifffile wrote with its shape (axes Q), the last one, as in a (..., C, H, W) array; None where a page holds
    its own channels (samples) or the pages are a plain sequence of images."""
    if "S" in series.keyframe.axes:
        return None
    if "C" in lead_axes:
        return lead_axes.index("C")
    if series.kind == "shaped" and "Q" in lead_axes:
        return lead_axes.rindex("Q")
    return None


def locate_tiff_image(tif: tifffile.TiffFile, number: int, path: Path) -> TiffImage:
    """Image `number` of the file: channels are a page's samples or lie across pages (page_channel_axis); every
    other axis (z, time, a sequence of pages) and every further series counts images."""
    seen = 0
    for series in tif.series:
        key = series.keyframe
        lead = len(series.axes) - len(key.axes)
        if key.axes not in ("YX", "YXS", "SYX") or not series.axes.endswith(key.axes):
            raise BadSampleError(f"{path}: unsupported TIFF layout (axes {series.axes})")
        lead_axes, lead_shape = series.axes[:lead], tuple(series.shape[:lead])
        grid, axis = np.arange(len(series.pages)), page_channel_axis(series, lead_axes)
        if axis is not None and grid.size == np.prod(lead_shape):
            per_image = np.moveaxis(grid.reshape(lead_shape), axis, -1).reshape(-1, lead_shape[axis])
        else:
            per_image = grid[:, None]
        if number < seen + len(per_image):
            shape = dict(zip(key.axes, key.shape, strict=True))
            channels = shape.get("S", per_image.shape[1])
            info = ImageInfo(channels, np.dtype(series.dtype).name, shape["Y"], shape["X"])
            return TiffImage(series, per_image[number - seen].tolist(), info)
        seen += len(per_image)
    raise BadSampleError(f"{path}: holds {seen} image{'s' * (seen != 1)}; there is no image {number} (--tiff-page)")


def _tiff_error(path: Path, err: Exception) -> UnreadableFile:
    """tifffile's errors say little without their type's name."""
    return unreadable(path, "image", err if isinstance(err, FileNotFoundError) else f"{type(err).__name__}: {err}")


TIFF_ERRORS = (OSError, ValueError, IndexError, KeyError, TypeError, tifffile.TiffFileError)


def _read_tiff(tif: tifffile.TiffFile, path: Path, reading: ImageReading, max_pixels: int) -> tuple[np.ndarray, int]:
    """(H, W, C) stored pixels of the chosen image and its orientation tag."""
    image = locate_tiff_image(tif, reading.page, path)
    check_pixels(path, image.info.width, image.info.height, max_pixels, "image")
    planes = [image.series.pages[index].asarray() for index in image.pages]
    if len(planes) > 1:
        array = np.stack(planes, axis=-1)
    elif image.samples_first:
        array = np.moveaxis(planes[0], 0, -1)
    else:
        array = planes[0] if planes[0].ndim == 3 else planes[0][..., None]
    tag = image.series.keyframe.tags.get(ORIENTATION_TAG)
    return array, int(tag.value) if tag is not None else 1


def _tiff_file(path: Path) -> tifffile.TiffFile | None:
    """The open file where tifffile should read it; None for colour models PIL reads as photos."""
    require_file(path, "image")
    try:
        tif = tifffile.TiffFile(path)
    except TIFF_ERRORS as err:
        raise _tiff_error(path, err) from None
    if tif.series and tif.series[0].keyframe.photometric in TIFFFILE_PHOTOMETRIC:
        return tif
    tif.close()
    return None


def read_stored(path: Path, reading: ImageReading, max_pixels: int) -> tuple[np.ndarray, int | None]:
    """The file's (H, W, C) pixels as stored, and the orientation that shows them upright."""
    tif = _tiff_file(path) if path.suffix.lower() in TIFF_EXTENSIONS else None
    if tif is not None:
        with tif:
            try:
                return _read_tiff(tif, path, reading, max_pixels)
            except BadSampleError:
                raise
            except TIFF_ERRORS as err:
                raise _tiff_error(path, err) from None
    image, pixels = _decode(path, max_pixels, "image")
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable(path, "image", err) from None
    return pil_pixels(image) if pixels is None else pixels, orientation


def read_image(
    path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, reading: ImageReading = RGB
) -> tuple[np.ndarray, int | None]:
    """(H, W, reading.channels) pixels, upright: uint8, or float32 (see pixel_values); and the orientation that
    turned them (masks drawn on the stored pixels need the same)."""
    stored, orientation = read_stored(path, reading, max_pixels)
    array = fit_channels(pixel_values(upright(stored, orientation), path), reading, path)
    return array, orientation if orientation in _UPRIGHT else None


def probe_image(path: Path, page: int = 0) -> ImageInfo:
    """Channels, stored type and size from the header alone."""
    tif = _tiff_file(path) if path.suffix.lower() in TIFF_EXTENSIONS else None
    if tif is not None:
        with tif:
            return locate_tiff_image(tif, page, path).info
    require_file(path, "image")
    try:
        with Image.open(path) as image:
            grey = image.mode in GREY_MODES
            return ImageInfo(1 if grey else 3, PIL_DTYPES.get(image.mode, "uint8"), image.height, image.width)
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable(path, "image", err) from None


def align_mask(mask: np.ndarray, shape: tuple[int, int], orientation: int | None, mask_path: Path) -> np.ndarray:
    """Masks match the upright image of shape (H, W); one drawn on the stored pixels is turned the same way."""
    height, width = shape
    if mask.shape == (height, width):
        return mask
    if orientation is not None and mask.shape == (width, height):
        return upright(mask, orientation)
    raise BadSampleError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
