"""The fixed-shape pooling and NMS static mode calls, chosen per device as modeling/ops.py does.

cpu and cuda keep torchvision's kernels (the dynamic path's, so static mode is bit-identical),
wrapped to fixed output shapes; under torch.compile they stay single ops with fake kernels. On cpu
the RoIAlign is the dynamic path's own (level routing, threaded forward, fast backward) as one
custom op. Other devices (npu) get ops.py's pure tensor versions, which reach no torchvision op.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from torchvision.ops import batched_nms, roi_align

from . import ops
from .ops import _pair
from .poolers import _MIN_ROIS_PER_THREAD, _threaded_roi_align_forward, roi_align_backward_cpu


def _torchvision(t: Tensor) -> bool:
    return ops.select_impl(t.device.type) == "torchvision"


def _nhwc_strides(c: int, h: int, w: int) -> tuple[int, int, int, int]:
    return (h * w * c, 1, w * c, c)


# typing.List, not list[...], in the custom-op signatures: torch 2.5's infer_schema accepts only
# typing.List / Sequence (builtin generics came later).
@torch.library.custom_op("cascade_rcnn::cpu_multilevel_roi_align", mutates_args=())
def _cpu_multilevel_roi_align(
    features: List[Tensor],
    rois: Tensor,
    levels: Tensor,
    scales: List[float],
    pooled_h: int,
    pooled_w: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """ROIPooler's CPU pooling (each level's RoIs through poolers.roi_align's threaded kernel) as
    one op with a fixed output shape: the routing by level happens inside, where a data-dependent
    count costs nothing, so eager and compiled static mode run the dynamic path's kernels on the
    same RoIs, bit for bit."""
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))
    for level, (feat, scale) in enumerate(zip(features, scales)):
        inds = torch.nonzero(levels == level, as_tuple=True)[0]
        if inds.numel() == 0:
            continue
        workers = min(torch.get_num_threads(), inds.numel() // _MIN_ROIS_PER_THREAD)
        out[inds] = _threaded_roi_align_forward(
            feat, rois[inds], (pooled_h, pooled_w), scale, sampling_ratio, aligned, workers
        )
    return out


@_cpu_multilevel_roi_align.register_fake
def _(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))


@torch.library.custom_op("cascade_rcnn::cpu_multilevel_roi_align_backward", mutates_args=())
def _cpu_multilevel_roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    levels: Tensor,
    scales: List[float],
    sampling_ratio: int,
    aligned: bool,
    shapes: List[int],
) -> List[Tensor]:
    """Each level's input gradient (NHWC-strided) by poolers.roi_align_backward_cpu; shapes holds
    (N, C, H, W) per level, flattened."""
    grads = []
    for level, scale in enumerate(scales):
        n, c, h, w = shapes[4 * level : 4 * level + 4]
        inds = torch.nonzero(levels == level, as_tuple=True)[0]
        if inds.numel() == 0:
            grads.append(grad.new_zeros((n, h, w, c)).permute(0, 3, 1, 2))
            continue
        grads.append(
            roi_align_backward_cpu(grad[inds], rois[inds], scale, sampling_ratio, aligned, (n, c, h, w))
        )
    return grads


@_cpu_multilevel_roi_align_backward.register_fake
def _(grad, rois, levels, scales, sampling_ratio, aligned, shapes):
    out = []
    for level in range(len(scales)):
        n, c, h, w = shapes[4 * level : 4 * level + 4]
        out.append(grad.new_empty_strided((n, c, h, w), _nhwc_strides(c, h, w)))
    return out


def _setup_cpu_multilevel(ctx, inputs, output):
    features, rois, levels, scales, _, _, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (list(scales), sampling_ratio, aligned, [int(v) for f in features for v in f.shape])


def _cpu_multilevel_grad(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = _cpu_multilevel_roi_align_backward(grad, rois, levels, *ctx.args)
    return list(grads), None, None, None, None, None, None, None


_cpu_multilevel_roi_align.register_autograd(_cpu_multilevel_grad, setup_context=_setup_cpu_multilevel)


def multilevel_roi_align(
    features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned, max_samples=None
):
    """(K, C, oh, ow): each RoI pooled on features[levels[k]]; no data-dependent shape.
    max_samples: the tensor version's bound on samples per bin (ops.fpn_sample_bound)."""
    if not _torchvision(features[0]):
        return ops.multilevel_roi_align(
            features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned, max_samples
        )
    if features[0].device.type == "cpu":
        return _cpu_multilevel_roi_align(
            list(features),
            rois,
            levels,
            [float(v) for v in spatial_scales],
            *_pair(output_size),
            sampling_ratio,
            aligned,
        )
    # cuda: every level pools all RoIs, the other levels' as empty boxes (no routing by nonzero).
    out = None
    empty = rois.new_tensor([0.0, 0.0, 0.0, 0.0])
    for level, (feat, scale) in enumerate(zip(features, spatial_scales)):
        here = levels == level
        # RoIs of other levels become empty boxes: next to no work, and (aligned) exactly zero output
        # and gradient.
        r = torch.cat([rois[:, :1], torch.where(here[:, None], rois[:, 1:], empty)], dim=1)
        pooled = roi_align(feat, r, output_size, scale, sampling_ratio, aligned)
        if not aligned:  # an empty box still samples one pixel without the half-pixel offset
            pooled = torch.where(here[:, None, None, None], pooled, 0.0)
        out = pooled if out is None else out + pooled
    return out


@torch.library.custom_op("cascade_rcnn::batched_nms_padded", mutates_args=())
def _batched_nms_padded(
    boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor, iou_threshold: float, max_out: int
) -> tuple[Tensor, Tensor]:
    """torchvision's batched_nms on each image's valid rows, padded to max_out. One opaque op with a
    fixed output shape, so a compiled graph stays whole around it."""
    keeps, valids = [], []
    for b, s, i, v in zip(boxes, scores, idxs, valid):
        rows = torch.nonzero(v, as_tuple=True)[0]
        k = rows[batched_nms(b[rows], s[rows], i[rows], iou_threshold)][:max_out]
        keeps.append(torch.cat([k, k.new_zeros(max_out - k.numel())]))
        valids.append(torch.arange(max_out, device=b.device) < k.numel())
    return torch.stack(keeps), torch.stack(valids)


@_batched_nms_padded.register_fake
def _(boxes, scores, idxs, valid, iou_threshold, max_out):
    n = boxes.shape[0]
    return (
        boxes.new_empty((n, max_out), dtype=torch.int64),
        boxes.new_empty((n, max_out), dtype=torch.bool),
    )


def batched_nms_fixed(
    boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Tensor, iou_threshold: float, max_out: int
) -> tuple[Tensor, Tensor]:
    """(N, R, 4), (N, R), (N, R), (N, R) bool -> keep (N, max_out) int64 in descending score order,
    keep_valid (N, max_out): the valid entries are torchvision's batched_nms of the valid rows."""
    if not _torchvision(boxes):
        return ops.batched_nms_fixed(boxes, scores, idxs, valid, iou_threshold, max_out)
    return _batched_nms_padded(boxes, scores, idxs, valid, float(iou_threshold), int(max_out))


def classwise_nms_fixed(
    boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float, max_out: int
) -> tuple[Tensor, Tensor]:
    """Per-class NMS of (N, P, 4) class-agnostic boxes scored (N, P, K): keep (N, max_out) indices into
    the P * K candidates (p * K + k) by descending score, keep_valid (N, max_out)."""
    if not _torchvision(boxes):
        return ops.classwise_nms_fixed(boxes, scores, valid, iou_threshold, max_out)
    n, p, k = scores.shape
    cand = boxes[:, :, None, :].expand(n, p, k, 4).reshape(n, p * k, 4)
    classes = torch.arange(k, device=boxes.device).repeat(p).expand(n, -1)
    return batched_nms_fixed(
        cand, scores.reshape(n, p * k), classes, valid.reshape(n, p * k), iou_threshold, max_out
    )
