"""static_ops' CPU RoIAlign: one custom op that is the dynamic path's ROIPooler, bit for bit."""

from __future__ import annotations

import pytest
import torch

from cascade_rcnn.modeling.poolers import ROIPooler, assign_boxes_to_levels, boxes_to_rois
from cascade_rcnn.modeling.static_ops import multilevel_roi_align


def _case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(2, 8, 128 // s, 192 // s, generator=gen).contiguous(memory_format=torch.channels_last)
        for s in (1, 2, 4, 8)
    ]
    boxes = []
    for _ in range(2):
        xy = torch.rand(70, 2, generator=gen) * torch.tensor([500.0, 250.0])
        wh = torch.exp(torch.rand(70, 2, generator=gen) * 6.6)
        b = torch.cat([xy, xy + wh], 1)
        b = torch.minimum(b, torch.tensor([768.0, 512.0, 768.0, 512.0]))
        big = torch.tensor([[0.0, 0.0, 768.0, 512.0], [10.0, 20.0, 700.0, 500.0], [5.0, 5.0, 300.0, 260.0]])
        boxes.append(torch.cat([b, big]))
    return feats, boxes


@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_cpu_multilevel_op_equals_roipooler_forward_and_backward(pooler_type, sampling_ratio):
    feats, boxes = _case(sampling_ratio + len(pooler_type))
    pooler = ROIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32), sampling_ratio, pooler_type)
    rois = boxes_to_rois(boxes)
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    assert len(set(levels.tolist())) == 4  # every level gets RoIs
    a = [f.clone().requires_grad_() for f in feats]
    b = [f.clone().requires_grad_() for f in feats]
    ref = pooler(a, boxes)
    out = multilevel_roi_align(b, rois, levels, (7, 7), pooler.scales, sampling_ratio, pooler.aligned)
    assert torch.equal(out, ref)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ga = torch.autograd.grad((ref * g).sum(), a)
    gb = torch.autograd.grad((out * g).sum(), b)
    for x, y in zip(ga, gb):
        assert torch.equal(x, y)


def test_cpu_multilevel_op_compiles_as_one_graph():
    from torch._dynamo.utils import counters

    feats, boxes = _case(5)
    rois = boxes_to_rois(boxes)
    levels = assign_boxes_to_levels(rois[:, 1:], 2, 5)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)

    def f(feats, rois, levels):
        return multilevel_roi_align(feats, rois, levels, (7, 7), scales, 0, True).square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    a = [x.clone().requires_grad_() for x in feats]
    b = [x.clone().requires_grad_() for x in feats]
    ga = torch.autograd.grad(compiled(a, rois, levels), a)
    gb = torch.autograd.grad(f(b, rois, levels), b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    assert sum(counters["graph_break"].values()) == 0
