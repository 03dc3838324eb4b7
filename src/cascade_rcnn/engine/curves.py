"""The training-curves page: a standalone HTML view of a run's `metrics.jsonl`.

It draws what a person watching a detector train looks at (what TensorBoard shows for detectron2):
each loss and the total over iterations, the learning rate and img/s, and box and mask AP at each
evaluation (TEST.EVAL_PERIOD). `cascade-rcnn train|finetune` leave it as `training_curves.html` in
the output; the train and finetune steps show the same page in the KFP UI.
"""

from __future__ import annotations

import html
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .. import storage
from .metrics import is_eval_row, read_rows

log = logging.getLogger(__name__)

CURVES_HTML = "training_curves.html"

# The loss panels: Cascade R-CNN's nine losses grouped as a reader compares them (its three stages
# side by side); any other loss_* key gets a panel of its own, so no curve is left out.
LOSS_PANELS = (
    ("total loss", ("total_loss",)),
    ("RPN", ("loss_rpn_cls", "loss_rpn_loc")),
    ("mask", ("loss_mask",)),
    ("box classification, per stage", ("loss_cls_stage0", "loss_cls_stage1", "loss_cls_stage2")),
    ("box regression, per stage", ("loss_box_reg_stage0", "loss_box_reg_stage1", "loss_box_reg_stage2")),
)
AP_KEYS = ("AP", "AP50", "AP75")
TASK_TITLES = {"bbox": "box AP", "segm": "mask AP"}


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["iteration"]), r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def eval_series(rows: Sequence[Mapping]) -> dict[str, dict[str, tuple[list[int], list[float | None]]]]:
    """{"[split/]bbox": {"AP": (iterations, values)}, ...} from the evaluation rows (None: NaN)."""
    out: dict[str, dict[str, tuple[list[int], list[float | None]]]] = {}
    for row in rows:
        if not is_eval_row(row):
            continue
        for key, value in row.items():
            prefix, _, metric = key.rpartition("/")
            if not prefix or metric not in AP_KEYS:
                continue
            xs, ys = out.setdefault(prefix, {}).setdefault(metric, ([], []))
            xs.append(int(row["iteration"]))
            ys.append(None if value is None else float(value))
    return out


def _task_title(prefix: str) -> str:
    split, _, task = prefix.rpartition("/")
    title = TASK_TITLES.get(task, f"{task} AP")
    return f"{title} ({split})" if split else title


def loss_figure(train: Sequence[Mapping]):
    from ..figures import line_panel, new_figure

    keys = {k for r in train for k in r if k.startswith("loss") or k == "total_loss"}
    panels = [(t, [k for k in ks if k in keys]) for t, ks in LOSS_PANELS]
    grouped = {k for _, ks in LOSS_PANELS for k in ks}
    panels += [(k, [k]) for k in sorted(keys - grouped)]
    panels = [(t, ks) for t, ks in panels if any(_series(train, k)[0] for k in ks)]
    cols = 3
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = new_figure(rows, cols)
    for ax, (title, ks) in zip(axes.flat, panels):
        series = [(k, *_series(train, k)) for k in ks]
        line_panel(ax, series, title=title, ylabel="loss (median of the log period)")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    return fig


def schedule_figure(train: Sequence[Mapping]):
    from ..figures import line_panel, new_figure

    fig, axes = new_figure(1, 2)
    line_panel(axes[0, 0], [("lr", *_series(train, "lr"))], title="learning rate", ylabel="lr")
    line_panel(
        axes[0, 1], [("img/s", *_series(train, "img_per_s"))], title="speed", ylabel="images per second"
    )
    return fig


def ap_figure(evals: Mapping[str, Mapping[str, tuple[list, list]]]):
    from ..figures import line_panel, new_figure

    prefixes = sorted(evals)
    fig, axes = new_figure(1, len(prefixes))
    for ax, prefix in zip(axes.flat, prefixes):
        series = [(k, *evals[prefix][k]) for k in AP_KEYS if k in evals[prefix]]
        line_panel(ax, series, title=_task_title(prefix), ylabel="AP (×100)", markers=True)
    return fig


def _last(train: Sequence[Mapping], key: str) -> float | None:
    values = _series(train, key)[1]
    return values[-1] if values else None


def summary(rows: Sequence[Mapping]) -> dict[str, str]:
    """The page's details table: how far the run got and its last values."""
    train = [r for r in rows if not is_eval_row(r)]
    evals = eval_series(rows)
    out: dict[str, str] = {}
    if train:
        out["iterations logged"] = f"{train[0]['iteration']} .. {train[-1]['iteration']} ({len(train)} rows)"
        for key, label, fmt in (
            ("total_loss", "last total loss", "{:.4g}"),
            ("lr", "last learning rate", "{:.6g}"),
        ):
            value = _last(train, key)
            if value is not None:
                out[label] = fmt.format(value)
        speeds = [v for v in _series(train, "img_per_s")[1] if math.isfinite(v)]
        if speeds:
            out["img/s (median)"] = f"{statistics.median(speeds):.2f}"
    for prefix in sorted(evals):
        xs, ys = evals[prefix].get("AP", ([], []))
        if xs:
            value = "n/a" if ys[-1] is None else f"{ys[-1]:.3f}"
            out[f"last {_task_title(prefix)}"] = f"{value} at iteration {xs[-1]}"
    return out


def training_curves_html(
    rows: Sequence[Mapping], title: str = "Training curves", details: Mapping[str, Any] | None = None
) -> str:
    """The standalone page for `rows` (metrics.jsonl's training and evaluation rows)."""
    from ..evaluation.report import html_page_start
    from ..figures import figure_html

    train = [r for r in rows if not is_eval_row(r)]
    evals = eval_series(rows)
    parts = html_page_start(title, {**(details or {}), **summary(rows)})
    if not train:
        parts.append("<p>No training rows in metrics.jsonl yet (one is written every 20 iterations).</p>")
    else:
        parts += [
            "<h2>Losses</h2>",
            figure_html(loss_figure(train), "losses over iterations: the total, RPN, mask, and per stage"),
            "<h2>Learning rate and speed</h2>",
            figure_html(schedule_figure(train), "learning rate and images per second over iterations"),
        ]
    parts.append("<h2>AP at each evaluation</h2>")
    if evals:
        parts.append(figure_html(ap_figure(evals), "box and mask AP, AP50 and AP75 at each evaluation"))
    else:
        parts.append(
            "<p>No evaluation during training (TEST.EVAL_PERIOD is 0). The evaluate step's report has "
            "the AP of the final model.</p>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_training_curves(output_uri: str, title: str = "Training curves") -> str:
    """Draw `<output>/metrics.jsonl` into `<output>/training_curves.html`; returns that URI."""
    rows = read_rows(output_uri)
    text = training_curves_html(rows, title, {"output": output_uri})
    uri = storage.join(output_uri, CURVES_HTML)
    storage.put_bytes(text.encode("utf-8"), uri)
    log.info("training curves: %s", uri)
    return uri


def save_curves_page(record: Mapping[str, Any], path: str) -> None:
    """A pipeline step's HTML output: the page the run left (record["training_curves"]), or a page
    that says why there is none."""
    uri = record.get("training_curves")
    if uri:
        storage.get_file(uri, path)
        return
    text = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Training curves</title></head>"
        f"<body><p>No training curves for {html.escape(str(record.get('output_uri', 'this run')))}: "
        "drawing them failed (see the step's log).</p></body></html>"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
