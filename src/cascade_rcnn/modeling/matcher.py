"""IoU-threshold matching of predictions to ground truth (detectron2's Matcher)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction (column) its best ground truth (row) and a label by IoU band.

    thresholds [t1, ..., tk] split [-inf, t1), [t1, t2), ..., [tk, inf) and `labels` (k+1 values in
    {-1, 0, 1}: ignore, negative, positive) names each band. With allow_low_quality_matches, every
    prediction tied at a ground truth's best IoU is made positive (Faster R-CNN RPN rule).
    """

    def __init__(self, thresholds: list[float], labels: list[int], allow_low_quality_matches: bool = False):
        thresholds = list(thresholds)
        if thresholds[0] < 0:
            raise ValueError(f"matcher thresholds must be >= 0, got {thresholds}")
        if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"matcher thresholds must be sorted, got {thresholds}")
        if len(labels) != len(thresholds) + 1 or any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(
                f"matcher labels {labels} must have one value in (-1, 0, 1) per band of thresholds {thresholds}"
            )
        self.thresholds = [-math.inf, *thresholds, math.inf]
        self.labels = list(labels)
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> tuple[Tensor, Tensor]:
        """(G, P) IoU -> matched gt index (P,) int64 and label (P,) int8."""
        num_preds = match_quality_matrix.shape[1]
        if match_quality_matrix.numel() == 0:
            matches = match_quality_matrix.new_full((num_preds,), 0, dtype=torch.int64)
            labels = match_quality_matrix.new_full((num_preds,), self.labels[0], dtype=torch.int8)
            return matches, labels
        matched_vals, matches = match_quality_matrix.max(dim=0)
        match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels[(matched_vals >= low) & (matched_vals < high)] = label
        if self.allow_low_quality_matches:
            best_per_gt, _ = match_quality_matrix.max(dim=1)
            _, pred_inds = torch.nonzero(match_quality_matrix == best_per_gt[:, None], as_tuple=True)
            match_labels[pred_inds] = 1
        return matches, match_labels
