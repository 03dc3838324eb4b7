"""Repairs of annotations that cannot be trained on as they are, each one recorded.

Real annotation files are not clean: COCO 2017 train holds a zero-height box whose polygon repeats
its points (annotation 918, image 200365; cocoapi issue 355), and CVAT, Labelme and Roboflow exports
hold 2-point polygons and boxes that run past the image border. Failing a whole data set on one of
them helps nobody, so ingest repairs what it can and records what it did:

- a box that runs past the border is clipped to the image;
- a polygon with fewer than 3 points (< 6 coordinates) or an odd number of coordinates is dropped;
- a polygon whose points all coincide or lie on one line is dropped too: it encloses no pixel, so as a
  mask target it would teach "no object here" inside a box that holds one;
- an annotation left without a polygon, or whose box has no area inside the image, is dropped.

RLE segmentations (crowd regions) are never changed. What this module cannot judge (an unknown image
id, a bbox that is not 4 numbers, a negative size, polygons that are not numbers) is left as it is,
for validation to report as an error.

Each change is a dict, in file order:
    {"annotation_id", "image_id", "action": "clip_bbox" | "drop_polygon" | "drop_annotation",
     "field": "bbox" | "segmentation" | "annotation", "before", "after" (None for a dropped annotation),
     "why", "strict": True when strict mode refuses it}
Strict mode accepts only a box clipped by at most `bbox_tolerance` px (rounding); every other change
is an error there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ACTIONS = ("clip_bbox", "drop_polygon", "drop_annotation")
# Strict mode still clips a box that overhangs by at most this much (rounding), as the old check did.
BBOX_TOLERANCE = 1.0
# The mapper drops boxes with a side this thin at training time anyway.
_MIN_BOX_SIDE = 1e-5
# Points closer than this to one line enclose no area worth a mask (and float rounding of decimal
# coordinates stays far below it).
_FLAT_PX = 1e-6


@dataclass
class RepairResult:
    data: dict  # the repaired JSON; shares every unchanged object with the input
    changes: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # per action, plus strict_errors

    @property
    def strict_errors(self) -> list[dict]:
        return [c for c in self.changes if c["strict"]]


def describe(change: dict, refused: bool = False) -> str:
    """One line for logs and errors: the annotation, what is wrong, and the repair (or its refusal)."""
    repair = {
        "clip_bbox": f"clipped to {change['after']}",
        "drop_polygon": "polygon dropped",
        "drop_annotation": "annotation dropped",
    }[change["action"]]
    head = f"annotation id={change['annotation_id']} (image_id={change['image_id']}): {change['why']}"
    if refused:
        return f"{head}; not repaired ({repair}) because strict is set"
    return f"{head}: {repair}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _usable_images(data: dict) -> dict[int, dict]:
    """id -> image for entries with an integer id and positive integer sizes (validation reports the rest)."""
    out = {}
    for img in data["images"]:
        if not isinstance(img, dict):
            continue
        iid, h, w = img.get("id"), img.get("height"), img.get("width")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (iid, h, w)) and h > 0 and w > 0:
            out.setdefault(iid, img)
    return out


def _clip_axis(lo: float, size: float, limit: int) -> tuple[float, float]:
    # Left alone unless it crosses a border, so an untouched side keeps its exact value.
    if lo >= 0 and lo + size <= limit:
        return lo, size
    start, end = max(lo, 0), min(lo + size, limit)
    return start, max(end - start, 0)


def _box_repair(bbox: list, img: dict) -> tuple[list | None, float, str, str]:
    """(clipped box or None when unchanged, overhang in px, sides crossed, why it cannot be used or '')."""
    x, y, w, h = bbox
    width, height = img["width"], img["height"]
    over = {"left": -x, "top": -y, "right": x + w - width, "bottom": y + h - height}
    crossed = [side for side, v in over.items() if v > 0]
    clipped = None
    if crossed:
        nx, nw = _clip_axis(x, w, width)
        ny, nh = _clip_axis(y, h, height)
        clipped = [nx, ny, nw, nh]
    else:
        nw, nh = w, h
    unusable = ""
    if nw <= _MIN_BOX_SIDE or nh <= _MIN_BOX_SIDE:
        where = f"the {width}x{height} image {img['file_name']}"
        if crossed and (w > _MIN_BOX_SIDE and h > _MIN_BOX_SIDE):
            unusable = f"bbox {bbox} has no area inside {where}"
        else:
            empty = " and ".join(n for n, v in (("width", w), ("height", h)) if v <= _MIN_BOX_SIDE)
            unusable = f"bbox {bbox} has zero {empty}"
    return clipped, max(over.values()), ", ".join(crossed), unusable


def _is_flat(poly: list) -> bool:
    """True when all points coincide or lie on one line (within _FLAT_PX): no area at all.

    Not the shoelace area: a self-crossing polygon can have zero signed area and still cover pixels.
    """
    # Fast exit for nearly every real polygon (numpy costs ~9 us each, ~1M polygons in COCO train):
    # if all points were within _FLAT_PX of one line, the first three would span a parallelogram of
    # at most 2 * _FLAT_PX * (the points' extent).
    xs, ys = poly[0::2], poly[1::2]
    extent = math.hypot(max(xs) - min(xs), max(ys) - min(ys))
    cross = (xs[1] - xs[0]) * (ys[2] - ys[0]) - (ys[1] - ys[0]) * (xs[2] - xs[0])
    if abs(cross) > 2.5 * _FLAT_PX * extent:
        return False
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    d = xy - xy[0]
    far = d[int(np.argmax((d * d).sum(axis=1)))]
    length = math.hypot(far[0], far[1])
    if length <= _FLAT_PX:
        return True
    # Distance of every point from the line through the first point and the one farthest from it.
    return float(np.abs(d[:, 0] * far[1] - d[:, 1] * far[0]).max()) / length <= _FLAT_PX


def _polygon_defect(poly: list) -> str:
    n = len(poly)
    if n < 6:
        return f"has {n} coordinates (fewer than 3 points)"
    if n % 2:
        return f"has an odd number of coordinates ({n})"
    if _is_flat(poly):
        return f"has no area (its {n // 2} points coincide or lie on one line)"
    return ""


def repair_annotations(
    data: dict, images: dict[int, dict] | None = None, *, bbox_tolerance: float = BBOX_TOLERANCE
) -> RepairResult:
    """Applies the repairs above to a parsed COCO instances JSON (which is not modified).

    `images`: id -> image of the usable image entries (as validation found them); by default taken
    from `data`. An image's size is the JSON's height/width.
    """
    if images is None:
        images = _usable_images(data)
    changes: list[dict] = []
    kept: list = []
    for ann in data["annotations"]:
        img = images.get(ann.get("image_id")) if isinstance(ann, dict) else None
        bbox = ann.get("bbox") if img is not None else None
        if not (
            isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)) and min(bbox[2:]) >= 0
        ):
            kept.append(ann)  # nothing to judge here; validation names what is wrong
            continue
        ids = {"annotation_id": ann.get("id"), "image_id": ann["image_id"]}
        mine: list[dict] = []
        drop_why: list[str] = []

        clipped, overhang, crossed, unusable = _box_repair(bbox, img)
        if unusable:
            drop_why.append(unusable)
        elif clipped is not None:
            mine.append(
                {
                    **ids,
                    "action": "clip_bbox",
                    "field": "bbox",
                    "before": bbox,
                    "after": clipped,
                    "why": f"bbox {bbox} runs {overhang:g} px past the {crossed} border of the "
                    f"{img['width']}x{img['height']} image {img['file_name']}",
                    "strict": overhang > bbox_tolerance,
                }
            )

        segm = ann.get("segmentation")
        new_segm = segm
        if (
            isinstance(segm, list)
            and segm
            and all(isinstance(p, list) and all(map(_is_number, p)) for p in segm)
        ):
            defects = [(k, _polygon_defect(p)) for k, p in enumerate(segm)]
            bad = [f"polygon {k} {why}" for k, why in defects if why]
            if bad:
                new_segm = [p for p, (_, why) in zip(segm, defects) if not why]
                if not new_segm:
                    drop_why.append("; ".join(bad) + ", and no polygon is left")
                else:
                    mine.append(
                        {
                            **ids,
                            "action": "drop_polygon",
                            "field": "segmentation",
                            "before": segm,
                            "after": new_segm,
                            "why": "; ".join(bad),
                            "strict": True,
                        }
                    )

        if drop_why:
            changes.append(
                {
                    **ids,
                    "action": "drop_annotation",
                    "field": "annotation",
                    "before": ann,
                    "after": None,
                    "why": "; ".join(drop_why),
                    "strict": True,
                }
            )
            continue
        if mine:
            ann = dict(ann)
            if clipped is not None:
                ann["bbox"] = clipped
            if new_segm is not segm:
                ann["segmentation"] = new_segm
            changes.extend(mine)
        kept.append(ann)

    counts = {action: 0 for action in ACTIONS}
    for c in changes:
        counts[c["action"]] += 1
    counts["strict_errors"] = sum(c["strict"] for c in changes)
    repaired = {**data, "annotations": kept} if changes else data
    return RepairResult(repaired, changes, counts)
