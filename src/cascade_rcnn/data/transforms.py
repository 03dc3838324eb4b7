"""Geometric transforms with detectron2's numerics: shortest-edge resize (PIL bilinear on uint8) and
horizontal flip, applied consistently to images, boxes and polygons."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def resize_shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w): shorter side -> `short`, longer side capped at `max_size`, each rounded int(x + 0.5)."""
    size = short * 1.0
    scale = size / min(h, w)
    if h < w:
        newh, neww = size, scale * w
    else:
        newh, neww = scale * h, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_image(img: np.ndarray, newh: int, neww: int, interp: int = Image.BILINEAR) -> np.ndarray:
    """(H, W[, C]) uint8 -> (newh, neww[, C]) uint8 with PIL (bilinear by default)."""
    if img.dtype != np.uint8:
        raise ValueError(f"resize_image expects uint8, got {img.dtype}")
    single_channel = img.ndim == 3 and img.shape[2] == 1
    pil = Image.fromarray(img[:, :, 0] if single_channel else img)
    out = np.asarray(pil.resize((neww, newh), interp))
    return out[:, :, None] if single_channel else out


@dataclass(frozen=True)
class ResizeTransform:
    """Resize from (h, w) to (new_h, new_w)."""

    h: int
    w: int
    new_h: int
    new_w: int

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"ResizeTransform expects a {self.h}x{self.w} image, got {img.shape[:2]}")
        return resize_image(img, self.new_h, self.new_w)

    def apply_segmentation(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool/uint8 mask, nearest-neighbour."""
        out = resize_image(mask.astype(np.uint8), self.new_h, self.new_w, Image.NEAREST)
        return out.astype(mask.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) x, y -> scaled copy."""
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[:, 0] = coords[:, 0] * (self.new_w * 1.0 / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h * 1.0 / self.h)
        return coords

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) XYXY -> (N, 4) XYXY."""
        return _boxes_via_corners(self, boxes)

    def apply_polygons(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        """Flat x0, y0, x1, y1, ... arrays -> transformed flat float64 arrays."""
        return _polygons_via_coords(self, polygons)


@dataclass(frozen=True)
class HFlipTransform:
    """Mirror an image of the given width: x -> width - x."""

    width: int

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img[:, ::-1])

    def apply_segmentation(self, mask: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(mask[:, ::-1])

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[:, 0] = self.width - coords[:, 0]
        return coords

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        return _boxes_via_corners(self, boxes)

    def apply_polygons(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        return _polygons_via_coords(self, polygons)


def _boxes_via_corners(transform, boxes: np.ndarray) -> np.ndarray:
    """Transform the 4 corners of each box and take their bounding box (handles flips)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)
    corners = transform.apply_coords(corners).reshape(-1, 4, 2)
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def _polygons_via_coords(transform, polygons: list[np.ndarray]) -> list[np.ndarray]:
    """Each flat x0, y0, x1, y1, ... polygon through transform.apply_coords, as a flat float64 array."""
    return [
        transform.apply_coords(np.asarray(p, dtype=np.float64).reshape(-1, 2)).reshape(-1) for p in polygons
    ]
