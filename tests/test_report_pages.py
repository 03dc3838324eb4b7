"""The report pages as a reader sees them: the training curves, the evaluation report with its
precision/recall curves, and the champion/challenger comparison with both models' AP over training.

Each page is drawn from realistic inputs (metrics.jsonl rows as the trainer writes them; COCOeval on
jittered, missed and false detections) and rendered in headless Chromium, alone and as the KFP UI
shows an HTML artifact (the srcdoc of a sandboxed iframe): it must load without a console error or a
failed load, and every figure must decode to a nonzero size (tests/browser.py). The pipeline's own
pages go through the same check in test_pipeline_local.py and test_retraining.py.
"""

from __future__ import annotations

import base64
import copy
import math
import re

import numpy as np
import pytest
from browser import check_page
from test_evaluation_coco import CONTIGUOUS_TO_ID, make_gt, make_predictions

from cascade_rcnn.engine.curves import LOSS_PANELS, eval_series, training_curves_html
from cascade_rcnn.evaluation.coco_eval import PR_IOUS, coco_evaluation, detections_to_coco_results
from cascade_rcnn.evaluation.compare import APHistory, comparison_html
from cascade_rcnn.evaluation.report import ReportExample, html_report, worst_classes

LOSSES = [k for _, keys in LOSS_PANELS for k in keys if k != "total_loss"]


def svgs(page: str) -> list[str]:
    """The SVG text of each figure of a page."""
    return [base64.b64decode(s).decode() for s in re.findall(r"data:image/svg\+xml;base64,([^\"]+)", page)]


def training_rows(iterations: int = 400, eval_period: int = 100, seed: int = 0) -> list[dict]:
    """metrics.jsonl as MetricsWriter writes it: a row every 20 iterations, an evaluation row every
    eval_period (one task's AP undefined once, stored as null)."""
    rng = np.random.default_rng(seed)
    rows = []
    for it in range(19, iterations, 20):
        decay = math.exp(-it / 150)
        losses = {k: 0.05 + decay * float(rng.uniform(0.2, 0.6)) for k in LOSSES}
        rows.append({
            "iteration": it, "total_loss": sum(losses.values()), **losses,
            "lr": 0.02 * min(1.0, (it + 1) / 100), "time": 0.25, "img_per_s": 16 + float(rng.uniform(-1, 1)),
            "data_time": 0.01, "eta_seconds": 10.0, "max_mem_mb": 900.0,
        })  # fmt: skip
        if (it + 1) % eval_period == 0:
            ap = 40 * (1 - decay)
            rows.append({
                "iteration": it, "bbox/AP": ap, "bbox/AP50": ap * 1.5, "bbox/AP75": ap * 1.05,
                "segm/AP": None if it < eval_period else ap * 0.9, "segm/AP50": ap * 1.4, "segm/AP75": ap,
                "bbox/AP-circle": ap,
            })  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def evaluation():
    gt = make_gt(num_images=10)
    gt["categories"] = [*gt["categories"], {"id": 9, "name": "hexagon"}]  # no ground truth at all
    results = detections_to_coco_results(make_predictions(gt), CONTIGUOUS_TO_ID)
    return gt, coco_evaluation(gt, results)


def test_pr_curves_average_to_coco_ap50_and_ap75(evaluation):
    _, found = evaluation
    for task in ("bbox", "segm"):
        curves, metrics = found.curves[task], found.metrics[task]
        assert len(curves["recall"]) == 101 and curves["recall"][0] == 0 and curves["recall"][-1] == 1
        assert sorted(curves["iou"]) == [f"{iou:.2f}" for iou in PR_IOUS]
        for iou, key in (("0.50", "AP50"), ("0.75", "AP75")):
            mean = curves["iou"][iou]["mean"]
            assert 100 * np.mean(mean) == pytest.approx(metrics[key], abs=0.01)  # values kept to 4 digits
            assert all(0 <= p <= 1 for p in mean) and mean == sorted(mean, reverse=True)  # interpolated
            classes = curves["iou"][iou]["classes"]
            assert classes["hexagon"] is None  # no ground truth: no curve, not a curve of zeros
            valid = [c for c in classes.values() if c is not None]
            assert len(valid) == 3
            assert np.mean(valid, axis=0) == pytest.approx(mean, abs=1e-4)
        # A stricter IoU never has more precision.
        assert all(a >= b for a, b in zip(curves["iou"]["0.50"]["mean"], curves["iou"]["0.75"]["mean"]))


def test_worst_classes_are_the_lowest_defined_ap():
    values = {"AP": 30.0, "AP-a": 50.0, "AP-b": float("nan"), "AP-c": 10.0, "AP-d": 20.0, "AP-e": None}
    assert worst_classes(values, 2) == ["c", "d"]
    assert worst_classes(values) == ["c", "d", "a"]


def test_training_curves_page(tmp_path, chromium):
    rows = training_rows()
    page = training_curves_html(rows, details={"output": "s3://bucket/runs/1/train"})
    path = tmp_path / "training_curves.html"
    path.write_text(page)
    check_page(chromium, path, min_figures=3)
    losses, schedule, ap = svgs(page)
    for name in LOSSES:  # the nine losses, each drawn
        assert name in losses or name == "loss_mask", name
    for title in ("total loss", "RPN", "mask", "box classification, per stage", "box regression, per stage"):
        assert title in losses, title
    assert "learning rate" in schedule and "images per second" in schedule
    assert "box AP" in ap and "mask AP" in ap and "AP50" in ap
    assert "at iteration 399" in page  # the last evaluation, in the details
    assert not re.search(r'(src|href)="(?!data:)', page), "no external resources"
    assert "<script" not in page


def test_training_curves_of_a_run_without_evaluations(tmp_path, chromium):
    rows = [r for r in training_rows() if "bbox/AP" not in r]
    page = training_curves_html(rows)
    assert "No evaluation during training (TEST.EVAL_PERIOD is 0)" in page
    path = tmp_path / "curves.html"
    path.write_text(page)
    check_page(chromium, path, min_figures=2)
    assert "No training rows" in training_curves_html([])


def test_eval_series_reads_each_split_and_task():
    rows = [
        {"iteration": 9, "val/bbox/AP": 1.0, "val/segm/AP": None, "test/bbox/AP": 2.0, "val/bbox/AP-x": 5.0},
        {"iteration": 19, "total_loss": 1.0},
        {"iteration": 19, "val/bbox/AP": 3.0, "val/segm/AP": 4.0, "test/bbox/AP": 5.0},
    ]
    series = eval_series(rows)
    assert series["val/bbox"]["AP"] == ([9, 19], [1.0, 3.0])
    assert series["val/segm"]["AP"] == ([9, 19], [None, 4.0])
    assert series["test/bbox"]["AP"] == ([9, 19], [2.0, 5.0])


def test_evaluation_report_page(tmp_path, chromium, evaluation):
    gt, found = evaluation
    image = np.full((60, 80, 3), 90, np.uint8)
    import torch

    from cascade_rcnn.structures import Detections

    det = Detections(
        image_size=(60, 80),
        boxes=torch.tensor([[5.0, 5.0, 40.0, 40.0]]),
        scores=torch.tensor([0.9]),
        classes=torch.tensor([0]),
        masks=torch.zeros((1, 60, 80), dtype=torch.bool),
    )
    page = html_report(
        found.metrics,
        [ReportExample(image, det, ["circle", "square", "triangle"], "img_001.jpg")],
        details={"split": "val2017"},
        curves=found.curves,
    )
    path = tmp_path / "report.html"
    path.write_text(page)
    check_page(chromium, path, min_figures=3)
    box, mask = svgs(page)
    for svg, task in ((box, "bbox"), (mask, "segm")):
        assert "all classes" in svg and "IoU 0.50" in svg and "IoU 0.75" in svg
        for name in worst_classes(found.metrics[task]):
            assert name in svg, name
        assert "hexagon" not in svg  # no ground truth: no AP, so not among the worst
    assert "<h2>Precision/recall</h2>" in page


def test_comparison_page(tmp_path, chromium, evaluation):
    _, found = evaluation
    champion = copy.deepcopy(found.metrics)
    champion["bbox"]["AP"] -= 3.0
    challenger_rows = training_rows(eval_period=100)
    champion_rows = training_rows(iterations=200, eval_period=50, seed=1)
    history = {
        "challenger": APHistory(eval_series(challenger_rows), 399),
        "champion": APHistory(eval_series(champion_rows), 199),
    }
    page = comparison_html(
        found.metrics, champion, decision="promoted", reason="segm/AP improved", history=history
    )
    path = tmp_path / "comparison.html"
    path.write_text(page)
    check_page(chromium, path, min_figures=1)
    (svg,) = svgs(page)
    for label in ("champion, during training", "challenger, during training", "this comparison"):
        assert label in svg, label
    assert "box AP" in svg and "mask AP" in svg

    first = comparison_html(found.metrics, None, decision="promoted", reason="first model", history={})
    assert "Not known" in first and not svgs(first)


def test_the_check_sees_what_a_reader_would_miss(tmp_path, chromium):
    """A page that needs the network (a CDN script), throws, or shows a broken image fails."""
    cdn = tmp_path / "cdn.html"
    cdn.write_text(
        '<!DOCTYPE html><html><head><script src="https://cdn.jsdelivr.net/npm/vega@5"></script></head>'
        "<body><img alt='x' src='data:image/svg+xml;base64,"
        + base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>').decode()
        + "'></body></html>"
    )
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><img alt='gone' src='data:image/png;base64,AAAA'></body></html>"
    )
    throws = tmp_path / "throws.html"
    throws.write_text(
        "<!DOCTYPE html><html><body><svg width='9' height='9'></svg><script>null.x</script></body></html>"
    )
    for path, words in ((cdn, "ERR_"), (broken, "did not decode"), (throws, "TypeError")):
        with pytest.raises(AssertionError, match=words):
            check_page(chromium, path)
