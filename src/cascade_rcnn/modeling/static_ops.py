"""The fixed-shape pooling and NMS static mode calls, chosen per device as modeling/ops.py does.

cpu and cuda keep torchvision's kernels (the dynamic path's, so eager static mode is as fast and
bit-identical), wrapped to fixed output shapes; under torch.compile they stay single ops with fake
kernels. Other devices (npu) get ops.py's pure tensor versions, which reach no torchvision op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, roi_align

from . import ops
from .poolers import roi_align as eager_roi_align


def _torchvision(t: Tensor) -> bool:
    return ops.select_impl(t.device.type) == "torchvision"


def multilevel_roi_align(features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned):
    """(K, C, oh, ow): each RoI pooled on features[levels[k]]; no data-dependent shape."""
    if not _torchvision(features[0]):
        return ops.multilevel_roi_align(
            features, rois, levels, output_size, spatial_scales, sampling_ratio, aligned
        )
    out = None
    empty = rois.new_tensor([0.0, 0.0, 0.0, 0.0])
    for level, (feat, scale) in enumerate(zip(features, spatial_scales)):
        here = levels == level
        # RoIs of other levels become empty boxes: next to no work, and (aligned) exactly zero output
        # and gradient.
        r = torch.cat([rois[:, :1], torch.where(here[:, None], rois[:, 1:], empty)], dim=1)
        if torch.compiler.is_compiling():
            pooled = roi_align(feat, r, output_size, scale, sampling_ratio, aligned)
        else:  # eager: the dynamic path's kernel (threaded forward, faster CPU backward)
            pooled = eager_roi_align(feat, r, output_size, scale, sampling_ratio, aligned)
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
