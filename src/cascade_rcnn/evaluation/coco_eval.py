"""COCO results conversion and box/mask AP: detections -> COCO results JSON -> COCOeval metrics.

Metrics follow detectron2's COCOEvaluator: AP, AP50, AP75, APs, APm, APl and one ``AP-<class>`` per
category, scaled by 100, NaN where COCOeval has nothing to average (e.g. no ground truth of that size).
`coco_evaluation` also returns the precision/recall curves behind them (`pr_curves`).

Empty results are evaluated as a result set with no detections (all images, no annotations), so a
model that finds nothing scores 0 wherever ground truth exists and NaN elsewhere. detectron2 instead
reports NaN for every metric with a "No predictions" warning; 0 is what COCOeval's own arithmetic gives
and keeps "the model found nothing" distinguishable from "nothing to measure".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
# Order matches COCOeval's summary (stats[0:6]) and detectron2's tables.
AP_FAMILY = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PR_IOUS = (0.5, 0.75)  # the IoU thresholds whose precision/recall curves the reports draw


def _category_lookup(contiguous_to_dataset_id: Mapping[int, int] | Sequence[int]) -> dict[int, int]:
    if isinstance(contiguous_to_dataset_id, Mapping):
        return {int(k): int(v) for k, v in contiguous_to_dataset_id.items()}
    return {i: int(v) for i, v in enumerate(contiguous_to_dataset_id)}


def encode_mask_rle(mask: np.ndarray) -> dict:
    """(H,W) bool/uint8 mask -> COCO compressed RLE {"size": [H, W], "counts": ASCII str}."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON-serialisable
    return rle


def detections_to_coco_json(
    detections: Any, image_id: int, contiguous_to_dataset_id: Mapping[int, int] | Sequence[int]
) -> list[dict]:
    """One image's Detections -> COCO result dicts.

    detections: boxes (N,4) XYXY, scores (N,), classes (N,) contiguous, masks (N,H,W) bool or None, all at
    the original image resolution. Output boxes are XYWH, category ids are the data set's ids, masks are
    RLE with ASCII counts.
    """
    lookup = _category_lookup(contiguous_to_dataset_id)
    boxes = np.asarray(_to_numpy(detections.boxes), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(_to_numpy(detections.scores), dtype=np.float64).reshape(-1)
    classes = np.asarray(_to_numpy(detections.classes), dtype=np.int64).reshape(-1)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(
            f"image {image_id}: detections have {len(boxes)} boxes, {len(scores)} scores and "
            f"{len(classes)} classes; they must match"
        )
    masks = getattr(detections, "masks", None)
    masks = None if masks is None else _to_numpy(masks)
    if masks is not None and len(masks) != len(boxes):
        raise ValueError(f"image {image_id}: detections have {len(boxes)} boxes but {len(masks)} masks")
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    results = []
    for i in range(len(boxes)):
        cls = int(classes[i])
        if cls not in lookup:
            raise ValueError(
                f"image {image_id}: predicted class {cls} has no data set category id "
                f"(the map covers contiguous ids {sorted(lookup)})"
            )
        res = {
            "image_id": int(image_id),
            "category_id": lookup[cls],
            "bbox": [float(v) for v in xywh[i]],
            "score": float(scores[i]),
        }
        if masks is not None:
            res["segmentation"] = encode_mask_rle(masks[i])
        results.append(res)
    return results


def detections_to_coco_results(
    predictions: Sequence[Mapping[str, Any]], contiguous_to_dataset_id: Mapping[int, int] | Sequence[int]
) -> list[dict]:
    """Per-image predictions {"image_id", "instances": Detections} -> one flat COCO results list."""
    results: list[dict] = []
    for pred in predictions:
        results.extend(detections_to_coco_json(pred["instances"], pred["image_id"], contiguous_to_dataset_id))
    return results


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _load_gt_dataset(gt_json: str | os.PathLike | Mapping) -> dict:
    if isinstance(gt_json, Mapping):
        return dict(gt_json)
    try:
        with open(gt_json) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground-truth annotations not found: {gt_json}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"ground-truth annotations {gt_json} are not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"ground-truth annotations {gt_json} have no {key!r} field")
    return data


def _check_results(results: Sequence[Mapping], gt: dict, source: str) -> None:
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    for i, r in enumerate(results):
        for key in ("image_id", "category_id", "score"):
            if key not in r:
                raise ValueError(f"result {i} has no {key!r} field")
        if r["image_id"] not in image_ids:
            raise ValueError(f"result {i}: image_id {r['image_id']} is not an image of {source}")
        if r["category_id"] not in cat_ids:
            raise ValueError(
                f"result {i}: category_id {r['category_id']} is not a category of {source} "
                f"(ids {sorted(cat_ids)})"
            )


def _coco_api(use_fast: bool):
    if use_fast:
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        except ImportError:
            # Same numbers, only slower: an image without faster-coco-eval still evaluates.
            logger.warning("faster-coco-eval is not installed; using pycocotools' COCOeval")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def _build_coco(coco_cls, dataset: dict):
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco.createIndex()
    return coco


def _run_cocoeval(
    coco_gt, dt_dataset_or_results, iou_type: str, use_fast: bool, img_ids: Sequence[int] | None
) -> tuple[np.ndarray, Any]:
    """-> (precision [T,R,K,A,M] from COCOeval.accumulate, the COCOeval params used)."""
    coco_cls, eval_cls = _coco_api(use_fast)
    if isinstance(dt_dataset_or_results, dict):
        coco_dt = _build_coco(coco_cls, dt_dataset_or_results)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dt_dataset_or_results)
    log = io.StringIO()
    if use_fast:
        evaluator = eval_cls(coco_gt, coco_dt, iou_type, print_function=logger.debug)
    else:
        evaluator = eval_cls(coco_gt, coco_dt, iou_type)
    if img_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in img_ids)
    with contextlib.redirect_stdout(log):
        evaluator.evaluate()
        evaluator.accumulate()
    if log.getvalue():
        logger.debug(log.getvalue())
    return np.asarray(evaluator.eval["precision"]), evaluator.params


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) * 100 if valid.size else math.nan


def _summarize(precision: np.ndarray, params, cat_names: list[str]) -> dict[str, float]:
    """The AP family and per-category AP from precision [T,R,K,A,M], as COCOeval.summarize computes them."""
    max_det = len(params.maxDets) - 1  # the last (largest) maxDets
    area = {label: i for i, label in enumerate(params.areaRngLbl)}
    thresholds = np.asarray(params.iouThrs)
    t50 = int(np.argmin(np.abs(thresholds - 0.5)))
    t75 = int(np.argmin(np.abs(thresholds - 0.75)))
    all_area = precision[:, :, :, area["all"], max_det]
    out = {
        "AP": _mean_valid(all_area),
        "AP50": _mean_valid(all_area[t50]),
        "AP75": _mean_valid(all_area[t75]),
        "APs": _mean_valid(precision[:, :, :, area["small"], max_det]),
        "APm": _mean_valid(precision[:, :, :, area["medium"], max_det]),
        "APl": _mean_valid(precision[:, :, :, area["large"], max_det]),
    }
    for k, name in enumerate(cat_names):
        out[f"AP-{name}"] = _mean_valid(precision[:, :, k, area["all"], max_det])
    return out


def pr_curves(precision: np.ndarray, params, cat_names: list[str]) -> dict:
    """Precision/recall curves from COCOeval's accumulated precision [T,R,K,A,M] (area "all", the
    largest maxDets): the interpolated precision at each of COCOeval's recall thresholds, at IoU 0.50
    and 0.75, averaged over the categories that have ground truth ("mean": averaging it over recall
    gives AP50 / AP75) and per category (None: no ground truth).

    -> {"recall": [R], "iou": {"0.50": {"mean": [R] | None, "classes": {name: [R] | None}}, "0.75": ...}}
    """
    max_det = len(params.maxDets) - 1
    area = list(params.areaRngLbl).index("all")
    thresholds = np.asarray(params.iouThrs)
    out: dict[str, Any] = {"recall": [round(float(r), 4) for r in params.recThrs], "iou": {}}
    for iou in PR_IOUS:
        t = int(np.argmin(np.abs(thresholds - iou)))
        curves = precision[t, :, :, area, max_det]  # [R, K]
        valid = (curves > -1).all(axis=0)  # a category without ground truth is -1 throughout
        classes = {
            name: [round(float(v), 4) for v in curves[:, k]] if valid[k] else None
            for k, name in enumerate(cat_names)
        }
        mean = curves[:, valid].mean(axis=1) if valid.any() else None
        out["iou"][f"{iou:.2f}"] = {
            "mean": None if mean is None else [round(float(v), 4) for v in mean],
            "classes": classes,
        }
    return out


@dataclass
class CocoEvaluation:
    """evaluate_coco's metrics and, per task, the precision/recall curves behind them (pr_curves)."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict] = field(default_factory=dict)


def evaluate_coco(
    gt_json: str | os.PathLike | Mapping,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    use_fast: bool = True,
    img_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """COCO AP of `results` against the ground truth in `gt_json` (local path or loaded dict); the
    metrics of coco_evaluation, which documents the arguments."""
    return coco_evaluation(gt_json, results, iou_types, use_fast, img_ids).metrics


def coco_evaluation(
    gt_json: str | os.PathLike | Mapping,
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    use_fast: bool = True,
    img_ids: Sequence[int] | None = None,
) -> CocoEvaluation:
    """COCO AP of `results` against the ground truth in `gt_json` (local path or loaded dict), and
    the precision/recall curves.

    results: COCO result dicts (image_id, category_id, score, bbox XYWH, segmentation RLE for segm).
    img_ids: evaluate only these images (e.g. when inference covered a subset); default all GT images.
    metrics: {iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<category name>", ...}}, ×100,
    NaN where undefined; curves: {iou_type: pr_curves(...)}. "segm" is skipped with a warning when no result has a segmentation.
    use_fast selects faster-coco-eval's C++ COCOeval; otherwise pycocotools' reference implementation.
    """
    for t in iou_types:
        if t not in IOU_TYPES:
            raise ValueError(f"unknown iou type {t!r}; expected one of {IOU_TYPES}")
    source = str(gt_json) if not isinstance(gt_json, Mapping) else "the ground truth"
    gt = _load_gt_dataset(gt_json)
    _check_results(results, gt, source)
    coco_cls, _ = _coco_api(use_fast)
    coco_gt = _build_coco(coco_cls, gt)
    cat_names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]

    out = CocoEvaluation()
    for iou_type in iou_types:
        if iou_type == "segm" and results and not all("segmentation" in r for r in results):
            logger.warning("results have no (or not all have) segmentation: skipping mask AP")
            continue
        if results:
            dts = copy.deepcopy(list(results))  # loadRes adds fields in place
            if iou_type == "segm":
                # With a bbox present, loadRes takes the box area as the instance area (wrong for masks).
                for r in dts:
                    r.pop("bbox", None)
        else:
            logger.warning("no predictions: every %s AP is 0 where ground truth exists", iou_type)
            dts = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        precision, params = _run_cocoeval(coco_gt, dts, iou_type, use_fast, img_ids)
        out.metrics[iou_type] = _summarize(precision, params, cat_names)
        out.curves[iou_type] = pr_curves(precision, params, cat_names)
    return out


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def save_json(obj: Any, uri: str) -> None:
    """Write `obj` as strict JSON to a local path, file:// or s3:// URI; NaN becomes null."""
    from cascade_rcnn import storage

    storage.put_bytes(json.dumps(_nan_to_none(obj), allow_nan=False).encode("utf-8"), uri)


def load_metrics_json(data: bytes | str) -> dict[str, dict[str, float]]:
    """Inverse of save_json for metrics: null -> NaN."""
    raw = json.loads(data)
    return {
        task: {k: math.nan if v is None else float(v) for k, v in values.items()}
        for task, values in raw.items()
    }
