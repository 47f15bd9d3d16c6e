"""Image and mask files -> arrays: every image mode to upright RGB, masks to label values, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
# Larger images are bad samples (--max-pixels). 100 MP is a 12000x8000 photo: 0.3 GB as uint8 RGB and 1.2 GB
# as float, which fits beside the model on a 16 GB machine; a 20000x20000 scan (400 MP) does not.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_MASK_VALUE = 2**16 - 1  # labels are 8- or 16-bit values; a 32-bit mask outside that range is a bad sample
Image.MAX_IMAGE_PIXELS = None  # our limit replaces PIL's decompression-bomb check, so both never disagree


class DataError(UserError):
    """Data that cannot be used as it is; the message names the file or folder."""


class BadSampleError(DataError):
    """One image or mask that cannot be used; the message names the file."""


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _decode(path: Path, max_pixels: int, kind: str) -> Image.Image:
    """Opens the file, checks the size its header gives, and only then decodes the pixels."""
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise BadSampleError(
                    f"{path}: {image.width}x{image.height} {kind} has {pixels:,} pixels, "
                    f"over the limit of {max_pixels:,} (--max-pixels)"
                )
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{path}: unreadable {kind} ({err})") from None
    return image


def read_mask(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A 2-D integer array of label values; colour masks are refused, not guessed at."""
    mask = _decode(path, max_pixels, "mask")
    if mask.mode in ("RGB", "RGBA", "LA"):
        array = np.asarray(mask)
        if mask.mode == "LA" or (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
            return array[..., 0]
        raise BadSampleError(f"{path}: colour ({mask.mode}) mask; masks must hold one label value per pixel")
    if mask.mode == "1":
        return np.asarray(mask, dtype=np.uint8)
    array = np.asarray(mask)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise BadSampleError(f"{path}: unsupported mask mode {mask.mode}")
    if array.size and (array.min() < 0 or array.max() > MAX_MASK_VALUE):  # 32-bit masks can hold anything
        raise BadSampleError(f"{path}: mask values {array.min()}..{array.max()}; labels must be 0..{MAX_MASK_VALUE}")
    return array


# EXIF orientation tag -> the transpose that shows the image upright (as ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Image.Transpose | None]:
    """RGB (to_rgb), shown upright, and the EXIF transpose that did it (masks may need the same)."""
    image = _decode(path, max_pixels, "image")
    try:
        upright = _UPRIGHT.get(image.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSampleError(f"{path}: unreadable image ({err})") from None
    image = to_rgb(image)
    return (image.transpose(upright) if upright is not None else image), upright


def to_rgb(image: Image.Image) -> Image.Image:
    """Palette, grey, RGBA, CMYK and 16-bit (scaled to 8 bits) images as 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        scale = 1 / 256 if array.max() > 255 else 1
        image = Image.fromarray((array * scale).clip(0, 255).astype(np.uint8))
    elif image.mode in ("P", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def rgb_array(image: str | Path | Image.Image | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A path (read as inference.py reads files), a PIL image or an (H, W[, 1|3|4]) uint8/uint16 array ->
    (H, W, 3) uint8, for the Python API."""
    if isinstance(image, (str, Path)):
        return np.array(read_image(Path(image), max_pixels)[0])
    if isinstance(image, np.ndarray):
        if image.dtype not in (np.uint8, np.uint16) or not (
            image.ndim == 2 or image.ndim == 3 and image.shape[2] in (1, 3, 4)
        ):
            raise ValueError(f"a {image.dtype} array of shape {image.shape}; expected uint8 or uint16 (H, W[, 1|3|4])")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a path, a PIL image or a NumPy array, not {type(image).__name__}")
    return np.array(to_rgb(image))  # a copy: writable, as torch.from_numpy wants


def align_mask(mask: np.ndarray, image: Image.Image, upright: Image.Transpose | None, mask_path: Path) -> np.ndarray:
    """Masks match the upright image; one drawn on the stored (pre-EXIF) pixels is turned the same way."""
    width, height = image.size
    if mask.shape == (height, width):
        return mask
    if upright is not None and mask.shape == (width, height):
        return np.asarray(Image.fromarray(mask).transpose(upright))
    raise BadSampleError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}")
