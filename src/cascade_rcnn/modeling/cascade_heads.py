"""Cascade R-CNN ROI heads: three box stages of rising IoU, then the Mask R-CNN mask head.

Stage 0 samples the RPN proposals (plus the ground truth boxes); stages 1 and 2 refine every box
of the previous stage without resampling and re-match it at their own IoU. At inference the
class probabilities of the stages are averaged and the last stage's boxes are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..structures import Targets
from .box_head import FastRCNNConvFCHead, FastRCNNOutputLayers, fast_rcnn_inference_single_image
from .box_regression import Box2BoxTransform
from .boxes import clip_boxes, nonempty, pairwise_iou
from .mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_inference, mask_rcnn_loss, mask_targets
from .matcher import Matcher
from .poolers import ROIPooler
from .sampling import subsample_labels


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    return _ScaleGradient.apply(x, scale)


@dataclass
class LabeledBoxes:
    """Boxes of one image labelled against its ground truth (training).

    boxes (R, 4); gt_classes (R,) with num_classes = background; gt_boxes (R, 4); gt_index (R,)
    index of the matched ground truth (meaningless for background rows).
    """

    boxes: Tensor
    gt_classes: Tensor
    gt_boxes: Tensor
    gt_index: Tensor


@dataclass
class RoiPredictions:
    """Final per-image detections in resized-image pixels, before postprocessing.

    boxes (D, 4), scores (D,), classes (D,), mask_probs (D, 1, M, M) or None.
    """

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    mask_probs: Optional[Tensor] = None


class CascadeROIHeads(nn.Module):
    def __init__(
        self,
        in_features: tuple[str, ...],
        box_pooler: ROIPooler,
        box_heads: list[FastRCNNConvFCHead],
        box_predictors: list[FastRCNNOutputLayers],
        stage_ious: tuple[float, ...],
        num_classes: int,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        proposal_append_gt: bool = True,
        test_score_thresh: float = 0.05,
        test_nms_thresh: float = 0.5,
        test_topk_per_image: int = 100,
        mask_pooler: Optional[ROIPooler] = None,
        mask_head: Optional[MaskRCNNConvUpsampleHead] = None,
    ):
        super().__init__()
        if not len(box_heads) == len(box_predictors) == len(stage_ious):
            raise ValueError("cascade stages need one box head, predictor and IoU each")
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("mask_pooler and mask_head go together")
        self.in_features = tuple(in_features)
        self.box_pooler = box_pooler
        self.box_head = nn.ModuleList(box_heads)
        self.box_predictor = nn.ModuleList(box_predictors)
        self.num_stages = len(box_heads)
        # Stage 0 samples with ROI_HEADS.IOU_THRESHOLDS (== stage_ious[0]); later stages only relabel.
        self.proposal_matchers = [
            Matcher([iou], [0, 1], allow_low_quality_matches=False) for iou in stage_ious
        ]
        self.num_classes = num_classes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.proposal_append_gt = proposal_append_gt
        self.test_score_thresh = test_score_thresh
        self.test_nms_thresh = test_nms_thresh
        self.test_topk_per_image = test_topk_per_image
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head

    @classmethod
    def from_config(cls, cfg, strides: dict[str, int], channels: int) -> CascadeROIHeads:
        """strides: {feature name: stride} of the backbone outputs; channels: their (shared) width."""
        roi = cfg.MODEL.ROI_HEADS
        box = cfg.MODEL.ROI_BOX_HEAD
        cascade = cfg.MODEL.ROI_BOX_CASCADE_HEAD
        if roi.NAME != "CascadeROIHeads":
            raise ValueError(f"MODEL.ROI_HEADS.NAME {roi.NAME!r} is not supported; only 'CascadeROIHeads' is")
        if not box.CLS_AGNOSTIC_BBOX_REG:
            raise ValueError("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG must be True for CascadeROIHeads")
        if box.USE_FED_LOSS or box.USE_SIGMOID_CE:
            raise ValueError("MODEL.ROI_BOX_HEAD.USE_FED_LOSS / USE_SIGMOID_CE are not supported")
        if box.TRAIN_ON_PRED_BOXES:
            raise ValueError("MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported")
        ious = tuple(cascade.IOUS)
        weights = tuple(tuple(w) for w in cascade.BBOX_REG_WEIGHTS)
        if len(ious) != len(weights):
            raise ValueError(
                f"MODEL.ROI_BOX_CASCADE_HEAD: {len(ious)} IOUS but {len(weights)} BBOX_REG_WEIGHTS"
            )
        if list(roi.IOU_THRESHOLDS) != [ious[0]] or list(roi.IOU_LABELS) != [0, 1]:
            raise ValueError(
                f"MODEL.ROI_HEADS.IOU_THRESHOLDS {list(roi.IOU_THRESHOLDS)} must be [IOUS[0]] = [{ious[0]}] "
                "with IOU_LABELS [0, 1]"
            )
        missing = [f for f in roi.IN_FEATURES if f not in strides]
        if missing:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES {missing} are not backbone outputs {sorted(strides)}"
            )
        scales = tuple(1.0 / strides[f] for f in roi.IN_FEATURES)
        box_pooler = ROIPooler(box.POOLER_RESOLUTION, scales, box.POOLER_SAMPLING_RATIO, box.POOLER_TYPE)
        heads, predictors = [], []
        for w in weights:
            head = FastRCNNConvFCHead.from_config(cfg, channels)
            heads.append(head)
            predictors.append(
                FastRCNNOutputLayers(
                    head.output_size,
                    roi.NUM_CLASSES,
                    Box2BoxTransform(w),
                    cls_agnostic_bbox_reg=True,
                    box_reg_loss_type=box.BBOX_REG_LOSS_TYPE,
                    smooth_l1_beta=box.SMOOTH_L1_BETA,
                    loss_weight_box_reg=box.BBOX_REG_LOSS_WEIGHT,
                )
            )
        mask_pooler = mask_head = None
        if cfg.MODEL.MASK_ON:
            m = cfg.MODEL.ROI_MASK_HEAD
            mask_pooler = ROIPooler(m.POOLER_RESOLUTION, scales, m.POOLER_SAMPLING_RATIO, m.POOLER_TYPE)
            mask_head = MaskRCNNConvUpsampleHead.from_config(cfg, channels)
        return cls(
            in_features=tuple(roi.IN_FEATURES),
            box_pooler=box_pooler,
            box_heads=heads,
            box_predictors=predictors,
            stage_ious=ious,
            num_classes=roi.NUM_CLASSES,
            batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE,
            positive_fraction=roi.POSITIVE_FRACTION,
            proposal_append_gt=roi.PROPOSAL_APPEND_GT,
            test_score_thresh=roi.SCORE_THRESH_TEST,
            test_nms_thresh=roi.NMS_THRESH_TEST,
            test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            mask_pooler=mask_pooler,
            mask_head=mask_head,
        )

    # ---- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: list[Tensor], targets: list[Targets]
    ) -> list[LabeledBoxes]:
        """Append the gt boxes, match at stage 0's IoU, sample BATCH_SIZE_PER_IMAGE (fg first)."""
        out = []
        for boxes, t in zip(proposals, targets):
            if self.proposal_append_gt:
                boxes = torch.cat([boxes, t.boxes.to(boxes.dtype)])
            matched_idxs, matched_labels = self.proposal_matchers[0](pairwise_iou(t.boxes, boxes))
            if len(t) > 0:
                gt_classes = t.classes[matched_idxs]
                gt_classes[matched_labels == 0] = self.num_classes
                gt_classes[matched_labels == -1] = -1
            else:
                gt_classes = torch.full_like(matched_idxs, self.num_classes)
            fg, bg = subsample_labels(
                gt_classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            sampled = torch.cat([fg, bg])
            gt_index = matched_idxs[sampled]
            out.append(
                LabeledBoxes(
                    boxes=boxes[sampled],
                    gt_classes=gt_classes[sampled],
                    gt_boxes=t.boxes[gt_index] if len(t) > 0 else boxes.new_zeros((len(sampled), 4)),
                    gt_index=gt_index,
                )
            )
        return out

    @torch.no_grad()
    def match_and_label_boxes(
        self, boxes: list[Tensor], stage: int, targets: list[Targets]
    ) -> list[LabeledBoxes]:
        """Relabel refined boxes at the stage's IoU: below it background, else the matched gt."""
        out = []
        for b, t in zip(boxes, targets):
            matched_idxs, labels = self.proposal_matchers[stage](pairwise_iou(t.boxes, b))
            if len(t) > 0:
                gt_classes = t.classes[matched_idxs]
                gt_classes[labels == 0] = self.num_classes
                gt_boxes = t.boxes[matched_idxs]
            else:
                gt_classes = torch.full_like(matched_idxs, self.num_classes)
                gt_boxes = b.new_zeros((len(b), 4))
            out.append(LabeledBoxes(b, gt_classes, gt_boxes, matched_idxs))
        return out

    def _pooler_inputs(self, features: dict[str, Tensor]) -> list[Tensor]:
        # RoIAlign kernels want NCHW-contiguous maps; convert channels-last ones once, not per call.
        return [features[f].contiguous() for f in self.in_features]

    def _run_stage(self, features: list[Tensor], boxes: list[Tensor], stage: int) -> tuple[Tensor, Tensor]:
        x = self.box_pooler(features, boxes)
        if self.training:
            # Each stage's loss reaches the shared features with weight 1/num_stages.
            x = scale_gradient(x, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](x))

    def _next_stage_boxes(
        self, stage: int, deltas: Tensor, boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Stage `stage`'s refined boxes, detached and clipped; empty ones dropped in training only."""
        with torch.no_grad():
            pred = self.box_predictor[stage].predict_boxes(deltas.detach(), torch.cat(boxes))
        out = []
        for b, size in zip(pred.split([len(b) for b in boxes]), image_sizes):
            b = clip_boxes(b, size)
            if self.training:
                b = b[nonempty(b)]
            out.append(b)
        return out

    def losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[Targets],
    ) -> dict[str, Tensor]:
        feats = self._pooler_inputs(features)
        sampled = self.label_and_sample_proposals(proposals, targets)
        labeled = sampled
        losses: dict[str, Tensor] = {}
        for k in range(self.num_stages):
            boxes = [x.boxes for x in labeled]
            scores, deltas = self._run_stage(feats, boxes, k)
            stage_losses = self.box_predictor[k].losses(
                scores,
                deltas,
                torch.cat(boxes),
                torch.cat([x.gt_classes for x in labeled]),
                torch.cat([x.gt_boxes for x in labeled]),
            )
            losses.update({f"{name}_stage{k}": v for name, v in stage_losses.items()})
            if k + 1 < self.num_stages:
                labeled = self.match_and_label_boxes(
                    self._next_stage_boxes(k, deltas, boxes, image_sizes), k + 1, targets
                )
        if self.mask_head is not None:
            losses["loss_mask"] = self._mask_loss(feats, sampled, targets)
        return losses

    def _mask_loss(self, feats: list[Tensor], sampled: list[LabeledBoxes], targets: list[Targets]) -> Tensor:
        """Mask loss on stage 0's foreground proposals (not the refined boxes)."""
        fg_boxes, fg_classes, gt_masks = [], [], []
        for s, t in zip(sampled, targets):
            fg = torch.nonzero((s.gt_classes != -1) & (s.gt_classes != self.num_classes), as_tuple=True)[0]
            fg_boxes.append(s.boxes[fg])
            fg_classes.append(s.gt_classes[fg])
            gt_masks.append((t, s.gt_index[fg], s.boxes[fg]))
        x = self.mask_pooler(feats, fg_boxes)
        logits = self.mask_head(x)
        mask_size = logits.shape[-1]
        targets_fg = [
            mask_targets(t.polygons, t.masks, idx, boxes, mask_size)
            for t, idx, boxes in gt_masks
            if len(idx) > 0
        ]
        if not targets_fg:
            return logits.sum() * 0
        return mask_rcnn_loss(logits, torch.cat(fg_classes), torch.cat(targets_fg))

    # ---- inference ------------------------------------------------------------------------------

    @torch.no_grad()
    def inference(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[RoiPredictions]:
        feats = self._pooler_inputs(features)
        counts = [len(p) for p in proposals]
        boxes = proposals
        probs_sum: Optional[Tensor] = None
        for k in range(self.num_stages):
            scores, deltas = self._run_stage(feats, boxes, k)
            probs = F.softmax(scores.float(), dim=-1)
            probs_sum = probs if probs_sum is None else probs_sum + probs
            if k + 1 < self.num_stages:
                boxes = self._next_stage_boxes(k, deltas, boxes, image_sizes)
        final_boxes = self.box_predictor[-1].predict_boxes(deltas, torch.cat(boxes))
        final_scores = probs_sum * (1.0 / self.num_stages)
        results = []
        for b, s, size in zip(final_boxes.split(counts), final_scores.split(counts), image_sizes):
            det_boxes, det_scores, det_classes, _ = fast_rcnn_inference_single_image(
                b, s, size, self.test_score_thresh, self.test_nms_thresh, self.test_topk_per_image
            )
            results.append(RoiPredictions(det_boxes, det_scores, det_classes))
        if self.mask_head is not None:
            x = self.mask_pooler(feats, [r.boxes for r in results])
            probs = mask_rcnn_inference(self.mask_head(x), torch.cat([r.classes for r in results]))
            for r, p in zip(results, probs.split([len(r.boxes) for r in results])):
                r.mask_probs = p
        return results
