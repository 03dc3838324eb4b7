"""Object storage: one interface for `s3://bucket/key` and local paths (plain or `file://`).

Each public function picks the backend once from the URI: `s3.S3Backend` (boto3 and s3transfer) or
`local.LocalBackend`. The S3 endpoint is the `endpoint_url` argument, else $AWS_ENDPOINT_URL (else AWS
itself); credentials come from the standard AWS chain (env, profile, web identity, instance role).
Path-style addressing, so SeaweedFS / MinIO / Ceph work as is.

Guarantees:
- integrity: every upload stores the content's sha256 as object metadata (x-amz-meta-sha256);
  every download recomputes it and raises ChecksumMismatch before the bytes reach their final name.
  Objects written by other tools have no such metadata; they are fetched unverified unless
  `require_checksum=True`.
- atomic results: local files are written to a temp file in the target directory, fsync'ed, then
  renamed; S3 objects are a single PUT or a completed multipart upload (s3transfer aborts the
  upload when a part fails).
- outages cost time, not the run (retry.py): botocore's "standard" mode retries each request for a
  few seconds ($AWS_MAX_ATTEMPTS attempts, default 8; $AWS_RETRY_MODE), and above it every S3
  operation that keeps failing transiently (connection refused/reset, timeouts, 5xx, throttling, a
  body cut off) is repeated with capped exponential backoff for $CASCADE_RCNN_S3_RETRY_SECONDS
  (default 600; 0: off), logged once when it starts waiting and once when it recovers. Permanent
  errors (credentials, a missing bucket or key, a refused conditional write) are never retried;
  they raise StorageError naming the bucket and the endpoint. Local paths are not retried.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping, Optional, Union

from .base import (
    SHA256_METADATA,
    ChecksumMismatch,
    NotFound,
    ObjectInfo,
    PathLike,
    PreconditionFailed,
    StorageError,
    TransferStats,
    file_digests,
    is_s3,
    join,
    sha256_file,
)
from .local import LocalBackend, cache_dir, list_files, local_path
from .pool import run_pool
from .progress import Progress
from .s3 import S3Backend, safe_relpath, split_uri
from .s3 import client as _client  # noqa: F401  (tests and bench reach the shared client)
from .s3 import resolve_endpoint as _resolve_endpoint  # noqa: F401

_safe_relpath = safe_relpath  # tests call it directly

__all__ = [
    "MULTIPART_CHUNKSIZE",
    "MULTIPART_CONCURRENCY",
    "MULTIPART_THRESHOLD",
    "SHA256_METADATA",
    "ChecksumMismatch",
    "NotFound",
    "ObjectInfo",
    "PathLike",
    "PreconditionFailed",
    "StorageError",
    "TransferStats",
    "cache_dir",
    "delete",
    "delete_prefix",
    "download_tree",
    "exists",
    "file_digests",
    "get_bytes",
    "get_file",
    "get_versioned",
    "head",
    "is_s3",
    "join",
    "list_prefix",
    "local_path",
    "put_bytes",
    "put_bytes_if",
    "put_file",
    "sha256_file",
    "upload_tree",
]

log = logging.getLogger(__name__)

# Objects up to this size go in one PUT / GET from memory; larger ones use s3transfer's multipart
# upload and concurrent ranged GETs. Read at each call, so they can be tuned here.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MULTIPART_CONCURRENCY = 8

_LOCAL = LocalBackend()


def _backend(uri: str, endpoint_url: Optional[str] = None, pool: int = 64) -> Union[S3Backend, LocalBackend]:
    if is_s3(uri):
        split_uri(uri)  # a malformed s3:// URI fails before any client is built
        return S3Backend(
            endpoint_url, pool, (MULTIPART_THRESHOLD, MULTIPART_CHUNKSIZE, MULTIPART_CONCURRENCY)
        )
    return _LOCAL


# ---------------------------------------------------------------------------------------------
# Single objects


def put_bytes(data: bytes, uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Write `data` to uri atomically; on S3 with its sha256 as metadata."""
    uri = os.fspath(uri)
    sha = hashlib.sha256(data).hexdigest()
    _backend(uri, endpoint_url).put_bytes(uri, data, sha)
    return ObjectInfo(uri, len(data), sha)


def get_bytes(uri: PathLike, endpoint_url: Optional[str] = None, require_checksum: bool = False) -> bytes:
    """Read a whole object; S3 objects are verified against their sha256 metadata."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).get_bytes(uri, require_checksum)


def get_versioned(uri: PathLike, endpoint_url: Optional[str] = None) -> tuple[bytes, str]:
    """(data, version) of an object, for a later `put_bytes_if`. The version is opaque: the ETag on S3,
    the content's sha256 for a local file. Raises NotFound when it is missing."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).get_versioned(uri)


def put_bytes_if(
    data: bytes, uri: PathLike, version: Optional[str], endpoint_url: Optional[str] = None
) -> str:
    """Write `data` only if the object is still at `version` (from get_versioned), or, with version
    None, only if it does not exist; else raise PreconditionFailed and write nothing. Returns the new
    version. On S3 this is a conditional PUT (If-Match / If-None-Match), which the server must honour:
    AWS S3, SeaweedFS and MinIO do."""
    uri = os.fspath(uri)
    sha = hashlib.sha256(data).hexdigest()
    return _backend(uri, endpoint_url).put_bytes_if(uri, data, sha, version)


def put_file(local_path: PathLike, uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Copy a local file to uri (S3 or local) atomically, storing its sha256 on S3."""
    uri = os.fspath(uri)
    size, sha = _backend(uri, endpoint_url).put_file(Path(local_path), uri)
    return ObjectInfo(uri, size, sha)


def get_file(
    uri: PathLike, local_path: PathLike, endpoint_url: Optional[str] = None, require_checksum: bool = False
) -> ObjectInfo:
    """Copy uri to a local file atomically; S3 objects are verified against their sha256 metadata
    (ChecksumMismatch leaves any existing file at local_path untouched). Returns the size and sha256
    of the bytes written; the sha256 is None for an S3 object without sha256 metadata."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).get_file(uri, Path(local_path), require_checksum)


def head(uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Size and sha256 of an object (local files are hashed). Raises NotFound when it is missing."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).head(uri)


def exists(uri: PathLike, endpoint_url: Optional[str] = None) -> bool:
    """Whether the object / file exists. A missing bucket raises StorageError instead of answering False."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).exists(uri)


def delete(uri: PathLike, endpoint_url: Optional[str] = None) -> None:
    """Delete one object / file. Deleting something that does not exist is not an error."""
    uri = os.fspath(uri)
    _backend(uri, endpoint_url).delete(uri)


# ---------------------------------------------------------------------------------------------
# Prefixes and trees


def list_prefix(uri: PathLike, endpoint_url: Optional[str] = None) -> list[str]:
    """Full URIs of all objects whose name starts with uri (string prefix, like S3), sorted. For a local
    directory that is every file below it."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).list_prefix(uri)


def delete_prefix(uri: PathLike, endpoint_url: Optional[str] = None) -> int:
    """Delete every object under a prefix (a local directory tree); returns how many were deleted."""
    uri = os.fspath(uri)
    return _backend(uri, endpoint_url).delete_prefix(uri)


def _tree_pool(workers: int) -> int:
    return workers * 2 + MULTIPART_CONCURRENCY


def _finish(progress: Progress, digests: Optional[Mapping[str, str]] = None) -> TransferStats:
    progress.finish()
    return TransferStats(
        progress.files - progress.skipped,
        progress.done,
        progress.elapsed,
        progress.skipped,
        progress.unverified,
        digests if digests is not None else {},
    )


def upload_tree(
    local_dir: PathLike,
    uri: PathLike,
    workers: int = 16,
    progress: bool = True,
    endpoint_url: Optional[str] = None,
    skip_unchanged: bool = False,
    fsync: bool = True,
    sha256: Optional[Mapping[str, str]] = None,
) -> TransferStats:
    """Upload every file under local_dir to uri/<relative path>, `workers` at a time. With skip_unchanged,
    objects that already hold the same bytes (size and sha256 metadata) are left alone. `fsync`
    only matters for a local destination (see download_tree).

    `sha256` maps relative paths (as in the listing: posix, relative to local_dir) to the hex sha256
    the caller already computed for those files (e.g. for a manifest); they are used for the stored
    metadata and the unchanged check instead of reading the files again, so they must describe the
    files' current bytes. Files not in it are hashed as usual."""
    src_root, uri = Path(local_dir), os.fspath(uri)
    if not src_root.is_dir():
        raise NotFound(f"upload {src_root} -> {uri}: no such directory {src_root}")
    files = list(list_files(src_root))
    label = f"upload {src_root} -> {uri}"
    prog = Progress(label, sum(s for _, s in files), files=len(files), enabled=progress, logger=log)
    backend = _backend(uri, endpoint_url, _tree_pool(workers))
    one = backend.tree_uploader(src_root, uri, skip_unchanged, fsync, prog, sha256 or {})
    run_pool(label, files, one, workers, prog)
    return _finish(prog)


def download_tree(
    uri: PathLike,
    local_dir: PathLike,
    workers: int = 16,
    progress: bool = True,
    endpoint_url: Optional[str] = None,
    skip_unchanged: bool = False,
    require_checksum: bool = False,
    fsync: bool = True,
) -> TransferStats:
    """Download every object under uri/ to local_dir/<relative key>, verifying each sha256. Raises NotFound
    when the prefix holds no objects. With skip_unchanged, local files with the object's size and
    sha256 are kept. fsync=False drops the per-file fsync: a killed process still never leaves a
    partial file under a final name, but a node crash may. The result's `sha256` maps each relative
    path to the sha256 of the bytes now in that file (hashed once, while verifying or comparing)."""
    uri, dest_root = os.fspath(uri), Path(local_dir)
    label = f"download {uri} -> {dest_root}"
    backend = _backend(uri, endpoint_url, _tree_pool(workers))
    items = backend.tree_items(uri)
    prog = Progress(label, sum(s for _, _, s in items), files=len(items), enabled=progress, logger=log)
    digests: dict[str, str] = {}
    one = backend.tree_downloader(uri, dest_root, skip_unchanged, require_checksum, fsync, prog, digests)
    run_pool(label, items, one, workers, prog)
    stats = _finish(prog, digests)
    if stats.unverified:
        log.warning("%s: %d object(s) had no sha256 metadata and were not verified", label, stats.unverified)
    return stats
