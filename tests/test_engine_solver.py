"""Optimizer parameter groups, the warmup multi-step LR schedule, and gradient clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cascade_rcnn.config import get_cfg
from cascade_rcnn.engine.solver import (
    SolverError,
    WarmupMultiStepLR,
    build_grad_clipper,
    build_lr_scheduler,
    build_optimizer,
    lr_multiplier,
)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.frozen = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def _groups_by_param(opt: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def test_weight_decay_zero_on_norm_layers_and_frozen_params_excluded():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.02
    net = _Net()
    opt = build_optimizer(cfg, net)
    groups = _groups_by_param(opt)
    for p in (net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias):
        assert groups[id(p)]["weight_decay"] == 0.0
    for p in (net.conv.weight, net.conv.bias, net.fc.weight, net.fc.bias):
        assert groups[id(p)]["weight_decay"] == pytest.approx(1e-4)
        assert groups[id(p)]["lr"] == pytest.approx(0.02)
    assert id(net.frozen.weight) not in groups and id(net.frozen.bias) not in groups
    assert opt.defaults["momentum"] == 0.9 and not opt.defaults["nesterov"]
    assert sum(len(g["params"]) for g in opt.param_groups) == 8


def test_bias_lr_factor_and_weight_decay_bias():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 0.5
    net = _Net()
    groups = _groups_by_param(build_optimizer(cfg, net))
    assert groups[id(net.fc.bias)]["lr"] == pytest.approx(0.2)
    assert groups[id(net.fc.bias)]["weight_decay"] == 0.5
    # detectron2 applies the bias rule after the norm rule.
    assert groups[id(net.bn.bias)]["weight_decay"] == 0.5
    assert groups[id(net.bn.weight)]["weight_decay"] == 0.0
    assert groups[id(net.fc.weight)]["lr"] == pytest.approx(0.1)


def test_lr_multiplier_matches_detectron2_schedule():
    steps = (60000, 80000)
    assert lr_multiplier(0, steps) == pytest.approx(0.001)
    assert lr_multiplier(500, steps) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_multiplier(999, steps) == pytest.approx(0.001 + 0.999 * 0.999)
    assert lr_multiplier(1000, steps) == 1.0
    assert lr_multiplier(59999, steps) == 1.0
    assert lr_multiplier(60000, steps) == pytest.approx(0.1)  # a step applies at its own iteration
    assert lr_multiplier(79999, steps) == pytest.approx(0.1)
    assert lr_multiplier(80000, steps) == pytest.approx(0.01)
    assert lr_multiplier(10, steps, warmup_iters=100, warmup_method="constant") == pytest.approx(0.001)
    with pytest.raises(SolverError, match="WARMUP_METHOD"):
        lr_multiplier(0, steps, warmup_method="cosine")


def test_scheduler_lr_per_iteration_and_exact_resume():
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.WARMUP_ITERS = 10
    cfg.SOLVER.STEPS = (15, 20)
    cfg.SOLVER.MAX_ITER = 25
    net = _Net()
    opt = build_optimizer(cfg, net)
    sched = build_lr_scheduler(cfg, opt)
    seen = []
    for it in range(25):
        seen.append(opt.param_groups[0]["lr"])  # the LR iteration `it` trains with
        opt.step()
        sched.step()
        if it == 12:
            saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    expected = [0.02 * lr_multiplier(t, (15, 20), 0.1, 10, 0.001) for t in range(25)]
    assert seen == pytest.approx(expected, rel=1e-12)

    # A fresh optimizer/scheduler resumed after iteration 12 continues with iteration 13's LR.
    opt2 = build_optimizer(cfg, _Net())
    sched2 = build_lr_scheduler(cfg, opt2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    resumed = []
    for _ in range(13, 25):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(expected[13:], rel=1e-12)


def test_scheduler_config_errors_name_keys():
    cfg = get_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    opt = build_optimizer(cfg, _Net())
    with pytest.raises(SolverError, match="SOLVER.LR_SCHEDULER_NAME"):
        build_lr_scheduler(cfg, opt)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.WARMUP_METHOD = "exponential"
    with pytest.raises(SolverError, match="SOLVER.WARMUP_METHOD"):
        build_lr_scheduler(cfg, opt)


def test_warmup_scheduler_direct_use():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WarmupMultiStepLR(opt, steps=[3], gamma=0.5, warmup_iters=2, warmup_factor=0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 0.5, 0.5])


@pytest.mark.parametrize("kind", ["value", "norm", "full_model"])
def test_gradient_clipping(kind):
    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = kind
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    a.grad = torch.full((4,), 3.0)
    b.grad = torch.full((4,), 0.1)
    opt = torch.optim.SGD([a, b], lr=0.1)
    build_grad_clipper(cfg)(opt)
    if kind == "value":
        assert torch.equal(a.grad, torch.full((4,), 0.5)) and torch.allclose(b.grad, torch.full((4,), 0.1))
    elif kind == "norm":
        assert a.grad.norm().item() == pytest.approx(0.5, rel=1e-5)
        assert torch.allclose(b.grad, torch.full((4,), 0.1))  # per-parameter: b's norm is below 0.5
    else:
        total = torch.cat([a.grad, b.grad]).norm().item()
        assert total == pytest.approx(0.5, rel=1e-5)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert build_grad_clipper(cfg) is None
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "bogus"
    with pytest.raises(SolverError, match="CLIP_TYPE"):
        build_grad_clipper(cfg)
