"""ResNet bottom-up backbone (detectron2's `build_resnet_backbone` for bottleneck depths).

Module names give detectron2's state-dict keys: `stem.conv1`, `res2.0.conv1`, `res2.0.shortcut`, ...
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .layers import Conv2d, FrozenBatchNorm2d, make_norm
from .weight_init import c2_msra_fill

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU, then 3x3/2 max-pool: total stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.conv1 = Conv2d(
            in_channels, out_channels, 7, stride=2, padding=3, bias=False, norm=make_norm(norm, out_channels)
        )
        c2_msra_fill(self.conv1)
        self.out_channels = out_channels
        self.stride = 4

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; the stride sits in the first 1x1 when stride_in_1x1 (MSRA)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck_channels: int,
        stride: int = 1,
        num_groups: int = 1,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = True,
        dilation: int = 1,
    ):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels, out_channels, 1, stride=stride, bias=False, norm=make_norm(norm, out_channels)
            )
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            1,
            stride=stride_1x1,
            bias=False,
            norm=make_norm(norm, bottleneck_channels),
        )
        self.conv2 = Conv2d(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride_3x3,
            padding=dilation,
            bias=False,
            groups=num_groups,
            dilation=dilation,
            norm=make_norm(norm, bottleneck_channels),
        )
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, 1, bias=False, norm=make_norm(norm, out_channels)
        )
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                c2_msra_fill(layer)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class ResNet(nn.Module):
    """Stem + res2..res5 stages, returning the requested stage outputs by name."""

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 3,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        num_groups: int = 1,
        width_per_group: int = 64,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = True,
        res5_dilation: int = 1,
        out_features: tuple[str, ...] = STAGE_NAMES,
        freeze_at: int = 2,
    ):
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"MODEL.RESNETS.DEPTH {depth} is not supported; expected one of {sorted(BLOCKS_PER_STAGE)}"
            )
        if res5_dilation != 1:
            raise ValueError(f"MODEL.RESNETS.RES5_DILATION {res5_dilation} is not supported; only 1 is")
        unknown = [f for f in out_features if f not in ("stem", *STAGE_NAMES)]
        if unknown:
            raise ValueError(f"MODEL.RESNETS.OUT_FEATURES has unknown names {unknown}")
        self.stem = BasicStem(in_channels, stem_out_channels, norm)
        self.out_features = tuple(out_features)
        self._out_channels = {"stem": stem_out_channels}
        self._out_strides = {"stem": 4}
        last_stage = max(STAGE_NAMES.index(f) for f in out_features if f != "stem") + 2
        in_ch, out_ch = stem_out_channels, res2_out_channels
        bottleneck = num_groups * width_per_group
        stride = 4
        self.stage_names: list[str] = []
        for stage_idx, num_blocks in zip(range(2, last_stage + 1), BLOCKS_PER_STAGE[depth]):
            first_stride = 1 if stage_idx == 2 else 2
            blocks = []
            for i in range(num_blocks):
                blocks.append(
                    BottleneckBlock(
                        in_ch,
                        out_ch,
                        bottleneck,
                        stride=first_stride if i == 0 else 1,
                        num_groups=num_groups,
                        norm=norm,
                        stride_in_1x1=stride_in_1x1,
                    )
                )
                in_ch = out_ch
            name = f"res{stage_idx}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            stride *= first_stride
            self._out_channels[name] = out_ch
            self._out_strides[name] = stride
            out_ch *= 2
            bottleneck *= 2
        # freeze_at=1 freezes the stem, 2 also res2, and so on.
        if freeze_at >= 1:
            _freeze(self.stem)
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                _freeze(getattr(self, name))

    @classmethod
    def from_config(cls, cfg) -> ResNet:
        r = cfg.MODEL.RESNETS
        if any(r.DEFORM_ON_PER_STAGE):
            raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE: deformable convolutions are not supported")
        return cls(
            depth=r.DEPTH,
            in_channels=len(cfg.MODEL.PIXEL_MEAN),
            stem_out_channels=r.STEM_OUT_CHANNELS,
            res2_out_channels=r.RES2_OUT_CHANNELS,
            num_groups=r.NUM_GROUPS,
            width_per_group=r.WIDTH_PER_GROUP,
            norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1,
            res5_dilation=r.RES5_DILATION,
            out_features=tuple(r.OUT_FEATURES),
            freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        )

    def output_channels(self, name: str) -> int:
        return self._out_channels[name]

    def output_stride(self, name: str) -> int:
        return self._out_strides[name]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, C, H, W) normalized images -> {name: (N, C_name, H/stride, W/stride)}."""
        outputs = {}
        x = self.stem(x)
        if "stem" in self.out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs
