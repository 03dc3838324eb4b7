"""Multi-level RoIAlign (detectron2's ROIPooler with ROIAlignV2 / ROIAlign) on torchvision's roi_align."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops

POOLER_TYPES = {"ROIAlignV2": True, "ROIAlign": False}  # name -> aligned (half-pixel offset)

# torchvision's CPU roi_align forward runs on one core; below this many RoIs per thread, splitting
# them is not worth a thread hand-off.
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


def _threaded_roi_align_forward(feat, rois, output_size, scale, sampling_ratio, aligned, workers) -> Tensor:
    """torchvision's roi_align kernel on `workers` threads, each over a share of the RoIs.

    Every output row depends on its RoI only, so the result is bit-identical to one call.
    """
    if workers < 2:
        return torch.ops.torchvision.roi_align(
            feat, rois, scale, output_size[0], output_size[1], sampling_ratio, aligned
        )

    def run(idx: Tensor) -> Tensor:
        return torch.ops.torchvision.roi_align(
            feat, rois[idx], scale, output_size[0], output_size[1], sampling_ratio, aligned
        )

    shares = _split_by_cost(rois, scale, output_size, workers)
    return torch.cat(list(_thread_pool(workers).map(run, shares)))


def _axis_weights(start: Tensor, extent: Tensor, pooled: int, grid: Tensor, length: int):
    """RoIAlign's bilinear sampling along one axis, summed over each bin's samples.

    start, extent (R,): the RoI's span in feature pixels; grid (R,): samples per bin. Returns
    the window start (R,) int64, the window length per RoI (R,) and weights (R, pooled, L) over
    feature positions [start, start + L). Follows torchvision's kernel: samples outside
    [-1, length] count zero, coordinates below 0 clamp to 0 and at the last pixel stay there.
    """
    num = start.shape[0]
    gmax = max(int(grid.max()), 1)
    bin_size = (extent / pooled)[:, None, None]
    pos = (
        start[:, None, None]
        + torch.arange(pooled, dtype=start.dtype)[None, :, None] * bin_size
        + (torch.arange(gmax, dtype=start.dtype)[None, None, :] + 0.5)
        * bin_size
        / grid.clamp(min=1).to(start.dtype)[:, None, None]
    )
    valid = (torch.arange(gmax)[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64)
    at_end = low >= length - 1
    low = torch.where(at_end, length - 1, low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, 0.0, pos - low.to(pos.dtype))
    first = torch.where(valid, low, length).amin(dim=(1, 2)).clamp(max=length - 1)
    rel_low = low - first[:, None, None]
    rel_high = high - first[:, None, None]
    lengths = torch.where(valid, rel_high, 0).amax(dim=(1, 2)) + 1
    size = int(lengths.max())
    weights = torch.zeros(num, pooled, size, dtype=start.dtype)
    # Invalid samples carry weight 0; point them at a valid slot.
    weights.scatter_add_(2, torch.where(valid, rel_low, 0), (1 - frac) * valid)
    weights.scatter_add_(2, torch.where(valid, rel_high, 0), frac * valid)
    return first, lengths, weights


# Floats of per-RoI gradient windows materialized at once by the CPU RoIAlign backward.
_BACKWARD_CHUNK_ELEMENTS = 1 << 24


def roi_align_backward_cpu(
    grad_output: Tensor,
    rois: Tensor,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    feature_shape: tuple[int, int, int, int],
) -> Tensor:
    """Gradient of torchvision's roi_align w.r.t. its (N, C, H, W) input, as an NHWC-strided tensor.

    RoIAlign is separable: each output bin is Wy[bin_y] . F . Wx[bin_x]^T, with Wy, Wx the summed
    bilinear weights of its samples along each axis. So the gradient over each RoI's window is two
    batched matmuls, scattered into the map with one index_add_. torchvision's CPU kernel instead
    recomputes the bilinear weights per channel and sample and runs on one core.
    """
    n, c, h, w = feature_shape
    num, _, ph, pw = grad_output.shape
    grad = grad_output.new_zeros((n * h * w, c))
    if num > 0:
        dtype = grad_output.dtype
        rois = rois.to(dtype)
        offset = 0.5 if aligned else 0.0
        x0, y0 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
        width, height = rois[:, 3] * scale - offset - x0, rois[:, 4] * scale - offset - y0
        if not aligned:
            width, height = width.clamp(min=1.0), height.clamp(min=1.0)
        if sampling_ratio > 0:
            grid_h = grid_w = torch.full((num,), sampling_ratio, dtype=torch.int64)
        else:
            grid_h = torch.ceil(height / ph).to(torch.int64).clamp(min=0)
            grid_w = torch.ceil(width / pw).to(torch.int64).clamp(min=0)
        count = (grid_h * grid_w).clamp(min=1).to(dtype)
        first_y, len_y, wy = _axis_weights(y0, height, ph, grid_h, h)
        first_x, len_x, wx = _axis_weights(x0, width, pw, grid_w, w)
        wy = wy / count[:, None, None]
        image = rois[:, 0].to(torch.int64)
        # Chunks of RoIs with similar windows (by height, then width), each padded to its own
        # largest window; a chunk ends before padding would double its work or pass the budget.
        order = torch.argsort(len_y * (w + 1) + len_x)
        sorted_y, sorted_x = len_y[order].tolist(), len_x[order].tolist()
        start = 0
        while start < num:
            stop = start + 1
            size_y, size_x = sorted_y[start], sorted_x[start]
            area = size_y * size_x
            while stop < num:
                ny, nx = max(size_y, sorted_y[stop]), max(size_x, sorted_x[stop])
                padded = (stop + 1 - start) * ny * nx
                if padded * c > _BACKWARD_CHUNK_ELEMENTS or padded > 2 * (
                    area + sorted_y[stop] * sorted_x[stop]
                ):
                    break
                size_y, size_x, stop = ny, nx, stop + 1
                area += sorted_y[stop - 1] * sorted_x[stop - 1]
            idx = order[start:stop]
            k = idx.shape[0]
            g = grad_output[idx].permute(0, 2, 1, 3).reshape(k, ph, c * pw)
            t = torch.bmm(wy[idx, :, :size_y].transpose(1, 2), g)  # (k, Ly, C * pw)
            t = torch.bmm(t.view(k, size_y * c, pw), wx[idx, :, :size_x])  # (k, Ly * C, Lx)
            values = t.view(k, size_y, c, size_x).transpose(2, 3).reshape(-1, c)
            # Window positions past the map's edge carry zero weight; clamp them onto it.
            ys = (first_y[idx, None] + torch.arange(size_y)).clamp(max=h - 1)
            xs = (first_x[idx, None] + torch.arange(size_x)).clamp(max=w - 1)
            rows = (image[idx, None, None] * h + ys[:, :, None]) * w + xs[:, None, :]
            grad.index_add_(0, rows.reshape(-1), values)
            start = stop
    return grad.view(n, h, w, c).permute(0, 3, 1, 2)


class _CPUROIAlign(torch.autograd.Function):
    """torchvision's roi_align forward (threaded over RoIs) with roi_align_backward_cpu."""

    @staticmethod
    def forward(ctx, feat, rois, output_size, scale, sampling_ratio, aligned, workers):
        ctx.save_for_backward(rois)
        ctx.args = (tuple(feat.shape), scale, sampling_ratio, aligned)
        return _threaded_roi_align_forward(feat, rois, output_size, scale, sampling_ratio, aligned, workers)

    @staticmethod
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        shape, scale, sampling_ratio, aligned = ctx.args
        grad = roi_align_backward_cpu(grad_output, rois, scale, sampling_ratio, aligned, shape)
        return grad, None, None, None, None, None, None


def roi_align(
    feat: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """ops.roi_align; where that picks torchvision on CPU, its forward spread over
    torch.get_num_threads() threads and its backward computed by roi_align_backward_cpu."""
    if feat.device.type != "cpu" or ops.select_impl("cpu") != "torchvision":
        return ops.roi_align(feat, rois, output_size, scale, sampling_ratio, aligned)
    workers = min(torch.get_num_threads(), rois.shape[0] // _MIN_ROIS_PER_THREAD)
    if torch.is_grad_enabled() and feat.requires_grad:
        return _CPUROIAlign.apply(feat, rois, output_size, scale, sampling_ratio, aligned, workers)
    return _threaded_roi_align_forward(feat, rois, output_size, scale, sampling_ratio, aligned, workers)


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
