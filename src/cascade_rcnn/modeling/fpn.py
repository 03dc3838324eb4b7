"""Feature Pyramid Network over a ResNet, with the p6 max-pool level (detectron2's
`build_resnet_fpn_backbone`). Outputs p2..p6 at strides 4..64."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import ResNet
from .layers import Conv2d, make_norm
from .weight_init import c2_xavier_fill


class LastLevelMaxPool(nn.Module):
    """p6 = 1x1 max-pool with stride 2 over p5."""

    in_feature = "p5"

    def forward(self, x: Tensor) -> list[Tensor]:
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class FPN(nn.Module):
    """Lateral 1x1 convs, nearest top-down upsampling with sum, 3x3 output convs, then p6."""

    def __init__(
        self,
        bottom_up: ResNet,
        in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5"),
        out_channels: int = 256,
        norm: str = "",
        fuse_type: str = "sum",
    ):
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"MODEL.FPN.FUSE_TYPE must be 'sum' or 'avg', got {fuse_type!r}")
        missing = [f for f in in_features if f not in bottom_up.out_features]
        if missing:
            raise ValueError(f"MODEL.FPN.IN_FEATURES {missing} are not in MODEL.RESNETS.OUT_FEATURES")
        self.bottom_up = bottom_up
        self.in_features = tuple(in_features)
        self.fuse_type = fuse_type
        strides = [bottom_up.output_stride(f) for f in in_features]
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        self._out_strides: dict[str, int] = {}
        for name, stride in zip(in_features, strides):
            level = int(math.log2(stride))
            lateral = Conv2d(
                bottom_up.output_channels(name),
                out_channels,
                1,
                bias=use_bias,
                norm=make_norm(norm, out_channels),
            )
            output = Conv2d(
                out_channels, out_channels, 3, padding=1, bias=use_bias, norm=make_norm(norm, out_channels)
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
            self._out_strides[f"p{level}"] = stride
        # Coarsest first, the order of the top-down pass (plain lists: the convs are registered above).
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]
        self.top_block = LastLevelMaxPool()
        last_level = int(math.log2(strides[-1]))
        self._out_strides[f"p{last_level + 1}"] = strides[-1] * 2
        self.out_features = tuple(self._out_strides)
        self.out_channels = out_channels
        # Inputs are padded to a multiple of the coarsest bottom-up stride.
        self.size_divisibility = strides[-1]

    @classmethod
    def from_config(cls, cfg) -> FPN:
        if cfg.MODEL.BACKBONE.NAME != "build_resnet_fpn_backbone":
            raise ValueError(
                f"MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME!r} is not supported; "
                "only 'build_resnet_fpn_backbone' is"
            )
        return cls(
            ResNet.from_config(cfg),
            in_features=tuple(cfg.MODEL.FPN.IN_FEATURES),
            out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            norm=cfg.MODEL.FPN.NORM,
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )

    def output_stride(self, name: str) -> int:
        return self._out_strides[name]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, 3, H, W), H and W multiples of size_divisibility -> {"p2": ..., "p6": ...}."""
        bottom_up = self.bottom_up(x)
        prev = self.lateral_convs[0](bottom_up[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for i in range(1, len(self.in_features)):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = self.lateral_convs[i](bottom_up[self.in_features[-1 - i]]) + top_down
            if self.fuse_type == "avg":
                prev = prev / 2
            results.insert(0, self.output_convs[i](prev))
        results.extend(self.top_block(results[-1]))
        return dict(zip(self.out_features, results))
