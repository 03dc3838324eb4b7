"""`cascade-rcnn predict`: run a model on image files and write detections as JSON.

Owns the inference path outside training: `Predictor` (batched, from Python, for the
evaluator and notebooks), `predict_files` (files -> JSON-able records) and the CLI `main`.
Images are read and resized as detectron2's DefaultPredictor does (EXIF orientation, channel
order cfg.INPUT.FORMAT, ResizeShortestEdge to INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST).

Output schema (the parity fixture's outputs.json, plus extra fields):
[{"file_name", "path", "height", "width",
  "instances": [{"bbox_xyxy": [x0, y0, x1, y1], "score", "category",
                 "category_id"?, "category_name"?, "segmentation": {"size": [h, w], "counts": str}}]}]

"category" is the model's contiguous class (0..K-1); "category_id" (the data set's category id, as
in COCO results) and "category_name" come from --categories or from the training data set recorded
in our checkpoints' meta (see `category_mapping`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from cascade_rcnn.checkpoint import load_pretrained
from cascade_rcnn.config_command import add_config_options, run_with_config
from cascade_rcnn.errors import CascadeRCNNError

logger = logging.getLogger(__name__)


class PredictError(CascadeRCNNError):
    """Bad input to prediction (missing/unreadable image, bad categories file); names the file."""


def _convert_channels(image: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Reorder a HWC image between BGR and RGB; other formats must already match."""
    if src == dst:
        return image
    if {src, dst} == {"BGR", "RGB"}:
        return image[:, :, ::-1]
    raise PredictError(f"cannot convert input images from {src} to the model's INPUT.FORMAT {dst}")


class Predictor:
    """A model in eval mode with detectron2's test-time preprocessing.

    `predictor(images)` takes HWC uint8 arrays (BGR by default) and returns one `Detections`
    per image, on the CPU, in original-image pixels.
    """

    def __init__(self, cfg: Any, weights: Optional[str] = None, *, model: Optional[torch.nn.Module] = None):
        from cascade_rcnn.accel import resolve_device
        from cascade_rcnn.data.transforms import resize_image, resize_shortest_edge_shape
        from cascade_rcnn.modeling import build_model

        self.cfg = cfg.clone()
        self.device = resolve_device(self.cfg.MODEL.DEVICE)
        self.model = model if model is not None else build_model(self.cfg, self.device)
        self.model.to(self.device).eval()
        self.weights = self.cfg.MODEL.WEIGHTS if weights is None else weights
        self.weights_meta: dict = {}
        if self.weights:
            loaded, self.load_report = load_pretrained(self.model, self.cfg, self.weights)
            self.weights_meta = loaded.meta
        elif model is None:
            logger.warning(
                "No weights given (--weights / MODEL.WEIGHTS): predicting with random initialization"
            )
        self.input_format = self.cfg.INPUT.FORMAT
        self.min_size = int(self.cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(self.cfg.INPUT.MAX_SIZE_TEST)
        self._resize_shape = resize_shortest_edge_shape
        self._resize = resize_image

    def preprocess(self, image: np.ndarray, input_format: str = "BGR") -> dict:
        """HWC uint8 image -> the model's input dict (resized CHW uint8 tensor, original size)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise PredictError(
                f"expected a uint8 numpy image, got {type(image).__name__} {getattr(image, 'dtype', '')}"
            )
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise PredictError(f"expected an HWC image, got shape {image.shape}")
        image = _convert_channels(image, input_format, self.input_format)
        h, w = image.shape[:2]
        if self.min_size > 0:
            newh, neww = self._resize_shape(h, w, self.min_size, self.max_size)
            image = self._resize(np.ascontiguousarray(image), newh, neww)
        if image.ndim == 2:
            image = image[:, :, None]
        chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": chw.to(self.device), "height": h, "width": w}

    def __call__(self, images: Sequence[np.ndarray], input_format: str = "BGR") -> list:
        """Detections for a batch of images; the batch runs through the model in one call."""
        inputs = [self.preprocess(im, input_format) for im in images]
        with torch.inference_mode():
            outputs = self.model(inputs)
        return [d.to("cpu") for d in outputs]


def category_mapping(
    categories_file: Optional[str], meta: dict, num_classes: Optional[int] = None, weights: str = ""
) -> tuple[Optional[list[int]], Optional[list[str]]]:
    """Dataset category ids and class names in contiguous order (class k -> ids[k], names[k]).

    From a COCO json's "categories" (sorted by id, as detectron2 maps them to 0..K-1) when given,
    else from our checkpoint's meta: "dataset" (the training split's DatasetMeta.to_dict(), with
    "thing_classes" and "thing_dataset_ids"), else its top-level "thing_classes" (names only).
    Weights without either (detectron2's, torchvision's) give (None, None). `num_classes`, when
    given, must match the number of categories, or the mapping would label detections wrongly.
    """
    if categories_file:
        try:
            with open(categories_file) as f:
                cats = json.load(f)["categories"]
            cats = sorted(cats, key=lambda c: c["id"])
            ids, names = [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]
        except FileNotFoundError:
            raise PredictError(f"categories file not found: {categories_file}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PredictError(
                f"{categories_file}: expected COCO json with a 'categories' list of {{'id', 'name'}} ({e!r})"
            ) from None
        source = categories_file
    else:
        dataset = meta.get("dataset") if isinstance(meta.get("dataset"), dict) else {}
        names = dataset.get("thing_classes") or meta.get("thing_classes")
        ids = dataset.get("thing_dataset_ids")
        ids = [int(i) for i in ids] if ids else None
        names = [str(n) for n in names] if names else None
        source = f"the metadata of {weights or 'the checkpoint'}"
    if num_classes is not None:
        for what, values in (("categories", ids), ("class names", names)):
            if values is not None and len(values) != num_classes:
                raise PredictError(
                    f"{source} has {len(values)} {what} but MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}"
                )
    return ids, names


def detections_to_record(
    file_name: str,
    det: Any,
    category_ids: Optional[list[int]] = None,
    class_names: Optional[list[str]] = None,
) -> dict:
    """One image's Detections as a JSON-able dict in the outputs.json schema."""
    from pycocotools import mask as mask_util

    height, width = (int(s) for s in det.image_size) if det.image_size != (0, 0) else (None, None)
    masks = det.masks
    if masks is not None and height is None:
        height, width = int(masks.shape[1]), int(masks.shape[2])
    instances = []
    boxes = det.boxes.tolist()
    scores = det.scores.tolist()
    classes = det.classes.tolist()
    for i in range(len(boxes)):
        inst: dict[str, Any] = {"bbox_xyxy": boxes[i], "score": scores[i], "category": int(classes[i])}
        if category_ids is not None and classes[i] < len(category_ids):
            inst["category_id"] = category_ids[classes[i]]
        if class_names is not None and classes[i] < len(class_names):
            inst["category_name"] = class_names[classes[i]]
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].numpy().astype(np.uint8)))
            inst["segmentation"] = {
                "size": [int(s) for s in rle["size"]],
                "counts": rle["counts"].decode("ascii"),
            }
        instances.append(inst)
    return {
        "file_name": os.path.basename(file_name),
        "path": str(file_name),
        "height": height,
        "width": width,
        "instances": instances,
    }


def _read(path: str, fmt: str) -> np.ndarray:
    from cascade_rcnn.data.image_io import read_image

    if not os.path.isfile(path):
        raise PredictError(f"image not found: {path}")
    try:
        return read_image(path, format=fmt)
    except Exception as e:  # PIL raises several types for broken files
        raise PredictError(f"cannot read image {path}: {e}") from e


def predict_files(
    cfg: Any,
    weights: Optional[str],
    paths: Sequence[str],
    batch_size: int = 1,
    *,
    categories_file: Optional[str] = None,
    predictor: Optional[Predictor] = None,
) -> list[dict]:
    """Run the model on image files; one record per path (outputs.json schema), in input order."""
    paths = [str(p) for p in paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise PredictError(f"image not found: {', '.join(missing)}")
    if batch_size < 1:
        raise PredictError(f"batch size must be >= 1, got {batch_size}")
    predictor = predictor or Predictor(cfg, weights)
    category_ids, class_names = category_mapping(
        categories_file,
        predictor.weights_meta,
        int(predictor.cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        str(predictor.weights or ""),
    )
    if class_names is None:
        logger.warning(
            "%s carries no class names (not one of our checkpoints): detections have only the "
            "contiguous 'category'; pass --categories with the data set's COCO json for names and ids",
            predictor.weights or "the model",
        )
    fmt = predictor.input_format
    records: list[dict] = []
    start = time.perf_counter()
    for b in range(0, len(paths), batch_size):
        batch = paths[b : b + batch_size]
        images = [_read(p, fmt) for p in batch]
        for path, image, det in zip(batch, images, predictor(images, input_format=fmt)):
            if det.image_size == (0, 0):
                det.image_size = tuple(image.shape[:2])
            records.append(detections_to_record(path, det, category_ids, class_names))
        logger.info(
            "[%d/%d] %s: %d detections (%.2f s/image so far)",
            len(records),
            len(paths),
            os.path.basename(batch[-1]),
            len(records[-1]["instances"]),
            (time.perf_counter() - start) / len(records),
        )
    return records


def write_json(records: list[dict], uri: str) -> None:
    """Write `records` to a local path or an s3:// URI (atomically; local files follow the umask)."""
    from cascade_rcnn import storage

    storage.put_bytes(json.dumps(records).encode(), uri)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade-rcnn predict",
        description="Run Cascade Mask R-CNN on images and write detections (boxes, scores, classes, RLE masks) as JSON.",
    )
    add_config_options(p, "config overrides as KEY VALUE pairs (end the list with another option or `--`)")
    p.add_argument(
        "--weights", default=None, help="weights file or URI (default: MODEL.WEIGHTS of the config)"
    )
    p.add_argument("--output", required=True, help="output JSON path or s3:// URI")
    p.add_argument(
        "--batch-size", type=int, default=1, help="images per model call (default 1, as detectron2)"
    )
    p.add_argument(
        "--categories", default=None, help="COCO json whose 'categories' give dataset ids and names"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)

    def predict(cfg) -> int:
        if not (args.weights if args.weights is not None else cfg.MODEL.WEIGHTS).strip():
            raise PredictError(f"no weights: pass --weights or set MODEL.WEIGHTS in {args.config}")
        records = predict_files(
            cfg, args.weights, args.images, args.batch_size, categories_file=args.categories
        )
        write_json(records, args.output)
        total = sum(len(r["instances"]) for r in records)
        logger.info("Wrote %d detections on %d images to %s", total, len(records), args.output)
        return 0

    return run_with_config("cascade-rcnn predict", args, predict)


if __name__ == "__main__":
    sys.exit(main())
