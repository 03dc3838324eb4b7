"""subsample_labels over fixed rows: the same distribution, masks instead of index lists.

detectron2 keeps min(#pos, int(n * fraction)) positives and min(#neg, n - kept positives) negatives,
each a uniform draw without replacement. Ranking i.i.d. uniform keys within each group and keeping
the lowest ranks is such a draw, and needs no data-dependent shape.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _ranks(group: Tensor, keys: Tensor) -> Tensor:
    """(N, R) rank of each row's key among the rows of its group (others ranked after them)."""
    order = torch.argsort(torch.where(group, keys, 2.0), dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def subsample_masks(
    positive: Tensor, negative: Tensor, num_samples: int, positive_fraction: float
) -> tuple[Tensor, Tensor]:
    """positive, negative (N, R) bool -> the sampled positive and negative rows (N, R) bool."""
    keys = torch.rand(positive.shape, device=positive.device)
    num_pos = positive.sum(dim=1).clamp(max=int(num_samples * positive_fraction))
    num_neg = negative.sum(dim=1).clamp(max=num_samples - num_pos)
    pos = positive & (_ranks(positive, keys) < num_pos[:, None])
    neg = negative & (_ranks(negative, keys) < num_neg[:, None])
    return pos, neg


def sampled_rows(pos: Tensor, neg: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """The first `num_rows` rows per image, sampled positives first, then negatives, then the rest.

    Returns row indices (N, num_rows) and their weight (N, num_rows) bool (sampled or padding).
    """
    group = torch.where(pos, 0, torch.where(neg, 1, 2))
    rows = torch.argsort(group, dim=1, stable=True)[:, :num_rows]
    return rows, torch.gather(pos | neg, 1, rows)
