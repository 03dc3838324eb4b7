"""COCO instances JSON -> per-image records, with detectron2's loading semantics and strict validation.

A record is a plain JSON-able dict (so it can be serialized cheaply for DataLoader workers):

    {"file_name": str (local path or s3:// URI), "height": int, "width": int, "image_id": int,
     "annotations": [{"id": int, "iscrowd": 0|1, "bbox": [x, y, w, h] (COCO XYWH, original pixels),
                      "category_id": int (contiguous 0..K-1),
                      "segmentation": list[list[float]] (polygons) | {"size": [h, w], "counts": str} (RLE),
                      }]}

What detectron2 does, and so do we: categories are sorted by id and mapped to 0..K-1; images come out in
sorted image-id order with annotations in file order; polygons with fewer than 3 points (or an odd number
of coordinates) are dropped, and an instance left with no polygon is dropped; uncompressed RLE is
compressed; annotations of images not in the file are dropped. Every silent drop is counted in one warning.
Where detectron2 would crash or load garbage (unknown category, negative box size, a box far outside
its image, missing fields, broken JSON) we raise `DataError` naming the file and the annotation id.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.storage import local_path

logger = logging.getLogger(__name__)

# How many individual problems an error message lists before summarizing the rest.
_MAX_LISTED = 10


class DataError(CascadeRCNNError, ValueError):
    """Bad input data; the message names the file and the image/annotation id."""


@dataclass(frozen=True)
class DatasetMeta:
    """Category mapping of one loaded split (what the evaluator needs to write COCO results)."""

    name: str
    json_file: str
    image_root: str
    thing_classes: list[str]
    # dataset category id -> contiguous id, and back.
    thing_dataset_id_to_contiguous_id: dict[int, int] = field(default_factory=dict)
    contiguous_id_to_dataset_id: dict[int, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (dict keys become strings in JSON, so the maps are stored as lists)."""
        return {
            "name": self.name,
            "json_file": self.json_file,
            "image_root": self.image_root,
            "thing_classes": list(self.thing_classes),
            "thing_dataset_ids": [self.contiguous_id_to_dataset_id[i] for i in range(self.num_classes)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMeta:
        ids = [int(i) for i in d["thing_dataset_ids"]]
        return cls(
            name=d.get("name", ""),
            json_file=d.get("json_file", ""),
            image_root=d.get("image_root", ""),
            thing_classes=list(d["thing_classes"]),
            thing_dataset_id_to_contiguous_id={v: i for i, v in enumerate(ids)},
            contiguous_id_to_dataset_id=dict(enumerate(ids)),
        )


def _is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join_image_path(image_root: str, file_name: str) -> str:
    """`image_root`/`file_name` for a local directory or an s3:// prefix."""
    if _is_remote(image_root):
        return image_root.rstrip("/") + "/" + file_name.lstrip("/")
    return os.path.join(local_path(image_root), file_name)


def read_json(path_or_uri: str) -> Any:
    """Parse a JSON file from a local path or an s3:// URI; DataError names the file and the position."""
    if _is_remote(path_or_uri):
        from cascade_rcnn import storage

        raw = storage.get_bytes(path_or_uri)
    else:
        path = local_path(path_or_uri)
        if not os.path.isfile(path):
            raise DataError(f"{path_or_uri}: annotation file does not exist")
        with open(path, "rb") as f:
            raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path_or_uri}: not valid JSON: {e}") from e


def _require(obj: Any, key: str, where: str, json_file: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{json_file}: {where} has no {key!r} field")
    return obj[key]


def _polygon_ok(poly: Any) -> bool:
    return isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0


def _compress_rle(segm: dict, ann_where: str, json_file: str) -> dict:
    """Uncompressed RLE (list counts, as COCO crowd annotations) -> compressed RLE with str counts."""
    size = segm.get("size")
    counts = segm.get("counts")
    if not (isinstance(size, list) and len(size) == 2) or counts is None:
        raise DataError(
            f"{json_file}: {ann_where} has an RLE segmentation without 'size' [h, w] and 'counts'"
        )
    if isinstance(counts, list):
        from pycocotools import mask as mask_util

        rle = mask_util.frPyObjects(segm, int(size[0]), int(size[1]))
        counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if not isinstance(counts, str):
        raise DataError(f"{json_file}: {ann_where} has RLE 'counts' of type {type(counts).__name__}")
    return {"size": [int(size[0]), int(size[1])], "counts": counts}


def load_coco_json(
    json_path_or_uri: str,
    image_root: str,
    *,
    dataset_name: str = "",
    check_images: bool = False,
    bbox_tolerance: float = 2.0,
    data: Any = None,
) -> tuple[list[dict], DatasetMeta]:
    """Read a COCO instances file into records (see module docstring) and the category mapping.

    image_root: local directory or s3:// prefix that the images' file_name is relative to.
    check_images: verify every image exists (one listing for s3://, a stat per file locally).
    bbox_tolerance: pixels a box may reach beyond its image before it is an error.
    data: the file's parsed JSON when the caller has read it already (read_json); it is not modified.
    """
    if data is None:
        data = read_json(json_path_or_uri)
    json_file = json_path_or_uri
    if not isinstance(data, dict):
        raise DataError(f"{json_file}: top level must be a JSON object with 'images' and 'categories'")
    images = _require(data, "images", "the top level", json_file)
    categories = _require(data, "categories", "the top level", json_file)
    annotations = data.get("annotations", [])  # absent in test-dev style image_info files
    for key, value in (("images", images), ("categories", categories), ("annotations", annotations)):
        if not isinstance(value, list):
            raise DataError(f"{json_file}: {key!r} must be a list, got {type(value).__name__}")

    meta = _category_meta(categories, json_file, image_root, dataset_name)
    id_map = meta.thing_dataset_id_to_contiguous_id

    img_by_id: dict[int, dict] = {}
    for i, img in enumerate(images):
        where = f"images[{i}]"
        img_id = _require(img, "id", where, json_file)
        where = f"image id={img_id}"
        for key in ("file_name", "height", "width"):
            _require(img, key, where, json_file)
        if img_id in img_by_id:
            raise DataError(f"{json_file}: image id={img_id} appears more than once")
        h, w = img["height"], img["width"]
        # Some converters write sizes as 480.0; anything not a positive whole number is an error.
        if not all(isinstance(v, (int, float)) and v > 0 and float(v).is_integer() for v in (h, w)):
            raise DataError(
                f"{json_file}: {where} ({img['file_name']}) has invalid size height={h} width={w}"
            )
        img_by_id[img_id] = dict(img, height=int(h), width=int(w))

    problems: list[str] = []
    anns_by_image: dict[int, list[dict]] = {i: [] for i in img_by_id}
    seen_ann_ids: set = set()
    orphan_anns = 0
    dropped_polygons = 0
    dropped_instances: list[Any] = []  # ann ids left without any valid polygon

    for i, ann in enumerate(annotations):
        ann_id = _require(ann, "id", f"annotations[{i}]", json_file)
        where = f"annotation id={ann_id}"
        for key in ("image_id", "bbox", "category_id"):
            _require(ann, key, where, json_file)
        if ann_id in seen_ann_ids:
            raise DataError(f"{json_file}: annotation id={ann_id} appears more than once")
        seen_ann_ids.add(ann_id)
        img = img_by_id.get(ann["image_id"])
        if img is None:
            orphan_anns += 1
            continue
        if ann.get("ignore", 0) != 0:
            raise DataError(f"{json_file}: {where} sets 'ignore', which is not supported (use 'iscrowd')")

        cat = ann["category_id"]
        if cat not in id_map:
            problems.append(f"{where} (image {img['file_name']}) has unknown category_id={cat!r}")
            continue
        bbox_problem = _check_bbox(ann["bbox"], img, bbox_tolerance)
        if bbox_problem:
            problems.append(
                f"{where} (image {img['file_name']}, {img['width']}x{img['height']}) {bbox_problem}"
            )
            continue

        obj = {
            "id": ann_id,
            "iscrowd": int(ann.get("iscrowd", 0)),
            "bbox": [float(v) for v in ann["bbox"]],
            "category_id": id_map[cat],
        }
        segm = ann.get("segmentation")
        if segm:
            if isinstance(segm, dict):
                obj["segmentation"] = _compress_rle(segm, where, json_file)
            elif isinstance(segm, list):
                valid = [[float(v) for v in poly] for poly in segm if _polygon_ok(poly)]
                dropped_polygons += len(segm) - len(valid)
                if not valid:
                    dropped_instances.append(ann_id)
                    continue
                obj["segmentation"] = valid
            else:
                problems.append(f"{where} has a segmentation of type {type(segm).__name__}")
                continue
        anns_by_image[ann["image_id"]].append(obj)

    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{json_file}: {len(problems)} bad annotation(s):\n  {listed}{more}")
    if dropped_polygons:
        ids = ", ".join(str(a) for a in dropped_instances[:_MAX_LISTED])
        logger.warning(
            "%s: dropped %d polygon(s) with fewer than 3 points; %d instance(s) left without a valid "
            "polygon were dropped%s",
            json_file,
            dropped_polygons,
            len(dropped_instances),
            f" (annotation ids {ids}{', ...' if len(dropped_instances) > _MAX_LISTED else ''})"
            if dropped_instances
            else "",
        )
    if orphan_anns:
        logger.warning(
            "%s: dropped %d annotation(s) whose image_id is not in 'images'", json_file, orphan_anns
        )

    records = []
    for img_id in sorted(img_by_id):
        img = img_by_id[img_id]
        records.append(
            {
                "file_name": join_image_path(image_root, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "image_id": img_id,
                "annotations": anns_by_image[img_id],
            }
        )
    if check_images:
        check_images_exist(records, image_root, json_file)
    logger.info(
        "Loaded %d images, %d annotations, %d categories from %s",
        len(records),
        sum(len(r["annotations"]) for r in records),
        meta.num_classes,
        json_file,
    )
    return records, meta


def _category_meta(categories: list, json_file: str, image_root: str, dataset_name: str) -> DatasetMeta:
    by_id: dict[int, str] = {}
    for i, cat in enumerate(categories):
        cid = _require(cat, "id", f"categories[{i}]", json_file)
        name = _require(cat, "name", f"category id={cid}", json_file)
        if not isinstance(cid, int):
            raise DataError(f"{json_file}: category id={cid!r} is not an integer")
        if cid in by_id:
            raise DataError(f"{json_file}: category id={cid} appears more than once")
        by_id[cid] = str(name)
    if not by_id:
        raise DataError(f"{json_file}: 'categories' is empty")
    ids = sorted(by_id)
    if ids != list(range(1, len(ids) + 1)):
        logger.info(
            "%s: category ids %s are not 1..%d; mapping them to 0..%d", json_file, ids, len(ids), len(ids) - 1
        )
    return DatasetMeta(
        name=dataset_name,
        json_file=json_file,
        image_root=image_root,
        thing_classes=[by_id[i] for i in ids],
        thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(ids)},
        contiguous_id_to_dataset_id=dict(enumerate(ids)),
    )


def _check_bbox(bbox: Any, img: dict, tol: float) -> str:
    """'' when the XYWH box is usable, else what is wrong with it."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return f"has bbox {bbox!r}, expected [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"has a non-finite bbox {bbox}"
    if w < 0 or h < 0:
        return f"has a bbox with negative width or height {bbox}"
    if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
        return f"has bbox {bbox} outside the image (beyond {tol} px)"
    return ""


def check_images_exist(records: list[dict], image_root: str, json_file: str = "") -> None:
    """Raise DataError naming the first missing image files (one listing for s3://, stat per file locally)."""
    if _is_remote(image_root):
        from cascade_rcnn import storage

        present = set(storage.list_prefix(image_root.rstrip("/") + "/"))
        missing = [r for r in records if r["file_name"] not in present]
    else:
        missing = [r for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        listed = ", ".join(f"{r['file_name']} (image id={r['image_id']})" for r in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        src = f"{json_file}: " if json_file else ""
        raise DataError(f"{src}{len(missing)} image file(s) missing: {listed}{more}")


def filter_empty(records: list[dict]) -> list[dict]:
    """Drop images without a non-crowd annotation (detectron2's FILTER_EMPTY_ANNOTATIONS)."""
    kept = [r for r in records if any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", ()))]
    if len(kept) < len(records):
        logger.warning(
            "Removed %d images with no usable (non-crowd) annotations; %d images left",
            len(records) - len(kept),
            len(kept),
        )
    return kept
