"""Validation of a COCO instances JSON and the images it references.

Everything wrong is collected (not just the first problem), counted per kind, and the first
`max_listed` messages are kept, each naming the JSON file and the ids involved. Defects that a repair
fixes (boxes past the border, unusable polygons: see repair.py) are not errors unless `strict` is set;
the report carries the repairs and the repaired JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.ingest.repair import BBOX_TOLERANCE, RepairResult, describe, repair_annotations
from cascade_rcnn.storage.progress import Progress

logger = logging.getLogger(__name__)

# The error kind under which strict mode reports each repair it refuses.
STRICT_ERROR_KINDS = {
    "clip_bbox": "bbox outside image",
    "drop_polygon": "unusable polygon",
    "drop_annotation": "unusable annotation",
}

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


@dataclass
class ValidationReport:
    json_path: str
    image_dir: str
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    images_checked: int = 0
    num_errors: int = 0
    errors: list[str] = field(default_factory=list)  # the first `max_listed` messages
    error_kinds: dict[str, int] = field(default_factory=dict)
    num_warnings: int = 0
    warnings: list[str] = field(default_factory=list)
    repairs: RepairResult | None = field(default=None, repr=False)  # holds the repaired JSON

    @property
    def ok(self) -> bool:
        return self.num_errors == 0

    def summary(self) -> str:
        head = (
            f"{self.json_path}: {self.num_images} images, {self.num_annotations} annotations, "
            f"{self.num_categories} categories, {self.images_checked} image files checked in "
            f"{self.image_dir}; "
        )
        if self.repairs is not None and self.repairs.changes:
            done = ", ".join(f"{n} {a}" for a, n in self.repairs.counts.items() if n and a != "strict_errors")
            head += f"repairs: {done}; "
        if self.ok:
            return head + f"no errors ({self.num_warnings} warnings)"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.error_kinds.items()))
        lines = [head + f"{self.num_errors} errors ({kinds})"]
        lines += [f"  - {msg}" for msg in self.errors]
        if self.num_errors > len(self.errors):
            lines.append(f"  ... and {self.num_errors - len(self.errors)} more")
        return "\n".join(lines)


class InvalidAnnotations(IngestError):
    """Raised by validate_annotations when errors exist; `.report` holds the details."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


class _Collector:
    def __init__(self, report: ValidationReport, max_listed: int):
        self.report = report
        self.max_listed = max_listed
        self.kinds: Counter[str] = Counter()

    def error(self, kind: str, msg: str) -> None:
        self.kinds[kind] += 1
        self.report.num_errors += 1
        if len(self.report.errors) < self.max_listed:
            self.report.errors.append(f"{kind}: {msg}")

    def warning(self, msg: str) -> None:
        self.report.num_warnings += 1
        if len(self.report.warnings) < self.max_listed:
            self.report.warnings.append(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_NUMBER_TYPES = {int, float}


def _all_finite_numbers(values: list) -> bool:
    """Same as all(map(_is_number, values)) at C speed: COCO train has ~40M polygon coordinates."""
    if not set(map(type, values)) <= _NUMBER_TYPES:  # exact types, so bool is excluded
        return False
    try:
        return math.isfinite(sum(values))  # nan and inf survive a sum
    except OverflowError:  # an int too large for a float
        return False


def _check_images(data: dict, out: _Collector) -> dict[int, dict]:
    images: dict[int, dict] = {}
    names: set[str] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            out.error("bad image entry", f"images[{i}] is not an object")
            continue
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            out.error("missing field", f"images[{i}] (id={img.get('id')}) lacks {', '.join(missing)}")
            continue
        iid, name = img["id"], img["file_name"]
        if not _is_int(iid):
            out.error("bad image entry", f"images[{i}] has non-integer id {iid!r}")
            continue
        if iid in images:
            out.error("duplicate id", f"image id={iid} appears more than once ({name!r})")
            continue
        path = PurePosixPath(str(name).replace("\\", "/"))
        if not isinstance(name, str) or not name or path.is_absolute() or ".." in path.parts:
            out.error("bad image entry", f"image id={iid} has unusable file_name {name!r}")
            continue
        if not (_is_int(img["height"]) and _is_int(img["width"]) and img["height"] > 0 and img["width"] > 0):
            out.error(
                "bad image entry",
                f"image id={iid} ({name}) has height/width {img['height']!r}x{img['width']!r}",
            )
            continue
        if name in names:
            out.warning(f"image id={iid} shares file_name {name!r} with another image")
        names.add(name)
        images[iid] = img
    return images


def _check_categories(data: dict, out: _Collector) -> set[int]:
    ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            out.error("missing field", f"categories[{i}] needs id and name")
            continue
        if not _is_int(cat["id"]):
            out.error("bad category", f"categories[{i}] has non-integer id {cat['id']!r}")
            continue
        if cat["id"] in ids:
            out.error("duplicate id", f"category id={cat['id']} appears more than once")
            continue
        ids.add(cat["id"])
    return ids


def _check_segmentation(seg: Any, ann_desc: str, img: dict, out: _Collector) -> None:
    if isinstance(seg, list):
        if not seg:
            out.error("bad segmentation", f"{ann_desc}: empty polygon list")
        for k, poly in enumerate(seg):
            # Too few or an odd number of coordinates is a repair (repair.py), not an error.
            if not isinstance(poly, list) or not _all_finite_numbers(poly):
                out.error("bad segmentation", f"{ann_desc}: polygon {k} is not a list of finite numbers")
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if counts is None or not isinstance(counts, (str, list)):
            out.error("bad segmentation", f"{ann_desc}: RLE without counts")
        if size != [img["height"], img["width"]]:
            out.error(
                "bad segmentation",
                f"{ann_desc}: RLE size {size!r} differs from image size [{img['height']}, {img['width']}]",
            )
    else:
        out.error("bad segmentation", f"{ann_desc}: segmentation is neither polygons nor RLE")


def _check_annotations(data: dict, images: dict[int, dict], categories: set[int], out: _Collector) -> None:
    # Run on the JSON as it came, so an annotation that a repair drops still has its ids checked.
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            out.error("bad annotation", f"annotations[{i}] is not an object")
            continue
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "iscrowd") if k not in ann]
        desc = f"annotation id={ann.get('id')} (image_id={ann.get('image_id')})"
        if missing:
            out.error("missing field", f"{desc} lacks {', '.join(missing)}")
            continue
        if not _is_int(ann["id"]):
            out.error("bad annotation", f"annotations[{i}] has non-integer id {ann['id']!r}")
        elif ann["id"] in seen:
            out.error("duplicate id", f"annotation id={ann['id']} appears more than once")
        else:
            seen.add(ann["id"])
        img = images.get(ann["image_id"]) if _is_int(ann["image_id"]) else None
        if img is None:
            out.error("dangling image_id", f"{desc} refers to an image id not in images")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in categories:
            out.error(
                "dangling category_id", f"{desc} has category_id={ann['category_id']} not in categories"
            )
        if ann["iscrowd"] not in (0, 1):
            out.error("bad annotation", f"{desc} has iscrowd={ann['iscrowd']!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and _all_finite_numbers(bbox)):
            out.error("bad bbox", f"{desc}: bbox {bbox!r} is not 4 finite numbers")
        elif bbox[2] < 0 or bbox[3] < 0:
            out.error("bad bbox", f"{desc}: bbox {bbox!r} has negative width or height")
        # A box past the border is clipped by repair_annotations (an error only in strict mode).
        if "segmentation" in ann and img is not None:
            _check_segmentation(ann["segmentation"], desc, img, out)


def _check_image_file(path: Path, img: dict, check_sizes: bool) -> tuple[str, str] | None:
    """(kind, message) when the file is missing, undecodable or of the wrong size."""
    from PIL import Image

    desc = f"image id={img['id']} file {img['file_name']}"
    if not path.is_file():
        return "missing image", f"{desc} does not exist"
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            if im.format == "JPEG":
                # Decoding at 1/8 scale reads the whole entropy-coded stream (so truncation is
                # caught) for a fraction of the cost of a full decode.
                im.draft("RGB", (max(width // 8, 1), max(height // 8, 1)))
                im.load()
            else:
                im.verify()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        return "undecodable image", f"{desc}: {type(e).__name__}: {e}"
    if orientation in _SWAPS_AXES:
        width, height = height, width
    if check_sizes and (width, height) != (img["width"], img["height"]):
        return (
            "size mismatch",
            f"{desc} is {width}x{height}, the JSON says {img['width']}x{img['height']}",
        )
    return None


def load_annotations(json_path: str | os.PathLike) -> dict:
    """Parses a COCO JSON; IngestError naming the file when it is not JSON or lacks the lists."""
    try:
        with open(json_path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise IngestError(f"{json_path}: cannot read annotation JSON ({e})") from e
    if not isinstance(data, dict):
        raise IngestError(f"{json_path}: top level is {type(data).__name__}, expected an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise IngestError(f"{json_path}: missing or non-list field {key!r}")
    return data


def validate_annotations(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    check_images: bool = True,
    check_sizes: bool = True,
    bbox_tolerance: float = BBOX_TOLERANCE,
    max_listed: int = 20,
    workers: int = 8,
    data: dict | None = None,
    raise_on_error: bool = True,
    display_json: str | None = None,
    display_images: str | None = None,
    strict: bool = False,
) -> ValidationReport:
    """Checks a COCO instances JSON and, with `check_images`, every image it lists in `image_dir`.

    `data` may carry the already-parsed JSON to avoid reading a large file twice. `display_json` and
    `display_images` name the files in messages when they were staged from elsewhere. Repairable
    defects are repaired (`report.repairs`, whose `.data` is the repaired JSON); with `strict` each
    one is an error, except a box clipped by at most `bbox_tolerance` px. Raises InvalidAnnotations
    (an IngestError) when errors exist, unless `raise_on_error` is False.
    """
    report = ValidationReport(
        json_path=display_json or str(json_path), image_dir=display_images or str(image_dir)
    )
    if data is None:
        data = load_annotations(json_path)
    out = _Collector(report, max_listed)
    images = _check_images(data, out)
    categories = _check_categories(data, out)
    _check_annotations(data, images, categories, out)
    report.repairs = repair_annotations(data, images, bbox_tolerance=bbox_tolerance)
    if strict:
        for change in report.repairs.strict_errors:
            out.error(STRICT_ERROR_KINDS[change["action"]], describe(change, refused=True))
    report.num_images = len(data["images"])
    report.num_annotations = len(data["annotations"])
    report.num_categories = len(data["categories"])
    if check_images and images:
        image_root = Path(image_dir)
        progress = Progress(f"check images of {report.json_path}", len(images), unit="images", logger=logger)
        with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
            results = pool.map(
                lambda img: _check_image_file(image_root / img["file_name"], img, check_sizes),
                images.values(),
            )
            for problem in results:
                progress.update(1)
                report.images_checked += 1
                if problem is not None:
                    out.error(*problem)
        progress.finish()
    report.error_kinds = dict(out.kinds)
    if report.ok:
        logger.info("%s", report.summary())
    elif raise_on_error:
        raise InvalidAnnotations(report)
    else:
        logger.error("%s", report.summary())
    return report
