"""`ingest_coco`: fetch COCO from a source, validate it, and store it with a manifest.

Steps: fingerprint the source (no transfer) -> reuse the stored data set when its manifest carries the
same fingerprint -> stage annotations and the images they list in a work directory -> validate ->
sha256 every file -> upload the tree -> write the manifest last, so a crash leaves no manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cascade_rcnn import storage
from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.ingest.manifest import (
    MANIFEST_NAME,
    build_manifest,
    dataset_root,
    hash_tree,
    read_manifest,
    split_entry,
    write_manifest,
)
from cascade_rcnn.ingest.sources import (
    OFFICIAL_BASE_URL,
    annotation_name,
    fingerprint,
    make_stager,
    parse_source,
    safe_file_name,
)
from cascade_rcnn.ingest.validate import load_annotations, validate_annotations

logger = logging.getLogger(__name__)


@dataclass
class IngestResult:
    manifest_uri: str
    transferred_files: int  # files uploaded to the data set root by this call
    reused: bool  # True when an existing data set with the same source fingerprint was kept
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> num_images/...
    downloaded_bytes: int = 0


def subset_annotations(data: dict, max_images: int) -> dict:
    """The first `max_images` images (in JSON order), their annotations and all categories."""
    images = data["images"][:max_images]
    keep = {img.get("id") for img in images if isinstance(img, dict)}
    annotations = [a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in keep]
    return {**data, "images": images, "annotations": annotations}


def _write_json_atomic(data: dict, path: Path) -> None:
    # Replace (never write through) the staged file: it may be a hard link into the source.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _reusable(manifest: dict | None, fp: str, splits: tuple[str, ...]) -> bool:
    if not manifest or manifest.get("source", {}).get("fingerprint") != fp:
        return False
    entries = manifest.get("splits", {})
    # The manifest is written last, but a bucket can be pruned by hand afterwards.
    return all(split in entries and storage.exists(entries[split]["annotations"]) for split in splits)


def _check_names(name: str, splits: tuple[str, ...]) -> None:
    # Both become path components of the stored layout.
    if not splits:
        raise IngestError("no splits given")
    for kind, value in [("data set name", name)] + [("split name", s) for s in splits]:
        if not value or "/" in value or "\\" in value or value.startswith("."):
            raise IngestError(f"invalid {kind} {value!r}: use a plain name such as coco2017 or val2017")


def ingest_coco(
    source: str,
    root: str,
    *,
    name: str = "coco2017",
    splits: tuple[str, ...] | list[str] = ("train2017", "val2017"),
    workdir: str | os.PathLike | None = None,
    base_url: str = OFFICIAL_BASE_URL,
    validate: bool = True,
    check_images: bool = True,
    max_images: int | None = None,
    force: bool = False,
    workers: int = 16,
) -> IngestResult:
    """Ingests COCO-layout data from `source` into `<root>/datasets/<name>/` and returns the manifest URI.

    source: "coco-official" (the zips under `base_url`), an http(s) base URL laid out like the
    official site, an s3:// prefix or a local directory in COCO layout. `workdir` keeps downloads
    between runs (so a failed run resumes); without it a temporary directory is used and removed.
    `max_images` keeps only the first N images of each split (for demos and tests).
    """
    splits = tuple(splits)
    _check_names(name, splits)
    if max_images is not None and max_images < 1:
        raise IngestError(f"max_images must be positive, got {max_images}")
    src = parse_source(source, base_url)
    ds_root = dataset_root(root, name)
    manifest_uri = storage.join(ds_root, MANIFEST_NAME)
    fp = fingerprint(src, splits, max_images)
    existing = read_manifest(manifest_uri)
    if not force and _reusable(existing, fp, splits):
        logger.info(
            "%s: data set %r already ingested from %s; nothing to transfer", manifest_uri, name, src.uri
        )
        counts = {
            s: {k: existing["splits"][s][k] for k in ("num_images", "num_annotations", "num_categories")}
            for s in splits
        }
        return IngestResult(manifest_uri, 0, True, counts)
    if existing is not None:
        # Retract the old manifest first: from here on the stored tree is a mix of old and new.
        logger.warning("%s: source or parameters changed; ingesting again", manifest_uri)
        storage.delete(manifest_uri)

    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="cascade_rcnn_ingest_")) if own_tmp else Path(workdir)
    stage = work / "stage" / name
    try:
        if stage.exists():
            shutil.rmtree(stage)
        (stage / "annotations").mkdir(parents=True)
        stager = make_stager(src, work / "downloads", workers, subset=max_images is not None)
        split_entries, counts = {}, {}
        for split in splits:
            logger.info("staging %s from %s", split, src.uri)
            stager.annotations(split, stage)
            json_path = stage / annotation_name(split)
            data = load_annotations(json_path)
            if max_images is not None and len(data["images"]) > max_images:
                data = subset_annotations(data, max_images)
                _write_json_atomic(data, json_path)
            names = {img.get("file_name") for img in data["images"] if isinstance(img, dict)}
            (stage / split).mkdir(exist_ok=True)
            stager.images(split, {n for n in names if safe_file_name(n)}, stage)
            if validate:
                report = validate_annotations(
                    json_path,
                    stage / split,
                    check_images=check_images,
                    data=data,
                    workers=workers,
                    display_json=f"{src.uri}/{annotation_name(split)}",
                    display_images=f"{src.uri}/{split}",
                )
                split_counts = {
                    "num_images": report.num_images,
                    "num_annotations": report.num_annotations,
                    "num_categories": report.num_categories,
                }
            else:
                split_counts = {
                    "num_images": len(data["images"]),
                    "num_annotations": len(data["annotations"]),
                    "num_categories": len(data["categories"]),
                }
            del data
            counts[split] = split_counts
            split_entries[split] = split_entry(ds_root, split, split_counts)
        files = hash_tree(stage, workers)
        logger.info("uploading %d files to %s", len(files), ds_root)
        # skip_unchanged: a run that follows one which died mid-upload sends only what is missing.
        stats = storage.upload_tree(str(stage), ds_root, workers=workers, progress=True, skip_unchanged=True)
        manifest = build_manifest(
            name=name,
            ds_root=ds_root,
            source={
                "kind": src.kind,
                "uri": src.uri,
                "fingerprint": fp,
                "splits": list(splits),
                "max_images": max_images,
            },
            splits=split_entries,
            files=files,
        )
        write_manifest(manifest, manifest_uri)
        logger.info("wrote %s", manifest_uri)
        downloaded = getattr(stager, "downloaded_bytes", 0)
        return IngestResult(manifest_uri, stats.files, False, counts, downloaded)
    finally:
        shutil.rmtree(work if own_tmp else stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cascade-rcnn ingest",
        description="Fetch COCO (official zips, an s3:// prefix or a local directory), validate it and "
        "store it under ROOT/datasets/NAME/ with a manifest. A second run with the same source "
        "transfers nothing.",
    )
    parser.add_argument(
        "--source", required=True, help="coco-official, an http(s) base URL, s3://... or a dir"
    )
    parser.add_argument("--root", required=True, help="object-store root (s3://bucket/prefix or a local dir)")
    parser.add_argument("--name", default="coco2017", help="data set name (default: coco2017)")
    parser.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    parser.add_argument("--workdir", help="keeps downloads between runs so an interrupted run resumes")
    parser.add_argument("--base-url", default=OFFICIAL_BASE_URL, help="base URL for --source coco-official")
    parser.add_argument("--max-images", type=int, help="keep only the first N images of each split")
    parser.add_argument("--no-validate", action="store_true", help="skip annotation validation")
    parser.add_argument("--no-check-images", action="store_true", help="validate the JSON only")
    parser.add_argument("--force", action="store_true", help="ingest again even if the manifest matches")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = ingest_coco(
            args.source,
            args.root,
            name=args.name,
            splits=tuple(args.splits),
            workdir=args.workdir,
            base_url=args.base_url,
            validate=not args.no_validate,
            check_images=not args.no_check_images,
            max_images=args.max_images,
            force=args.force,
            workers=args.workers,
        )
    except (IngestError, storage.StorageError) as e:
        print(f"cascade-rcnn ingest: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=1))
    return 0
