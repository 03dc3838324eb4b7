"""The data set manifest: the one small file that describes an ingested data set.

Layout under `<root>/datasets/<name>/`:
    annotations/instances_<split>.json            (repaired: what training and evaluation read)
    annotations/original/instances_<split>.json   (as it came, only when a repair changed it)
    <split>/<file_name>
    ingest_report.json   (every repair, per annotation id; see ingest/repair.py)
    manifest.json   (written last: a data set without it is incomplete)

Manifest shape (read by cascade_rcnn.data's resolve_dataset through splits.<split>.annotations/images):
    {"name", "version": 1, "root", "source": {"kind", "uri", "fingerprint", "splits", "max_images"},
     "splits": {split: {"annotations": uri, "images": uri prefix, "num_images", "num_annotations",
                        "num_categories", "repairs": {action: count, "strict_errors": n},
                        "original_annotations"?: uri}},
     "files": [{"path": relative path, "size", "sha256"}],
     "report": {"uri", "size", "sha256"}, "created": ISO-8601 UTC time}
`files` lists the data (annotations and images); the report, like the manifest, is not in it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cascade_rcnn import storage
from cascade_rcnn.storage.progress import Progress

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "ingest_report.json"


def dataset_root(root: str, name: str) -> str:
    """`<root>/datasets/<name>`, with a local root made absolute so the URIs stay valid elsewhere."""
    if "://" not in root:
        root = str(Path(root).resolve())
    return storage.join(root, "datasets", name)


def split_entry(ds_root: str, split: str, counts: dict[str, int]) -> dict:
    return {
        "annotations": storage.join(ds_root, "annotations", f"instances_{split}.json"),
        "images": storage.join(ds_root, split),
        "num_images": counts["num_images"],
        "num_annotations": counts["num_annotations"],
        "num_categories": counts["num_categories"],
    }


def hash_tree(
    local_dir: str | os.PathLike, workers: int = 8, known: Mapping[str, str] | None = None
) -> list[dict]:
    """[{"path", "size", "sha256"}] for every file under `local_dir`, sorted by path. `known` maps
    relative paths to digests already computed for the bytes now in those files (while downloading
    them); those files are not read again."""
    base = Path(local_dir)
    paths = sorted(p for p in base.rglob("*") if p.is_file())
    progress = Progress(f"sha256 of {base.name}", len(paths), unit="files", logger=logger)
    known = known or {}

    def one(path: Path) -> dict:
        rel = path.relative_to(base).as_posix()
        sha = known.get(rel)
        return {"path": rel, "size": path.stat().st_size, "sha256": sha or storage.sha256_file(path)}

    entries = []
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        for entry in pool.map(one, paths):
            entries.append(entry)
            progress.update(1)
    progress.finish()
    return entries


def build_manifest(
    *, name: str, ds_root: str, source: dict, splits: dict, files: list[dict], report: dict | None = None
) -> dict:
    return {
        "name": name,
        "version": MANIFEST_VERSION,
        "root": ds_root,
        "source": source,
        "splits": splits,
        "files": files,
        **({"report": report} if report is not None else {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


DATA_VERSION_PREFIX = "dv1-"


def data_version(manifest: Mapping, split: str) -> str:
    """A stable id of `split`'s content: sha256 over the digest of its (repaired) annotation file and
    of every image under it, by path. The same bytes give the same id whatever the source, root or
    ingest time; any changed, added or removed image or annotation gives another. Derived from the
    manifest alone, so manifests written before the id existed have one too."""
    uri = manifest.get("root", "<manifest>")
    splits = manifest.get("splits")
    if not isinstance(splits, Mapping) or split not in splits:
        have = ", ".join(sorted(splits)) if isinstance(splits, Mapping) else "none"
        raise ValueError(f"{uri}: the manifest has no split {split!r} (splits: {have})")
    annotations = f"annotations/instances_{split}.json"
    digest = hashlib.sha256()
    found = False
    for entry in sorted(manifest.get("files", []), key=lambda e: e["path"]):
        path = entry["path"]
        if path == annotations or path.startswith(f"{split}/"):
            found = found or path == annotations
            digest.update(f"{path}\t{entry['sha256']}\n".encode())
    if not found:
        raise ValueError(f"{uri}: the manifest's files do not list {annotations}")
    return DATA_VERSION_PREFIX + digest.hexdigest()[:32]


def read_manifest(uri: str) -> dict | None:
    """The manifest at `uri`, or None when there is none (or it is unreadable, which is logged)."""
    try:
        data = storage.get_bytes(uri)
    except storage.NotFound:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as e:
        logger.warning("%s: unreadable manifest (%s); treating the data set as absent", uri, e)
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(manifest: dict, uri: str) -> None:
    storage.put_bytes(json.dumps(manifest, indent=1).encode(), uri)
