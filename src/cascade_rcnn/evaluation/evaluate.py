"""Evaluate a checkpoint on a COCO-layout split and write the results under an output URI.

Files written (by rank 0) under `output` (a local path, file:// or s3:// prefix):
- coco_instances_results.json: the raw detections in COCO results format;
- metrics.json: {"bbox": {...}, "segm": {...}} (×100; NaN stored as null);
- pr_curves.json: {"bbox": coco_eval.pr_curves(...), "segm": ...}, the precision/recall curves at IoU
  0.50 and 0.75, over all categories and per category;
- report.md and report.html (when report=True): the tables, and for HTML the precision/recall curves
  and a few example images with their predictions drawn (the images as inference read them, kept in memory for the few examples).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch

from cascade_rcnn.comm import rank_and_world_size
from cascade_rcnn.config import ConfigError
from cascade_rcnn.data.mapper import DatasetMapper
from cascade_rcnn.evaluation.coco_eval import coco_evaluation, detections_to_coco_json, save_json
from cascade_rcnn.evaluation.inference import inference_on_dataset
from cascade_rcnn.evaluation.report import ReportExample, format_table, html_report, markdown_report
from cascade_rcnn.storage import local_path

logger = logging.getLogger(__name__)

RESULTS_JSON = "coco_instances_results.json"
METRICS_JSON = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PR_CURVES_JSON = "pr_curves.json"


def load_model(
    cfg, weights: str, device: torch.device | None = None, *, thing_classes: Sequence[str] | None = None
) -> torch.nn.Module:
    """build_model(cfg) with `weights` (our checkpoint or detectron2's) loaded, in eval mode on `device`
    (default: cfg.MODEL.DEVICE through cascade_rcnn.accel.resolve_device).

    Unlike training, evaluation refuses weights that leave model tensors missing or mismatched: the
    metrics of a partly random model (say, a NUM_CLASSES that differs from the checkpoint) are noise.
    For the same reason, when `thing_classes` (the evaluated split's, in contiguous order) is given,
    our checkpoints must have been trained on the same classes in the same order.
    """
    from cascade_rcnn.checkpoint import CheckpointError, load_pretrained
    from cascade_rcnn.modeling import build_model

    model = build_model(cfg, device)
    loaded, report = load_pretrained(model, cfg, weights)
    if report.missing or report.shape_mismatch:
        raise CheckpointError(f"{weights} does not fit the model of this config:\n{report.format()}")
    trained = loaded.meta.get("thing_classes")  # written by our trainer; absent from detectron2's files
    if thing_classes is not None and trained and list(trained) != list(thing_classes):
        raise CheckpointError(
            f"{weights} was trained on the classes {list(trained)} but the evaluated data has "
            f"{list(thing_classes)}: the class ids would not correspond"
        )
    return model.eval()


def results_to_detections(
    results: Sequence[Mapping], dataset_id_to_contiguous: Mapping[int, int], hw: tuple[int, int]
):
    """COCO result dicts of one image -> Detections (XYXY boxes, contiguous classes, decoded masks)."""
    from cascade_rcnn.structures import Detections

    h, w = hw
    boxes = np.array([r["bbox"] for r in results], dtype=np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = None
    if results and all("segmentation" in r for r in results):
        masks = torch.from_numpy(
            np.stack([mask_util.decode(r["segmentation"]).astype(bool) for r in results])
        )
    return Detections(
        boxes=torch.from_numpy(boxes),
        scores=torch.tensor([r["score"] for r in results], dtype=torch.float32),
        classes=torch.tensor(
            [dataset_id_to_contiguous[r["category_id"]] for r in results], dtype=torch.int64
        ),
        masks=masks,
        image_size=(h, w),
    )


def _read_image_rgb(file_name: str) -> np.ndarray:
    from cascade_rcnn.data.image_io import read_image

    if file_name.startswith("s3://"):
        from cascade_rcnn import storage

        return read_image(storage.get_bytes(file_name), format="RGB")
    return read_image(local_path(file_name), format="RGB")


ORIGINAL_IMAGE = "original_image"  # the input dict's key for the image as read, before resizing


class _KeepOriginalMapper(DatasetMapper):
    """The test mapper, also passing the image as read (original size, INPUT.FORMAT) on as a tensor
    (tensors cross from loader workers in shared memory), so the report need not read it again."""

    def _read(self, record: dict) -> np.ndarray:
        self._original = super()._read(record)
        return self._original

    def __call__(self, record: dict, rng: np.random.Generator | None = None) -> dict:
        out = super().__call__(record, rng)
        out[ORIGINAL_IMAGE] = torch.from_numpy(np.ascontiguousarray(self._original))
        self._original = None
        return out


def _to_rgb(image: np.ndarray, image_format: str) -> np.ndarray:
    return np.ascontiguousarray(image[:, :, ::-1]) if image_format == "BGR" else image


def _examples(predictions: list[dict], meta, num: int) -> list[ReportExample]:
    """The first `num` images that have detections, at full resolution and RGB: kept from inference
    (evaluate_model's keep_images) when it could, else read again."""
    out: list[ReportExample] = []
    for pred in predictions:
        if len(out) >= num:
            break
        if not pred["instances"]:
            continue
        image = pred.get("image")
        try:
            image = _read_image_rgb(pred["file_name"]) if image is None else image
        except Exception as e:  # a report must not fail the evaluation that produced the metrics
            logger.warning("report: cannot read %s for the examples: %s", pred["file_name"], e)
            continue
        det = results_to_detections(
            pred["instances"], meta.thing_dataset_id_to_contiguous_id, (pred["height"], pred["width"])
        )
        if image.shape[:2] != (pred["height"], pred["width"]):
            logger.warning(
                "report: %s is %s but the annotations say %dx%d; skipped",
                pred["file_name"],
                image.shape[:2],
                pred["height"],
                pred["width"],
            )
            continue
        out.append(ReportExample(image, det, list(meta.thing_classes), os.path.basename(pred["file_name"])))
    return out


@dataclass
class EvalSplit:
    """A split read once for evaluation, possibly many times (periodic evaluation during training)."""

    name: str
    data: str
    annotations_uri: str
    records: list[dict]
    meta: Any  # cascade_rcnn.data.coco.DatasetMeta
    _gt: dict | None = field(default=None, repr=False)

    def ground_truth(self) -> dict:
        """The annotation JSON (kept from prepare_split on rank 0, else read on first use: only rank 0
        needs it)."""
        if self._gt is None:
            from cascade_rcnn.data.coco import read_json

            self._gt = read_json(self.annotations_uri)
        return self._gt


def prepare_split(data: str, split: str, max_images: int | None = None) -> EvalSplit:
    """The records (first `max_images` by image id) and metadata of `split` under `data`.

    The annotation file is read once: rank 0 keeps the parsed JSON as the split's ground truth, the
    other ranks, which never evaluate, drop it.
    """
    from cascade_rcnn.data.coco import load_coco_json, read_json
    from cascade_rcnn.data.splits import resolve_dataset

    if max_images is not None and max_images <= 0:
        raise ConfigError(f"max_images must be positive, got {max_images}")
    annotations_uri, image_root = resolve_dataset(data, split)
    gt = read_json(annotations_uri)
    records, meta = load_coco_json(annotations_uri, image_root, dataset_name=split, data=gt)
    if max_images is not None:
        records = records[:max_images]
    return EvalSplit(
        split, data, annotations_uri, records, meta, gt if rank_and_world_size()[0] == 0 else None
    )


@dataclass
class ModelEvaluation:
    """What evaluate_model found, on rank 0 (empty on the other ranks).

    metrics: {"bbox"|"segm": {"AP", ..., "AP-<class>"}} (×100); predictions: per image, with COCO-JSON
    "instances" (and "image" for the kept ones); curves: {"bbox"|"segm": coco_eval.pr_curves(...)}."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)


def evaluate_model(
    model: torch.nn.Module,
    cfg: Any,
    split: EvalSplit,
    *,
    device: torch.device,
    use_fast: bool = True,
    progress: bool = True,
    keep_images: int = 0,
) -> ModelEvaluation:
    """COCO box (and mask, with MODEL.MASK_ON) AP of `model` as it is, on `split`.

    Every rank of an initialised process group runs its shard of the split (collective: all ranks
    must call it); the predictions are gathered to rank 0, which computes the metrics. Returns the
    metrics, the predictions and the precision/recall curves on rank 0, nothing on the others. The model
    is put in eval mode for the inference and back in its previous mode afterwards.
    keep_images: rank 0 keeps (RGB, original size) the first N of its images that have detections, as
    "image" in their predictions, for the report's examples; the others are not held.
    """
    from cascade_rcnn.data.loader import build_test_loader

    rank, world_size = rank_and_world_size()
    image_format = cfg.INPUT.FORMAT
    keep_images = keep_images if rank == 0 and image_format in ("RGB", "BGR") else 0
    mapper = _KeepOriginalMapper.from_config(cfg, is_train=False) if keep_images else None
    loader = build_test_loader(
        cfg, split.records, rank=rank, world_size=world_size, pin_memory=device.type != "cpu", mapper=mapper
    )
    contiguous_to_dataset = split.meta.contiguous_id_to_dataset_id
    kept: dict[Any, np.ndarray] = {}

    def to_coco(inp: Mapping[str, Any], det: Any) -> list[dict]:
        # Encode masks right away: full-resolution bitmasks for a whole split do not fit in memory.
        instances = detections_to_coco_json(det.to("cpu"), inp["image_id"], contiguous_to_dataset)
        if instances and len(kept) < keep_images:
            kept[inp["image_id"]] = _to_rgb(inp[ORIGINAL_IMAGE].numpy(), image_format)
        return instances

    predictions = inference_on_dataset(model, loader, device=device, postprocess=to_coco, progress=progress)
    if rank != 0:
        return ModelEvaluation()
    for pred in predictions:
        if pred["image_id"] in kept:
            pred["image"] = kept[pred["image_id"]]
    results = [r for pred in predictions for r in pred["instances"]]
    iou_types = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    found = coco_evaluation(
        split.ground_truth(),
        results,
        iou_types=iou_types,
        use_fast=use_fast,
        img_ids=[r["image_id"] for r in split.records],
    )
    return ModelEvaluation(found.metrics, predictions, found.curves)


def write_results(
    output: str,
    metrics: Mapping[str, Mapping[str, float]],
    predictions: list[dict],
    split: EvalSplit,
    *,
    weights: str,
    report: bool = True,
    num_examples: int = 6,
    report_md_to: str | None = None,
    report_html_to: str | None = None,
    curves: Mapping[str, dict] | None = None,
) -> None:
    """The files of the module docstring under `output` (rank 0); with `report`, report.md and
    report.html also go to the local files report_md_to / report_html_to when given. curves:
    evaluate_model's precision/recall curves (pr_curves.json and the report's figures)."""
    from cascade_rcnn import storage

    results = [r for pred in predictions for r in pred["instances"]]
    save_json(results, storage.join(output, RESULTS_JSON))
    save_json(dict(metrics), storage.join(output, METRICS_JSON))
    if curves:
        save_json(dict(curves), storage.join(output, PR_CURVES_JSON))
    if report:
        details = {
            "weights": weights,
            "data": split.data,
            "split": split.name,
            "images": len(split.records),
            "detections": len(results),
        }
        examples = _examples(predictions, split.meta, num_examples)
        for text, name, local in (
            (markdown_report(metrics, details=details), REPORT_MD, report_md_to),
            (html_report(metrics, examples, details=details, curves=curves), REPORT_HTML, report_html_to),
        ):
            storage.put_bytes(text.encode(), storage.join(output, name))
            if local:
                with open(local, "wb") as f:
                    f.write(text.encode())
    logger.info(
        "wrote %s and %s%s under %s", RESULTS_JSON, METRICS_JSON, " and the reports" if report else "", output
    )


def evaluate_checkpoint(
    cfg: Any,
    weights: str | None,
    data: str,
    split: str = "val2017",
    output: str | None = None,
    *,
    max_images: int | None = None,
    report: bool = True,
    opts: Sequence[str] | None = None,
    num_examples: int = 6,
    use_fast: bool = True,
    report_md_to: str | None = None,
    report_html_to: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run `weights` over `split` of `data` and compute COCO box/mask AP.

    cfg: a CfgNode, or a config file path (then `opts` "KEY VALUE" overrides apply).
    weights: our checkpoint or detectron2's (.pkl/.pth), local or s3://; None uses cfg.MODEL.WEIGHTS.
    data: a COCO-layout root (local or s3://) or an ingest manifest URI.
    max_images: evaluate only the first N images (by image id) of the split.
    Under an initialised process group every rank runs its shard; rank 0 evaluates, writes the files
    (module docstring) under `output` and returns the metrics; other ranks return {}.
    report_md_to, report_html_to: local files that also get report.md / report.html (rank 0, with
    `output` and `report`), e.g. a pipeline step's output artifacts.
    """
    from cascade_rcnn.accel import accelerator_from_cfg
    from cascade_rcnn.config import load_config

    if not isinstance(cfg, Mapping):
        cfg = load_config(cfg, list(opts or []))
    elif opts:
        cfg = cfg.clone()
        cfg.merge_from_list(list(opts))
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights:
        raise ConfigError("no weights: pass --weights or set MODEL.WEIGHTS in the config")
    if max_images is not None and max_images <= 0:
        raise ConfigError(f"max_images must be positive, got {max_images}")
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    device = accelerator_from_cfg(cfg, local_rank).device

    prepared = prepare_split(data, split, max_images)
    logger.info(
        "evaluating %s on %d images of %s (%s)",
        weights,
        len(prepared.records),
        split,
        prepared.annotations_uri,
    )
    model = load_model(cfg, weights, device, thing_classes=prepared.meta.thing_classes)
    found = evaluate_model(
        model,
        cfg,
        prepared,
        device=device,
        use_fast=use_fast,
        keep_images=num_examples if output and report else 0,
    )
    metrics = found.metrics
    if rank != 0:
        return {}
    logger.info("COCO evaluation of %s on %s:\n%s", weights, split, format_table(metrics))
    if output:
        write_results(
            output,
            metrics,
            found.predictions,
            prepared,
            weights=weights,
            report=report,
            num_examples=num_examples,
            report_md_to=report_md_to,
            report_html_to=report_html_to,
            curves=found.curves,
        )
    return metrics
