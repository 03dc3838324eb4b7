"""Caffe2-style weight initializations used by detectron2 (fvcore `weight_init`)."""

from __future__ import annotations

from torch import nn


def c2_msra_fill(module: nn.Module) -> None:
    """He normal init with fan_out (Caffe2's MSRAFill); bias 0."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill, which is kaiming_uniform with a=1; bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def normal_fill(module: nn.Module, std: float) -> None:
    """Normal(0, std) weights, bias 0 (RPN, box predictor, mask predictor)."""
    nn.init.normal_(module.weight, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)
