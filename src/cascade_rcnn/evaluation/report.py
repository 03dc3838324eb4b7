"""Human- and pipeline-facing views of COCO metrics: a text table, Markdown, a standalone HTML report
with the precision/recall curves and example predictions drawn on their images, and the flat scalars
of a KFP Metrics artifact.

`metrics` everywhere is evaluate_coco's output: {"bbox"|"segm": {"AP", ..., "AP-<class>"}}, ×100.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cascade_rcnn.evaluation.coco_eval import AP_FAMILY
from cascade_rcnn.figures import PALETTE

TASK_NAMES = {"bbox": "box", "segm": "mask"}


def _fmt(v: float, missing: str) -> str:
    return missing if v is None or math.isnan(v) else f"{v:.3f}"


def _categories(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    names: list[str] = []
    for values in metrics.values():
        for key in values:
            if key.startswith("AP-") and key[3:] not in names:
                names.append(key[3:])
    return names


def _rows(metrics: Mapping[str, Mapping[str, float]], missing: str) -> tuple[list, list, list, list]:
    """-> (family header, family rows, per-category header, per-category rows)."""
    tasks = list(metrics)
    fam_head = ["task", *AP_FAMILY]
    fam_rows = [[task, *(_fmt(metrics[task].get(k, math.nan), missing) for k in AP_FAMILY)] for task in tasks]
    cat_head = ["category", *(f"{TASK_NAMES.get(t, t)} AP" for t in tasks)]
    cat_rows = [
        [name, *(_fmt(metrics[t].get(f"AP-{name}", math.nan), missing) for t in tasks)]
        for name in _categories(metrics)
    ]
    return fam_head, fam_rows, cat_head, cat_rows


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(row: list[str]) -> str:
        # Names left-aligned, numbers right-aligned.
        return " | ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        )

    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """Plain-text tables (AP family per task, then per-category AP) for the terminal; NaN shown as nan."""
    if not metrics:
        return "no metrics"
    fam_head, fam_rows, cat_head, cat_rows = _rows(metrics, "nan")
    out = _text_table(fam_head, fam_rows)
    if cat_rows:
        out += "\n\n" + _text_table(cat_head, cat_rows)
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(head), "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += [row(r) for r in rows]
    return "\n".join(lines)


def markdown_report(
    metrics: Mapping[str, Mapping[str, float]],
    title: str = "COCO evaluation",
    details: Mapping[str, Any] | None = None,
) -> str:
    """Markdown: optional details (checkpoint, split, ...), the box/mask AP families and per-category AP."""
    parts = [f"# {title}", ""]
    for key, value in (details or {}).items():
        parts.append(f"- **{key}**: {value}")
    if details:
        parts.append("")
    if not metrics:
        return "\n".join([*parts, "No metrics.", ""])
    fam_head, fam_rows, cat_head, cat_rows = _rows(metrics, "n/a")
    fam_rows = [[TASK_NAMES.get(r[0], r[0]), *r[1:]] for r in fam_rows]
    parts += ["## AP (COCO, IoU 0.50:0.95, ×100)", "", _md_table(fam_head, fam_rows), ""]
    if cat_rows:
        parts += ["## Per-category AP", "", _md_table(cat_head, cat_rows), ""]
    parts += ["n/a: nothing to average (no ground truth of that size or class).", ""]
    return "\n".join(parts)


def kfp_metrics(metrics: Mapping[str, Mapping[str, float]], per_category: bool = False) -> dict[str, float]:
    """Flat {"bbox/AP": 41.2, "segm/AP50": ...} for a KFP Metrics artifact.

    NaN values are left out: KFP stores metrics as JSON numbers, which cannot be NaN. Per-category AP
    ("bbox/AP-person") only with per_category=True, to keep the run's metrics list short.
    """
    flat: dict[str, float] = {}
    for task, values in metrics.items():
        for key, value in values.items():
            if key.startswith("AP-") and not per_category:
                continue
            if value is not None and math.isfinite(value):
                flat[f"{task}/{key}"] = float(value)
    return flat


@dataclass
class ReportExample:
    """One image for the HTML report: RGB (H,W,3) uint8 at the detections' (original) resolution."""

    image: np.ndarray
    detections: Any  # Detections: boxes XYXY, scores, classes, masks (N,H,W) or None
    class_names: Sequence[str]
    caption: str = ""


def _color(cls: int) -> tuple[int, int, int]:
    return PALETTE[cls % len(PALETTE)]


def draw_detections(
    image_rgb: np.ndarray,
    detections: Any,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """Predicted masks alpha-blended in each class's colour, boxes and "class score" labels -> RGB uint8."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image_rgb.shape} {image_rgb.dtype}")
    img = image_rgb.astype(np.float32)
    boxes = np.asarray(_np(detections.boxes), dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(_np(detections.scores), dtype=np.float32).reshape(-1)
    classes = np.asarray(_np(detections.classes), dtype=np.int64).reshape(-1)
    masks = None if getattr(detections, "masks", None) is None else _np(detections.masks).astype(bool)
    if masks is not None and masks.shape[1:] != img.shape[:2]:
        raise ValueError(f"masks are {masks.shape[1:]} but the image is {img.shape[:2]}")
    keep = np.flatnonzero(scores >= score_threshold)
    # Paint low scores first so the most confident instance ends on top.
    keep = keep[np.argsort(scores[keep], kind="stable")]
    if masks is not None:
        for i in keep:
            color = np.array(_color(int(classes[i])), np.float32)
            img[masks[i]] = img[masks[i]] * (1 - alpha) + color * alpha
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i in keep:
        color = _color(int(classes[i]))
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        cls = int(classes[i])
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        label = f"{name} {scores[i]:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), label, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0  # above the box when it fits
        draw.rectangle([x0, ty, x0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=color)
        draw.text((x0 + 2, ty), label, fill=(0, 0, 0), font=font)
    return np.asarray(out)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def png_base64(image_rgb: np.ndarray, max_side: int = 800) -> str:
    """RGB uint8 image -> base64 PNG, downscaled so the longer side is at most max_side."""
    img = Image.fromarray(image_rgb)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #f3f3f3; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
figure.plot { display: block; margin: 0 0 1.5em; }
figure.plot img { max-width: 100%; height: auto; }
.details td { text-align: left; }
"""


def html_page_start(title: str, details: Mapping[str, Any] | None = None) -> list[str]:
    """The opening of a standalone report page: head with the styles, the title, the details table."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if details:
        parts.append(html_details_table(details))
    return parts


def html_details_table(details: Mapping[str, Any]) -> str:
    table = _html_table(["", ""], [[k, v] for k, v in details.items()])
    return table.replace("<table>", '<table class="details">', 1)


WORST_CLASSES = 5  # per task, the classes whose precision/recall curves the report draws


def worst_classes(values: Mapping[str, float], n: int = WORST_CLASSES) -> list[str]:
    """The n categories with the lowest AP (AP-<name>, NaN left out), lowest first."""
    aps = [(float(v), k[3:]) for k, v in values.items() if k.startswith("AP-") and v is not None]
    return [name for ap, name in sorted(a for a in aps if math.isfinite(a[0]))[:n]]


def _curve_ap(curve: Sequence[float]) -> float:
    return 100.0 * float(np.mean(curve))  # COCO's AP at one IoU: mean precision over the recall points


def pr_figure(curves: Mapping[str, Any], values: Mapping[str, float], task: str):
    """One task's precision/recall curves (coco_eval.pr_curves): every category's mean at IoU 0.50
    and 0.75, then each of the worst classes alone."""
    from cascade_rcnn.figures import line_panel, new_figure, note_panel

    recall = curves["recall"]
    ious = sorted(curves["iou"])
    worst = [c for c in worst_classes(values) if curves["iou"][ious[0]]["classes"].get(c) is not None]
    n = 1 + len(worst)
    cols = n if n <= 4 else 3
    fig, axes = new_figure(math.ceil(n / cols), cols, panel_width=3.6, panel_height=3.0)
    styles = [{"linestyle": "-"}, {"linestyle": "--"}]
    panels = list(axes.flat)

    def draw(ax, get, title: str) -> None:
        series = []
        for iou in ious:
            curve = get(curves["iou"][iou])
            if curve is not None:
                series.append((f"IoU {iou} (AP {_curve_ap(curve):.1f})", recall, curve))
        if not series:
            note_panel(ax, "no ground truth", title)
            return
        line_panel(ax, series, title=title, xlabel="recall", ylabel="precision", styles=styles[: len(series)])
        ax.legend(fontsize=7, frameon=False, loc="lower left")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)

    draw(panels[0], lambda c: c["mean"], f"{TASK_NAMES.get(task, task)}: all classes")
    for ax, name in zip(panels[1:], worst):
        draw(ax, lambda c, name=name: c["classes"].get(name), f"{name} (AP {values[f'AP-{name}']:.1f})")
    for ax in panels[1 + len(worst) :]:
        ax.set_axis_off()
    return fig


def pr_section(metrics: Mapping[str, Mapping[str, float]], curves: Mapping[str, Any]) -> list[str]:
    """The report's precision/recall part: one figure per task."""
    from cascade_rcnn.figures import figure_html

    parts = [
        "<h2>Precision/recall</h2>",
        "<p>COCOeval's interpolated precision at its 101 recall points (all object sizes, up to 100 "
        f"detections per image), over all classes and for the {WORST_CLASSES} classes with the lowest "
        "AP; solid IoU 0.50, dashed IoU 0.75.</p>",
    ]
    for task in curves:
        name = TASK_NAMES.get(task, task)
        fig = pr_figure(curves[task], metrics.get(task, {}), task)
        parts.append(figure_html(fig, f"{name} precision/recall curves at IoU 0.50 and 0.75"))
    return parts


def html_report(
    metrics: Mapping[str, Mapping[str, float]],
    examples: Sequence[ReportExample | tuple] = (),
    title: str = "COCO evaluation",
    details: Mapping[str, Any] | None = None,
    score_threshold: float = 0.5,
    curves: Mapping[str, Any] | None = None,
) -> str:
    """Standalone HTML (no external files): details, the metric tables, the precision/recall curves
    (`curves`: coco_eval.pr_curves per task) and example images with the predicted boxes, labels and
    masks drawn on them, embedded as base64 PNG.

    examples: ReportExample or (image RGB (H,W,3) uint8, Detections, class names[, caption]) tuples.
    """
    parts = html_page_start(title, details)
    if metrics:
        fam_head, fam_rows, cat_head, cat_rows = _rows(metrics, "n/a")
        fam_rows = [[TASK_NAMES.get(r[0], r[0]), *r[1:]] for r in fam_rows]
        parts += ["<h2>AP (COCO, IoU 0.50:0.95, &times;100)</h2>", _html_table(fam_head, fam_rows)]
        if cat_rows:
            parts += ["<h2>Per-category AP</h2>", _html_table(cat_head, cat_rows)]
        parts.append("<p><small>n/a: nothing to average (no ground truth of that size or class).</small></p>")
    else:
        parts.append("<p>No metrics.</p>")
    if curves:
        parts += pr_section(metrics, curves)
    if examples:
        parts.append(f"<h2>Example predictions (score &ge; {score_threshold:g})</h2>")
    for ex in examples:
        ex = ex if isinstance(ex, ReportExample) else ReportExample(*ex)
        drawn = draw_detections(ex.image, ex.detections, ex.class_names, score_threshold)
        caption = html.escape(ex.caption or f"{len(ex.detections.scores)} detections")
        parts.append(
            f'<figure><img alt="{caption}" src="data:image/png;base64,{png_base64(drawn)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
