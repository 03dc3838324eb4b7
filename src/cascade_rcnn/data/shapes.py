"""Synthetic COCO-format shapes data set (circle, square, triangle) for tests, the demo and smoke training.

Layout written under OUT (the COCO layout the loaders read)::

    annotations/instances_train2017.json   train2017/train2017_00001.jpg ...
    annotations/instances_val2017.json     val2017/val2017_00001.jpg ...

Light shapes on a dark noisy background, 1-5 per image, random sizes and rotations. Shapes never share
a pixel (so every polygon is exactly the visible region), but their boxes may overlap. Category ids
are 1, 3 and 7 on purpose, so the contiguous mapping (circle 0, square 1, triangle 2) is exercised.
With crowd_every=k, every k-th image also holds a cluster of small dots annotated as one crowd
instance with an uncompressed RLE mask, as COCO's crowd annotations are.

Every image is a function of (seed, split, index) only, so the output is the same on every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from cascade_rcnn import errors
from cascade_rcnn.data.coco import DataError
from cascade_rcnn.logs import setup_logging

logger = logging.getLogger(__name__)

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
_SPLIT_KEYS = {"train2017": 0, "val2017": 1}
_CIRCLE_VERTICES = 48


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """(K, 2) vertices of a shape of `size` px across, centred at (cx, cy)."""
    if kind == "circle":
        t = np.linspace(0.0, 2 * math.pi, _CIRCLE_VERTICES, endpoint=False)
        r = size / 2
    elif kind == "square":
        t = angle + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        r = size / math.sqrt(2)  # half diagonal of a square of side `size`
    else:  # equilateral triangle whose side is `size`
        t = angle + np.array([0.0, 2 / 3, 4 / 3]) * math.pi
        r = size / math.sqrt(3)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _rasterize(vertices: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bool (h, w) mask of a polygon, drawn exactly as it is painted into the image."""
    img = Image.new("L", (w, h), 0)
    # COCO pixel (x, y) covers [x, x+1); PIL's integer coordinates are pixel centres, hence the -0.5.
    ImageDraw.Draw(img).polygon([(x - 0.5, y - 0.5) for x, y in vertices], fill=1)
    return np.asarray(img, dtype=bool)


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with a run of zeros)."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(10, 70, size=3).astype(np.float32)
    ramp = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None, None] * rng.uniform(-12, 12, size=3)
    noise = rng.normal(0.0, 7.0, size=(h, w, 3)).astype(np.float32)
    return np.clip(base + ramp + noise, 0, 255)


def _draw_image(
    rng: np.random.Generator, min_size: int, max_size: int, max_shapes: int, with_crowd: bool
) -> tuple[np.ndarray, list[dict]]:
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    img = _background(rng, h, w)
    occupied = np.zeros((h, w), dtype=bool)
    objects: list[dict] = []
    short = min(h, w)

    if with_crowd:
        # A cluster of small dots: one crowd instance (the evaluator ignores detections inside it).
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        crowd = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(6, 12))):
            px, py = cx + rng.normal(0, short * 0.06), cy + rng.normal(0, short * 0.06)
            crowd |= _rasterize(_polygon("circle", px, py, rng.uniform(4, 9), 0.0), h, w)
        if crowd.any():
            grown = crowd.copy()  # keep other shapes a few pixels away from the cluster
            grown[:-3] |= crowd[3:]
            grown[3:] |= crowd[:-3]
            grown[:, :-3] |= grown[:, 3:]
            grown[:, 3:] |= grown[:, :-3]
            occupied |= grown
            objects.append(
                {"kind": "circle", "mask": crowd, "crowd": True, "color": rng.integers(150, 240, 3)}
            )

    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = ("circle", "square", "triangle")[int(rng.integers(3))]
        for _attempt in range(30):
            size = rng.uniform(0.14, 0.36) * short
            angle = rng.uniform(0, 2 * math.pi)
            cx, cy = rng.uniform(size * 0.6, w - size * 0.6), rng.uniform(size * 0.6, h - size * 0.6)
            verts = _polygon(kind, cx, cy, size, angle)
            if verts.min() < 1 or verts[:, 0].max() > w - 1 or verts[:, 1].max() > h - 1:
                continue
            mask = _rasterize(verts, h, w)
            if (mask & occupied).any() or not mask.any():
                continue
            occupied |= mask
            color = rng.integers(120, 246, size=3)
            objects.append({"kind": kind, "verts": verts, "mask": mask, "crowd": False, "color": color})
            break

    for obj in objects:
        img[obj["mask"]] = obj["color"]
    return np.round(img).astype(np.uint8), objects


def _annotation(obj: dict, ann_id: int, image_id: int, cat_ids: dict[str, int]) -> dict:
    mask = obj["mask"]
    ys, xs = np.nonzero(mask)
    if obj["crowd"]:
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        segm = {"size": list(mask.shape), "counts": _rle_counts(mask)}
        area = float(mask.sum())
    else:
        v = obj["verts"]
        x0, y0 = v.min(axis=0)
        x1, y1 = v.max(axis=0)
        segm = [[round(float(c), 2) for c in v.reshape(-1)]]
        x, y = v[:, 0], v[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    bbox = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat_ids[obj["kind"]],
        "bbox": bbox,
        "area": round(area, 2),
        "iscrowd": int(obj["crowd"]),
        "segmentation": segm,
    }


def write_split(
    out_dir: str,
    split: str,
    num_images: int,
    *,
    seed: int = 0,
    min_size: int = 256,
    max_size: int = 448,
    max_shapes: int = 5,
    crowd_every: int = 8,
) -> str:
    """Write `num_images` images and annotations/instances_<split>.json; returns the JSON path."""
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    split_key = _SPLIT_KEYS.get(split, sum(split.encode()))
    cat_ids = {c["name"]: c["id"] for c in CATEGORIES}
    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        rng = np.random.default_rng([seed, split_key, i])
        with_crowd = crowd_every > 0 and i % crowd_every == 0
        pixels, objects = _draw_image(rng, min_size, max_size, max_shapes, with_crowd)
        file_name = f"{split}_{i:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(img_dir, file_name), quality=92)
        images.append({"id": i, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for obj in objects:
            annotations.append(_annotation(obj, len(annotations) + 1, i, cat_ids))
    coco = {
        "info": {"description": f"synthetic shapes ({split}, seed {seed})", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    logger.info("Wrote %d images and %d annotations to %s", len(images), len(annotations), json_path)
    return json_path


def make_shapes(
    out_dir: str,
    num_train: int = 64,
    num_val: int = 16,
    seed: int = 0,
    min_size: int = 256,
    max_size: int = 448,
    *,
    max_shapes: int = 5,
    crowd_every: int = 8,
) -> dict[str, str]:
    """Write train2017 and val2017 splits under `out_dir`; returns {split: annotations JSON path}."""
    kw = dict(seed=seed, min_size=min_size, max_size=max_size, max_shapes=max_shapes, crowd_every=crowd_every)
    return {
        "train2017": write_split(out_dir, "train2017", num_train, **kw),
        "val2017": write_split(out_dir, "val2017", num_val, **kw),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cascade-rcnn make-shapes", description="Write a small synthetic COCO-format shapes data set."
    )
    parser.add_argument("out", help="output directory, or an s3:// prefix (written locally, then uploaded)")
    parser.add_argument("--train", type=int, default=64, help="number of training images (default 64)")
    parser.add_argument("--val", type=int, default=16, help="number of validation images (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=256, help="smallest image side in px")
    parser.add_argument("--max-size", type=int, default=448, help="largest image side in px")
    parser.add_argument("--max-shapes", type=int, default=5, help="most shapes per image")
    parser.add_argument("--crowd-every", type=int, default=8, help="every k-th image gets a crowd (0: none)")
    errors.add_debug_option(parser)
    args = parser.parse_args(argv)
    if not 16 <= args.min_size <= args.max_size:
        parser.error(f"need 16 <= --min-size <= --max-size, got {args.min_size} and {args.max_size}")
    setup_logging(fmt="%(levelname)s %(name)s: %(message)s")
    opts = dict(
        num_train=args.train,
        num_val=args.val,
        seed=args.seed,
        min_size=args.min_size,
        max_size=args.max_size,
        max_shapes=args.max_shapes,
        crowd_every=args.crowd_every,
    )

    def write() -> int:
        try:
            if args.out.startswith("s3://"):
                from cascade_rcnn import storage

                with tempfile.TemporaryDirectory() as tmp:
                    make_shapes(tmp, **opts)
                    storage.upload_tree(tmp, args.out)
            else:
                make_shapes(args.out, **opts)
        except OSError as e:  # an unwritable output: the user's to fix
            raise DataError(f"cannot write the shapes data set to {args.out}: {e}") from e
        print(f"wrote shapes data set to {args.out}")
        return 0

    return errors.run_command("cascade-rcnn make-shapes", write, args.debug)


if __name__ == "__main__":
    sys.exit(main())
