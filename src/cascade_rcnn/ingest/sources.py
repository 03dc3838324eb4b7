"""Where a COCO data set comes from, and how it is staged into a local directory for validation.

Three kinds of source, all ending in the same staged layout
(`annotations/instances_<split>.json`, `<split>/<file_name>`, holding exactly the images the JSON lists):
- "http": the COCO 2017 zips under a base URL (the official site or a mirror), downloaded resumably;
- "s3": an s3:// prefix in COCO layout;
- "local": a local directory in COCO layout (hard-linked into the stage when possible, else copied).
Each stager's `digests` holds the sha256 of staged files it already computed while verifying a
download (stage-relative posix path -> hex), so the manifest need not read them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cascade_rcnn import storage
from cascade_rcnn.ingest.archive import extract_zip
from cascade_rcnn.ingest.download import download_file
from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.storage.progress import Progress

logger = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "http://images.cocodataset.org"
ANNOTATIONS_ARCHIVE = "annotations/annotations_trainval2017.zip"
# Path under the base URL -> (size in bytes, md5) of the official files; checked only for the
# official host, since a mirror or a test server may serve other bytes under the same names.
OFFICIAL_ARCHIVES: dict[str, tuple[int, str]] = {
    "annotations/annotations_trainval2017.zip": (252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    "zips/train2017.zip": (19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "zips/val2017.zip": (815585330, "442b8da7639aecaf257c1dceb8ba8c80"),
}
_OFFICIAL_HOSTS = ("http://images.cocodataset.org", "https://images.cocodataset.org")


@dataclass(frozen=True)
class Source:
    kind: str  # "http" | "s3" | "local"
    uri: str  # base URL without trailing slash, s3:// prefix, or absolute local directory

    @property
    def official(self) -> bool:
        return self.kind == "http" and self.uri in _OFFICIAL_HOSTS


def parse_source(source: str, base_url: str = OFFICIAL_BASE_URL) -> Source:
    """ "coco-official" (uses `base_url`), an http(s) base URL, an s3:// prefix or a local directory."""
    if source == "coco-official":
        return Source("http", base_url.rstrip("/"))
    if source.startswith(("http://", "https://")):
        return Source("http", source.rstrip("/"))
    if source.startswith("s3://"):
        return Source("s3", source.rstrip("/"))
    if "://" in source and not source.startswith("file://"):
        raise IngestError(
            f"unsupported source {source!r}: use coco-official, http(s)://, s3:// or a directory"
        )
    path = Path(storage.local_path(source))
    if not path.is_dir():
        raise IngestError(f"source directory {path} does not exist")
    return Source("local", str(path.resolve()))


def annotation_name(split: str) -> str:
    return f"annotations/instances_{split}.json"


def image_archive(split: str) -> str:
    return f"zips/{split}.zip"


def safe_file_name(name: object) -> bool:
    """A JSON file_name that stays inside the split directory when joined to it."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts


def _head(url: str) -> dict[str, str]:
    """Size and version headers of a URL (no body transferred); empty when the server refuses HEAD."""
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "cascade-rcnn-ingest/1"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return {k: resp.headers.get(k, "") for k in ("Content-Length", "ETag", "Last-Modified")}
    except OSError as e:
        logger.warning("HEAD %s failed (%s); fingerprinting by URL only", url, e)
        return {}


def _local_listing(base: Path, rels: Iterable[str]) -> list:
    out = []
    for rel in rels:
        root = base / rel
        if root.is_file():
            st = root.stat()
            out.append([rel, st.st_size, st.st_mtime_ns])
        elif root.is_dir():
            for dirpath, _, names in os.walk(root):
                for n in names:
                    st = os.stat(os.path.join(dirpath, n))
                    out.append([os.path.relpath(os.path.join(dirpath, n), base), st.st_size, st.st_mtime_ns])
    return sorted(out)


def fingerprint(src: Source, splits: tuple[str, ...], max_images: int | None) -> str:
    """A sha256 that changes when the source's files or the ingest parameters change.

    http: the official table, else HEAD's size/ETag/Last-Modified; s3: the object names under the
    split prefixes; local: names, sizes and mtimes. Nothing is downloaded.
    """
    state: dict = {"kind": src.kind, "uri": src.uri, "splits": list(splits), "max_images": max_images}
    if src.kind == "http":
        paths = [ANNOTATIONS_ARCHIVE] + [image_archive(s) for s in splits]
        if src.official:
            state["files"] = {p: OFFICIAL_ARCHIVES.get(p) for p in paths}
        else:
            state["files"] = {p: _head(f"{src.uri}/{p}") for p in paths}
    elif src.kind == "s3":
        names = []
        for split in splits:
            names += storage.list_prefix(storage.join(src.uri, annotation_name(split)))
            names += storage.list_prefix(storage.join(src.uri, split) + "/")
        state["files"] = sorted(names)
    else:
        rels = [annotation_name(s) for s in splits] + list(splits)
        state["files"] = _local_listing(Path(src.uri), rels)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Staging: annotations first (they decide which images are needed), then the images.
# ---------------------------------------------------------------------------------------------


class HttpStager:
    """Downloads the annotation zip once and each split's image zip into `downloads`."""

    def __init__(self, src: Source, downloads: Path):
        self.src = src
        self.downloads = downloads
        self.downloaded_bytes = 0
        self.digests: dict[str, str] = {}  # extraction hashes nothing
        self._annotations_zip: Path | None = None

    def _download(self, rel: str) -> Path:
        size, md5 = OFFICIAL_ARCHIVES.get(rel, (None, None)) if self.src.official else (None, None)
        result = download_file(f"{self.src.uri}/{rel}", self.downloads / Path(rel).name, size=size, md5=md5)
        self.downloaded_bytes += result.bytes_fetched
        return result.path

    def annotations(self, split: str, stage: Path) -> None:
        if self._annotations_zip is None:
            self._annotations_zip = self._download(ANNOTATIONS_ARCHIVE)
        wanted = annotation_name(split)
        names = extract_zip(self._annotations_zip, stage, select=lambda n: n == wanted)
        if wanted not in names:
            raise IngestError(f"{self._annotations_zip}: has no {wanted} (is {split!r} a COCO 2017 split?)")

    def images(self, split: str, file_names: set[str], stage: Path) -> None:
        archive = self._download(image_archive(split))
        wanted = {f"{split}/{n}" for n in file_names}
        names = extract_zip(archive, stage, select=lambda n: n in wanted)
        logger.info("%s: extracted %d of the %d images the JSON lists", archive.name, len(names), len(wanted))


class S3Stager:
    def __init__(self, src: Source, workers: int = 16, subset: bool = False):
        self.src = src
        self.workers = workers
        self.subset = subset
        self.digests: dict[str, str] = {}

    def _got(self, stage: Path, path: Path, sha: str | None) -> None:
        # The digest of the bytes the download wrote to `path` (None: the object had no metadata).
        if sha is not None:
            self.digests[path.relative_to(stage).as_posix()] = sha

    def annotations(self, split: str, stage: Path) -> None:
        uri = storage.join(self.src.uri, annotation_name(split))
        dest = stage / annotation_name(split)
        try:
            self._got(stage, dest, storage.get_file(uri, dest).sha256)
        except storage.NotFound as e:
            raise IngestError(f"source has no {annotation_name(split)}: {uri} not found") from e

    def images(self, split: str, file_names: set[str], stage: Path) -> None:
        prefix = storage.join(self.src.uri, split)
        target = stage / split
        if not self.subset:
            # The whole split: one listing and concurrent GETs, then drop what the JSON does not list.
            try:
                stats = storage.download_tree(prefix, target, workers=self.workers)
            except storage.NotFound:
                return  # every image is then reported missing by validation
            _prune(target, file_names)
            for rel, sha in stats.sha256.items():
                if rel in file_names:  # the others were just pruned
                    self._got(stage, target / rel, sha)
            return
        progress = Progress(f"download {prefix}", len(file_names), unit="files", logger=logger)

        def one(name: str) -> None:
            try:
                info = storage.get_file(storage.join(prefix, name), target / name)
                self._got(stage, target / name, info.sha256)
            except storage.NotFound:
                pass  # reported by validation as a missing image, together with any other problem
            progress.update(1)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(one, sorted(file_names)))
        progress.finish()


def _prune(split_dir: Path, file_names: set[str]) -> None:
    """Removes files the annotation JSON does not list, so the stored split holds exactly its images."""
    extra = [
        p
        for p in split_dir.rglob("*")
        if p.is_file() and p.relative_to(split_dir).as_posix() not in file_names
    ]
    for path in extra:
        path.unlink()
    if extra:
        logger.info("%s: left out %d files the annotation JSON does not list", split_dir, len(extra))


class LocalStager:
    def __init__(self, src: Source):
        self.base = Path(src.uri)
        self.digests: dict[str, str] = {}  # linking or copying hashes nothing

    def annotations(self, split: str, stage: Path) -> None:
        src = self.base / annotation_name(split)
        if not src.is_file():
            raise IngestError(f"source directory {self.base} has no {annotation_name(split)}")
        _link_or_copy(src, stage / annotation_name(split))

    def images(self, split: str, file_names: set[str], stage: Path) -> None:
        progress = Progress(f"stage {self.base / split}", len(file_names), unit="files", logger=logger)
        for name in sorted(file_names):
            src = self.base / split / name
            if src.is_file():  # a missing one is reported by validation
                _link_or_copy(src, stage / split / name)
            progress.update(1)
        progress.finish()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # no copy of 19 GB when the work dir is on the same file system
    except OSError:
        shutil.copy2(src, dst)


def make_stager(src: Source, downloads: Path, workers: int = 16, subset: bool = False):
    if src.kind == "http":
        return HttpStager(src, downloads)
    if src.kind == "s3":
        return S3Stager(src, workers, subset)
    return LocalStager(src)
