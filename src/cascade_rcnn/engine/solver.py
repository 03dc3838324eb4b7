"""SGD with detectron2's parameter groups, the warmup multi-step LR schedule and gradient clipping."""

from __future__ import annotations

import bisect
import logging
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import CascadeRCNNError

log = logging.getLogger(__name__)

# Norm layers whose affine parameters get SOLVER.WEIGHT_DECAY_NORM (detectron2's list).
_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


class SolverError(CascadeRCNNError, ValueError):
    """A SOLVER setting cannot be used; the message names the key."""


def is_norm_module(module: nn.Module) -> bool:
    # Also catches norm classes of our own (e.g. FrozenBatchNorm2d), which carry "Norm" in their name.
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float | None = 0.0,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float | None = None,
) -> list[dict]:
    """Trainable parameters grouped by (lr, weight_decay), as detectron2's default optimizer params.

    Norm layers' parameters get `weight_decay_norm`; parameters named `bias` get
    `base_lr * bias_lr_factor` and `weight_decay_bias` (None: same as `weight_decay`), applied after the
    norm rule as detectron2 does. Frozen parameters (requires_grad=False) are left out.
    """
    seen: set[int] = set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, wd = base_lr, weight_decay
            if weight_decay_norm is not None and is_norm_module(module):
                wd = weight_decay_norm
            if name == "bias":
                lr = base_lr * bias_lr_factor
                if weight_decay_bias is not None:
                    wd = weight_decay_bias
            groups.setdefault((lr, wd), []).append(param)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.SGD:
    """SGD(momentum=SOLVER.MOMENTUM, nesterov=SOLVER.NESTEROV) over `param_groups` from SOLVER keys."""
    s = cfg.SOLVER
    groups = param_groups(
        model,
        base_lr=float(s.BASE_LR),
        weight_decay=float(s.WEIGHT_DECAY),
        weight_decay_norm=None if s.WEIGHT_DECAY_NORM is None else float(s.WEIGHT_DECAY_NORM),
        bias_lr_factor=float(s.BIAS_LR_FACTOR),
        weight_decay_bias=None if s.WEIGHT_DECAY_BIAS is None else float(s.WEIGHT_DECAY_BIAS),
    )
    if not groups:
        raise SolverError("the model has no trainable parameters (check MODEL.BACKBONE.FREEZE_AT)")
    return torch.optim.SGD(groups, lr=float(s.BASE_LR), momentum=float(s.MOMENTUM), nesterov=bool(s.NESTEROV))


def lr_multiplier(
    it: int,
    steps: Iterable[int],
    gamma: float = 0.1,
    warmup_iters: int = 1000,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
) -> float:
    """The LR multiplier used by iteration `it` (0-based): warmup, then gamma^(#steps <= it).

    Linear warmup: warmup_factor + (1 - warmup_factor) * it / warmup_iters for it < warmup_iters.
    A pure function of `it`, so a resumed run gets exactly the same LR.
    """
    steps = sorted(int(s) for s in steps)
    value = gamma ** bisect.bisect_right(steps, it)
    if it < warmup_iters:
        if warmup_method == "linear":
            alpha = it / warmup_iters
            value *= warmup_factor * (1.0 - alpha) + alpha
        elif warmup_method == "constant":
            value *= warmup_factor
        else:
            raise SolverError(f"SOLVER.WARMUP_METHOD must be linear or constant, got {warmup_method!r}")
    return value


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Each group's LR at iteration t is its initial LR times `lr_multiplier(t, ...)`.

    `last_epoch` counts iterations: after k calls of `step()` the optimizer holds iteration k's LR.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: Iterable[int],
        gamma: float = 0.1,
        warmup_iters: int = 1000,
        warmup_factor: float = 0.001,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ):
        self.steps = sorted(int(s) for s in steps)
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.warmup_method = str(warmup_method)
        lr_multiplier(0, self.steps, self.gamma, self.warmup_iters, self.warmup_factor, self.warmup_method)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, it: int) -> float:
        return lr_multiplier(
            it, self.steps, self.gamma, self.warmup_iters, self.warmup_factor, self.warmup_method
        )

    def get_lr(self) -> list[float]:
        return [base * self.multiplier(self.last_epoch) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Re-derive the LR from the iteration so a resumed optimizer never keeps a stale value.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> WarmupMultiStepLR:
    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        raise SolverError(
            f"SOLVER.LR_SCHEDULER_NAME {s.LR_SCHEDULER_NAME!r} is not supported; use WarmupMultiStepLR"
        )
    steps = [int(x) for x in s.STEPS]
    if any(x > int(s.MAX_ITER) for x in steps):
        # detectron2 warns and ignores them; a short run of a long recipe is common.
        log.warning(
            "SOLVER.STEPS %s has steps beyond SOLVER.MAX_ITER %s; they never apply", tuple(steps), s.MAX_ITER
        )
    return WarmupMultiStepLR(
        optimizer,
        steps=steps,
        gamma=float(s.GAMMA),
        warmup_iters=int(s.WARMUP_ITERS),
        warmup_factor=float(s.WARMUP_FACTOR),
        warmup_method=str(s.WARMUP_METHOD),
    )


def build_grad_clipper(cfg) -> Callable[[torch.optim.Optimizer], None] | None:
    """SOLVER.CLIP_GRADIENTS as a function over the optimizer's parameters (None when disabled).

    "value" and "norm" clip each parameter's gradient on its own (detectron2's behaviour);
    "full_model" clips the norm of all gradients together.
    """
    c = cfg.SOLVER.CLIP_GRADIENTS
    if not c.ENABLED:
        return None
    clip_value, norm_type, kind = float(c.CLIP_VALUE), float(c.NORM_TYPE), str(c.CLIP_TYPE)
    if kind not in ("value", "norm", "full_model"):
        raise SolverError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be value, norm or full_model, got {kind!r}")

    def clip(optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if kind == "value":
            for p in params:
                torch.nn.utils.clip_grad_value_(p, clip_value)
        elif kind == "norm":
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, clip_value, norm_type)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_value, norm_type)

    return clip
