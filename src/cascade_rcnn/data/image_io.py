"""Image decoding as detectron2's `read_image`: EXIF orientation applied, any PIL mode converted."""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image

from cascade_rcnn.errors import CascadeRCNNError

_EXIF_ORIENTATION = 274  # EXIF tag id of "Orientation"

# Orientation tag value -> the transpose that displays the image upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

FORMATS = ("BGR", "RGB", "L")


class ImageReadError(CascadeRCNNError, ValueError):
    """The bytes or file could not be decoded as an image; the message names the source."""


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip `image` per its EXIF orientation tag (2..8); unchanged without a usable tag."""
    if not hasattr(image, "getexif"):
        return image
    try:
        exif = image.getexif()
    except Exception:  # broken EXIF blocks are common; detectron2 ignores them too
        return image
    method = _ORIENTATION_TRANSPOSE.get(exif.get(_EXIF_ORIENTATION)) if exif is not None else None
    return image.transpose(method) if method is not None else image


def convert_pil_to_numpy(image: Image.Image, format: str = "BGR") -> np.ndarray:
    """PIL image -> (H, W, 3) uint8 in `format` ("BGR" / "RGB"), or (H, W, 1) for "L"."""
    if format not in FORMATS:
        raise ValueError(f"image format must be one of {FORMATS}, got {format!r}")
    image = image.convert("RGB" if format == "BGR" else format)
    array = np.asarray(image)
    if format == "L":
        return array[:, :, None]
    if format == "BGR":
        return np.ascontiguousarray(array[:, :, ::-1])
    return array


def read_image(source: Union[str, os.PathLike, bytes], format: str = "BGR") -> np.ndarray:
    """Decode a file path or encoded bytes -> (H, W, C) uint8 as detectron2 reads it."""
    if format not in FORMATS:
        raise ValueError(f"image format must be one of {FORMATS}, got {format!r}")
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else name) as image:
            return convert_pil_to_numpy(apply_exif_orientation(image), format)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{name}: cannot decode image: {e}") from e
