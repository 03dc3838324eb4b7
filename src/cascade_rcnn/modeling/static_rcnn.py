"""Static-shape training step and inference of CascadeMaskRCNN (MODEL.STATIC).

The same model and parameters as the dynamic path, with every shape fixed by the canvas, the batch
size, the ground-truth bucket and the config: proposals, sampled RoIs and detections are padded
rows with a validity mask, and each loss is a masked sum with detectron2's normalizer. Nothing here
reads a tensor on the host, except the exact polygon mask targets (bitmask targets stay on the
device), so the step traces as one graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.static_batch import StaticBatch
from .box_regression import smooth_l1_loss
from .cascade_heads import scale_gradient
from .mask_head import rasterize_polygons_in_boxes
from .ops import fpn_sample_bound
from .poolers import assign_boxes_to_levels
from .static_ops import batched_nms_fixed, classwise_nms_fixed, multilevel_roi_align
from .static_sampling import sampled_rows, subsample_masks

_UNIT_BOX = (0.0, 0.0, 1.0, 1.0)


def batched_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, G, 4), (N, P, 4) -> (N, G, P), pairwise_iou's arithmetic per image."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = torch.min(a[:, :, None, 2:], b[:, None, :, 2:]) - torch.max(a[:, :, None, :2], b[:, None, :, :2])
    inter = wh.clamp(min=0).prod(dim=3)
    return torch.where(inter > 0, inter / (area_a[:, :, None] + area_b[:, None, :] - inter), 0.0)


def clip_to_sizes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """(N, R, 4) boxes clamped to each image's [0, w] x [0, h]; sizes (N, 2) (h, w)."""
    h = sizes[:, 0, None].to(boxes.dtype)
    w = sizes[:, 1, None].to(boxes.dtype)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x0 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y0 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x1 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def _nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    return ((boxes[..., 2] - boxes[..., 0]) > threshold) & ((boxes[..., 3] - boxes[..., 1]) > threshold)


def _unit_where(mask: Tensor, boxes: Tensor) -> Tensor:
    """Rows outside `mask` replaced by a unit box, so no masked row can produce Inf/NaN."""
    return torch.where(mask[..., None], boxes, boxes.new_tensor(_UNIT_BOX))


def _match(iou: Tensor, gt_valid: Tensor, thresholds: list[float], labels: list[int], low_quality: bool):
    """Matcher over (N, G, P) IoU with padded gt rows: (matched index (N, P), label (N, P) int64)."""
    iou = torch.where(gt_valid[:, :, None], iou, -1.0)
    vals, idx = iou.max(dim=1)
    out = torch.ones_like(idx)
    for label, low, high in zip(labels, thresholds[:-1], thresholds[1:]):
        out = torch.where((vals >= low) & (vals < high), label, out)
    if low_quality:
        best = iou.max(dim=2, keepdim=True).values
        hit = ((iou == best) & gt_valid[:, :, None]).any(dim=1)
        out = torch.where(hit, 1, out)
    return idx, out


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (N, R, ...) rows idx (N, S) -> (N, S, ...)."""
    view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, view)


def _pool(pooler, feats: list[Tensor], boxes: Tensor, valid: Tensor) -> Tensor:
    """boxes (N, R, 4) -> (N * R, C, S, S) with ROIPooler's level rule; invalid rows pool a unit box."""
    n, r = boxes.shape[:2]
    flat = _unit_where(valid, boxes).reshape(-1, 4).float()
    batch_idx = torch.arange(n, device=boxes.device, dtype=flat.dtype).repeat_interleave(r)
    rois = torch.cat([batch_idx[:, None], flat], dim=1)
    if len(pooler.scales) == 1:
        levels = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    else:
        levels = assign_boxes_to_levels(
            flat, pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
        )
    dtype = feats[0].dtype
    if dtype != torch.float32:
        feats = [f.float() for f in feats]
    # Every box here lies inside its image (proposals and stage outputs are clipped, gt is checked
    # by build_static_batch), so the level rule bounds the samples a RoI needs.
    bound = fpn_sample_bound(
        [tuple(f.shape[2:]) for f in feats],
        pooler.scales,
        pooler.output_size,
        pooler.sampling_ratio,
        pooler.canonical_box_size,
        pooler.canonical_level,
    )
    out = multilevel_roi_align(
        feats, rois, levels, pooler.output_size, pooler.scales, pooler.sampling_ratio, pooler.aligned, bound
    )
    return out.to(dtype)


# ---- RPN ------------------------------------------------------------------------------------------


def rpn_losses(rpn, anchors: Tensor, logits: Tensor, deltas: Tensor, batch: StaticBatch) -> dict[str, Tensor]:
    """anchors (A, 4), logits (N, A), deltas (N, A, 4): label every anchor, sample, masked losses."""
    n = logits.shape[0]
    with torch.no_grad():
        iou = batched_iou(batch.gt_boxes, anchors[None].expand(n, -1, -1))
        m = rpn.anchor_matcher
        idx, labels = _match(iou, batch.gt_valid, m.thresholds, m.labels, m.allow_low_quality_matches)
        del iou
        if rpn.anchor_boundary_thresh >= 0:
            b = rpn.anchor_boundary_thresh
            h = batch.image_sizes[:, 0, None].to(anchors.dtype)
            w = batch.image_sizes[:, 1, None].to(anchors.dtype)
            inside = (
                (anchors[:, 0] >= -b)
                & (anchors[:, 1] >= -b)
                & (anchors[:, 2] < w + b)
                & (anchors[:, 3] < h + b)
            )
            labels = torch.where(inside, labels, -1)
        pos, neg = subsample_masks(labels == 1, labels == 0, rpn.batch_size_per_image, rpn.positive_fraction)
        anchors_n = anchors[None].expand(n, -1, -1)
        gt = _unit_where(pos, _gather_rows(batch.gt_boxes, idx))
        src = _unit_where(pos, anchors_n)
        gt_deltas = rpn.box2box_transform.get_deltas(src.reshape(-1, 4), gt.reshape(-1, 4)).view(n, -1, 4)
    if rpn.box_reg_loss_type != "smooth_l1":
        raise ValueError("MODEL.STATIC supports MODEL.RPN.BBOX_REG_LOSS_TYPE 'smooth_l1' only")
    loc = smooth_l1_loss(torch.where(pos[..., None], deltas, gt_deltas), gt_deltas, rpn.smooth_l1_beta)
    sampled = pos | neg
    cls = F.binary_cross_entropy_with_logits(logits, pos.to(logits.dtype), reduction="none")
    cls = torch.where(sampled, cls, 0.0).sum()
    normalizer = rpn.batch_size_per_image * n
    return {
        "loss_rpn_cls": cls / normalizer * rpn.loss_weight_cls,
        "loss_rpn_loc": loc / normalizer * rpn.loss_weight_loc,
    }


@torch.no_grad()
def rpn_proposals(rpn, anchors: list[Tensor], logits: list[Tensor], deltas: list[Tensor], sizes: Tensor):
    """Fixed top-k per level, clip, size filter and per-level NMS as masks.

    Returns proposals (N, P, 4), their validity (N, P) and the count of non-finite candidates.
    """
    training = rpn.training
    n = logits[0].shape[0]
    pre, post = rpn.pre_nms_topk[training], rpn.post_nms_topk[training]
    boxes, scores, levels = [], [], []
    for level, (a, d, s) in enumerate(zip(anchors, deltas, logits)):
        s = s.float()
        k = min(s.shape[1], pre)
        top_s, top_i = s.topk(k, dim=1)
        d = _gather_rows(d, top_i)
        a = a[top_i]  # (N, k, 4)
        decoded = rpn.box2box_transform.apply_deltas(d.reshape(-1, 4), a.reshape(-1, 4)).view(n, k, 4)
        boxes.append(decoded)
        scores.append(top_s)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=s.device))
    boxes = torch.cat(boxes, dim=1)
    scores = torch.cat(scores, dim=1)
    levels = torch.cat(levels)
    finite = torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    boxes = clip_to_sizes(torch.where(finite[..., None], boxes, 0.0), sizes)
    scores = torch.where(finite, scores, 0.0)
    valid = finite & _nonempty(boxes, rpn.min_box_size)
    num = min(post, boxes.shape[1])
    keep, keep_valid = batched_nms_fixed(boxes, scores, levels.expand(n, -1), valid, rpn.nms_thresh, num)
    return _gather_rows(boxes, keep), keep_valid, (~finite).sum()


# ---- ROI heads ------------------------------------------------------------------------------------


def _box_losses(predictor, scores, deltas, boxes, gt_classes, gt_boxes, weight) -> dict[str, Tensor]:
    """FastRCNNOutputLayers.losses over fixed rows: (R, ...) inputs, weight (R,) bool."""
    k = predictor.num_classes
    if predictor.box_reg_loss_type != "smooth_l1" or deltas.shape[1] != 4:
        raise ValueError(
            "MODEL.STATIC supports class-agnostic 'smooth_l1' box regression only "
            "(MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE)"
        )
    count = weight.sum().clamp(min=1).to(scores.dtype)
    ce = F.cross_entropy(scores, torch.where(weight, gt_classes, k), reduction="none")
    loss_cls = torch.where(weight, ce, 0.0).sum() / count
    fg = weight & (gt_classes >= 0) & (gt_classes < k)
    with torch.no_grad():
        gt_deltas = predictor.box2box_transform.get_deltas(_unit_where(fg, boxes), _unit_where(fg, gt_boxes))
    loss_box = smooth_l1_loss(
        torch.where(fg[:, None], deltas, gt_deltas), gt_deltas, predictor.smooth_l1_beta
    )
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box / count * predictor.loss_weight_box_reg}


def _label(heads, stage: int, boxes: Tensor, batch: StaticBatch):
    """Match (N, R, 4) boxes at the stage's IoU: gt class (num_classes = background) and gt index."""
    m = heads.proposal_matchers[stage]
    idx, labels = _match(batched_iou(batch.gt_boxes, boxes), batch.gt_valid, m.thresholds, m.labels, False)
    gt_classes = torch.gather(batch.gt_classes, 1, idx)
    gt_classes = torch.where(labels == 1, gt_classes, heads.num_classes)
    gt_classes = torch.where(labels == -1, -1, gt_classes)
    return gt_classes, idx


def roi_losses(heads, features: dict[str, Tensor], proposals: Tensor, pvalid: Tensor, batch: StaticBatch):
    """CascadeROIHeads.losses over fixed rows. proposals (N, P, 4), pvalid (N, P)."""
    feats = heads._pooler_inputs(features)
    n = proposals.shape[0]
    k = heads.num_classes
    with torch.no_grad():
        if heads.proposal_append_gt:
            boxes = torch.cat([proposals, batch.gt_boxes], dim=1)
            valid = torch.cat([pvalid, batch.gt_valid], dim=1)
        else:
            boxes, valid = proposals, pvalid
        gt_classes, gt_index = _label(heads, 0, boxes, batch)
        fg = valid & (gt_classes != -1) & (gt_classes != k)
        bg = valid & (gt_classes == k)
        pos, neg = subsample_masks(fg, bg, heads.batch_size_per_image, heads.positive_fraction)
        num_rows = min(heads.batch_size_per_image, boxes.shape[1])
        rows, weight = sampled_rows(pos, neg, num_rows)
        boxes = _gather_rows(boxes, rows)
        gt_classes = torch.gather(gt_classes, 1, rows)
        gt_index = torch.gather(gt_index, 1, rows)
    stage0 = (boxes, gt_classes, gt_index, weight)
    losses: dict[str, Tensor] = {}
    for s in range(heads.num_stages):
        x = scale_gradient(_pool(heads.box_pooler, feats, boxes, weight), 1.0 / heads.num_stages)
        scores, deltas = heads.box_predictor[s](heads.box_head[s](x))
        gt_boxes = _gather_rows(batch.gt_boxes, gt_index)
        stage_losses = _box_losses(
            heads.box_predictor[s],
            scores,
            deltas,
            boxes.reshape(-1, 4),
            gt_classes.reshape(-1),
            gt_boxes.reshape(-1, 4),
            weight.reshape(-1),
        )
        losses.update({f"{name}_stage{s}": v for name, v in stage_losses.items()})
        if s + 1 < heads.num_stages:
            with torch.no_grad():
                pred = heads.box_predictor[s].predict_boxes(deltas.detach(), boxes.reshape(-1, 4))
                boxes = clip_to_sizes(pred.view(n, -1, 4), batch.image_sizes)
                weight = weight & _nonempty(boxes)
                gt_classes, gt_index = _label(heads, s + 1, boxes, batch)
    if heads.mask_head is not None:
        losses["loss_mask"] = mask_loss(heads, feats, *stage0, batch)
    return losses


def mask_loss(heads, feats, boxes, gt_classes, gt_index, weight, batch: StaticBatch) -> Tensor:
    """Mask loss on stage 0's sampled foreground: they are the first rows, at most the positive cap."""
    k = heads.num_classes
    m = min(boxes.shape[1], int(heads.batch_size_per_image * heads.positive_fraction))
    boxes, gt_classes, gt_index = boxes[:, :m], gt_classes[:, :m], gt_index[:, :m]
    fg = weight[:, :m] & (gt_classes >= 0) & (gt_classes < k)
    logits = heads.mask_head(_pool(heads.mask_pooler, feats, boxes, fg))
    size = logits.shape[-1]
    targets = mask_targets_static(boxes, gt_index, fg, batch, size)
    if logits.shape[1] == 1:
        logits = logits[:, 0]
    else:
        cls = torch.where(fg, gt_classes, 0).reshape(-1)
        logits = torch.gather(logits, 1, cls[:, None, None, None].expand(-1, 1, size, size))[:, 0]
    bce = F.binary_cross_entropy_with_logits(
        logits, targets.reshape(-1, size, size).to(logits.dtype), reduction="none"
    )
    fg = fg.reshape(-1)
    total = torch.where(fg[:, None, None], bce, 0.0).sum()
    return total / (fg.sum() * size * size).clamp(min=1).to(total.dtype)


def mask_targets_static(boxes: Tensor, gt_index: Tensor, fg: Tensor, batch: StaticBatch, size: int) -> Tensor:
    """(N, M, size, size) bool targets; rows outside `fg` are zeros or arbitrary (they weigh 0)."""
    n, m = boxes.shape[:2]
    if batch.gt_masks is not None:
        g = batch.gt_masks.shape[1]
        flat_idx = (torch.arange(n, device=boxes.device)[:, None] * g + gt_index).reshape(-1)
        rois = torch.cat(
            [flat_idx[:, None].to(torch.float32), _unit_where(fg, boxes).reshape(-1, 4).float()], 1
        )
        maps = batch.gt_masks.reshape(n * g, 1, *batch.gt_masks.shape[2:]).to(torch.float32)
        out = multilevel_roi_align([maps], rois, torch.zeros_like(flat_idx), (size, size), (1.0,), 0, True)
        return (out[:, 0] >= 0.5).view(n, m, size, size)
    if batch.gt_polygons is None:
        raise ValueError("MODEL.MASK_ON training needs mask targets (Targets.polygons or Targets.masks)")
    # Exact detectron2 targets from polygons: rasterized on the host (a sync; bitmasks avoid it).
    out = torch.zeros((n, m, size, size), dtype=torch.bool, device=boxes.device)
    fg_host = fg.cpu()
    for i, polys in enumerate(batch.gt_polygons):
        rows = torch.nonzero(fg_host[i], as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        idx = gt_index[i].cpu()[rows].tolist()
        out[i, rows.to(boxes.device)] = rasterize_polygons_in_boxes(
            [polys[j] for j in idx], boxes[i, rows.to(boxes.device)], size
        )
    return out


# ---- whole model ----------------------------------------------------------------------------------


def train_losses(model, batch: StaticBatch) -> dict[str, Tensor]:
    """The nine training losses by detectron2's names. Non-finite RPN candidates are masked out
    (dynamic mode raises at once); divergence then shows in the losses the trainer checks."""
    images = batch.images
    if images.device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    features = model.backbone(images)
    rpn = model.proposal_generator
    anchors, logits, deltas = rpn.dense_outputs(features)
    losses = rpn_losses(rpn, torch.cat(anchors), torch.cat(logits, dim=1), torch.cat(deltas, dim=1), batch)
    proposals, pvalid, _ = rpn_proposals(rpn, anchors, logits, deltas, batch.image_sizes)
    losses.update(roi_losses(model.roi_heads, features, proposals, pvalid, batch))
    return losses


@torch.no_grad()
def inference_padded(model, images: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
    """Detections as padded rows per image: boxes (N, D, 4), scores (N, D), classes (N, D),
    valid (N, D) and mask_probs (N, D, 1, M, M) when the model has masks; D = TEST.DETECTIONS_PER_IMAGE."""
    if images.device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    features = model.backbone(images)
    rpn = model.proposal_generator
    anchors, logits, deltas = rpn.dense_outputs(features)
    boxes, valid, _ = rpn_proposals(rpn, anchors, logits, deltas, image_sizes)
    heads = model.roi_heads
    feats = heads._pooler_inputs(features)
    n, p = boxes.shape[:2]
    probs_sum: Optional[Tensor] = None
    for s in range(heads.num_stages):
        scores, deltas_s = heads.box_predictor[s](
            heads.box_head[s](_pool(heads.box_pooler, feats, boxes, valid))
        )
        probs = F.softmax(scores.float(), dim=-1)
        probs_sum = probs if probs_sum is None else probs_sum + probs
        pred = heads.box_predictor[s].predict_boxes(deltas_s, boxes.reshape(-1, 4)).view(n, p, 4)
        if s + 1 < heads.num_stages:
            boxes = clip_to_sizes(pred, image_sizes)
    scores = (probs_sum * (1.0 / heads.num_stages)).view(n, p, -1)
    finite = torch.isfinite(pred).all(dim=2) & torch.isfinite(scores).all(dim=2)
    pred = clip_to_sizes(torch.where(finite[..., None], pred, 0.0), image_sizes)
    k = scores.shape[2] - 1
    cls_scores = torch.where(finite[..., None], scores[..., :k], 0.0)
    cand_valid = (valid & finite)[..., None] & (cls_scores > heads.test_score_thresh)
    cand_boxes = pred[:, :, None, :].expand(n, p, k, 4).reshape(n, p * k, 4)
    cand_scores = cls_scores.reshape(n, p * k)
    cand_classes = torch.arange(k, device=boxes.device).repeat(p)
    top = heads.test_topk_per_image if heads.test_topk_per_image >= 0 else p * k
    keep, keep_valid = classwise_nms_fixed(
        pred, cls_scores, cand_valid, heads.test_nms_thresh, min(top, p * k)
    )
    out = {
        "boxes": _gather_rows(cand_boxes, keep),
        "scores": torch.gather(cand_scores, 1, keep),
        "classes": cand_classes[keep],
        "valid": keep_valid,
    }
    if heads.mask_head is not None:
        x = _pool(heads.mask_pooler, feats, out["boxes"], keep_valid)
        logits = heads.mask_head(x)
        size = logits.shape[-1]
        if logits.shape[1] > 1:
            logits = torch.gather(
                logits, 1, out["classes"].reshape(-1)[:, None, None, None].expand(-1, 1, size, size)
            )
        out["mask_probs"] = logits.float().sigmoid().view(n, -1, 1, size, size)
    return out


def unpad_detections(out: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Image i's valid rows of inference_padded's output (a host read, after the graph)."""
    keep = out["valid"][i]
    masks = out.get("mask_probs")
    return (
        out["boxes"][i][keep],
        out["scores"][i][keep],
        out["classes"][i][keep],
        None if masks is None else masks[i][keep],
    )


def compile_train_losses(model, **compile_kwargs):
    """train_losses as one torch.compile graph (fullgraph, static shapes): batch -> losses.

    Polygon mask targets are rasterized on the host, so the compiled step needs bitmask targets
    (INPUT.MASK_FORMAT bitmask) when the model has masks.
    """

    def step(images, image_sizes, gt_boxes, gt_classes, gt_valid, gt_masks):
        return train_losses(model, StaticBatch(images, image_sizes, gt_boxes, gt_classes, gt_valid, gt_masks))

    compiled = torch.compile(step, fullgraph=True, dynamic=False, **compile_kwargs)

    def run(batch: StaticBatch) -> dict[str, Tensor]:
        if batch.gt_polygons is not None:
            raise ValueError("the compiled static step needs bitmask targets: set INPUT.MASK_FORMAT bitmask")
        return compiled(
            batch.images, batch.image_sizes, batch.gt_boxes, batch.gt_classes, batch.gt_valid, batch.gt_masks
        )

    return run


def compile_inference(model, **compile_kwargs):
    """inference_padded as one torch.compile graph: (images, image_sizes) -> padded detections."""

    def infer(images, image_sizes):
        return inference_padded(model, images, image_sizes)

    return torch.compile(infer, fullgraph=True, dynamic=False, **compile_kwargs)
