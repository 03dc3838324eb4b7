"""COCO conversion and AP: our evaluate_coco against a direct pycocotools COCOeval run."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cascade_rcnn.evaluation.coco_eval import (
    AP_FAMILY,
    detections_to_coco_json,
    detections_to_coco_results,
    evaluate_coco,
    load_metrics_json,
    save_json,
)
from cascade_rcnn.structures import Detections

# Non-contiguous, unsorted ids so a wrong contiguous<->dataset mapping shows.
CATEGORIES = [{"id": 7, "name": "triangle"}, {"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]
CONTIGUOUS_TO_ID = [1, 3, 7]  # contiguous ids follow sorted dataset ids, as the COCO reader assigns them


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[float]:
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    elif kind == "square":
        pts = np.array([[cx - r, cy - r], [cx + r, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    else:
        pts = np.array([[cx, cy - r], [cx + r, cy + r], [cx - r, cy + r]])
    return [float(v) for v in pts.reshape(-1)]


def make_gt(num_images: int = 8, seed: int = 0) -> dict:
    """A COCO instances dict with polygons of all three area ranges and one crowd region."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for img_id in range(1, num_images + 1):
        h, w = int(rng.integers(220, 300)), int(rng.integers(240, 320))
        images.append({"id": img_id * 10, "file_name": f"img_{img_id:03d}.jpg", "height": h, "width": w})
        for _ in range(int(rng.integers(2, 6))):
            cat = CATEGORIES[int(rng.integers(0, 3))]
            r = float(rng.choice([8.0, 25.0, 60.0]) * rng.uniform(0.8, 1.2))  # small / medium / large
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            poly = _polygon(cat["name"], cx, cy, r)
            rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
            x, y, bw, bh = mask_util.toBbox(rle).tolist()
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id * 10,
                    "category_id": cat["id"],
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "bbox": [x, y, bw, bh],
                    "iscrowd": 0,
                }
            )
    # A crowd region (RLE) in the first image: detections on it are ignored, not false positives.
    h, w = images[0]["height"], images[0]["width"]
    crowd = np.zeros((h, w), np.uint8)
    crowd[5:40, 5:60] = 1
    rle = mask_util.encode(np.asfortranarray(crowd))
    anns.append(
        {
            "id": len(anns) + 1,
            "image_id": images[0]["id"],
            "category_id": 1,
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_util.area(rle)),
            "bbox": mask_util.toBbox(rle).tolist(),
            "iscrowd": 1,
        }
    )
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def make_predictions(gt: dict, seed: int = 1) -> list[dict]:
    """Per-image Detections from GT: jittered boxes, shifted masks, misses and false positives."""
    rng = np.random.default_rng(seed)
    id_to_contig = {d: i for i, d in enumerate(CONTIGUOUS_TO_ID)}
    preds = []
    for img in gt["images"]:
        h, w = img["height"], img["width"]
        boxes, scores, classes, masks = [], [], [], []
        for ann in gt["annotations"]:
            if ann["image_id"] != img["id"] or ann["iscrowd"] or rng.random() < 0.15:
                continue
            x, y, bw, bh = ann["bbox"]
            j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            boxes.append([x + j[0], y + j[1], x + bw + j[2], y + bh + j[3]])
            m = mask_util.decode(mask_util.frPyObjects(ann["segmentation"], h, w)).max(2)
            dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
            masks.append(np.roll(m, (dy, dx), (0, 1)).astype(bool))
            scores.append(float(rng.uniform(0.3, 1.0)))
            cat = ann["category_id"] if rng.random() > 0.1 else CONTIGUOUS_TO_ID[int(rng.integers(0, 3))]
            classes.append(id_to_contig[cat])
        for _ in range(int(rng.integers(0, 3))):  # false positives
            x0, y0 = rng.uniform(0, w - 50), rng.uniform(0, h - 50)
            s = rng.uniform(10, 50)
            boxes.append([x0, y0, x0 + s, y0 + s])
            m = np.zeros((h, w), bool)
            m[int(y0) : int(y0 + s), int(x0) : int(x0 + s)] = True
            masks.append(m)
            scores.append(float(rng.uniform(0.05, 0.6)))
            classes.append(int(rng.integers(0, 3)))
        n = len(boxes)
        dets = Detections(
            image_size=(h, w),
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            scores=torch.tensor(scores, dtype=torch.float32),
            classes=torch.tensor(classes, dtype=torch.int64),
            masks=torch.from_numpy(np.stack(masks)) if n else torch.zeros((0, h, w), dtype=torch.bool),
        )
        preds.append({"image_id": img["id"], "instances": dets})
    return preds


def pycocotools_reference(gt: dict, results: list[dict], iou_type: str) -> tuple[np.ndarray, np.ndarray]:
    """stats[0:6] and precision from an untouched pycocotools COCOeval run, the way detectron2 calls it."""
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt)
    dts = copy.deepcopy(results)
    if iou_type == "segm":
        for r in dts:
            r.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dts), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6], ev.eval["precision"]


@pytest.fixture(scope="module")
def gt_and_results(tmp_path_factory):
    gt = make_gt()
    path = tmp_path_factory.mktemp("coco") / "instances_val.json"
    path.write_text(json.dumps(gt))
    results = detections_to_coco_results(make_predictions(gt), CONTIGUOUS_TO_ID)
    return gt, path, results


def test_results_json_format(gt_and_results):
    gt, _, results = gt_and_results
    preds = make_predictions(gt)
    first = preds[0]["instances"]
    out = detections_to_coco_json(first, preds[0]["image_id"], {0: 1, 1: 3, 2: 7})
    assert len(out) == len(first.boxes)
    json.dumps(results)  # serialisable: counts are ASCII, numbers are Python floats
    for r, box, cls, score, mask in zip(out, first.boxes, first.classes, first.scores, first.masks):
        x0, y0, x1, y1 = box.tolist()
        assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)  # XYWH
        assert r["category_id"] == CONTIGUOUS_TO_ID[int(cls)]
        assert r["score"] == pytest.approx(float(score))
        assert r["image_id"] == preds[0]["image_id"]
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == list(mask.shape)
        decoded = mask_util.decode({"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"]})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
    # A class outside the map is an error that names the image and class.
    bad = Detections(first.boxes[:1], first.scores[:1], torch.tensor([5]), None)
    with pytest.raises(ValueError, match="image 10: predicted class 5"):
        detections_to_coco_json(bad, 10, CONTIGUOUS_TO_ID)


@pytest.mark.parametrize("use_fast", [True, False], ids=["faster-coco-eval", "pycocotools"])
def test_metrics_equal_pycocotools(gt_and_results, use_fast):
    gt, path, results = gt_and_results
    metrics = evaluate_coco(path, results, use_fast=use_fast)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        stats, precision = pycocotools_reference(gt, results, iou_type)
        ours = metrics[iou_type]
        for name, ref in zip(AP_FAMILY, stats):
            assert ref >= 0, f"fixture should define {iou_type} {name}"
            assert ours[name] == pytest.approx(ref * 100, abs=1e-4), (iou_type, name)
        # Per-category AP is the mean over valid precision of that category (GT categories sorted by id).
        for k, cat in enumerate(sorted(CATEGORIES, key=lambda c: c["id"])):
            p = precision[:, :, k, 0, -1]
            assert ours[f"AP-{cat['name']}"] == pytest.approx(p[p > -1].mean() * 100, abs=1e-4)
        # Imperfect predictions: AP clearly between 0 and 100, so a wrong matching would show.
        assert 20 < ours["AP"] < 95
    # The input results are not mutated by loadRes (it adds area/id/iscrowd in place).
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}


def test_perfect_predictions_score_100_and_missing_class_is_nan(gt_and_results):
    gt, path, _ = gt_and_results
    # Drop every "square" from GT: its AP is undefined (NaN), not 0.
    gt = copy.deepcopy(gt)
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != 3]
    results = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue
        img = next(i for i in gt["images"] if i["id"] == a["image_id"])
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], img["height"], img["width"]))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            | {"segmentation": rle}
        )
    metrics = evaluate_coco(gt, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(100.0)
        assert math.isnan(metrics[iou_type]["AP-square"])
        assert metrics[iou_type]["AP-circle"] == pytest.approx(100.0)


def test_empty_results_give_zero_where_gt_exists(gt_and_results):
    _, path, _ = gt_and_results
    for use_fast in (True, False):
        metrics = evaluate_coco(path, [], use_fast=use_fast)
        for iou_type in ("bbox", "segm"):
            assert metrics[iou_type]["AP"] == 0.0
            assert metrics[iou_type]["AP-circle"] == 0.0


def test_img_ids_restricts_evaluation(gt_and_results):
    gt, path, results = gt_and_results
    first = gt["images"][0]["id"]
    subset = [r for r in results if r["image_id"] == first]
    only_first = evaluate_coco(path, subset, iou_types=("bbox",), img_ids=[first])
    all_images = evaluate_coco(path, subset, iou_types=("bbox",))
    # The other images' GT counts as missed only when they are evaluated.
    assert only_first["bbox"]["AP"] > all_images["bbox"]["AP"]


def test_bad_results_name_the_problem(gt_and_results):
    _, path, results = gt_and_results
    bad = [dict(results[0], image_id=999)]
    with pytest.raises(ValueError, match="image_id 999 is not an image of .*instances_val.json"):
        evaluate_coco(path, bad)
    bad = [dict(results[0], category_id=2)]
    with pytest.raises(ValueError, match="category_id 2 is not a category"):
        evaluate_coco(path, bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_coco(path.parent / "nope.json", results)
    with pytest.raises(ValueError, match="unknown iou type 'keypoints'"):
        evaluate_coco(path, results, iou_types=("keypoints",))


def test_metrics_json_roundtrip_keeps_nan(tmp_path):
    metrics = {"bbox": {"AP": 41.5, "APs": math.nan}}
    save_json(metrics, str(tmp_path / "metrics.json"))
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text  # strict JSON for other tools
    back = load_metrics_json(text)
    assert back["bbox"]["AP"] == 41.5 and math.isnan(back["bbox"]["APs"])
