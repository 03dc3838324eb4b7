"""Convolution with an attached norm layer, FrozenBatchNorm2d and the norm factory.

The attached norm lives at `<conv>.norm`, which gives detectron2's state-dict names
(e.g. `res2.0.conv1.norm.running_mean`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F

from .weight_init import c2_msra_fill


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (all buffers), eps 1e-5.

    Differs from torchvision's in two places, both to match detectron2: a fresh layer has
    running_var = 1 - eps (so it is the identity), and without autograd it runs the fused
    `F.batch_norm` kernel, whose rounding is detectron2's at inference.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps)
        self.running_var.fill_(1.0 - eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            # batch_norm's backward would also compute (unused) weight/bias gradients.
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            # One fused pass over x (x * scale + bias) instead of a multiply and an add that each read it.
            return torch.addcmul(
                bias.reshape(1, -1, 1, 1).to(x.dtype), x, scale.reshape(1, -1, 1, 1).to(x.dtype)
            )
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm2d/SyncBatchNorm in `module` by a FrozenBatchNorm2d with its values."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


NORMS = ("", "FrozenBN", "BN", "SyncBN", "GN")


def make_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """The norm layer named by a config value (MODEL.RESNETS.NORM, MODEL.FPN.NORM, ...); "" means none."""
    if norm == "":
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unsupported norm {norm!r}; expected one of {NORMS}")


class Conv2d(nn.Conv2d):
    """nn.Conv2d followed by an optional norm (`self.norm`) and activation."""

    def __init__(
        self,
        *args,
        norm: Optional[nn.Module] = None,
        activation: Optional[Callable[[Tensor], Tensor]] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def add_conv_stack(
    module: nn.Module, name: str, num_conv: int, in_channels: int, conv_dim: int, conv_norm: str
) -> int:
    """Add `num_conv` 3x3 conv (+ `conv_norm`) + ReLU layers named f"{name}1", f"{name}2", ... to
    `module`, MSRA-initialised as detectron2's RoI heads do; returns the channels they output."""
    channels = in_channels
    for k in range(num_conv):
        conv = Conv2d(
            channels,
            conv_dim,
            3,
            padding=1,
            bias=not conv_norm,
            norm=make_norm(conv_norm, conv_dim),
            activation=F.relu,
        )
        c2_msra_fill(conv)
        module.add_module(f"{name}{k + 1}", conv)
        channels = conv_dim
    return channels
