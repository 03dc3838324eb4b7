"""Device-portable RoIAlign and NMS (cascade_rcnn.modeling.ops) against torchvision's CPU kernels."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from cascade_rcnn.modeling import ops

EPS32 = torch.finfo(torch.float32).eps
# RoIAlign's outputs and gradients are sums of float32 terms (bilinear weight x feature, or x upstream
# gradient), which torchvision's kernels and ours add in different orders. Two such sums differ by up
# to about n * eps * sum|terms| for n terms, so a bare absolute bound fails by chance on large values
# (a gradient of 16 was off by 1.6e-5 in CI). Measured over 2 thread counts x 96 random cases of the
# test below: at most 3.4 * eps * sum|terms|. The bound is 32 * eps * sum|terms| per element; a wrong
# weight or a missed sample moves a value by a whole term, orders of magnitude more.
SUM_ULPS = 32


def roi_align_terms(feats, rois, levels, output, scales, sampling_ratio, aligned, g=None):
    """sum|terms| of each RoIAlign output (g None), or of each feature's gradient for the upstream
    gradient g, computed in float64 with torchvision's kernel; one level per feature map."""
    feats64 = [f.detach().abs().double().requires_grad_(g is not None) for f in feats]
    out = torch.zeros((rois.shape[0], feats[0].shape[1], output, output), dtype=torch.float64)
    for lvl, (f, s) in enumerate(zip(feats64, scales)):
        rows = levels == lvl
        out[rows] = torchvision.ops.roi_align(f, rois[rows].double(), output, s, sampling_ratio, aligned)
    if g is None:
        return out
    return torch.autograd.grad((out * g.abs().double()).sum(), feats64)


def assert_sums_close(actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor) -> None:
    assert actual.shape == expected.shape == terms.shape
    diff = (actual.double() - expected.double()).abs()
    bound = SUM_ULPS * EPS32 * terms
    bad = diff > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements differ by more than {SUM_ULPS} eps x sum|terms|; "
        f"worst {float((diff / bound.clamp_min(1e-30)).max()):.3g} x the bound, largest difference {float(diff.max()):.3g}"
    )


def _rois(gen: torch.Generator, k: int, n_images: int, extent: float) -> torch.Tensor:
    """Random boxes in image pixels plus the awkward ones: partly/fully outside, degenerate, tiny, huge."""
    xy = torch.rand(k, 2, generator=gen) * extent * 1.2 - 0.1 * extent
    wh = torch.rand(k, 2, generator=gen) * extent * 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    special = torch.tensor(
        [
            [-30.0, -20.0, 25.0, 18.0],  # partly outside (top left)
            [0.8 * extent, 0.7 * extent, 1.6 * extent, 1.5 * extent],  # partly outside (bottom right)
            [2.0 * extent, 2.0 * extent, 2.5 * extent, 2.2 * extent],  # fully outside
            [-50.0, -50.0, -10.0, -5.0],  # fully outside, negative side
            [10.0, 12.0, 10.0, 30.0],  # zero width
            [20.0, 20.0, 14.0, 9.0],  # negative width and height
            [5.0, 5.0, 5.1, 5.05],  # tiny
            [-0.5 * extent, -0.4 * extent, 3.0 * extent, 2.5 * extent],  # huge
        ]
    )
    boxes = torch.cat([boxes, special])
    batch = torch.randint(0, n_images, (boxes.shape[0], 1), generator=gen).float()
    return torch.cat([batch, boxes], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("scale,output", [(0.25, 7), (0.125, 14), (1.0, 5)])
def test_roi_align_tensor_matches_torchvision_forward_and_gradient(aligned, sampling_ratio, scale, output):
    gen = torch.Generator().manual_seed(int(scale * 1000) + output + sampling_ratio + aligned)
    feat = torch.randn(2, 3, 23, 31, generator=gen, requires_grad=True)
    rois = _rois(gen, 40, 2, extent=31 / scale)
    ref = torchvision.ops.roi_align(feat, rois, output, scale, sampling_ratio, aligned)
    out = ops.roi_align_tensor(feat, rois, output, scale, sampling_ratio, aligned)
    assert out.shape == ref.shape
    one_level = (torch.zeros(rois.shape[0], dtype=torch.long), output, [scale], sampling_ratio, aligned)
    assert_sums_close(out, ref, roi_align_terms([feat], rois, *one_level))
    g = torch.randn(ref.shape, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * g).sum(), feat)
    (g_out,) = torch.autograd.grad((out * g).sum(), feat)
    assert_sums_close(g_out, g_ref, roi_align_terms([feat], rois, *one_level, g=g)[0])


def test_roi_align_tensor_honours_and_checks_max_samples():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(1, 2, 16, 16, generator=gen)
    rois = torch.tensor([[0.0, 1.0, 1.0, 30.0, 30.0], [0.0, 2.0, 3.0, 9.0, 7.0]])
    # The first box needs ceil(29 * 0.5 / 7) = 3 samples per axis: 9 per bin.
    ref = torchvision.ops.roi_align(feat, rois, 7, 0.5, 0, True)
    terms = roi_align_terms([feat], rois, torch.zeros(2, dtype=torch.long), 7, [0.5], 0, True)
    assert_sums_close(ops.roi_align_tensor(feat, rois, 7, 0.5, 0, True, max_samples=9), ref, terms)
    assert_sums_close(ops.roi_align_tensor(feat, rois, 7, 0.5, 0, True, max_samples=20), ref, terms)
    with pytest.raises(ValueError, match="max_samples=8 is below the 9"):
        ops.roi_align_tensor(feat, rois, 7, 0.5, 0, True, max_samples=8)
    with pytest.raises(ValueError, match=r"rois must be \(K, 5\)"):
        ops.roi_align_tensor(feat, rois[:, 1:], 7, 0.5, 0, True)
    assert ops.roi_align_tensor(feat, rois[:0], 7, 0.5, 0, True).shape == (0, 2, 7, 7)


@pytest.mark.parametrize("canvas", [(448, 448), (320, 448), (800, 1344), (1344, 800)])
def test_fpn_sample_bound_covers_every_box_inside_the_image(canvas):
    """The bound static mode gives the tensor RoIAlign holds for any box inside the canvas on the
    level ROIPooler's rule assigns it, including the extreme shapes that set it: full-width
    slivers, boxes just under a level's area limit, the whole image; and it is far below the
    whole-map bound the compiled path used before."""
    from cascade_rcnn.modeling.poolers import assign_boxes_to_levels

    h, w = canvas
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    maps = [(h // 4, w // 4), (h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    bound = ops.fpn_sample_bound(maps, scales, 7, 0, 224.0, 4)
    gen = torch.Generator().manual_seed(h + w)
    # Random boxes, log-uniform sides, inside the canvas.
    k = 20000
    bw = torch.exp(torch.rand(k, generator=gen) * torch.log(torch.tensor(float(w)))).clamp(max=w)
    bh = torch.exp(torch.rand(k, generator=gen) * torch.log(torch.tensor(float(h)))).clamp(max=h)
    x0 = torch.rand(k, generator=gen) * (w - bw)
    y0 = torch.rand(k, generator=gen) * (h - bh)
    boxes = [torch.stack([x0, y0, x0 + bw, y0 + bh], 1)]
    # Boxes just below each level's area limit, with every aspect ratio the canvas allows.
    for level in (2, 3, 4):
        side = 224.0 * 2.0 ** (level - 3) * (1 - 1e-6)
        for a in torch.linspace(1.0, min(w, side * side), 400):
            bwa = min(float(a), w)
            bha = min(side * side / bwa, h)
            boxes.append(torch.tensor([[0.0, 0.0, bwa, bha], [0.0, 0.0, bha, bwa]]))
    boxes = torch.cat(boxes)
    boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))
    boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, w, h], [0.0, 0.0, w, 1.0], [0.0, 0.0, 1.0, h]])])
    levels = assign_boxes_to_levels(boxes, 2, 5)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    need = torch.zeros(len(boxes), dtype=torch.int64)
    for i, s in enumerate(scales):
        here = levels == i
        need[here] = ops._needed_samples(
            rois[here], torch.full((int(here.sum()),), s), (7, 7), 0, True
        ).long()
    assert int(need.max()) == bound  # holds, and is tight: some box needs all of it
    whole_map = ops._map_bound([m[0] for m in maps], [m[1] for m in maps], (7, 7), 0)
    assert bound * 4 <= whole_map
    assert ops.fpn_sample_bound(maps, scales, 7, 2, 224.0, 4) == 4


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multilevel_roi_align_equals_pooling_each_roi_on_its_level(sampling_ratio):
    gen = torch.Generator().manual_seed(sampling_ratio)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [torch.randn(2, 4, 64 // 2**i, 48 // 2**i, generator=gen, requires_grad=True) for i in range(4)]
    rois = _rois(gen, 60, 2, extent=200.0)
    levels = torch.randint(0, 4, (rois.shape[0],), generator=gen)
    out = ops.multilevel_roi_align(feats, rois, levels, 7, scales, sampling_ratio, True)
    ref = torch.zeros_like(out)
    for lvl, (f, s) in enumerate(zip(feats, scales)):
        rows = levels == lvl
        ref[rows] = torchvision.ops.roi_align(f, rois[rows], 7, s, sampling_ratio, True)
    assert_sums_close(out, ref, roi_align_terms(feats, rois, levels, 7, scales, sampling_ratio, True))
    g = torch.randn(ref.shape, generator=gen)
    grads_ref = torch.autograd.grad((ref * g).sum(), feats)
    grads_out = torch.autograd.grad((out * g).sum(), feats)
    terms = roi_align_terms(feats, rois, levels, 7, scales, sampling_ratio, True, g=g)
    for a, b, t in zip(grads_out, grads_ref, terms):
        assert_sums_close(a, b, t)


def _nms_case(gen: torch.Generator, n: int):
    """Boxes with duplicates, degenerate boxes and exact score ties."""
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 40], dim=1)
    if n >= 8:
        boxes[1] = boxes[0]  # duplicate
        boxes[2, 2:] = boxes[2, :2]  # zero area
        boxes[3, 2] = boxes[3, 0] - 5  # negative width
        boxes[4:6] = boxes[6]
    scores = torch.randint(0, max(2, n // 4), (n,), generator=gen).float() / 7  # many exact ties
    valid = torch.rand(n, generator=gen) < 0.8
    return boxes, scores, valid


def _reference(boxes, scores, valid, thr, max_out, idxs=None):
    rows = torch.nonzero(valid, as_tuple=True)[0]
    if idxs is None:
        keep = torchvision.ops.nms(boxes[rows], scores[rows], thr)
    else:
        keep = torchvision.ops.batched_nms(boxes[rows], scores[rows], idxs[rows], thr)
    return rows[keep][:max_out]


def test_nms_fixed_keeps_torchvisions_set_in_its_order():
    gen = torch.Generator().manual_seed(0)
    for case in range(150):
        n = [0, 1, 8, 37, 120, 300][case % 6]
        boxes, scores, valid = _nms_case(gen, n)
        if case % 10 == 3:
            valid[:] = False
        thr = [0.3, 0.5, 0.7, 0.0][case % 4]
        max_out = [5, 50, 400][case % 3]
        keep, keep_valid = ops.nms_fixed(boxes, scores, valid, thr, max_out)
        assert keep.shape == keep_valid.shape == (max_out,) and keep.dtype == torch.int64
        expected = _reference(boxes, scores, valid, thr, max_out)
        assert torch.equal(keep[keep_valid], expected), case
        assert bool(keep_valid[: expected.numel()].all()) and not bool(keep_valid[expected.numel() :].any())
        idxs = torch.randint(0, 3, (n,), generator=gen)
        keep, keep_valid = ops.batched_nms_fixed(boxes, scores, idxs, valid, thr, max_out)
        assert torch.equal(keep[keep_valid], _reference(boxes, scores, valid, thr, max_out, idxs)), case


def test_nms_fixed_batch_dimension_is_per_image():
    gen = torch.Generator().manual_seed(1)
    cases = [_nms_case(gen, 64) for _ in range(3)]
    boxes, scores, valid = (torch.stack(t) for t in zip(*cases))
    idxs = torch.randint(0, 4, (3, 64), generator=gen)
    keep, keep_valid = ops.batched_nms_fixed(boxes, scores, idxs, valid, 0.5, 30)
    for i in range(3):
        assert torch.equal(
            keep[i][keep_valid[i]], _reference(boxes[i], scores[i], valid[i], 0.5, 30, idxs[i])
        )


def test_classwise_nms_equals_batched_nms_over_all_candidates(monkeypatch):
    """Static inference's final NMS (class-agnostic boxes scored per class) on the tensor path: one
    P x P problem per class, in class chunks, gives torchvision's batched_nms over all P * K
    candidates, in its order, ties across classes included."""
    gen = torch.Generator().manual_seed(4)
    monkeypatch.setattr(ops, "_NMS_CHUNK_ELEMENTS", 3 * 2 * 60 * 60)  # several chunks, one ragged
    for case in range(12):
        b, p, k = 2, [1, 9, 60][case % 3], [1, 4, 7][case % 3]
        boxes = torch.stack([_nms_case(gen, p)[0] for _ in range(b)])
        scores = torch.randint(0, 6, (b, p, k), generator=gen).float() / 5  # ties within and across classes
        valid = (torch.rand(b, p, k, generator=gen) < 0.7) & (scores > 0.05)
        max_out = [3, 40, 500][case % 3]
        thr = [0.5, 0.3, 0.7][case % 3]
        keep, keep_valid = ops.classwise_nms_fixed(boxes, scores, valid, thr, max_out)
        assert keep.shape == keep_valid.shape == (b, max_out)
        cand = boxes[:, :, None, :].expand(b, p, k, 4).reshape(b, p * k, 4)
        classes = torch.arange(k).repeat(p)
        for i in range(b):
            expected = _reference(cand[i], scores[i].reshape(-1), valid[i].reshape(-1), thr, max_out, classes)
            assert torch.equal(keep[i][keep_valid[i]], expected), case
            assert not bool(keep_valid[i, expected.numel() :].any())
    with pytest.raises(ValueError, match="classwise_nms"):
        ops.classwise_nms_fixed(boxes[:, :, :3], scores, valid, 0.5, 4)


def test_dynamic_entries_match_torchvision_on_the_tensor_path():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        boxes, scores, _ = _nms_case(gen, 200)
        idxs = torch.randint(0, 5, (200,), generator=gen)
        assert torch.equal(
            ops.nms(boxes, scores, 0.6, impl="tensor"), torchvision.ops.nms(boxes, scores, 0.6)
        )
        assert torch.equal(
            ops.batched_nms(boxes, scores, idxs, 0.6, impl="tensor"),
            torchvision.ops.batched_nms(boxes, scores, idxs, 0.6),
        )
    feat = torch.randn(1, 2, 10, 12, generator=gen)
    rois = _rois(gen, 10, 1, 40.0)
    assert_sums_close(
        ops.roi_align(feat, rois, 7, 0.25, 0, True, impl="tensor"),
        torchvision.ops.roi_align(feat, rois, 7, 0.25, 0, True),
        roi_align_terms([feat], rois, torch.zeros(len(rois), dtype=torch.long), 7, [0.25], 0, True),
    )


def test_device_selection():
    assert ops.select_impl("cpu") == ops.select_impl("cuda") == "torchvision"
    assert ops.select_impl("npu") == "tensor"
    assert ops.select_impl("cpu", "tensor") == "tensor"
    with ops.dispatch_as("npu"):
        assert ops.select_impl("cpu") == "tensor"
    assert ops.select_impl("cpu") == "torchvision"
    with pytest.raises(ValueError, match="impl 'npu_native'"):
        ops.select_impl("npu", "npu_native")


def _compile_counters():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


@pytest.mark.slow
def test_compiled_nms_and_pooling_are_one_graph_for_any_data():
    """fullgraph compile on CPU; new valid patterns and box values reuse the one graph."""
    torch._dynamo.reset()
    nms = torch.compile(ops.batched_nms_fixed, fullgraph=True)
    pool = torch.compile(ops.multilevel_roi_align, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    scales = [1 / 4, 1 / 8]
    for trial in range(3):
        cases = [_nms_case(gen, 96) for _ in range(2)]
        boxes, scores, valid = (torch.stack(t) for t in zip(*cases))
        idxs = torch.randint(0, 3, (2, 96), generator=gen)
        keep, keep_valid = nms(boxes, scores, idxs, valid, 0.5, 40)
        for i in range(2):
            assert torch.equal(
                keep[i][keep_valid[i]], _reference(boxes[i], scores[i], valid[i], 0.5, 40, idxs[i])
            )
        feats = [torch.randn(1, 3, 32 // 2**i, 40 // 2**i, generator=gen) for i in range(2)]
        xy = torch.rand(30, 2, generator=gen) * 120
        rois = torch.cat([torch.zeros(30, 1), xy, xy + torch.rand(30, 2, generator=gen) * 40], dim=1)
        levels = torch.randint(0, 2, (30,), generator=gen)
        out = pool(feats, rois, levels, 7, scales, 0, True, 36)
        assert_sums_close(
            out,
            ops.multilevel_roi_align(feats, rois, levels, 7, scales, 0, True),
            roi_align_terms(feats, rois, levels, 7, scales, 0, True),
        )
        graphs, recompiles = _compile_counters()
        assert (graphs, recompiles) == (2, 0), trial


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def test_npu_path_reaches_no_torchvision_op():
    """Proof, without an NPU, that the npu path calls no torchvision kernel.

    Every call of an operator registered with the dispatcher (aten ops and custom ops such as
    torchvision::roi_align / torchvision::nms alike) passes through an active TorchDispatchMode,
    in forward and in autograd's backward. The recorder first runs the whole model (training
    forward + backward, then inference) with the default CPU choice and must see torchvision ops,
    which shows it can see them; then the same runs under dispatch_as("npu"), which makes every
    choice in ops exactly as for npu tensors (the choice reads only the device type), and no
    torchvision op may appear. Model code that bypassed ops would show up in the second run.
    """
    from test_modeling import shapes_image, slim_cfg

    from cascade_rcnn.modeling import build_model

    seen = {}
    for device in ("cpu", "npu"):
        torch.manual_seed(0)
        model = build_model(slim_cfg())
        data = [shapes_image(0), shapes_image(1)]
        recorder = _OpRecorder()
        with ops.dispatch_as(device), recorder:
            model.train()
            losses = model(data)
            sum(losses.values()).backward()
            model.eval()
            with torch.no_grad():
                model(data)
        seen[device] = recorder.namespaces
    assert "torchvision" in seen["cpu"]
    assert "aten" in seen["npu"] and "torchvision" not in seen["npu"], seen["npu"]


@pytest.mark.slow
def test_static_training_step_compiles_on_the_npu_path_and_matches_the_cpu_path():
    """Static mode's training step with ops' tensor versions (the npu choice) compiles as one graph
    (fullgraph) and gives the torchvision path's losses and gradients (one batch; measured relative
    differences about 1e-6, bound 1e-4)."""
    import numpy as np
    from test_static_compile import _config, random_batch
    from torch._dynamo.utils import counters

    from cascade_rcnn.modeling import build_model
    from cascade_rcnn.modeling.static_rcnn import compile_train_losses

    torch.manual_seed(0)
    model = build_model(_config()).train()
    batch = model.static_batch(random_batch(np.random.default_rng(0), True, [5, 12]))
    results = {}
    for device in ("cpu", "npu"):
        torch._dynamo.reset()
        counters.clear()
        with ops.dispatch_as(device):
            step = compile_train_losses(model, backend="aot_eager")
            torch.manual_seed(1)
            losses = step(batch)
            sum(losses.values()).backward()
        assert counters["graph_break"] == {} and counters["stats"]["unique_graphs"] == 1, device
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        results[device] = ({k: v.detach() for k, v in losses.items()}, grads)
    (cpu_losses, cpu_grads), (npu_losses, npu_grads) = results["cpu"], results["npu"]
    for name, value in cpu_losses.items():
        torch.testing.assert_close(npu_losses[name], value, rtol=1e-4, atol=1e-4)
    assert (npu_grads - cpu_grads).abs().max() <= 1e-4 * cpu_grads.abs().max()
