"""Figures of the HTML reports: matplotlib charts rendered to SVG and embedded as data: URIs.

A page must stand alone: the KFP UI shows an HTML artifact as the srcdoc of an iframe with
sandbox="allow-scripts" (kubeflow/pipelines frontend/src/components/viewers/HTMLViewer.tsx), so it
has no origin of its own and nothing beside the page to load. An SVG image needs no script at all,
scales with the panel and keeps its text as text (svg.fonttype "none"). Figures are built on
matplotlib.figure.Figure directly: no pyplot, no global state, safe in any thread.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

# Colour-blind-friendly hues (Okabe-Ito, then tab10 extras), RGB 0-255, cycled by series or class.
PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (148, 103, 189),
    (140, 86, 75),
    (188, 189, 34),
)
# Lines on white: the palette without its pale yellow.
LINE_COLORS = tuple(f"#{r:02x}{g:02x}{b:02x}" for r, g, b in PALETTE if (r, g, b) != (240, 228, 66))


def new_figure(rows: int, cols: int, *, panel_width: float = 4.2, panel_height: float = 2.9):
    """(Figure, 2-D array of Axes) with rows x cols panels of the given size in inches."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_width * cols, panel_height * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_prop_cycle(color=LINE_COLORS)
        ax.grid(True, color="#dddddd", linewidth=0.6)
        ax.tick_params(labelsize=8)
    return fig, axes


def line_panel(
    ax,
    series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "iteration",
    ylabel: str = "",
    markers: bool = False,
    styles: Sequence[dict[str, Any]] | None = None,
) -> None:
    """One panel: each (label, x, y) series as a line (None/NaN y values are gaps)."""
    for i, (label, xs, ys) in enumerate(series):
        ys = [math.nan if y is None else float(y) for y in ys]
        style = dict(styles[i]) if styles else {}
        style.setdefault("linewidth", 1.3)
        if markers or len(xs) == 1:
            style.setdefault("marker", "o")
            style.setdefault("markersize", 3.5)
        ax.plot(list(xs), ys, label=label, **style)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=7, frameon=False)


def note_panel(ax, text: str, title: str = "") -> None:
    """A panel that says why there is nothing to draw."""
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="#555555", wrap=True)


def svg_bytes(fig) -> bytes:
    """The figure as SVG: text kept as text, fixed ids and no date, so equal figures are equal bytes."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cascade-rcnn"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def figure_html(fig, alt: str, caption: str = "") -> str:
    """<figure> with the chart as an SVG data: URI (and its caption); the figure is released."""
    data = base64.b64encode(svg_bytes(fig)).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure class="plot"><img alt="{html.escape(alt)}" src="data:image/svg+xml;base64,{data}">'
        f"{cap}</figure>"
    )
