"""Multi-level RoIAlign (detectron2's ROIPooler with ROIAlignV2 / ROIAlign) on torchvision's roi_align."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align as tv_roi_align

POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}  # name -> aligned (half-pixel offset)

# torchvision's CPU roi_align (forward and backward) runs on one core; below this many RoIs per
# thread, splitting them is not worth a thread hand-off.
_MIN_ROIS_PER_THREAD = 32
_executor: Optional[tuple[int, int, ThreadPoolExecutor]] = None  # (pid, workers, pool)


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool owned by this process (a forked data-loader worker must not reuse its parent's)."""
    global _executor
    if _executor is None or _executor[0] != os.getpid() or _executor[1] != workers:
        _executor = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="roi_align"))
    return _executor[2]


def _split_by_cost(rois: Tensor, scale: float, output_size: tuple[int, int], parts: int) -> list[Tensor]:
    """Split RoI indices into `parts` contiguous runs of about equal sampling work."""
    h = ((rois[:, 4] - rois[:, 2]) * scale / output_size[0]).ceil().clamp(min=1)
    w = ((rois[:, 3] - rois[:, 1]) * scale / output_size[1]).ceil().clamp(min=1)
    cost = torch.cumsum(h * w, 0)
    bounds = torch.searchsorted(cost, cost[-1] * torch.arange(1, parts) / parts).tolist()
    return list(torch.arange(rois.shape[0]).tensor_split(bounds))


class _ThreadedROIAlign(torch.autograd.Function):
    """torchvision's roi_align kernels on several threads, each over a share of the RoIs.

    Every output row depends on its RoI only, so the forward is bit-identical; the backward sums
    the per-share input gradients.
    """

    @staticmethod
    def forward(ctx, feat, rois, output_size, scale, sampling_ratio, aligned, workers):
        shares = _split_by_cost(rois, scale, output_size, workers)
        ctx.save_for_backward(rois)
        ctx.args = (feat.shape, output_size, scale, sampling_ratio, aligned, shares)

        def run(idx: Tensor) -> Tensor:
            return torch.ops.torchvision.roi_align(
                feat, rois[idx], scale, output_size[0], output_size[1], sampling_ratio, aligned
            )

        return torch.cat(list(_thread_pool(workers).map(run, shares)))

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        (n, c, h, w), output_size, scale, sampling_ratio, aligned, shares = ctx.args
        grad_output = grad_output.contiguous()

        def run(idx: Tensor) -> Tensor:
            return torch.ops.torchvision._roi_align_backward(
                grad_output[idx],
                rois[idx],
                scale,
                output_size[0],
                output_size[1],
                n,
                c,
                h,
                w,
                sampling_ratio,
                aligned,
            )

        grads = list(_thread_pool(len(shares)).map(run, shares))
        total = grads[0]
        for g in grads[1:]:
            total += g
        return total, None, None, None, None, None, None


def roi_align(
    feat: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """torchvision.ops.roi_align; on CPU spread over torch.get_num_threads() threads."""
    workers = min(torch.get_num_threads(), rois.shape[0] // _MIN_ROIS_PER_THREAD)
    if feat.device.type != "cpu" or workers < 2:
        return tv_roi_align(feat, rois, output_size, scale, sampling_ratio, aligned)
    return _ThreadedROIAlign.apply(feat, rois, output_size, scale, sampling_ratio, aligned, workers)


def assign_boxes_to_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """(R, 4) boxes -> (R,) int64 index into [min_level, max_level] (0 = min_level).

    lvl = floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8)), the eps inside the log.
    """
    box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image (R_i, 4) boxes -> (sum R_i, 5) rows (batch index, x0, y0, x1, y1)."""
    cat = torch.cat(boxes, dim=0)
    sizes = torch.tensor([len(b) for b in boxes], device=cat.device)
    indices = torch.repeat_interleave(torch.arange(len(boxes), dtype=cat.dtype, device=cat.device), sizes)
    return torch.cat([indices[:, None], cat], dim=1)


class ROIPooler(nn.Module):
    """Pools each box from the FPN level its size selects; output rows keep the input box order."""

    def __init__(
        self,
        output_size: int,
        scales: tuple[float, ...],
        sampling_ratio: int = 0,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        if pooler_type not in POOLER_TYPES:
            raise ValueError(
                f"POOLER_TYPE {pooler_type!r} is not supported; expected one of {list(POOLER_TYPES)}"
            )
        self.output_size = (int(output_size), int(output_size))
        self.scales = tuple(float(s) for s in scales)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = POOLER_TYPES[pooler_type]
        min_level = -math.log2(self.scales[0])
        max_level = -math.log2(self.scales[-1])
        if not (math.isclose(min_level, round(min_level)) and math.isclose(max_level, round(max_level))):
            raise ValueError(f"pooler scales {scales} must be powers of 1/2")
        self.min_level = int(round(min_level))
        self.max_level = int(round(max_level))
        if len(self.scales) != self.max_level - self.min_level + 1:
            raise ValueError(f"pooler scales {scales} must be consecutive powers of 1/2")
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """features: per level (N, C, H_l, W_l); boxes: per image (R_i, 4) -> (sum R_i, C, S, S)."""
        if len(boxes) != features[0].shape[0]:
            raise ValueError(
                f"pooler got boxes for {len(boxes)} images and features for {features[0].shape[0]}"
            )
        rois = boxes_to_rois(boxes).float()
        dtype = features[0].dtype
        if dtype != rois.dtype:
            # Pool in fp32 under mixed precision (as torchvision's autocast wrapper does):
            # fp16/bf16 box coordinates would be off by pixels.
            features = [f.float() for f in features]
        if len(self.scales) == 1:
            out = roi_align(
                features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned
            )
            return out.to(dtype)
        levels = assign_boxes_to_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(features, self.scales)):
            inds = torch.nonzero(levels == level, as_tuple=True)[0]
            if inds.numel() == 0:
                continue
            pooled = roi_align(feat, rois[inds], self.output_size, scale, self.sampling_ratio, self.aligned)
            out.index_put_((inds,), pooled)
        return out.to(dtype)
