"""`ingest_coco`: fetch COCO from a source, validate it, and store it with a manifest.

Steps: fingerprint the source (no transfer) -> reuse the stored data set when its manifest carries the
same fingerprint -> stage annotations and the images they list in a work directory -> validate and
repair (repair.py; the repaired JSON replaces the staged one, the original is kept beside it) ->
sha256 every file -> upload the tree -> write the repair report -> write the manifest last, so a
crash leaves no manifest. Each staged file is hashed once: the manifest's digests are the ones the
upload stores and compares, and a digest computed while verifying a download is reused as long as
the staged file is not rewritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cascade_rcnn import errors, storage
from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.ingest.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    build_manifest,
    data_version,
    dataset_root,
    hash_tree,
    read_manifest,
    split_entry,
    write_manifest,
)
from cascade_rcnn.ingest.repair import BBOX_TOLERANCE, RepairResult, describe, repair_annotations
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
    repairs: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> action -> count
    report_uri: str = ""  # every repair, per annotation id
    data_versions: dict[str, str] = field(default_factory=dict)  # split -> manifest.data_version


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


_LOGGED_REPAIRS = 20  # per split; the report holds them all


def _log_repairs(name: str, repair: RepairResult) -> None:
    counts = ", ".join(f"{n} {a}" for a, n in repair.counts.items() if a != "strict_errors")
    logger.warning("%s: %d annotation(s) repaired (%s)", name, len(repair.changes), counts)
    for change in repair.changes[:_LOGGED_REPAIRS]:
        logger.warning("%s: %s", name, describe(change))
    if len(repair.changes) > _LOGGED_REPAIRS:
        logger.warning("%s: ... and %d more in the report", name, len(repair.changes) - _LOGGED_REPAIRS)


def _refuse_reuse_if_strict(manifest: dict, manifest_uri: str, splits: tuple[str, ...]) -> None:
    # Strict does not change what is stored when it passes, so it is no part of the fingerprint;
    # but a data set stored with repairs that strict refuses must not pass a strict run.
    n = sum(manifest["splits"][s].get("repairs", {}).get("strict_errors", 0) for s in splits)
    if not n:
        return
    report_uri = manifest.get("report", {}).get("uri", "")
    listed = []
    try:
        report = json.loads(storage.get_bytes(report_uri))
        for split in splits:
            for change in report["splits"][split]["changes"]:
                if change["strict"] and len(listed) < _LOGGED_REPAIRS:
                    listed.append(f"  - {split}: {describe(change, refused=True)}")
    except (storage.StorageError, ValueError, KeyError, TypeError) as e:
        listed.append(f"  (report {report_uri} unreadable: {e})")
    raise IngestError(
        f"{manifest_uri}: strict is set, and the stored data set was ingested with {n} repair(s) that "
        f"strict refuses (all in {report_uri}):\n" + "\n".join(listed)
    )


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
    strict: bool = False,
) -> IngestResult:
    """Ingests COCO-layout data from `source` into `<root>/datasets/<name>/` and returns the manifest URI.

    source: "coco-official" (the zips under `base_url`), an http(s) base URL laid out like the
    official site, an s3:// prefix or a local directory in COCO layout. `workdir` keeps downloads
    between runs (so a failed run resumes); without it a temporary directory is used and removed.
    `max_images` keeps only the first N images of each split (for demos and tests).

    Annotations that cannot be trained on as they are get repaired (boxes clipped to the image,
    unusable polygons and annotations dropped; see repair.py) and each change is recorded in
    `<root>/datasets/<name>/ingest_report.json`. What cannot be repaired (dangling ids, bad images)
    fails the ingest; with `strict` every repair does too, except clipping a box by at most 1 px.
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
        if strict:
            _refuse_reuse_if_strict(existing, manifest_uri, splits)
        counts = {
            s: {k: existing["splits"][s][k] for k in ("num_images", "num_annotations", "num_categories")}
            for s in splits
        }
        # Manifests written before repairs existed have no counts: nothing was repaired then.
        repairs = {s: existing["splits"][s].get("repairs", {}) for s in splits}
        report_uri = existing.get("report", {}).get("uri", "")
        versions = {s: data_version(existing, s) for s in splits}
        return IngestResult(manifest_uri, 0, True, counts, 0, repairs, report_uri, versions)
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
        known = stager.digests  # stage-relative path -> sha256 of the bytes staged there
        split_entries, counts, repairs, report_splits = {}, {}, {}, {}
        for split in splits:
            logger.info("staging %s from %s", split, src.uri)
            stager.annotations(split, stage)
            json_path = stage / annotation_name(split)
            data = load_annotations(json_path)
            if max_images is not None and len(data["images"]) > max_images:
                data = subset_annotations(data, max_images)
                _write_json_atomic(data, json_path)
                known.pop(annotation_name(split), None)
            names = {img.get("file_name") for img in data["images"] if isinstance(img, dict)}
            (stage / split).mkdir(exist_ok=True)
            stager.images(split, {n for n in names if safe_file_name(n)}, stage)
            shown = f"{src.uri}/{annotation_name(split)}"
            if validate:
                report = validate_annotations(
                    json_path,
                    stage / split,
                    check_images=check_images,
                    data=data,
                    workers=workers,
                    display_json=shown,
                    display_images=f"{src.uri}/{split}",
                    strict=strict,
                )
                repair, report = report.repairs, None  # one reference to the big JSON, not two
            else:
                # Repairs are a JSON pass and training needs them, so they run without validation too.
                repair = repair_annotations(data)
                if strict and repair.strict_errors:
                    raise IngestError(
                        f"{shown}: strict is set and {len(repair.strict_errors)} annotation(s) need a "
                        "repair:\n"
                        + "\n".join(f"  - {describe(c, refused=True)}" for c in repair.strict_errors[:20])
                    )
            num_before = len(data["annotations"])
            data = repair.data
            entry_extra: dict = {"repairs": repair.counts}
            original_uri = None
            if repair.changes:
                _log_repairs(shown, repair)
                # Keep the file as it came (a rename: no copy), and store the repaired one in its place.
                original = stage / "annotations" / "original" / Path(json_path).name
                original.parent.mkdir(exist_ok=True)
                os.replace(json_path, original)
                if annotation_name(split) in known:  # a rename keeps the bytes
                    known[original.relative_to(stage).as_posix()] = known.pop(annotation_name(split))
                _write_json_atomic(data, json_path)
                original_uri = storage.join(ds_root, "annotations", "original", original.name)
                entry_extra["original_annotations"] = original_uri
            split_counts = {
                "num_images": len(data["images"]),
                "num_annotations": len(data["annotations"]),
                "num_categories": len(data["categories"]),
            }
            split_entries[split] = {**split_entry(ds_root, split, split_counts), **entry_extra}
            report_splits[split] = {
                "source_annotations": shown,
                "annotations": split_entries[split]["annotations"],
                "original_annotations": original_uri,
                "num_annotations_before": num_before,
                "num_annotations_after": split_counts["num_annotations"],
                "counts": repair.counts,
                "changes": repair.changes,
            }
            del data, repair
            counts[split] = split_counts
            repairs[split] = entry_extra["repairs"]
        files = hash_tree(stage, workers, known=known)
        logger.info("uploading %d files to %s", len(files), ds_root)
        # skip_unchanged: a run that follows one which died mid-upload sends only what is missing.
        # The manifest's digests serve as the objects' sha256 and for that check: no second read.
        stats = storage.upload_tree(
            str(stage),
            ds_root,
            workers=workers,
            progress=True,
            skip_unchanged=True,
            sha256={f["path"]: f["sha256"] for f in files},
        )
        # Deterministic bytes (no time stamp), so the same source always yields the same report.
        report_uri = storage.join(ds_root, REPORT_NAME)
        report_doc = {
            "version": 1,
            "dataset": name,
            "root": ds_root,
            "bbox_tolerance": BBOX_TOLERANCE,
            "splits": report_splits,
        }
        info = storage.put_bytes(json.dumps(report_doc, indent=1).encode(), report_uri)
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
            report={"uri": report_uri, "size": info.size, "sha256": info.sha256},
        )
        write_manifest(manifest, manifest_uri)
        logger.info("wrote %s", manifest_uri)
        downloaded = getattr(stager, "downloaded_bytes", 0)
        versions = {s: data_version(manifest, s) for s in splits}
        return IngestResult(
            manifest_uri, stats.files, False, counts, downloaded, repairs, report_uri, versions
        )
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
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail on annotations that would be repaired (boxes past the border by more than 1 px, "
        "unusable polygons) instead of repairing them",
    )
    parser.add_argument("--force", action="store_true", help="ingest again even if the manifest matches")
    parser.add_argument("--workers", type=int, default=16)
    errors.add_debug_option(parser)
    args = parser.parse_args(argv)
    from cascade_rcnn.logs import setup_logging

    setup_logging()

    def ingest() -> int:
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
            strict=args.strict,
        )
        print(json.dumps(asdict(result), indent=1))
        return 0

    return errors.run_command("cascade-rcnn ingest", ingest, args.debug)
