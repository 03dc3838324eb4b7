"""Fast R-CNN box head (convs + FCs), its output layers, losses and per-image inference."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .box_regression import BOX_REG_LOSS_TYPES, Box2BoxTransform, box_regression_loss
from .boxes import clip_boxes
from .layers import add_conv_stack
from .ops import batched_nms
from .weight_init import c2_xavier_fill, normal_fill


class FastRCNNConvFCHead(nn.Sequential):
    """conv{k} (3x3 + ReLU) layers, then flatten (C, H, W order) and fc{k} (+ ReLU) layers."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_conv: int = 0,
        conv_dim: int = 256,
        num_fc: int = 2,
        fc_dim: int = 1024,
        conv_norm: str = "",
    ):
        super().__init__()
        if num_conv + num_fc == 0:
            raise ValueError("ROI_BOX_HEAD needs NUM_CONV + NUM_FC > 0")
        channels, height, width = input_shape
        channels = add_conv_stack(self, "conv", num_conv, channels, conv_dim, conv_norm)
        size = channels * height * width
        for k in range(num_fc):
            if k == 0:
                self.add_module("flatten", nn.Flatten())
            fc = nn.Linear(size, fc_dim)
            c2_xavier_fill(fc)
            self.add_module(f"fc{k + 1}", fc)
            self.add_module(f"fc_relu{k + 1}", nn.ReLU())
            size = fc_dim
        self.output_size = size

    @classmethod
    def from_config(cls, cfg, in_channels: int) -> FastRCNNConvFCHead:
        h = cfg.MODEL.ROI_BOX_HEAD
        if h.NAME != "FastRCNNConvFCHead":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.NAME {h.NAME!r} is not supported; only 'FastRCNNConvFCHead' is"
            )
        res = h.POOLER_RESOLUTION
        return cls((in_channels, res, res), h.NUM_CONV, h.CONV_DIM, h.NUM_FC, h.FC_DIM, h.NORM)


class FastRCNNOutputLayers(nn.Module):
    """cls_score: K+1 logits (background last); bbox_pred: 4 (agnostic) or K*4 deltas."""

    def __init__(
        self,
        input_size: int,
        num_classes: int,
        box2box_transform: Box2BoxTransform,
        cls_agnostic_bbox_reg: bool = True,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.0,
        loss_weight_box_reg: float = 1.0,
    ):
        super().__init__()
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE {box_reg_loss_type!r} is not supported; "
                f"expected one of {BOX_REG_LOSS_TYPES}"
            )
        self.num_classes = num_classes
        self.box2box_transform = box2box_transform
        self.cls_score = nn.Linear(input_size, num_classes + 1)
        self.bbox_pred = nn.Linear(input_size, (1 if cls_agnostic_bbox_reg else num_classes) * 4)
        normal_fill(self.cls_score, std=0.01)
        normal_fill(self.bbox_pred, std=0.001)
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight_box_reg = loss_weight_box_reg

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(R, D) features -> scores (R, K+1), deltas (R, 4 or K*4)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def losses(
        self, scores: Tensor, deltas: Tensor, proposal_boxes: Tensor, gt_classes: Tensor, gt_boxes: Tensor
    ) -> dict[str, Tensor]:
        """Softmax CE averaged over all R RoIs; box loss summed over foreground / max(R, 1).

        scores (R, K+1), deltas (R, 4|K*4), proposal_boxes (R, 4), gt_classes (R,) with K = background,
        gt_boxes (R, 4) (ignored for background rows).
        """
        if gt_classes.numel() == 0:
            loss_cls = scores.sum() * 0.0
        else:
            loss_cls = F.cross_entropy(scores, gt_classes, reduction="mean")
        fg_inds = torch.nonzero((gt_classes >= 0) & (gt_classes < self.num_classes), as_tuple=True)[0]
        if deltas.shape[1] == 4:
            fg_deltas = deltas[fg_inds]
        else:
            fg_deltas = deltas.view(-1, self.num_classes, 4)[fg_inds, gt_classes[fg_inds]]
        loss_box = box_regression_loss(
            self.box2box_transform,
            proposal_boxes[fg_inds],
            fg_deltas,
            gt_boxes[fg_inds],
            self.box_reg_loss_type,
            self.smooth_l1_beta,
        )
        loss_box = loss_box / max(gt_classes.numel(), 1.0)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box * self.loss_weight_box_reg}

    def predict_boxes(self, deltas: Tensor, proposal_boxes: Tensor) -> Tensor:
        """(R, 4|K*4) deltas applied to (R, 4) boxes -> (R, 4|K*4)."""
        return self.box2box_transform.apply_deltas(deltas, proposal_boxes)


def fast_rcnn_inference_single_image(
    boxes: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """boxes (R, 4|K*4), scores (R, K+1) -> kept boxes (D, 4), scores (D,), classes (D,), source rows (D,).

    Every (box, class) pair scoring above score_thresh competes in per-class NMS; the top
    topk_per_image survive, sorted by score.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    if not bool(valid.all()):
        boxes, scores, rows = boxes[valid], scores[valid], rows[valid]
    scores = scores[:, :-1]
    num_reg_classes = boxes.shape[1] // 4
    boxes = clip_boxes(boxes.reshape(-1, 4), image_size).view(-1, num_reg_classes, 4)
    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()
    if num_reg_classes == 1:
        boxes = boxes[filter_inds[:, 0], 0]
    else:
        boxes = boxes[filter_mask]
    scores = scores[filter_mask]
    keep = batched_nms(boxes, scores, filter_inds[:, 1], nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    filter_inds = filter_inds[keep]
    return boxes[keep], scores[keep], filter_inds[:, 1], rows[filter_inds[:, 0]]
