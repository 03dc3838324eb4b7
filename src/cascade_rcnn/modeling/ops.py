"""RoIAlign and NMS that run on every device, chosen per device type here and nowhere else.

- cpu: torchvision's kernels, so CPU results stay bit for bit what they were (ROIPooler wraps
  them in poolers.roi_align, a threaded forward with a faster exact backward, and asks
  select_impl before it does).
- cuda: torchvision's CUDA kernels, unchanged.
- npu and any other device: the tensor-op versions below. torch_npu registers no kernel for
  ``torchvision::roi_align`` / ``torchvision::nms``, so those would fail or fall back to the CPU.
  Its native ``npu_roi_align`` / ``npu_nms_v4`` / ``npu_batch_nms`` are not used: nothing we can
  check here shows that their adaptive sampling (sample_num 0, roi_end_mode), boundary rules,
  IoU comparison (``>`` vs ``>=``) and tie order match torchvision's, and exact parity with
  detectron2 is the point. The tensor versions are tested against torchvision on CPU.

The tensor-op versions have static shapes and no host sync once ``max_samples`` is given (or
``sampling_ratio > 0``), so they also serve static mode under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import Tensor

IMPLS = ("auto", "torchvision", "tensor")
_TORCHVISION_DEVICES = ("cpu", "cuda")
# Floats gathered at once by the tensor RoIAlign (per chunk of RoIs).
_GATHER_CHUNK_ELEMENTS = 1 << 25


# A plain module global, not a ContextVar: select_impl runs inside compiled regions, and torch 2.5's
# Dynamo cannot trace ContextVar.get() (it guards on a global's value, so a change recompiles).
# Process-wide, which suits its one use: emulating another device's choice in tests and benchmarks.
_dispatch_as: Optional[str] = None


def select_impl(device_type: str, impl: str = "auto") -> str:
    """The implementation ("torchvision" or "tensor") used for tensors on `device_type`."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    device_type = _dispatch_as or device_type
    return "torchvision" if device_type in _TORCHVISION_DEVICES else "tensor"


@contextlib.contextmanager
def dispatch_as(device_type: str) -> Iterator[None]:
    """Choose implementations as if every tensor were on `device_type` (runs the npu path on CPU)."""
    global _dispatch_as
    previous, _dispatch_as = _dispatch_as, device_type
    try:
        yield
    finally:
        _dispatch_as = previous


# ---- RoIAlign -------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _grids(extent: Tensor, pooled: int, sampling_ratio: int) -> Tensor:
    if sampling_ratio > 0:
        return torch.full_like(extent, sampling_ratio, dtype=torch.int64)
    return torch.ceil(extent / pooled).to(torch.int64)


def _axis(start, bin_size, grid, idx, pooled: int, length, shape):
    """Bilinear taps along one axis, as torchvision's kernel computes them.

    start, bin_size, grid, length: (K,) per RoI; idx (K, S) the sample's index along this axis.
    Returns low, high (int64), weight of low, weight of high, all broadcast to `shape`.
    """
    dtype = start.dtype
    p = torch.arange(pooled, dtype=dtype, device=start.device)
    pos = (
        start[:, None, None]
        + p[None, :, None] * bin_size[:, None, None]
        + (idx[:, None, :].to(dtype) + 0.5) * bin_size[:, None, None] / grid[:, None, None].to(dtype)
    )
    length = length[:, None, None]
    inside = (pos >= -1.0) & (pos <= length.to(dtype))
    pos = pos.clamp(min=0)
    low = pos.to(torch.int64)
    at_end = low >= length - 1
    low = torch.where(at_end, length - 1, low)
    high = torch.where(at_end, low, low + 1)
    pos = torch.where(at_end, low.to(dtype), pos)
    frac = pos - low.to(dtype)
    w_low = torch.where(inside, 1 - frac, 0.0)
    w_high = torch.where(inside, frac, 0.0)
    return tuple(t.reshape(shape) for t in (low, high, w_low, w_high))


def _needed_samples(rois: Tensor, scales: Tensor, output_size, sampling_ratio: int, aligned: bool) -> Tensor:
    """(K,) samples per bin (grid_h * grid_w, 0 where the grid is empty)."""
    if sampling_ratio > 0:
        return torch.full((rois.shape[0],), sampling_ratio * sampling_ratio, device=rois.device)
    offset = 0.5 if aligned else 0.0
    w = (rois[:, 3] * scales - offset) - (rois[:, 1] * scales - offset)
    h = (rois[:, 4] * scales - offset) - (rois[:, 2] * scales - offset)
    if not aligned:
        w, h = w.clamp(min=1.0), h.clamp(min=1.0)
    gh, gw = _grids(h, output_size[0], 0), _grids(w, output_size[1], 0)
    return torch.where((gh > 0) & (gw > 0), gh * gw, 0)


def _pool_chunk(flat, base, heights, widths, scales, rois, output_size, sampling_ratio, aligned, s):
    """RoIAlign over channels-last rows `flat` (M, C); RoI k reads rows base[k] + y * widths[k] + x.

    Each bin enumerates s sample slots t -> (t // grid_w, t % grid_w); slots past
    grid_h * grid_w get zero weight, so the result equals the kernel's adaptive grid.
    """
    ph, pw = output_size
    k, c = rois.shape[0], flat.shape[1]
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * scales - offset
    y0 = rois[:, 2] * scales - offset
    roi_w = rois[:, 3] * scales - offset - x0
    roi_h = rois[:, 4] * scales - offset - y0
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    gh, gw = _grids(roi_h, ph, sampling_ratio), _grids(roi_w, pw, sampling_ratio)
    count = (gh * gw).clamp(min=1).to(flat.dtype)
    t = torch.arange(s, device=rois.device)[None, :]
    gw1 = gw.clamp(min=1)[:, None]
    # A negative grid on both axes has a positive product but no samples.
    slot_ok = (t < (gh * gw)[:, None]) & (gh > 0)[:, None] & (gw > 0)[:, None]
    iy, ix = t // gw1, t % gw1
    ylo, yhi, wyl, wyh = _axis(y0, roi_h / ph, gh.clamp(min=1), iy, ph, heights, (k, ph, 1, s))
    xlo, xhi, wxl, wxh = _axis(x0, roi_w / pw, gw.clamp(min=1), ix, pw, widths, (k, 1, pw, s))
    b = base[:, None, None, None]
    wd = widths[:, None, None, None]
    index = torch.stack(
        [b + ylo * wd + xlo, b + ylo * wd + xhi, b + yhi * wd + xlo, b + yhi * wd + xhi], dim=-1
    ).reshape(-1)
    weight = torch.stack([wyl * wxl, wyl * wxh, wyh * wxl, wyh * wxh], dim=-1)
    weight = torch.where(slot_ok[:, None, None, :, None], weight, 0.0)
    vals = flat[index].view(k * ph * pw, s * 4, c)
    out = torch.bmm(weight.reshape(k * ph * pw, 1, s * 4), vals).view(k, ph, pw, c)
    return out / count[:, None, None, None]


def _pool_flat(flat, base, heights, widths, scales, rois, output_size, sampling_ratio, aligned, s):
    """_pool_chunk over runs of RoIs, so the gathered samples stay within a fixed budget."""
    k, c = rois.shape[0], flat.shape[1]
    chunk = max(1, _GATHER_CHUNK_ELEMENTS // max(1, output_size[0] * output_size[1] * s * 4 * max(c, 2)))
    outs = [
        _pool_chunk(
            flat,
            *(x[i : i + chunk] for x in (base, heights, widths, scales, rois)),
            output_size,
            sampling_ratio,
            aligned,
            s,
        )
        for i in range(0, k, chunk)
    ]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.permute(0, 3, 1, 2)


def _resolve_samples(max_samples, rois, scales, output_size, sampling_ratio, aligned, map_bound: int) -> int:
    """The static sample bound: given, sampling_ratio**2, the data's (eager) or the map's (compiled)."""
    if sampling_ratio > 0 and max_samples is None:
        return sampling_ratio * sampling_ratio
    if _is_compiling():
        return int(max_samples) if max_samples is not None else max(map_bound, 1)
    need = int(_needed_samples(rois, scales, output_size, sampling_ratio, aligned).max()) if len(rois) else 1
    if max_samples is None:
        return max(need, 1)
    if need > max_samples:
        raise ValueError(
            f"RoIAlign max_samples={max_samples} is below the {need} samples per bin a RoI needs; "
            "raise max_samples (the result would not match the kernel)"
        )
    return int(max_samples)


def _map_bound(heights: Sequence[int], widths: Sequence[int], output_size, sampling_ratio: int) -> int:
    """Samples per bin of a RoI that spans the whole map: the bound for RoIs inside the map."""
    if sampling_ratio > 0:
        return sampling_ratio * sampling_ratio
    return max(math.ceil(h / output_size[0]) * math.ceil(w / output_size[1]) for h, w in zip(heights, widths))


def fpn_sample_bound(
    map_sizes: Sequence[tuple[int, int]],
    scales: Sequence[float],
    output_size,
    sampling_ratio: int,
    canonical_box_size: float,
    canonical_level: int,
) -> int:
    """Samples per bin that any RoI can need when it lies inside the image and went to its level by
    ROIPooler's rule (poolers.assign_boxes_to_levels); map_sizes[i] (h, w) of level i.

    A RoI on level l below the top has sqrt(area) < canonical_box_size * 2^(l + 1 - canonical_level),
    so its extents (a, b) in feature pixels have a * b < that area * scale^2; it needs
    ceil(b / ph) * ceil(a / pw) samples, and each extent is at most the map's. The top level takes
    every larger RoI: its bound is the whole map's. Far below the whole-map bound on the lower
    levels (p2 of a 1344x800 canvas: 48 instead of 1392), which is what the tensor RoIAlign pays.
    """
    ph, pw = _pair(output_size)
    if sampling_ratio > 0:
        return sampling_ratio * sampling_ratio
    bound = 1
    for i, ((h, w), scale) in enumerate(zip(map_sizes, scales)):
        gy_max, gx_max = math.ceil(h / ph), math.ceil(w / pw)
        if i == len(scales) - 1:
            bound = max(bound, gy_max * gx_max)
            continue
        level = round(-math.log2(scale))
        # 1e-3 of slack for the float arithmetic of the level rule and of the box scaling.
        area = (canonical_box_size * 2.0 ** (level + 1 - canonical_level) * scale) ** 2 * (1 + 1e-3)
        for gy in range(1, gy_max + 1):
            # extents above ph * (gy - 1) and pw * (gx - 1) must fit in the area
            gx = gx_max if gy == 1 else min(gx_max, math.ceil(area / (ph * (gy - 1) * pw)))
            bound = max(bound, gy * gx)
    return bound


def _check_rois(rois: Tensor, what: str) -> None:
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"{what}: rois must be (K, 5) rows (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}"
        )


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    return int(output_size[0]), int(output_size[1])


def roi_align_tensor(
    input: Tensor,
    rois: Tensor,
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    max_samples: Optional[int] = None,
) -> Tensor:
    """torchvision.ops.roi_align in plain tensor ops; autograd gives the input's gradient.

    max_samples bounds grid_h * grid_w, the samples per bin. None: sampling_ratio**2 when
    sampling_ratio > 0; else the RoIs' own need (one host sync) in eager mode, and under
    torch.compile the need of a RoI spanning the whole map (exact for RoIs inside the map).
    In eager mode a bound below what a RoI needs raises. Gradients do not flow to the boxes
    (as with torchvision's op).
    """
    _check_rois(rois, "roi_align_tensor")
    return multilevel_roi_align(
        [input],
        rois,
        torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device),
        output_size,
        [spatial_scale],
        sampling_ratio,
        aligned,
        max_samples,
    )


def multilevel_roi_align(
    features: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor,
    output_size,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    max_samples: Optional[int] = None,
) -> Tensor:
    """(K, C, oh, ow): RoI k pooled on features[levels[k]] at spatial_scales[levels[k]].

    All levels are flattened into one channels-last table and every RoI gathers from it at its
    level's offset, so shapes are static and no RoI is routed by nonzero/index_put_.
    max_samples as in roi_align_tensor (one bound for all levels).
    """
    _check_rois(rois, "multilevel_roi_align")
    if len(features) != len(spatial_scales):
        raise ValueError(
            f"multilevel_roi_align: {len(features)} feature levels but {len(spatial_scales)} scales"
        )
    output_size = _pair(output_size)
    n, c = features[0].shape[:2]
    dtype, device = features[0].dtype, features[0].device
    hs = [int(f.shape[2]) for f in features]
    ws = [int(f.shape[3]) for f in features]
    offsets, total = [], 0
    for f, h, w in zip(features, hs, ws):
        if f.shape[:2] != (n, c):
            raise ValueError(
                f"multilevel_roi_align: level shapes differ in (N, C): {[tuple(x.shape) for x in features]}"
            )
        offsets.append(total)
        total += n * h * w
    flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, c) for f in features])
    rois = rois.detach().to(dtype)
    levels = levels.to(device=device, dtype=torch.int64)
    # Scales multiply in the input's dtype, as the kernel casts its float scale.
    scales = torch.tensor(list(spatial_scales), dtype=dtype, device=device)[levels]
    heights = torch.tensor(hs, dtype=torch.int64, device=device)[levels]
    widths = torch.tensor(ws, dtype=torch.int64, device=device)[levels]
    base = torch.tensor(offsets, dtype=torch.int64, device=device)[levels]
    base = base + rois[:, 0].to(torch.int64) * heights * widths
    if rois.shape[0] == 0:
        return flat.new_zeros((0, c, *output_size))
    s = _resolve_samples(
        max_samples,
        rois,
        scales,
        output_size,
        sampling_ratio,
        aligned,
        _map_bound(hs, ws, output_size, sampling_ratio),
    )
    return _pool_flat(flat, base, heights, widths, scales, rois, output_size, sampling_ratio, aligned, s)


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    *,
    impl: str = "auto",
) -> Tensor:
    """Dynamic-mode RoIAlign: rois (K, 5); the implementation follows input's device (see module doc)."""
    chosen = select_impl(input.device.type, impl)
    output_size = _pair(output_size)
    if chosen == "tensor":
        return roi_align_tensor(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    from torchvision.ops import roi_align as tv_roi_align

    return tv_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


# ---- NMS ------------------------------------------------------------------------------------------


def _pairwise_iou(boxes: Tensor) -> Tensor:
    """(B, N, 4) -> (B, N, N) IoU with torchvision's CPU kernel's arithmetic (0/0 stays NaN)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp(
        min=0
    )
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp(
        min=0
    )
    inter = w * h
    return inter / (area[:, :, None] + area[:, None, :] - inter)


def _greedy(suppresses: Tensor, valid: Tensor) -> Tensor:
    """Greedy NMS in sorted order: keep[j] = valid[j] and no kept i < j suppresses j.

    The rule has exactly one fixed point (induct over j), and iterating it from `valid` fixes
    one more leading entry per step at least, so stopping when nothing changes is exact.
    """
    m = suppresses.to(torch.float32)

    def step(keep: Tensor) -> Tensor:
        hits = torch.bmm(keep.to(torch.float32)[:, None, :], m)[:, 0]
        return valid & (hits == 0)

    if _is_compiling():
        from torch._higher_order_ops.while_loop import while_loop

        def cond(keep, done):
            return ~done

        def body(keep, done):
            new = step(keep)
            return new, (new == keep).all()

        keep, _ = while_loop(
            cond, body, (valid.clone(), torch.zeros((), dtype=torch.bool, device=valid.device))
        )
        return keep
    keep = valid
    while True:
        new = step(keep)
        if bool((new == keep).all()):
            return new
        keep = new


def _nms_fixed(
    boxes: Tensor,
    scores: Tensor,
    idxs: Optional[Tensor],
    valid: Optional[Tensor],
    iou_threshold: float,
    max_out: int,
):
    if boxes.shape[-1] != 4 or boxes.shape[:-1] != scores.shape:
        raise ValueError(
            f"nms: boxes must be (..., N, 4) and scores (..., N), got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    lead, n = scores.shape[:-1], scores.shape[-1]
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(
            f"nms: valid must have the scores' shape {tuple(scores.shape)}, got {tuple(valid.shape)}"
        )
    b = math.prod(lead)
    boxes = boxes.reshape(b, n, 4)
    scores = scores.reshape(b, n)
    valid = valid.reshape(b, n).to(torch.bool)
    # Descending score, index order among ties (torchvision's CPU kernel sorts stably); invalid last.
    order = torch.sort(scores, dim=1, descending=True, stable=True)[1]
    v_sorted = valid.gather(1, order)
    order = order.gather(1, torch.sort((~v_sorted).to(torch.uint8), dim=1, stable=True)[1])
    v_sorted = valid.gather(1, order)
    b_sorted = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    sup = _pairwise_iou(b_sorted) > iou_threshold
    if idxs is not None:
        i_sorted = idxs.reshape(b, n).gather(1, order)
        sup = sup & (i_sorted[:, :, None] == i_sorted[:, None, :])
    sup = sup & torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(1)
    sup = sup & v_sorted[:, :, None] & v_sorted[:, None, :]
    keep = _greedy(sup, v_sorted)
    # Kept positions first, in sorted order.
    pos = torch.sort((~keep).to(torch.uint8), dim=1, stable=True)[1]
    kept_idx = order.gather(1, pos)
    count = keep.sum(dim=1, keepdim=True)
    if max_out > n:
        kept_idx = torch.cat([kept_idx, kept_idx.new_zeros(kept_idx.shape[0], max_out - n)], dim=1)
    kept_idx = kept_idx[:, :max_out]
    keep_valid = torch.arange(max_out, device=boxes.device)[None, :] < count
    kept_idx = torch.where(keep_valid, kept_idx, 0)
    return kept_idx.reshape(*lead, max_out), keep_valid.reshape(*lead, max_out)


def nms_fixed(boxes: Tensor, scores: Tensor, valid: Optional[Tensor], iou_threshold: float, max_out: int):
    """Fixed-size NMS: boxes (..., N, 4), scores (..., N), valid bool (..., N) or None (all).

    Returns keep (..., max_out) int64 indices into N, by descending score, and keep_valid
    (..., max_out) bool; the valid entries are torchvision's nms(boxes[valid], scores[valid])
    [:max_out] as indices into N, and the rest are 0. Invalid boxes neither survive nor suppress.
    """
    return _nms_fixed(boxes, scores, None, valid, iou_threshold, max_out)


def batched_nms_fixed(
    boxes: Tensor, scores: Tensor, idxs: Tensor, valid: Optional[Tensor], iou_threshold: float, max_out: int
):
    """nms_fixed where only boxes of the same idxs (class or level) suppress each other."""
    if idxs.shape != scores.shape:
        raise ValueError(
            f"batched_nms: idxs must have the scores' shape {tuple(scores.shape)}, got {tuple(idxs.shape)}"
        )
    return _nms_fixed(boxes, scores, idxs, valid, iou_threshold, max_out)


# IoU entries per chunk of classwise_nms_fixed (each a few float32 temporaries).
_NMS_CHUNK_ELEMENTS = 1 << 26


def classwise_nms_fixed(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float, max_out: int):
    """batched_nms_fixed over class-agnostic boxes (B, P, 4) scored per class (B, P, K), with
    candidate j = p * K + k (box p, class k) and valid (B, P, K).

    The same result as batched_nms_fixed on the flattened (B, P * K) candidates, but each class is
    its own P x P problem: boxes of different classes never suppress each other, so nothing is lost,
    and the memory is K * P^2 instead of (K * P)^2 (COCO: 80 x 1000 candidates per image would need
    an 80000 x 80000 matrix). Returns keep (B, max_out) indices into P * K and keep_valid.
    """
    b, p, k = scores.shape
    if boxes.shape != (b, p, 4) or valid.shape != scores.shape:
        raise ValueError(
            f"classwise_nms: boxes (B, P, 4), scores and valid (B, P, K), got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(valid.shape)}"
        )
    per_class = []
    chunk = max(1, _NMS_CHUNK_ELEMENTS // max(1, b * p * p))
    for c0 in range(0, k, chunk):
        c1 = min(k, c0 + chunk)
        kk = c1 - c0
        keep, keep_valid = _nms_fixed(
            boxes[:, None].expand(b, kk, p, 4),
            scores[:, :, c0:c1].transpose(1, 2),
            None,
            valid[:, :, c0:c1].transpose(1, 2),
            iou_threshold,
            p,
        )
        # Back to a (B, kk, P) mask of kept boxes.
        kept = torch.zeros((b, kk, p), dtype=torch.int32, device=boxes.device)
        kept = kept.scatter_add(2, keep, keep_valid.to(torch.int32))
        per_class.append(kept > 0)
    kept = torch.cat(per_class, dim=1).transpose(1, 2).reshape(b, p * k)
    flat = scores.reshape(b, p * k)
    # As _nms_fixed orders its output: descending score, candidate index among ties.
    order = torch.sort(flat, dim=1, descending=True, stable=True)[1]
    pos = torch.sort((~kept.gather(1, order)).to(torch.uint8), dim=1, stable=True)[1]
    kept_idx = order.gather(1, pos)
    n = p * k
    if max_out > n:
        kept_idx = torch.cat([kept_idx, kept_idx.new_zeros(b, max_out - n)], dim=1)
    kept_idx = kept_idx[:, :max_out]
    keep_valid = torch.arange(max_out, device=boxes.device)[None, :] < kept.sum(dim=1, keepdim=True)
    return torch.where(keep_valid, kept_idx, 0), keep_valid


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, impl: str = "auto") -> Tensor:
    """torchvision.ops.nms semantics; the implementation follows the boxes' device."""
    if select_impl(boxes.device.type, impl) == "tensor":
        keep, keep_valid = nms_fixed(boxes, scores, None, iou_threshold, boxes.shape[0])
        return keep[keep_valid]
    from torchvision.ops import nms as tv_nms

    return tv_nms(boxes, scores, iou_threshold)


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, impl: str = "auto"
) -> Tensor:
    """torchvision.ops.batched_nms semantics; the implementation follows the boxes' device."""
    if select_impl(boxes.device.type, impl) == "tensor":
        keep, keep_valid = batched_nms_fixed(boxes, scores, idxs, None, iou_threshold, boxes.shape[0])
        return keep[keep_valid]
    from torchvision.ops import batched_nms as tv_batched_nms

    return tv_batched_nms(boxes, scores, idxs, iou_threshold)


__all__ = [
    "batched_nms",
    "batched_nms_fixed",
    "classwise_nms_fixed",
    "dispatch_as",
    "multilevel_roi_align",
    "nms",
    "nms_fixed",
    "roi_align",
    "roi_align_tensor",
    "fpn_sample_bound",
    "select_impl",
]
