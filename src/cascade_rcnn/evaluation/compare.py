"""Champion versus challenger: the Markdown and HTML views of a promotion decision.

Both take evaluate_coco's metrics ({"bbox"|"segm": {"AP", ..., "AP-<class>"}}, ×100) of each model
on the same evaluation data; the champion's may be None (the first model). The HTML view also draws
each model's AP over its training (`APHistory`), where its training run evaluated (TEST.EVAL_PERIOD).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cascade_rcnn.evaluation.coco_eval import AP_FAMILY
from cascade_rcnn.evaluation.report import (
    TASK_NAMES,
    _categories,
    _html_table,
    _md_table,
    draw_detections,
    html_details_table,
    html_page_start,
    png_base64,
)

Metrics = Mapping[str, Mapping[str, Any]]


def _value(metrics: Metrics | None, task: str, key: str) -> float:
    if metrics is None:
        return math.nan
    v = metrics.get(task, {}).get(key)
    return math.nan if v is None else float(v)


def _cell(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _delta(new: float, old: float) -> str:
    return "n/a" if math.isnan(new) or math.isnan(old) else f"{new - old:+.3f}"


def comparison_rows(challenger: Metrics, champion: Metrics | None) -> tuple[list, list, list, list]:
    """(AP header, AP rows, per-category header, per-category rows), each value as champion,
    challenger and their difference."""
    tasks = [t for t in ("bbox", "segm") if t in challenger or (champion and t in champion)]
    head = ["task", "metric", "champion", "challenger", "delta"]
    rows = []
    for task in tasks:
        for key in AP_FAMILY:
            old, new = _value(champion, task, key), _value(challenger, task, key)
            rows.append([TASK_NAMES.get(task, task), key, _cell(old), _cell(new), _delta(new, old)])
    names = _categories(challenger)
    for name in _categories(champion or {}):
        if name not in names:
            names.append(name)
    cat_head = ["category"]
    for task in tasks:
        t = TASK_NAMES.get(task, task)
        cat_head += [f"{t} AP champion", f"{t} AP challenger", f"{t} delta"]
    cat_rows = []
    for name in names:
        row = [name]
        for task in tasks:
            old, new = _value(champion, task, f"AP-{name}"), _value(challenger, task, f"AP-{name}")
            row += [_cell(old), _cell(new), _delta(new, old)]
        cat_rows.append(row)
    return head, rows, cat_head, cat_rows


def _headline(decision: str, reason: str) -> str:
    return f"{decision.upper()}: {reason}"


def comparison_markdown(
    challenger: Metrics,
    champion: Metrics | None,
    *,
    decision: str,
    reason: str,
    details: Mapping[str, Any] | None = None,
) -> str:
    parts = ["# Champion vs challenger", "", f"**{_headline(decision, reason)}**", ""]
    for key, value in (details or {}).items():
        parts.append(f"- **{key}**: {value}")
    parts.append("")
    head, rows, cat_head, cat_rows = comparison_rows(challenger, champion)
    if champion is None:
        parts += ["There was no champion: the challenger is the first model.", ""]
    parts += ["## AP (COCO, IoU 0.50:0.95, ×100)", "", _md_table(head, rows), ""]
    if cat_rows:
        parts += ["## Per-category AP", "", _md_table(cat_head, cat_rows), ""]
    parts += ["n/a: nothing to average, or no champion.", ""]
    return "\n".join(parts)


@dataclass
class ComparisonExample:
    """One image with both models' detections (the champion's None when there is none)."""

    image: np.ndarray  # RGB (H,W,3) uint8
    challenger: Any  # Detections
    champion: Any | None
    class_names: Sequence[str]
    caption: str = ""


@dataclass
class APHistory:
    """One model's AP during its training run: series as engine.curves.eval_series gives them
    ({"[split/]bbox": {"AP": (iterations, values)}}), and the run's last iteration."""

    series: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float | None]]]] = field(
        default_factory=dict
    )
    last_iteration: int | None = None


def _task_series(history: APHistory, task: str) -> tuple[Sequence[int], Sequence[float | None]]:
    for prefix in sorted(history.series):  # the first validation split when there are several
        if prefix == task or prefix.endswith("/" + task):
            return history.series[prefix].get("AP", ([], []))
    return [], []


def ap_history_figure(
    history: Mapping[str, APHistory], final: Mapping[str, Metrics | None], tasks: Sequence[str]
):
    """Per task, each model's AP at its training run's evaluations (lines) and in this comparison
    (a star at its last iteration)."""
    from cascade_rcnn.figures import LINE_COLORS, new_figure

    fig, axes = new_figure(1, len(tasks))
    for ax, task in zip(axes.flat, tasks):
        for i, who in enumerate(("champion", "challenger")):
            h = history.get(who)
            if h is None:
                continue
            color = LINE_COLORS[i]
            xs, ys = _task_series(h, task)
            if xs:
                values = [math.nan if y is None else y for y in ys]
                ax.plot(xs, values, color=color, marker="o", markersize=3.5, linewidth=1.3,
                        label=f"{who}, during training")  # fmt: skip
            v = _value(final.get(who), task, "AP")
            if h.last_iteration is not None and not math.isnan(v):
                ax.plot([h.last_iteration], [v], color=color, marker="*", markersize=11, linestyle="none",
                        label=f"{who}, this comparison")  # fmt: skip
        ax.set_title(f"{TASK_NAMES.get(task, task)} AP", fontsize=10)
        ax.set_xlabel("iteration of the model's own training run", fontsize=8)
        ax.set_ylabel("AP (×100)", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    return fig


def _history_known(history: Mapping[str, APHistory] | None, tasks: Sequence[str]) -> bool:
    return bool(history) and any(_task_series(h, t)[0] for h in history.values() for t in tasks)


def comparison_html(
    challenger: Metrics,
    champion: Metrics | None,
    examples: Sequence[ComparisonExample] = (),
    *,
    decision: str,
    reason: str,
    details: Mapping[str, Any] | None = None,
    score_threshold: float = 0.5,
    history: Mapping[str, APHistory] | None = None,
) -> str:
    """Standalone HTML: the decision, the AP tables with deltas, both models' AP over their training
    (`history`: {"champion"|"challenger": APHistory}, where known), and each example image twice
    (champion left, challenger right) with the predictions drawn."""
    parts = html_page_start("Champion vs challenger")
    parts.append(f"<p><strong>{html.escape(_headline(decision, reason))}</strong></p>")
    if details:
        parts.append(html_details_table(details))
    head, rows, cat_head, cat_rows = comparison_rows(challenger, champion)
    parts += ["<h2>AP (COCO, IoU 0.50:0.95, &times;100)</h2>", _html_table(head, rows)]
    if cat_rows:
        parts += ["<h2>Per-category AP</h2>", _html_table(cat_head, cat_rows)]
    tasks = [t for t in ("bbox", "segm") if t in challenger or (champion and t in champion)]
    parts.append("<h2>AP over training</h2>")
    if _history_known(history, tasks):
        from cascade_rcnn.figures import figure_html

        fig = ap_history_figure(history or {}, {"champion": champion, "challenger": challenger}, tasks)
        parts.append(figure_html(fig, "champion and challenger AP at each evaluation of their training"))
        parts.append(
            "<p><small>Lines: each model's evaluations during its own training run (its validation "
            "split, TEST.EVAL_PERIOD); stars: this comparison's evaluation.</small></p>"
        )
    else:
        parts.append(
            "<p>Not known: neither model was evaluated during its training (TEST.EVAL_PERIOD 0), or its "
            "training run's metrics.jsonl is gone.</p>"
        )
    if examples:
        parts.append(f"<h2>Examples (score &ge; {score_threshold:g}): champion | challenger</h2>")
    for ex in examples:
        parts.append("<div>")
        for who, det in (("champion", ex.champion), ("challenger", ex.challenger)):
            if det is None:
                parts.append(f"<figure><figcaption>{who}: none</figcaption></figure>")
                continue
            drawn = draw_detections(ex.image, det, ex.class_names, score_threshold)
            caption = html.escape(f"{who}: {ex.caption} ({len(det.scores)} detections)")
            parts.append(
                f'<figure><img alt="{caption}" src="data:image/png;base64,{png_base64(drawn, 480)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
