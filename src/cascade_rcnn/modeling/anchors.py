"""Anchor generator with detectron2's numerics: unrounded cell anchors, fixed strides, offset 0."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """(len(sizes) * len(aspect_ratios), 4) XYXY anchors centred at 0, size-major, ratio = h / w."""
    anchors = []
    for size in sizes:
        area = size**2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


def _per_level(values: Sequence, num_levels: int, key: str) -> list:
    if not isinstance(values[0], (list, tuple)):
        return [list(values)] * num_levels
    if len(values) == 1:
        return [list(values[0])] * num_levels
    if len(values) != num_levels:
        raise ValueError(f"{key} has {len(values)} entries for {num_levels} feature levels")
    return [list(v) for v in values]


class AnchorGenerator(nn.Module):
    """Per level, the cell anchors shifted to every feature-map cell's top-left corner (+ offset)."""

    def __init__(
        self,
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
        strides: Sequence[int],
        offset: float = 0.0,
    ):
        super().__init__()
        self.strides = [int(s) for s in strides]
        num_levels = len(self.strides)
        sizes = _per_level(sizes, num_levels, "MODEL.ANCHOR_GENERATOR.SIZES")
        aspect_ratios = _per_level(aspect_ratios, num_levels, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"MODEL.ANCHOR_GENERATOR.OFFSET must be in [0, 1), got {offset}")
        self.offset = offset
        self.num_levels = num_levels
        for i, (s, r) in enumerate(zip(sizes, aspect_ratios)):
            self.register_buffer(f"cell_anchors_{i}", cell_anchors(s, r), persistent=False)
        self.num_anchors = [len(s) * len(r) for s, r in zip(sizes, aspect_ratios)]
        if len(set(self.num_anchors)) != 1:
            raise ValueError(f"every level needs the same number of anchors, got {self.num_anchors}")

    @property
    def cell_anchors(self) -> list[Tensor]:
        return [getattr(self, f"cell_anchors_{i}") for i in range(self.num_levels)]

    def grid_anchors(self, grid_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """[(H_l, W_l)] -> per level (H_l * W_l * A, 4), ordered (y, x, anchor)."""
        anchors = []
        for (h, w), stride, base in zip(grid_sizes, self.strides, self.cell_anchors):
            device = base.device
            shifts_x = torch.arange(
                self.offset * stride, w * stride, step=stride, dtype=torch.float32, device=device
            )
            shifts_y = torch.arange(
                self.offset * stride, h * stride, step=stride, dtype=torch.float32, device=device
            )
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Feature maps (N, C, H_l, W_l) -> anchors per level (H_l * W_l * A, 4), shared by the batch."""
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features])
