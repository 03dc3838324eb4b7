"""What loading weights into a model did, in detectron2's grouped-key report format."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What `load_into_model` did. Keys are model names (checkpoint names for `unexpected`).

    `expected` counts the model tensors a checkpoint can supply: the model's state_dict (parameters
    and persistent buffers, FrozenBN statistics included; non-persistent buffers such as the pixel
    mean and cell anchors are not in it) minus BatchNorm's num_batches_tracked counters, which
    load_weights drops from every file. Every one of them is in exactly one of `loaded` (taken from the checkpoint),
    `filled_bn_stats` (running stats set to 0/1 because the file has none), `missing` and
    `shape_mismatch`, so a complete load reads `len(loaded) == expected`.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    filled_bn_stats: list[str] = field(default_factory=list)
    expected: int = 0

    @property
    def complete(self) -> bool:
        """Every expected model tensor came from the checkpoint or was a filled BN statistic."""
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        """One line of counts, e.g. "loaded 315 of 323 model tensors, 8 missing"."""
        parts = [f"loaded {len(self.loaded)} of {self.expected} model tensors"]
        if self.filled_bn_stats:
            parts.append(f"{len(self.filled_bn_stats)} BN statistics set to mean 0 / var 1")
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.shape_mismatch:
            parts.append(f"{len(self.shape_mismatch)} skipped for their shape")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint tensors unused")
        return ", ".join(parts)

    def format(self) -> str:
        lines = []
        for key, ckpt_shape, model_shape in self.shape_mismatch:
            lines.append(
                f"Skip loading '{key}': shape {tuple(ckpt_shape)} in the checkpoint but "
                f"{tuple(model_shape)} in the model."
            )
        if self.missing:
            lines.append("Some model parameters or buffers are not found in the checkpoint:")
            lines += [f"  {g}" for g in group_keys(self.missing)]
        if self.unexpected:
            lines.append("The checkpoint contains keys that are not used by the model:")
            lines += [f"  {g}" for g in group_keys(self.unexpected)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format() or self.summary().capitalize() + "."


def group_keys(keys: list[str]) -> list[str]:
    """Compress dotted names into readable groups.

    ["a.0.w", "a.0.b", "a.1.w", "a.1.b"] -> ["a.{0, 1}.{b, w}"]. Only keys with the same number
    of components are merged, and a group is always the full product of its alternatives.
    """
    by_len: dict[int, list[list[frozenset]]] = {}
    for k in keys:
        parts = k.split(".")
        by_len.setdefault(len(parts), []).append([frozenset([p]) for p in parts])
    out: list[str] = []
    for n, groups in by_len.items():
        changed = True
        while changed:
            changed = False
            for pos in reversed(range(n)):
                merged: dict[tuple, set] = {}
                order: list[tuple] = []
                for g in groups:
                    sig = tuple(g[:pos] + g[pos + 1 :])
                    if sig not in merged:
                        merged[sig] = set()
                        order.append(sig)
                    merged[sig] |= g[pos]
                if len(order) < len(groups):
                    changed = True
                    groups = [list(sig[:pos]) + [frozenset(merged[sig])] + list(sig[pos:]) for sig in order]
        for g in groups:
            out.append(
                ".".join(next(iter(s)) if len(s) == 1 else "{" + ", ".join(sorted(s)) + "}" for s in g)
            )
    return sorted(out)
