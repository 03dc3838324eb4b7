"""Mask R-CNN mask head: 4 convs, 2x deconv, per-class 1x1 predictor; mask targets, loss and inference."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layers import add_conv_stack
from .ops import roi_align
from .weight_init import c2_msra_fill, normal_fill


class MaskRCNNConvUpsampleHead(nn.Sequential):
    """mask_fcn{1..n} (3x3 + ReLU), deconv (2x2 stride 2) + ReLU, predictor (1x1) -> (R, K, 2S, 2S) logits."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_conv: int = 4,
        conv_dim: int = 256,
        conv_norm: str = "",
        cls_agnostic: bool = False,
    ):
        super().__init__()
        cur = add_conv_stack(self, "mask_fcn", num_conv, in_channels, conv_dim, conv_norm)
        self.deconv = nn.ConvTranspose2d(cur, conv_dim, kernel_size=2, stride=2, padding=0)
        c2_msra_fill(self.deconv)
        self.add_module("deconv_relu", nn.ReLU())
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic else num_classes, kernel_size=1)
        normal_fill(self.predictor, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu":
            # As for the backbone: oneDNN's NHWC convolutions are faster, on pooled 14x14 maps too.
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> MaskRCNNConvUpsampleHead:
        m = cfg.MODEL.ROI_MASK_HEAD
        if m.NAME != "MaskRCNNConvUpsampleHead":
            raise ValueError(
                f"MODEL.ROI_MASK_HEAD.NAME {m.NAME!r} is not supported; only 'MaskRCNNConvUpsampleHead' is"
            )
        return cls(
            in_channels,
            cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            m.NUM_CONV,
            m.CONV_DIM,
            m.NORM,
            m.CLS_AGNOSTIC_MASK,
        )


def rasterize_polygons_in_boxes(polygons: list[list[np.ndarray]], boxes: Tensor, mask_size: int) -> Tensor:
    """Per box, its instance's polygons cropped to the box and rasterized at mask_size x mask_size.

    polygons[i] (flat x, y arrays in image pixels) belongs to boxes[i] (R, 4). Coordinates are
    shifted by the box corner and scaled by mask_size / max(side, 0.1), then pycocotools
    rasterizes them (detectron2's rule). Returns (R, M, M) bool on boxes.device.
    """
    num = len(polygons)
    if num == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    box = boxes.detach().to("cpu", torch.float32)
    w = box[:, 2] - box[:, 0]
    h = box[:, 3] - box[:, 1]
    ratio = (
        torch.stack((mask_size / torch.clamp(w, min=0.1), mask_size / torch.clamp(h, min=0.1)), dim=1)
        .numpy()
        .astype(np.float64)
    )
    origin = box[:, :2].numpy().astype(np.float64)
    # Fewer than 3 points is no area (detectron2 drops such polygons when loading).
    polygons = [[p for p in polys if len(p) >= 6] for polys in polygons]
    lengths = [len(p) for polys in polygons for p in polys]
    counts = [len(polys) for polys in polygons]
    rles = []
    if lengths:
        # Shift and scale every coordinate of every polygon in one vector op.
        owner = np.repeat(np.arange(num), counts)
        coord_owner = np.repeat(owner, lengths)
        axis = np.concatenate([np.arange(n) % 2 for n in lengths])
        flat = np.concatenate([p for polys in polygons for p in polys]).astype(np.float64)
        flat = (flat - origin[coord_owner, axis]) * ratio[coord_owner, axis]
        rles = mask_util.frPyObjects(np.split(flat, np.cumsum(lengths)[:-1]), mask_size, mask_size)
    empty = None
    merged = []
    start = 0
    for n in counts:
        if n == 0:
            if empty is None:
                empty = mask_util.encode(np.zeros((mask_size, mask_size), dtype=np.uint8, order="F"))
            merged.append(empty)
        else:
            merged.append(rles[start] if n == 1 else mask_util.merge(rles[start : start + n]))
        start += n
    masks = mask_util.decode(merged)  # (M, M, R), Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))).to(boxes.device, torch.bool)


def crop_bitmasks_in_boxes(masks: Tensor, gt_index: Tensor, boxes: Tensor, mask_size: int) -> Tensor:
    """masks (G, H, W) bool; box i crops masks[gt_index[i]] with aligned RoIAlign -> (R, M, M) bool (>= 0.5)."""
    if boxes.shape[0] == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    rois = torch.cat([gt_index.to(boxes.dtype)[:, None], boxes], dim=1).to(torch.float32)
    out = roi_align(masks[:, None].to(torch.float32), rois, (mask_size, mask_size), 1.0, 0, aligned=True)
    return out.squeeze(1) >= 0.5


def mask_rcnn_loss(pred_mask_logits: Tensor, gt_classes: Tensor, gt_masks: Tensor) -> Tensor:
    """BCE-with-logits averaged over all R x M x M elements of the gt-class channel.

    pred_mask_logits (R, K|1, M, M); gt_classes (R,); gt_masks (R, M, M) bool.
    """
    if pred_mask_logits.shape[0] == 0:
        return pred_mask_logits.sum() * 0
    if pred_mask_logits.shape[1] == 1:
        logits = pred_mask_logits[:, 0]
    else:
        logits = pred_mask_logits[
            torch.arange(pred_mask_logits.shape[0], device=gt_classes.device), gt_classes
        ]
    return F.binary_cross_entropy_with_logits(logits, gt_masks.to(torch.float32), reduction="mean")


def mask_rcnn_inference(pred_mask_logits: Tensor, pred_classes: Tensor) -> Tensor:
    """(R, K|1, M, M) logits, (R,) classes -> (R, 1, M, M) probabilities of the predicted class."""
    if pred_mask_logits.shape[1] == 1:
        return pred_mask_logits.float().sigmoid()
    rows = torch.arange(pred_mask_logits.shape[0], device=pred_classes.device)
    return pred_mask_logits[rows, pred_classes][:, None].float().sigmoid()


def mask_targets(
    polygons: Optional[list[list[np.ndarray]]],
    bitmasks: Optional[Tensor],
    gt_index: Tensor,
    boxes: Tensor,
    mask_size: int,
) -> Tensor:
    """Targets (R, M, M) bool for proposals `boxes` (R, 4) matched to ground-truth `gt_index` (R,)."""
    if polygons is not None:
        idx = gt_index.tolist()
        return rasterize_polygons_in_boxes([polygons[i] for i in idx], boxes, mask_size)
    if bitmasks is not None:
        return crop_bitmasks_in_boxes(bitmasks, gt_index, boxes, mask_size)
    raise ValueError("mask training needs Targets.polygons or Targets.masks")
