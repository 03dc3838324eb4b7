"""Record -> model input, as detectron2's DatasetMapper: read, resize shortest edge, flip, build Targets.

Training: ResizeShortestEdge (one of MIN_SIZE_TRAIN, "choice", or an integer in [lo, hi], "range"; the
long side capped at MAX_SIZE_TRAIN), then a horizontal flip with p=0.5. Crowd instances are dropped;
boxes go XYWH -> XYXY, through the transforms, and are clipped to the image; instances whose box side is
<= 1e-5 or whose mask is empty are removed. Test: resize to MIN_SIZE_TEST / MAX_SIZE_TEST, no flip,
no targets. The random choices come from the `rng` argument only, so a caller that seeds it per item
gets the same output in any process (see loader.py).

Output: {"image": uint8 (C, H, W) contiguous, channel order cfg.INPUT.FORMAT, "height", "width"
(original size), "file_name", "image_id", "targets": Targets (training only)}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from cascade_rcnn import storage
from cascade_rcnn.data.coco import DataError
from cascade_rcnn.data.image_io import read_image
from cascade_rcnn.data.transforms import HFlipTransform, ResizeTransform, resize_shortest_edge_shape
from cascade_rcnn.structures import Targets

# detectron2 removes instances whose box width or height is not above this (filter_empty_instances).
_MIN_BOX_SIDE = 1e-5


def local_image_file(file_name: str, cache_dir: Optional[str] = None) -> str:
    """Local path of an image: the path itself, or the cached copy of an s3:// object.

    The cache is keyed by URI (<cache>/s3/<bucket>/<key>) and filled on first use; objects are assumed
    immutable, as the ingest step writes them once. Concurrent workers may fetch the same object: the
    storage layer writes atomically, so the last rename wins with identical bytes.
    """
    if not file_name.startswith("s3://"):
        return storage.local_path(file_name)
    bucket, _, key = file_name[len("s3://") :].partition("/")
    parts = [bucket, *key.split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise DataError(f"{file_name}: this object key cannot be cached as a file")
    path = os.path.join(cache_dir or storage.cache_dir(), "s3", *parts)
    if not os.path.isfile(path):
        storage.get_file(file_name, path)
    return path


def _xywh_to_xyxy(bboxes: list[list[float]]) -> np.ndarray:
    """(N, 4) XYXY float64. The sum runs in float32, as detectron2's BoxMode.convert does on a list."""
    b = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4)
    b[:, 2] += b[:, 0]
    b[:, 3] += b[:, 1]
    return b.astype(np.float64)


def _polygons_to_bitmask(polygons: list[np.ndarray], h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], h, w)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _decode_rle(segm: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    counts = segm["counts"]
    rle = {"size": segm["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_util.decode(rle).astype(bool)


@dataclass
class DatasetMapper:
    """Callable record -> model input dict; see the module docstring.

    min_sizes: candidate shorter sides ("choice"), or (lo, hi) ("range"); 0 disables resizing.
    flip: "horizontal" or "none" (training only). mask_format: "polygon" keeps polygons in Targets;
    "bitmask" rasterizes all masks. Images with any non-crowd RLE mask always use bitmasks.
    """

    is_train: bool
    min_sizes: tuple[int, ...]
    max_size: int
    sample_style: str = "choice"
    flip: str = "horizontal"
    image_format: str = "BGR"
    use_masks: bool = True
    mask_format: str = "polygon"
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        self.min_sizes = tuple(int(s) for s in self.min_sizes)
        if self.sample_style not in ("choice", "range"):
            raise ValueError(
                f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice' or 'range', got {self.sample_style!r}"
            )
        if self.sample_style == "range" and len(self.min_sizes) != 2:
            raise ValueError(
                f"INPUT.MIN_SIZE_TRAIN with 'range' sampling needs (lo, hi), got {self.min_sizes}"
            )
        if not self.min_sizes:
            raise ValueError("INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST is empty")
        if self.flip not in ("horizontal", "none"):
            raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal' or 'none', got {self.flip!r}")
        if self.mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"INPUT.MASK_FORMAT must be 'polygon' or 'bitmask', got {self.mask_format!r}")

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool, cache_dir: Optional[str] = None) -> DatasetMapper:
        inp = cfg.INPUT
        if is_train:
            sizes = inp.MIN_SIZE_TRAIN
            sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
            return cls(
                is_train=True,
                min_sizes=sizes,
                max_size=inp.MAX_SIZE_TRAIN,
                sample_style=inp.MIN_SIZE_TRAIN_SAMPLING,
                flip=inp.RANDOM_FLIP,
                image_format=inp.FORMAT,
                use_masks=bool(cfg.MODEL.MASK_ON),
                mask_format=inp.MASK_FORMAT,
                cache_dir=cache_dir,
            )
        return cls(
            is_train=False,
            min_sizes=(inp.MIN_SIZE_TEST,),
            max_size=inp.MAX_SIZE_TEST,
            flip="none",
            image_format=inp.FORMAT,
            use_masks=bool(cfg.MODEL.MASK_ON),
            mask_format=inp.MASK_FORMAT,
            cache_dir=cache_dir,
        )

    def _read(self, record: dict) -> np.ndarray:
        file_name = record["file_name"]
        where = f"{file_name} (image id={record.get('image_id')})"
        try:
            image = read_image(local_image_file(file_name, self.cache_dir), format=self.image_format)
        except DataError:
            raise
        except FileNotFoundError as e:
            raise DataError(f"{where}: image file not found") from e
        except Exception as e:  # noqa: BLE001 - decode errors, storage errors: all name the file
            raise DataError(f"{where}: cannot read image: {e}") from e
        h, w = image.shape[:2]
        if (record.get("height", h), record.get("width", w)) != (h, w):
            raise DataError(
                f"{where}: image is {w}x{h} (width x height) but the annotations say "
                f"{record['width']}x{record['height']}"
            )
        return image

    def _sample(self, rng: Optional[np.random.Generator]) -> tuple[int, bool]:
        """(shorter side, flip?) for this image, drawn in detectron2's order: size, then flip."""
        if not self.is_train:
            return self.min_sizes[0], False
        if rng is None:
            raise ValueError("the training mapper needs an rng (numpy Generator) for its random choices")
        if self.sample_style == "range":
            short = int(rng.integers(self.min_sizes[0], self.min_sizes[1] + 1))
        else:
            short = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
        flip = self.flip == "horizontal" and bool(rng.random() < 0.5)
        return short, flip

    def __call__(self, record: dict, rng: Optional[np.random.Generator] = None) -> dict:
        image = self._read(record)
        h, w = image.shape[:2]
        short, flip = self._sample(rng)
        transforms: list = []
        if short > 0:
            newh, neww = resize_shortest_edge_shape(h, w, short, self.max_size)
            transforms.append(ResizeTransform(h, w, newh, neww))
        else:
            newh, neww = h, w
        if flip:
            transforms.append(HFlipTransform(neww))
        for t in transforms:
            image = t.apply_image(image)
        out = {
            "file_name": record["file_name"],
            "image_id": record.get("image_id"),
            "height": record.get("height", h),
            "width": record.get("width", w),
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        }
        if self.is_train:
            out["targets"] = self._targets(record, transforms, (newh, neww))
        return out

    def _targets(self, record: dict, transforms: list, image_size: tuple[int, int]) -> Targets:
        newh, neww = image_size
        annos = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
        boxes = _xywh_to_xyxy([a["bbox"] for a in annos])
        for t in transforms:
            boxes = t.apply_boxes(boxes)
        boxes = np.minimum(boxes.clip(min=0), [neww, newh, neww, newh])
        boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([int(a["category_id"]) for a in annos], dtype=torch.int64)

        polygons: Optional[list[list[np.ndarray]]] = None
        masks: Optional[torch.Tensor] = None
        if self.use_masks and annos:
            for a in annos:
                if "segmentation" not in a:
                    raise DataError(
                        f"{record['file_name']}: annotation id={a.get('id')} has no segmentation, "
                        "but the model has a mask head (MODEL.MASK_ON)"
                    )
            has_rle = any(isinstance(a["segmentation"], dict) for a in annos)
            if has_rle or self.mask_format == "bitmask":
                masks = self._bitmasks(record, annos, transforms, image_size)
            else:
                polygons = []
                for a in annos:
                    polys = [np.asarray(p, dtype=np.float64) for p in a["segmentation"]]
                    for t in transforms:
                        polys = t.apply_polygons(polys)
                    polygons.append(polys)
        elif self.use_masks and self.mask_format == "bitmask":
            masks = torch.zeros((0, newh, neww), dtype=torch.bool)
        elif self.use_masks:
            polygons = []

        keep = ((boxes_t[:, 2] - boxes_t[:, 0]) > _MIN_BOX_SIDE) & (
            (boxes_t[:, 3] - boxes_t[:, 1]) > _MIN_BOX_SIDE
        )
        if masks is not None:
            keep &= masks.flatten(1).any(dim=1)
        if polygons is not None:
            keep &= torch.tensor([len(p) > 0 for p in polygons], dtype=torch.bool).reshape(-1)
        idx = keep.nonzero().flatten().tolist()
        return Targets(
            boxes=boxes_t[keep],
            classes=classes[keep],
            polygons=None if polygons is None else [polygons[i] for i in idx],
            masks=None if masks is None else masks[keep],
        )

    def _bitmasks(
        self, record: dict, annos: list[dict], transforms: list, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """(N, H, W) bool: polygons rasterized after transforming; RLE decoded, then transformed."""
        newh, neww = image_size
        masks = []
        for a in annos:
            segm = a["segmentation"]
            if isinstance(segm, dict):
                mask = _decode_rle(segm)
                if mask.shape != (record["height"], record["width"]):
                    raise DataError(
                        f"{record['file_name']}: annotation id={a.get('id')} has an RLE of size "
                        f"{list(mask.shape)}, but the image is {record['height']}x{record['width']} (h x w)"
                    )
                for t in transforms:
                    mask = t.apply_segmentation(mask)
            else:
                polys = [np.asarray(p, dtype=np.float64) for p in segm]
                for t in transforms:
                    polys = t.apply_polygons(polys)
                mask = _polygons_to_bitmask(polys, newh, neww)
            masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
        return torch.stack(masks) if masks else torch.zeros((0, newh, neww), dtype=torch.bool)
