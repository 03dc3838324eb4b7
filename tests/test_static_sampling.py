"""The fixed-row sampler draws from subsample_labels' distribution.

Both samplers pick positives and negatives uniformly without replacement with the same caps. Over
T seeded draws of a 12-row case (5 positives, 4 negatives, 3 ignored; 4 samples at fraction 0.5),
every (positive pair, negative pair) subset is one of 60 cells; Pearson's statistic of the static
sampler's cell counts against the uniform law, and against the dynamic sampler's counts, stays far
below the df = 59 chi-square quantile at p = 1e-6 (about 126). Seeded: the test is deterministic.
"""

from __future__ import annotations

import itertools

import torch

from cascade_rcnn.modeling.sampling import subsample_labels
from cascade_rcnn.modeling.static_sampling import sampled_rows, subsample_masks

LABELS = torch.tensor([1, 0, -1, 1, 0, 1, -1, 0, 1, 0, -1, 1])  # 1 fg, 0 bg, -1 ignore
NUM, FRACTION = 4, 0.5
TRIALS = 20000
CHI2_59_P1E6 = 126.0  # chi-square quantile, df 59, upper tail 1e-6 (Wilson-Hilferty)


def _cells() -> dict[tuple, int]:
    pos = torch.nonzero(LABELS == 1).flatten().tolist()
    neg = torch.nonzero(LABELS == 0).flatten().tolist()
    combos = itertools.product(itertools.combinations(pos, 2), itertools.combinations(neg, 2))
    return {c: i for i, c in enumerate(combos)}


def _static_counts(cells) -> torch.Tensor:
    labels = LABELS.expand(TRIALS, -1)
    pos, neg = subsample_masks(labels == 1, labels == 0, NUM, FRACTION)
    assert (pos.sum(1) == 2).all() and (neg.sum(1) == 2).all()
    assert not (pos & (labels != 1)).any() and not (neg & (labels != 0)).any()
    counts = torch.zeros(len(cells))
    for p, n in zip(pos.tolist(), neg.tolist()):
        key = (tuple(i for i, v in enumerate(p) if v), tuple(i for i, v in enumerate(n) if v))
        counts[cells[key]] += 1
    return counts


def _dynamic_counts(cells) -> torch.Tensor:
    counts = torch.zeros(len(cells))
    for _ in range(TRIALS):
        p, n = subsample_labels(LABELS, NUM, FRACTION, 0)
        counts[cells[(tuple(sorted(p.tolist())), tuple(sorted(n.tolist())))]] += 1
    return counts


def test_static_sampler_matches_the_dynamic_distribution():
    torch.manual_seed(0)
    cells = _cells()
    static = _static_counts(cells)
    dynamic = _dynamic_counts(cells)
    expected = TRIALS / len(cells)
    vs_uniform = ((static - expected) ** 2 / expected).sum().item()
    pooled = (static + dynamic) / 2
    vs_dynamic = (((static - pooled) ** 2 + (dynamic - pooled) ** 2) / pooled).sum().item()
    print(f"chi2 static vs uniform {vs_uniform:.1f}, static vs dynamic {vs_dynamic:.1f} (df 59)")
    assert vs_uniform < CHI2_59_P1E6 and vs_dynamic < CHI2_59_P1E6
    # Sanity of the statistic: a biased sampler (always the lowest-index rows) is rejected.
    biased = torch.zeros(len(cells))
    biased[0] = TRIALS
    assert ((biased - expected) ** 2 / expected).sum().item() > CHI2_59_P1E6


def test_caps_follow_subsample_labels():
    torch.manual_seed(1)
    # Few positives: negatives fill the rest; many: capped at int(num * fraction).
    for n_pos, n_neg, num, frac in [(1, 50, 16, 0.25), (30, 50, 16, 0.25), (0, 3, 8, 0.5), (9, 0, 8, 0.5)]:
        labels = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * 5)[torch.randperm(n_pos + n_neg + 5)]
        p_dyn, n_dyn = subsample_labels(labels, num, frac, 0)
        pos, neg = subsample_masks((labels == 1)[None], (labels == 0)[None], num, frac)
        assert int(pos.sum()) == len(p_dyn) and int(neg.sum()) == len(n_dyn)
        rows, weight = sampled_rows(pos, neg, num)
        assert int(weight.sum()) == len(p_dyn) + len(n_dyn)
        # Sampled positives come first, then negatives; padding rows carry weight 0.
        kinds = torch.where(pos[0, rows[0]], 0, torch.where(neg[0, rows[0]], 1, 2))
        assert torch.equal(kinds, kinds.sort().values)
