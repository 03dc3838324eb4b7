"""Region Proposal Network: head, anchor labelling, losses and proposal selection (detectron2's RPN)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..structures import Targets
from .anchors import AnchorGenerator
from .box_regression import BOX_REG_LOSS_TYPES, Box2BoxTransform, box_regression_loss
from .boxes import clip_boxes, nonempty, pairwise_iou
from .layers import Conv2d
from .matcher import Matcher
from .ops import batched_nms
from .sampling import subsample_labels
from .weight_init import normal_fill


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 objectness (A channels) and deltas (A*4 channels) per level."""

    def __init__(
        self, in_channels: int, num_anchors: int, box_dim: int = 4, conv_dims: tuple[int, ...] = (-1,)
    ):
        super().__init__()
        convs = []
        cur = in_channels
        for dim in conv_dims:
            out = in_channels if dim == -1 else dim
            if out <= 0:
                raise ValueError(f"MODEL.RPN.CONV_DIMS entries must be positive or -1, got {conv_dims}")
            convs.append(Conv2d(cur, out, kernel_size=3, stride=1, padding=1, activation=F.relu))
            cur = out
        if len(convs) == 1:
            self.conv = convs[0]
        else:
            self.conv = nn.Sequential()
            for k, c in enumerate(convs):
                self.conv.add_module(f"conv{k}", c)
        self.objectness_logits = nn.Conv2d(cur, num_anchors, kernel_size=1, stride=1)
        self.anchor_deltas = nn.Conv2d(cur, num_anchors * box_dim, kernel_size=1, stride=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                normal_fill(m, std=0.01)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness (N, A, H, W) and deltas (N, A*4, H, W)."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


@torch.no_grad()
def find_top_proposals(
    proposals: list[Tensor],
    logits: list[Tensor],
    image_sizes: list[tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    training: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per level top-k by raw logit, then per image: clip, drop small, NMS per level, keep post_nms_topk.

    proposals: per level (N, HWA, 4); logits: per level (N, HWA).
    Returns per image boxes (R_i, 4) and logits (R_i,), sorted by logit.
    """
    num_images = len(image_sizes)
    device = proposals[0].device
    logits = [x.float() for x in logits]  # NMS and the returned logits in fp32 under mixed precision
    batch_idx = torch.arange(num_images, device=device)
    topk_scores, topk_proposals, level_ids = [], [], []
    for level, (props, scores) in enumerate(zip(proposals, logits)):
        k = min(scores.shape[1], pre_nms_topk)
        top_scores, top_idx = scores.topk(k, dim=1)
        topk_scores.append(top_scores)
        topk_proposals.append(props[batch_idx[:, None], top_idx])
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
    all_scores = torch.cat(topk_scores, dim=1)
    all_proposals = torch.cat(topk_proposals, dim=1)
    all_levels = torch.cat(level_ids, dim=0)

    out_boxes, out_scores = [], []
    for n, image_size in enumerate(image_sizes):
        boxes, scores, lvl = all_proposals[n], all_scores[n], all_levels
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            if training:
                raise FloatingPointError(
                    "RPN predicted boxes or scores contain Inf/NaN: training has diverged"
                )
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = clip_boxes(boxes, image_size)
        keep = nonempty(boxes, threshold=min_box_size)
        if not bool(keep.all()):
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, nms_thresh)[:post_nms_topk]
        out_boxes.append(boxes[keep])
        out_scores.append(scores[keep])
    return out_boxes, out_scores


class RPN(nn.Module):
    """Anchors + head; in training also labels anchors against the ground truth and returns losses."""

    def __init__(
        self,
        in_features: tuple[str, ...],
        head: RPNHead,
        anchor_generator: AnchorGenerator,
        anchor_matcher: Matcher,
        box2box_transform: Box2BoxTransform,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_topk: tuple[int, int] = (2000, 1000),
        post_nms_topk: tuple[int, int] = (1000, 1000),
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        anchor_boundary_thresh: float = -1.0,
        loss_weight_cls: float = 1.0,
        loss_weight_loc: float = 1.0,
        box_reg_loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 0.0,
    ):
        super().__init__()
        if box_reg_loss_type not in BOX_REG_LOSS_TYPES:
            raise ValueError(
                f"MODEL.RPN.BBOX_REG_LOSS_TYPE {box_reg_loss_type!r} is not supported; "
                f"expected one of {BOX_REG_LOSS_TYPES}"
            )
        self.in_features = tuple(in_features)
        self.rpn_head = head
        self.anchor_generator = anchor_generator
        self.anchor_matcher = anchor_matcher
        self.box2box_transform = box2box_transform
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk[0], False: pre_nms_topk[1]}
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.nms_thresh = nms_thresh
        self.min_box_size = float(min_box_size)
        self.anchor_boundary_thresh = anchor_boundary_thresh
        self.loss_weight_cls = loss_weight_cls
        self.loss_weight_loc = loss_weight_loc
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = smooth_l1_beta

    @classmethod
    def from_config(cls, cfg, strides: dict[str, int], channels: int) -> RPN:
        """strides: {feature name: stride} of the backbone outputs; channels: their (shared) width."""
        if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "RPN":
            raise ValueError(
                f"MODEL.PROPOSAL_GENERATOR.NAME {cfg.MODEL.PROPOSAL_GENERATOR.NAME!r} is not supported; only 'RPN' is"
            )
        if cfg.MODEL.RPN.HEAD_NAME != "StandardRPNHead":
            raise ValueError(
                f"MODEL.RPN.HEAD_NAME {cfg.MODEL.RPN.HEAD_NAME!r} is not supported; only 'StandardRPNHead' is"
            )
        if cfg.MODEL.ANCHOR_GENERATOR.NAME != "DefaultAnchorGenerator":
            raise ValueError(
                f"MODEL.ANCHOR_GENERATOR.NAME {cfg.MODEL.ANCHOR_GENERATOR.NAME!r} is not supported; "
                "only 'DefaultAnchorGenerator' is"
            )
        r = cfg.MODEL.RPN
        missing = [f for f in r.IN_FEATURES if f not in strides]
        if missing:
            raise ValueError(f"MODEL.RPN.IN_FEATURES {missing} are not backbone outputs {sorted(strides)}")
        anchor_generator = AnchorGenerator(
            cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            [strides[f] for f in r.IN_FEATURES],
            cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        )
        head = RPNHead(channels, anchor_generator.num_anchors[0], 4, tuple(r.CONV_DIMS))
        return cls(
            in_features=tuple(r.IN_FEATURES),
            head=head,
            anchor_generator=anchor_generator,
            anchor_matcher=Matcher(r.IOU_THRESHOLDS, r.IOU_LABELS, allow_low_quality_matches=True),
            box2box_transform=Box2BoxTransform(tuple(r.BBOX_REG_WEIGHTS)),
            batch_size_per_image=r.BATCH_SIZE_PER_IMAGE,
            positive_fraction=r.POSITIVE_FRACTION,
            pre_nms_topk=(r.PRE_NMS_TOPK_TRAIN, r.PRE_NMS_TOPK_TEST),
            post_nms_topk=(r.POST_NMS_TOPK_TRAIN, r.POST_NMS_TOPK_TEST),
            nms_thresh=r.NMS_THRESH,
            min_box_size=cfg.MODEL.PROPOSAL_GENERATOR.MIN_SIZE,
            anchor_boundary_thresh=r.BOUNDARY_THRESH,
            loss_weight_cls=r.LOSS_WEIGHT,
            loss_weight_loc=r.BBOX_REG_LOSS_WEIGHT * r.LOSS_WEIGHT,
            box_reg_loss_type=r.BBOX_REG_LOSS_TYPE,
            smooth_l1_beta=r.SMOOTH_L1_BETA,
        )

    @torch.no_grad()
    def label_anchors(
        self, anchors: Tensor, targets: list[Targets], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """anchors (A, 4) -> labels (N, A) in {-1, 0, 1} after sampling, matched gt boxes (N, A, 4)."""
        all_labels, all_boxes = [], []
        for t, (h, w) in zip(targets, image_sizes):
            iou = pairwise_iou(t.boxes, anchors)
            matched_idxs, labels = self.anchor_matcher(iou)
            labels = labels.to(torch.int64)
            del iou
            if self.anchor_boundary_thresh >= 0:
                b = self.anchor_boundary_thresh
                inside = (
                    (anchors[:, 0] >= -b)
                    & (anchors[:, 1] >= -b)
                    & (anchors[:, 2] < w + b)
                    & (anchors[:, 3] < h + b)
                )
                labels[~inside] = -1
            pos_idx, neg_idx = subsample_labels(labels, self.batch_size_per_image, self.positive_fraction, 0)
            labels.fill_(-1)
            labels.scatter_(0, pos_idx, 1)
            labels.scatter_(0, neg_idx, 0)
            all_labels.append(labels)
            all_boxes.append(torch.zeros_like(anchors) if len(t) == 0 else t.boxes[matched_idxs])
        return torch.stack(all_labels), torch.stack(all_boxes)

    def losses(
        self, anchors: Tensor, logits: Tensor, deltas: Tensor, gt_labels: Tensor, gt_boxes: Tensor
    ) -> dict[str, Tensor]:
        """anchors (A, 4); logits (N, A); deltas (N, A, 4); gt_labels (N, A); gt_boxes (N, A, 4)."""
        num_images = gt_labels.shape[0]
        pos_mask = gt_labels == 1
        pos_img, pos_anchor = torch.nonzero(pos_mask, as_tuple=True)
        loc_loss = box_regression_loss(
            self.box2box_transform,
            anchors[pos_anchor],
            deltas[pos_img, pos_anchor],
            gt_boxes[pos_img, pos_anchor],
            self.box_reg_loss_type,
            self.smooth_l1_beta,
        )
        valid_mask = gt_labels >= 0
        cls_loss = F.binary_cross_entropy_with_logits(
            logits[valid_mask], gt_labels[valid_mask].to(torch.float32), reduction="sum"
        )
        normalizer = self.batch_size_per_image * num_images
        return {
            "loss_rpn_cls": cls_loss / normalizer * self.loss_weight_cls,
            "loss_rpn_loc": loc_loss / normalizer * self.loss_weight_loc,
        }

    def dense_outputs(self, features: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: anchors (HWA, 4), objectness logits (N, HWA), deltas (N, HWA, 4), (y, x, a) order."""
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas = self.rpn_head(feats)
        num_images = feats[0].shape[0]
        # (N, A, H, W) -> (N, H*W*A)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        # (N, A*4, H, W) -> (N, H*W*A, 4)
        deltas = [
            x.view(num_images, -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
            for x in deltas
        ]
        return anchors, logits, deltas

    def forward(
        self,
        features: dict[str, Tensor],
        image_sizes: list[tuple[int, int]],
        targets: Optional[list[Targets]] = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals per image (R_i, 4) in resized-image pixels (sorted by objectness), and losses."""
        anchors, logits, deltas = self.dense_outputs(features)
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN needs targets in training mode")
            all_anchors = torch.cat(anchors)
            gt_labels, gt_boxes = self.label_anchors(all_anchors, targets, image_sizes)
            losses = self.losses(
                all_anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), gt_labels, gt_boxes
            )
        proposals, _ = self.predict_proposals(anchors, logits, deltas, image_sizes)
        return proposals, losses

    @torch.no_grad()
    def predict_proposals(
        self,
        anchors: list[Tensor],
        logits: list[Tensor],
        deltas: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decoded top proposals per image (R_i, 4) and their objectness logits (R_i,)."""
        decoded = []
        for anchors_l, deltas_l in zip(anchors, deltas):
            n = deltas_l.shape[0]
            boxes = self.box2box_transform.apply_deltas(
                deltas_l.reshape(-1, 4), anchors_l.unsqueeze(0).expand(n, -1, -1).reshape(-1, 4)
            )
            decoded.append(boxes.view(n, -1, 4))
        return find_top_proposals(
            decoded,
            logits,
            image_sizes,
            self.nms_thresh,
            self.pre_nms_topk[self.training],
            self.post_nms_topk[self.training],
            self.min_box_size,
            self.training,
        )
