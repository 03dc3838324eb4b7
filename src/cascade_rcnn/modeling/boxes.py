"""XYXY box geometry with detectron2's conventions (width = x1 - x0, no +1)."""

from __future__ import annotations

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """(N, 4) -> (N,)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(N, 4), (M, 4) -> (N, M) IoU; 0 where the boxes do not overlap (never NaN for empty boxes)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    wh = torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])
    inter = wh.clamp_(min=0).prod(dim=2)
    return torch.where(
        inter > 0,
        inter / (area1[:, None] + area2 - inter),
        torch.zeros(1, dtype=inter.dtype, device=inter.device),
    )


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp (..., 4) boxes to [0, w] x [0, h]; returns a new tensor."""
    h, w = image_size
    x0 = boxes[..., 0].clamp(min=0, max=w)
    y0 = boxes[..., 1].clamp(min=0, max=h)
    x1 = boxes[..., 2].clamp(min=0, max=w)
    y1 = boxes[..., 3].clamp(min=0, max=h)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """(N, 4) -> (N,) bool: width and height both above `threshold`."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)
