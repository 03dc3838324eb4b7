"""Reports: text/Markdown tables, the standalone HTML with drawn predictions, and KFP scalars."""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn.evaluation.report import (
    ReportExample,
    draw_detections,
    format_table,
    html_report,
    kfp_metrics,
    markdown_report,
)
from cascade_rcnn.structures import Detections

METRICS = {
    "bbox": {"AP": 41.25, "AP50": 60.5, "AP75": 44.0, "APs": math.nan, "APm": 38.0, "APl": 52.125}
    | {"AP-circle": 40.0, "AP-square": math.nan, "AP-tri|angle": 12.5},
    "segm": {"AP": 36.5, "AP50": 58.0, "AP75": 38.75, "APs": 20.0, "APm": 33.0, "APl": 47.0}
    | {"AP-circle": 35.0, "AP-square": 30.0, "AP-tri|angle": 10.0},
}


def test_text_table():
    text = format_table(METRICS)
    lines = text.splitlines()
    assert lines[0].split(" | ")[0].strip() == "task"
    assert [c.strip() for c in lines[2].split("|")] == [
        "bbox",
        "41.250",
        "60.500",
        "44.000",
        "nan",
        "38.000",
        "52.125",
    ]
    assert [c.strip() for c in lines[3].split("|")] == [
        "segm",
        "36.500",
        "58.000",
        "38.750",
        "20.000",
        "33.000",
        "47.000",
    ]
    square = next(line for line in lines if line.startswith("square"))
    assert [c.strip() for c in square.split(" | ")] == ["square", "nan", "30.000"]
    assert format_table({}) == "no metrics"


def test_markdown_report():
    md = markdown_report(METRICS, details={"weights": "s3://b/model_final.pth", "images": 60})
    assert "- **weights**: s3://b/model_final.pth" in md
    assert "| box | 41.250 | 60.500 | 44.000 | n/a | 38.000 | 52.125 |" in md
    assert "| mask | 36.500 | 58.000 | 38.750 | 20.000 | 33.000 | 47.000 |" in md
    assert "| category | box AP | mask AP |" in md
    assert "| tri\\|angle | 12.500 | 10.000 |" in md  # a pipe in a class name does not break the table


def test_kfp_metrics_flat_and_finite():
    flat = kfp_metrics(METRICS)
    assert flat["bbox/AP"] == 41.25 and flat["segm/AP50"] == 58.0
    assert "bbox/APs" not in flat  # NaN cannot be a KFP metric value
    assert not any("AP-" in k for k in flat)
    assert len(flat) == 11
    with_cats = kfp_metrics(METRICS, per_category=True)
    assert with_cats["segm/AP-square"] == 30.0 and "bbox/AP-square" not in with_cats


def _example() -> tuple[np.ndarray, Detections]:
    h, w = 60, 80
    image = np.full((h, w, 3), 100, np.uint8)
    masks = torch.zeros((3, h, w), dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:55, 50:75] = True
    masks[2, 0:5, 0:5] = True
    det = Detections(
        boxes=torch.tensor([[10.0, 10.0, 40.0, 30.0], [50.0, 35.0, 75.0, 55.0], [0.0, 0.0, 5.0, 5.0]]),
        scores=torch.tensor([0.95, 0.7, 0.1]),
        classes=torch.tensor([0, 2, 1]),
        masks=masks,
        image_size=(h, w),
    )
    return image, det


def test_draw_detections_blends_masks_above_threshold():
    image, det = _example()
    drawn = draw_detections(image, det, ["circle", "square", "triangle"], score_threshold=0.5, alpha=0.5)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    # Inside the first mask (away from box edge and label): half grey, half the class-0 colour (230,159,0).
    assert drawn[20, 25].tolist() == [165, 130, 50]
    assert drawn[45, 62].tolist() != [100, 100, 100]
    assert drawn[2, 2].tolist() == [100, 100, 100], "score 0.1 is below the threshold: not drawn"
    assert drawn[58, 2].tolist() == [100, 100, 100], "background untouched"
    with pytest.raises(ValueError, match="masks are"):
        draw_detections(np.zeros((10, 10, 3), np.uint8), det, ["a", "b", "c"])


def test_html_report_is_standalone_with_images_and_tables():
    image, det = _example()
    page = html_report(
        METRICS,
        [
            ReportExample(image, det, ["circle", "square", "triangle"], "val_001.jpg"),
            (image, det, ["a", "b", "c"]),
        ],
        details={"split": "val2017"},
    )
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<td>41.250</td>" in page and "<td>tri|angle</td>" in page and "<td>n/a</td>" in page
    assert "<td>val2017</td>" in page
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 2
    decoded = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert decoded.size == (80, 60)
    assert np.asarray(decoded.convert("RGB"))[20, 25].tolist() == [165, 130, 50]  # the drawn mask is in it
    assert "val_001.jpg" in page
    assert not re.search(r'(src|href)="(?!data:)', page), "no external resources"
