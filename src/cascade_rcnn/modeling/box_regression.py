"""Box <-> delta encoding (detectron2's Box2BoxTransform) and the box regression losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

# Upper bound on dw/dh so exp() cannot overflow: boxes grow at most 1000/16 times per step.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class Box2BoxTransform:
    """Deltas (dx, dy, dw, dh) scaled by `weights` = (wx, wy, ww, wh); widths are x1 - x0."""

    weights: tuple[float, float, float, float]
    scale_clamp: float = DEFAULT_SCALE_CLAMP

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """(N, 4) src, (N, 4) targets -> (N, 4) deltas that turn src into targets."""
        src_widths = src_boxes[:, 2] - src_boxes[:, 0]
        src_heights = src_boxes[:, 3] - src_boxes[:, 1]
        src_ctr_x = src_boxes[:, 0] + 0.5 * src_widths
        src_ctr_y = src_boxes[:, 1] + 0.5 * src_heights

        target_widths = target_boxes[:, 2] - target_boxes[:, 0]
        target_heights = target_boxes[:, 3] - target_boxes[:, 1]
        target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
        target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights

        wx, wy, ww, wh = self.weights
        dx = wx * (target_ctr_x - src_ctr_x) / src_widths
        dy = wy * (target_ctr_y - src_ctr_y) / src_heights
        dw = ww * torch.log(target_widths / src_widths)
        dh = wh * torch.log(target_heights / src_heights)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """(N, K*4) deltas, (N, 4) boxes -> (N, K*4) boxes. Always decoded in fp32."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        x0 = pred_ctr_x - 0.5 * pred_w
        y0 = pred_ctr_y - 0.5 * pred_h
        x1 = pred_ctr_x + 0.5 * pred_w
        y1 = pred_ctr_y + 0.5 * pred_h
        return torch.stack((x0, y0, x1, y1), dim=-1).reshape(deltas.shape)


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1; beta < 1e-5 is exactly L1 (fvcore's convention)."""
    if beta < 1e-5:
        return torch.abs(input - target).sum()
    n = torch.abs(input - target)
    return torch.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta).sum()


BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")


def box_regression_loss(
    transform: Box2BoxTransform,
    src_boxes: Tensor,
    pred_deltas: Tensor,
    gt_boxes: Tensor,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> Tensor:
    """Summed (not averaged) regression loss over foreground rows.

    src_boxes (M, 4) anchors or proposals, pred_deltas (M, 4), gt_boxes (M, 4).
    """
    if loss_type == "smooth_l1":
        gt_deltas = transform.get_deltas(src_boxes, gt_boxes)
        return smooth_l1_loss(pred_deltas, gt_deltas, smooth_l1_beta)
    pred_boxes = transform.apply_deltas(pred_deltas, src_boxes)
    if loss_type == "giou":
        return generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="sum", eps=1e-7)
    if loss_type == "diou":
        return distance_box_iou_loss(pred_boxes, gt_boxes, reduction="sum", eps=1e-7)
    if loss_type == "ciou":
        return complete_box_iou_loss(pred_boxes, gt_boxes, reduction="sum", eps=1e-7)
    raise ValueError(
        f"BBOX_REG_LOSS_TYPE {loss_type!r} is not supported; expected one of {BOX_REG_LOSS_TYPES}"
    )
