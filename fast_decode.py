"""The common files decoded fast: 8-bit JPEG images and grey PNG masks through TorchCodec (libjpeg-turbo, libpng),
straight into (H, W, C) memory. PIL decodes the same pixels into a four-bytes-a-pixel buffer that is then copied
out; it still reads every header (image_io checks size and orientation first) and every other file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

try:
    from torchcodec.decoders import decode_jpeg, decode_png

    FAST_DECODERS = {
        ("image", "JPEG", "RGB"): (decode_jpeg, "RGB"),
        ("image", "JPEG", "L"): (decode_jpeg, "GRAY"),
        ("mask", "PNG", "L"): (decode_png, "GRAY"),
    }
except (ImportError, OSError, RuntimeError):  # no TorchCodec build for this platform or torch: PIL decodes all
    FAST_DECODERS = {}


def fast_pixels(path: Path, image: Image.Image, kind: str) -> np.ndarray | None:
    """(H, W, C) pixels as stored of an opened, not yet decoded image ("image" or "mask"), or None where PIL
    decodes: other formats and modes, and files TorchCodec cannot decode (PIL then names what is wrong)."""
    decoder = FAST_DECODERS.get((kind, image.format, image.mode))
    if decoder is None:
        return None
    if kind == "image" and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        return None  # TorchCodec would turn a JPEG upright, and the mask drawn on its stored pixels could not follow
    decode, mode = decoder
    try:
        return decode(path, mode=mode).permute(1, 2, 0).numpy()
    except RuntimeError:
        return None
