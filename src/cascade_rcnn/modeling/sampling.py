"""Random foreground/background subsampling of labelled anchors or proposals."""

from __future__ import annotations

import torch
from torch import Tensor


def subsample_labels(
    labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[Tensor, Tensor]:
    """Pick at most num_samples indices, at most int(num_samples * positive_fraction) positive.

    labels (N,): -1 ignore, `bg_label` background, anything else foreground. Returns (pos_idx, neg_idx).
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm1 = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm2 = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm1], negative[perm2]
