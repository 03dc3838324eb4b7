"""Where a split lives: detectron2 dataset names -> COCO-layout splits, and data roots -> file URIs.

A data root is one of:
- a local directory in COCO layout: ``annotations/instances_<split>.json`` and ``<split>/`` images;
- an ``s3://bucket/prefix`` holding the same layout;
- the URI (local or s3://) of an ingest manifest, a JSON file whose name ends in ``manifest.json``::

    {"name": "coco2017",
     "root": "s3://bucket/datasets/coco2017",          # optional; base for relative entries below
     "splits": {"val2017": {"annotations": "annotations/instances_val2017.json",   # or a full URI
                            "images": "val2017",                                    # or a full URI prefix
                            "num_images": 5000, ...}},
     "files": [...]}

  Relative "annotations"/"images" entries are resolved against "root", or against the manifest's own
  folder when "root" is absent. Other keys are ignored here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cascade_rcnn.data.coco import DataError, DatasetMeta, load_coco_json, read_json
from cascade_rcnn.storage import local_path


@dataclass(frozen=True)
class SplitSpec:
    """A named dataset: its image folder (the split) and annotation file name under annotations/."""

    split: str
    annotation_file: str


# detectron2's builtin COCO names (data/datasets/builtin.py), plus our synthetic shapes set.
DATASETS: dict[str, SplitSpec] = {
    "coco_2014_train": SplitSpec("train2014", "instances_train2014.json"),
    "coco_2014_val": SplitSpec("val2014", "instances_val2014.json"),
    "coco_2014_minival": SplitSpec("val2014", "instances_minival2014.json"),
    "coco_2014_valminusminival": SplitSpec("val2014", "instances_valminusminival2014.json"),
    "coco_2017_train": SplitSpec("train2017", "instances_train2017.json"),
    "coco_2017_val": SplitSpec("val2017", "instances_val2017.json"),
    "coco_2017_test": SplitSpec("test2017", "image_info_test2017.json"),
    "coco_2017_test-dev": SplitSpec("test2017", "image_info_test-dev2017.json"),
    "coco_2017_val_100": SplitSpec("val2017", "instances_val2017_100.json"),
    "shapes_train": SplitSpec("train2017", "instances_train2017.json"),
    "shapes_val": SplitSpec("val2017", "instances_val2017.json"),
}


def split_of(name: str) -> str:
    """Dataset name (``coco_2017_train``) -> split folder (``train2017``); a bare split passes through."""
    if name in DATASETS:
        return DATASETS[name].split
    if name.startswith(("coco_", "shapes_")):
        raise DataError(f"unknown dataset name {name!r}; known: {', '.join(sorted(DATASETS))}")
    return name


def _annotation_candidates(name_or_split: str) -> list[str]:
    if name_or_split in DATASETS:
        return [DATASETS[name_or_split].annotation_file]
    split = name_or_split
    names = [f"instances_{split}.json", f"image_info_{split}.json"]
    if split == "test2017":
        names.append("image_info_test-dev2017.json")
    return names


def _exists(uri: str) -> bool:
    if uri.startswith("s3://"):
        from cascade_rcnn import storage

        return storage.exists(uri)
    return os.path.exists(local_path(uri))


def _join(base: str, rel: str) -> str:
    if "://" in rel or os.path.isabs(rel):
        return rel
    if base.startswith("s3://"):
        return base.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(base, rel)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def is_manifest(root_or_uri: str) -> bool:
    return root_or_uri.rstrip("/").endswith("manifest.json")


def resolve_dataset(root_or_uri: str, split: str) -> tuple[str, str]:
    """(annotations URI, image root URI) of a split (or dataset name) under a data root or manifest."""
    if is_manifest(root_or_uri):
        return _resolve_manifest(root_or_uri, split_of(split))
    image_root = _join(root_or_uri, split_of(split))
    tried = [_join(root_or_uri, f"annotations/{n}") for n in _annotation_candidates(split)]
    for ann in tried:
        if _exists(ann):
            return ann, image_root
    raise DataError(f"{root_or_uri}: no annotations for split {split!r}; looked for {', '.join(tried)}")


def _resolve_manifest(manifest_uri: str, split: str) -> tuple[str, str]:
    manifest: Any = read_json(manifest_uri)
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict):
        raise DataError(f"{manifest_uri}: manifest has no 'splits' object")
    if split not in splits:
        raise DataError(
            f"{manifest_uri}: manifest has no split {split!r}; it has {', '.join(sorted(splits))}"
        )
    entry = splits[split]
    base = manifest.get("root") or _parent(manifest_uri)
    for key in ("annotations", "images"):
        if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
            raise DataError(f"{manifest_uri}: splits.{split} has no {key!r} string")
    return _join(base, entry["annotations"]), _join(base, entry["images"])


def load_split(
    root_or_uri: str, name_or_split: str, *, check_images: bool = False
) -> tuple[list[dict], DatasetMeta]:
    """resolve_dataset + load_coco_json: the records and category mapping of one split."""
    ann, images = resolve_dataset(root_or_uri, name_or_split)
    return load_coco_json(ann, images, dataset_name=name_or_split, check_images=check_images)
