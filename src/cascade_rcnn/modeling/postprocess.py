"""Detections from the resized input back to the original image: box rescaling and mask pasting."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..structures import Detections
from .boxes import clip_boxes, nonempty

# Floats of pasted probabilities per chunk; bounds memory for many large masks.
_PASTE_CHUNK_ELEMENTS = 1 << 24


def _paste_chunk(masks: Tensor, boxes: Tensor, y0: int, y1: int, x0: int, x1: int) -> Tensor:
    """(n, 1, M, M) probabilities sampled at the pixel centres of rows y0:y1, columns x0:x1."""
    n = masks.shape[0]
    bx0, by0, bx1, by1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(y0, y1, device=boxes.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0, x1, device=boxes.device, dtype=torch.float32) + 0.5
    img_y = (img_y - by0) / (by1 - by0) * 2 - 1
    img_x = (img_x - bx0) / (bx1 - bx0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.shape[1], img_x.shape[1])
    gy = img_y[:, :, None].expand(n, img_y.shape[1], img_x.shape[1])
    grid = torch.stack([gx, gy], dim=3)
    if not masks.dtype.is_floating_point:
        masks = masks.float()
    return F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)[:, 0]


def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> Tensor:
    """(N, M, M) probabilities placed in their (N, 4) boxes of an (H, W) image -> (N, H, W) bool.

    Bilinear grid_sample at pixel centres, then `>= threshold`. Each chunk of masks is sampled only
    over the pixels its boxes can touch (one pixel of margin); the value of a pixel does not depend
    on the chunking, and pixels farther out sample below 0.5 and stay False.
    """
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"masks must be square, got {tuple(masks.shape)}")
    n = masks.shape[0]
    img_h, img_w = image_size
    out = torch.zeros((n, img_h, img_w), dtype=torch.bool, device=boxes.device)
    if n == 0:
        return out
    # Per box: the pixels it can touch, with one pixel of margin, inside the image.
    x0s = torch.clamp(boxes[:, 0].floor() - 1, min=0).to(torch.int64).tolist()
    y0s = torch.clamp(boxes[:, 1].floor() - 1, min=0).to(torch.int64).tolist()
    x1s = torch.clamp(boxes[:, 2].ceil() + 1, max=img_w).to(torch.int64).tolist()
    y1s = torch.clamp(boxes[:, 3].ceil() + 1, max=img_h).to(torch.int64).tolist()
    start = 0
    while start < n:
        # Grow the chunk while (masks in it) x (its bounding region) stays under the budget.
        y0, y1, x0, x1 = y0s[start], y1s[start], x0s[start], x1s[start]
        end = start + 1
        while end < n:
            ny0, ny1 = min(y0, y0s[end]), max(y1, y1s[end])
            nx0, nx1 = min(x0, x0s[end]), max(x1, x1s[end])
            if (end + 1 - start) * max(ny1 - ny0, 0) * max(nx1 - nx0, 0) > _PASTE_CHUNK_ELEMENTS:
                break
            y0, y1, x0, x1 = ny0, ny1, nx0, nx1
            end += 1
        if y1 > y0 and x1 > x0:
            probs = _paste_chunk(masks[start:end, None], boxes[start:end], y0, y1, x0, x1)
            out[start:end, y0:y1, x0:x1] = probs >= threshold
        start = end
    return out


def detector_postprocess(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    mask_probs: Optional[Tensor],
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    mask_threshold: float = 0.5,
) -> Detections:
    """Scale boxes from the resized input (h, w) to the original (H, W), clip, drop empty, paste masks.

    boxes (D, 4), scores (D,), classes (D,), mask_probs (D, 1, M, M) or None.
    """
    out_h, out_w = output_size
    scale_x, scale_y = out_w / input_size[1], out_h / input_size[0]
    boxes = boxes.clone()
    boxes[:, 0::2] *= scale_x
    boxes[:, 1::2] *= scale_y
    boxes = clip_boxes(boxes, (out_h, out_w))
    keep = nonempty(boxes)
    if not bool(keep.all()):
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        mask_probs = None if mask_probs is None else mask_probs[keep]
    masks = None
    if mask_probs is not None:
        masks = paste_masks_in_image(mask_probs[:, 0], boxes, (out_h, out_w), mask_threshold)
    return Detections(boxes=boxes, scores=scores, classes=classes, masks=masks, image_size=(out_h, out_w))
