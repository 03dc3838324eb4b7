"""Per-image value types passed between the data pipeline, the model and the evaluator.

`Targets` is the ground truth of one resized (and possibly flipped) training image; `Detections`
is the model's output for one image at its original resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from torch import Tensor


@dataclass
class Targets:
    """Ground truth of one image, in resized-image pixels.

    boxes: (N, 4) float32 XYXY; classes: (N,) int64 contiguous 0-based ids.
    polygons: per instance, a list of flat float64 arrays x0, y0, x1, y1, ... (COCO polygons);
    masks: (N, H, W) bool bitmasks, used when polygons is None.
    """

    boxes: Tensor
    classes: Tensor
    polygons: Optional[list[list[np.ndarray]]] = None
    masks: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Targets.boxes must have shape (N, 4), got {tuple(self.boxes.shape)}")
        n = self.boxes.shape[0]
        if self.classes.shape != (n,):
            raise ValueError(f"Targets.classes must have shape ({n},), got {tuple(self.classes.shape)}")
        if self.polygons is not None and len(self.polygons) != n:
            raise ValueError(f"Targets.polygons has {len(self.polygons)} instances, boxes has {n}")
        if self.masks is not None and (self.masks.ndim != 3 or self.masks.shape[0] != n):
            raise ValueError(f"Targets.masks must have shape ({n}, H, W), got {tuple(self.masks.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def has_masks(self) -> bool:
        return self.polygons is not None or self.masks is not None

    def to(self, device: torch.device | str) -> Targets:
        """Tensors moved to `device`; polygons stay on the host (they are rasterized there)."""
        return replace(
            self,
            boxes=self.boxes.to(device),
            classes=self.classes.to(device),
            masks=None if self.masks is None else self.masks.to(device),
        )


@dataclass
class Detections:
    """Detections of one image in ORIGINAL image pixels, in descending score order.

    boxes: (N, 4) float32 XYXY; scores: (N,); classes: (N,) int64 contiguous 0-based ids;
    masks: (N, H, W) bool at the original resolution, or None when the model has no mask head.
    """

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    masks: Optional[Tensor] = None
    image_size: tuple[int, int] = field(default=(0, 0))  # (height, width) of the original image

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> Detections:
        return replace(
            self,
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            classes=self.classes.to(device),
            masks=None if self.masks is None else self.masks.to(device),
        )
