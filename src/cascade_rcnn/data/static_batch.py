"""A batch on a fixed canvas with padded ground truth: every tensor's shape depends only on the
canvas, the batch size and the ground-truth bucket (MODEL.STATIC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class StaticShapes:
    """MODEL.STATIC, checked: canvases sorted by area (smallest first) and the smallest gt bucket."""

    canvases: tuple[tuple[int, int], ...]
    gt_bucket_min: int

    @classmethod
    def from_config(cls, cfg: Any, size_divisibility: int) -> StaticShapes:
        s = cfg.MODEL.STATIC
        canvases = []
        for c in s.CANVAS:
            if not (isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, int) for v in c)):
                raise ValueError(
                    f"MODEL.STATIC.CANVAS entries must be (height, width) integer pairs, got {c!r}"
                )
            h, w = c
            if h <= 0 or w <= 0 or h % size_divisibility or w % size_divisibility:
                raise ValueError(
                    f"MODEL.STATIC.CANVAS entry {c!r} must be positive multiples of the backbone's "
                    f"size divisibility {size_divisibility}"
                )
            canvases.append((h, w))
        if not canvases:
            raise ValueError("MODEL.STATIC.ENABLED needs at least one MODEL.STATIC.CANVAS (height, width)")
        if s.GT_BUCKET_MIN < 1:
            raise ValueError(f"MODEL.STATIC.GT_BUCKET_MIN must be >= 1, got {s.GT_BUCKET_MIN}")
        return cls(tuple(sorted(set(canvases), key=lambda c: (c[0] * c[1], c))), int(s.GT_BUCKET_MIN))

    def canvas_for(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The smallest canvas holding every (h, w) in `sizes`."""
        for ch, cw in self.canvases:
            if all(h <= ch and w <= cw for h, w in sizes):
                return ch, cw
        raise ValueError(
            f"no MODEL.STATIC.CANVAS of {list(self.canvases)} holds the batch's image sizes {list(sizes)}; "
            "add a larger canvas or lower INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST"
        )

    def gt_bucket(self, count: int) -> int:
        """GT_BUCKET_MIN * 2^k >= count: a small set of row counts, none dropping a box."""
        bucket = self.gt_bucket_min
        while bucket < count:
            bucket *= 2
        return bucket


@dataclass
class StaticBatch:
    """images (N, C, H, W) normalized on the canvas; image_sizes (N, 2) int64 (h, w) unpadded.

    Training only: gt_boxes (N, G, 4), gt_classes (N, G) int64, gt_valid (N, G) bool; gt_masks
    (N, G, H, W) bool bitmasks on the canvas or None; gt_polygons: per image the instances'
    polygons (exact host rasterization) or None.
    """

    images: Tensor
    image_sizes: Tensor
    gt_boxes: Optional[Tensor] = None
    gt_classes: Optional[Tensor] = None
    gt_valid: Optional[Tensor] = None
    gt_masks: Optional[Tensor] = None
    gt_polygons: Optional[list[list[list[np.ndarray]]]] = None

    @property
    def shape_key(self) -> tuple[int, ...]:
        """(N, H, W, G): what the step's shapes depend on, for reporting the buckets seen."""
        n, _, h, w = self.images.shape
        g = 0 if self.gt_boxes is None else self.gt_boxes.shape[1]
        return (n, h, w, g)


def _check_inside(boxes: Tensor, h: int, w: int, k: int, item: dict[str, Any]) -> None:
    """Static mode relies on gt boxes inside their image (the mapper clips them, as detectron2's
    does): the RoIAlign sample bound (ops.fpn_sample_bound) assumes it."""
    if boxes.numel() == 0:
        return
    b = boxes.detach().float().cpu()
    bad = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"training input {k} ({item.get('file_name', 'no file_name')}): gt box {j} "
            f"{[round(v, 2) for v in b[j].tolist()]} leaves the {h}x{w} image; MODEL.STATIC needs boxes "
            "clipped to the image (the data mapper clips them)"
        )


def build_static_batch(
    batched_inputs: list[dict[str, Any]],
    shapes: StaticShapes,
    pixel_mean: Tensor,
    pixel_std: Tensor,
    training: bool,
) -> StaticBatch:
    """Normalize the images onto the smallest canvas that holds them, pad the ground truth."""
    device = pixel_mean.device
    sizes = []
    for i, x in enumerate(batched_inputs):
        im = x["image"]
        if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != pixel_mean.shape[0]:
            raise ValueError(
                f"input {i} ({x.get('file_name', 'no file_name')}): 'image' must be a "
                f"({pixel_mean.shape[0]}, H, W) tensor, got "
                f"{tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__}"
            )
        sizes.append((int(im.shape[-2]), int(im.shape[-1])))
    ch, cw = shapes.canvas_for(sizes)
    n = len(batched_inputs)
    images = torch.zeros((n, pixel_mean.shape[0], ch, cw), dtype=torch.float32, device=device)
    for x, dst, (h, w) in zip(batched_inputs, images, sizes):
        dst[:, :h, :w].copy_((x["image"].to(device, non_blocking=True) - pixel_mean) / pixel_std)
    batch = StaticBatch(images=images, image_sizes=torch.tensor(sizes, dtype=torch.int64, device=device))
    if not training:
        return batch
    targets = []
    for i, x in enumerate(batched_inputs):
        if "targets" not in x:
            raise ValueError(f"training input {i} ({x.get('file_name', 'no file_name')}) has no 'targets'")
        targets.append(x["targets"])
    g = shapes.gt_bucket(max(len(t) for t in targets))
    boxes = torch.zeros((n, g, 4), dtype=torch.float32)
    classes = torch.zeros((n, g), dtype=torch.int64)
    valid = torch.zeros((n, g), dtype=torch.bool)
    with_masks = [t.has_masks for t in targets]
    use_bitmasks = all(with_masks) and all(t.polygons is None for t in targets)
    use_polygons = all(with_masks) and not use_bitmasks
    masks = torch.zeros((n, g, ch, cw), dtype=torch.bool) if use_bitmasks else None
    polygons = [] if use_polygons else None
    for k, (t, (h, w)) in enumerate(zip(targets, sizes)):
        m = len(t)
        _check_inside(t.boxes, h, w, k, batched_inputs[k])
        boxes[k, :m] = t.boxes.float()
        classes[k, :m] = t.classes
        valid[k, :m] = True
        if masks is not None:
            masks[k, :m, : t.masks.shape[1], : t.masks.shape[2]] = t.masks.cpu()
        if polygons is not None:
            if t.polygons is None:
                raise ValueError(
                    f"training input {k}: a batch mixes polygon and bitmask targets; "
                    "set INPUT.MASK_FORMAT to one of them"
                )
            polygons.append(t.polygons)
    batch.gt_boxes = boxes.to(device)
    batch.gt_classes = classes.to(device)
    batch.gt_valid = valid.to(device)
    batch.gt_masks = None if masks is None else masks.to(device)
    batch.gt_polygons = polygons
    return batch
