"""Object storage: one interface for `s3://bucket/key` and local paths (plain or `file://`).

s3:// goes through boto3 and s3transfer. The endpoint is the `endpoint_url` argument, else
$AWS_ENDPOINT_URL (else AWS itself); credentials come from the standard AWS chain (env, profile,
web identity, instance role). Path-style addressing, so SeaweedFS / MinIO / Ceph work as is.

Guarantees:
- integrity: every upload stores the content's sha256 as object metadata (x-amz-meta-sha256);
  every download recomputes it and raises ChecksumMismatch before the bytes reach their final name.
  Objects written by other tools have no such metadata; they are fetched unverified unless
  `require_checksum=True`.
- atomic results: local files are written to a temp file in the target directory, fsync'ed, then
  renamed; S3 objects are a single PUT or a completed multipart upload (s3transfer aborts the
  upload when a part fails).
- retries: botocore's "standard" mode (exponential backoff with jitter on throttling, 5xx and
  connection errors; $AWS_MAX_ATTEMPTS attempts, default 8, $AWS_RETRY_MODE to change the mode),
  plus a few re-reads of a response body cut off mid-stream. Auth errors and a missing bucket are
  never retried; they raise StorageError naming the bucket and the endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, NoReturn, Optional, Tuple, Union

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

SHA256_METADATA = "sha256"  # stored by S3 as the header x-amz-meta-sha256
# Objects up to this size go in one PUT / GET from memory; larger ones use s3transfer's multipart
# upload and concurrent ranged GETs.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MULTIPART_CONCURRENCY = 8
_IO_CHUNK = 1024 * 1024
_PROGRESS_INTERVAL_S = 5.0
_STREAM_ATTEMPTS = 4  # whole-GET retries when a response body is cut off mid-read

# Error codes that retrying cannot fix: wrong or missing credentials, no permission.
_AUTH_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)


class StorageError(Exception):
    """A storage operation failed; the message names the URI (bucket/key) and the endpoint."""


class NotFound(StorageError):
    """The object, file or prefix does not exist."""


class ChecksumMismatch(StorageError):
    """Downloaded bytes do not hash to the sha256 stored with the object."""


@dataclass(frozen=True)
class ObjectInfo:
    """What `head` knows about an object: size in bytes and its sha256 (hex), None when the object
    carries no sha256 metadata."""

    uri: str
    size: int
    sha256: Optional[str]


@dataclass(frozen=True)
class TransferStats:
    """Outcome of a tree transfer: files and bytes moved, files skipped as unchanged, wall time."""

    files: int
    bytes: int
    seconds: float
    skipped: int = 0
    unverified: int = 0  # downloaded objects that had no sha256 metadata

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: PathLike) -> bool:
    return str(uri).startswith("s3://")


def _split_s3(uri: str) -> Tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: no bucket (expected s3://bucket/key)")
    return bucket, key


def _split_object(uri: str) -> Tuple[str, str]:
    """Like _split_s3, for operations on one object: the key must name an object, not a prefix."""
    bucket, key = _split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri!r} names a bucket or prefix, not an object (expected s3://bucket/key)")
    return bucket, key


def _local_path(uri: PathLike) -> Path:
    text = os.fspath(uri)
    if text.startswith("file://"):
        rest = text[len("file://") :]
        if not rest.startswith("/"):
            host, _, path = rest.partition("/")
            if host not in ("", "localhost"):
                raise StorageError(f"file URI {text!r} names host {host!r}; only local files are supported")
            rest = "/" + path
        return Path(rest)
    if "://" in text:
        raise StorageError(f"unsupported URI scheme in {text!r}: use s3://bucket/key, file:///path or a path")
    return Path(text)


def join(uri: PathLike, *parts: str) -> str:
    """Append path parts with '/', e.g. join('s3://b/runs', 'r1', 'model.pth') -> 's3://b/runs/r1/model.pth'."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_IO_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# S3 clients and error translation


def _resolve_endpoint(endpoint_url: Optional[str]) -> Optional[str]:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _endpoint_name(endpoint: Optional[str]) -> str:
    return endpoint or "the default AWS S3 endpoint"


_clients: dict = {}
_clients_lock = threading.Lock()
_known_buckets: set = set()


def _client(endpoint: Optional[str], pool: int = 64) -> Any:
    """A botocore S3 client shared by all threads (clients are thread-safe; sessions are not), one per
    endpoint, credential environment and pool size."""
    pool = max(pool, 64)
    env = tuple(
        os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
            "AWS_MAX_ATTEMPTS",
            "AWS_RETRY_MODE",
        )
    )
    # The pid keeps a forked DataLoader worker off the parent's pooled sockets: two processes reading
    # one connection interleave responses ("IncompleteRead"). Inherited clients stay referenced, so
    # collecting them never closes a socket the parent still uses.
    key = (os.getpid(), endpoint, env, pool)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            config = Config(
                region_name=region or ("us-east-1" if endpoint else None),
                retries={
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")),
                },
                max_pool_connections=pool,
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path"},
                # We checksum end to end ourselves; the newer default CRC trailers are not understood
                # by every S3-compatible server.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = client
    return client


def _is_auth_error(code: str) -> bool:
    return code in _AUTH_CODES


def _translate(exc: BaseException, op: str, bucket: str, key: str, endpoint: Optional[str]) -> StorageError:
    """Map a botocore/s3transfer exception to a StorageError that names the object and endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    uri = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    where = _endpoint_name(endpoint)
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = err.get("Message", "")
        if code == "NoSuchBucket":
            return StorageError(f"{op} {uri}: bucket {bucket!r} does not exist at {where}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{op} {uri}: no such object at {where}")
        if _is_auth_error(code):
            return StorageError(
                f"{op} {uri}: access denied by {where} for bucket {bucket!r} ({code}: {msg or 'Forbidden'}); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) and the bucket policy"
            )
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        return StorageError(f"{op} {uri} at {where} failed after {attempts + 1} attempt(s): {code}: {msg}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{op} {uri}: no AWS credentials found for {where} "
            "(set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)"
        )
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{op} {uri}: could not complete the request to {where}: {exc}")
    if isinstance(exc, OSError):
        return StorageError(f"{op} {uri} at {where}: {exc}")
    return StorageError(f"{op} {uri} at {where}: {type(exc).__name__}: {exc}")


def _raise(exc: BaseException, op: str, bucket: str, key: str, endpoint: Optional[str]) -> NoReturn:
    raise _translate(exc, op, bucket, key, endpoint) from exc


def _require_bucket(client: Any, bucket: str, endpoint: Optional[str], op: str, key: str) -> None:
    """HEAD answers a bare 404 for a missing object and a missing bucket alike; tell them apart once per
    bucket so a typo in a bucket name is an error rather than 'object not found'."""
    from botocore.exceptions import ClientError

    if (endpoint, bucket) in _known_buckets:
        return
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(
                f"{op} s3://{bucket}/{key}: bucket {bucket!r} does not exist at {_endpoint_name(endpoint)}"
            ) from exc
        _raise(exc, op, bucket, key, endpoint)
    _known_buckets.add((endpoint, bucket))


def _stream_errors() -> Tuple[type, ...]:
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

    return (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ProtocolError, Urllib3ReadTimeout)


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5 * 2**attempt, 8.0))


# ---------------------------------------------------------------------------------------------
# Local writes


def _temp_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def _atomic_local(dest: Path, fsync: bool = True) -> Iterator[Tuple[Any, Path]]:
    """Yield (file, temp path) in dest's directory; on success (fsync and) rename onto dest, on any error
    remove the temp file so nothing partial is ever visible under dest. The rename alone protects
    against a killed process; the fsync also against a node crash (data reaches disk before the name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_local_bytes(data: bytes, dest: Path) -> None:
    try:
        with _atomic_local(dest) as (f, _):
            f.write(data)
    except OSError as exc:
        raise StorageError(f"write {dest}: {exc}") from exc


def _copy_local(src: Path, dest: Path, fsync: bool = True) -> Tuple[int, str]:
    """Copy src to dest atomically; returns (size, sha256) of the bytes written."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, _atomic_local(dest, fsync) as (fout, _):
            for block in iter(lambda: fin.read(_IO_CHUNK), b""):
                digest.update(block)
                fout.write(block)
                size += len(block)
    except FileNotFoundError as exc:
        raise NotFound(f"no such file {src}") from exc
    except OSError as exc:
        raise StorageError(f"copy {src} -> {dest}: {exc}") from exc
    return size, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# S3 primitives (bucket, key, endpoint already resolved)


class _ByteCounter:
    """s3transfer subscriber: optionally provides size/etag up front (skips its HEAD) and counts bytes."""

    def __init__(
        self,
        on_bytes: Optional[Callable[[int], None]],
        size: Optional[int] = None,
        etag: Optional[str] = None,
    ):
        self._on_bytes, self._size, self._etag = on_bytes, size, etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(self._etag)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._on_bytes is not None:
            self._on_bytes(bytes_transferred)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        pass


def _transfer_manager(client: Any) -> Any:
    from s3transfer.manager import TransferConfig, TransferManager

    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_request_concurrency=MULTIPART_CONCURRENCY,
        num_download_attempts=5,
    )
    return TransferManager(client, config)


def _s3_put_bytes(client: Any, data: bytes, bucket: str, key: str, endpoint: Optional[str], sha: str) -> None:
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA: sha})
    except Exception as exc:
        _raise(exc, "put", bucket, key, endpoint)


def _s3_put_file(
    client: Any,
    src: Path,
    bucket: str,
    key: str,
    endpoint: Optional[str],
    on_bytes: Optional[Callable[[int], None]] = None,
) -> Tuple[int, str]:
    """Upload one file; small files in one PUT from memory, large ones multipart. Returns (size, sha256)."""
    try:
        size = src.stat().st_size
    except FileNotFoundError as exc:
        raise NotFound(f"put {src} -> s3://{bucket}/{key}: no such file {src}") from exc
    if size <= MULTIPART_THRESHOLD:
        data = src.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        _s3_put_bytes(client, data, bucket, key, endpoint, sha)
        if on_bytes is not None:
            on_bytes(len(data))
        return len(data), sha
    sha = sha256_file(src)
    try:
        with _transfer_manager(client) as manager:
            future = manager.upload(
                str(src),
                bucket,
                key,
                extra_args={"Metadata": {SHA256_METADATA: sha}},
                subscribers=[_ByteCounter(on_bytes, size=size)],
            )
            future.result()
    except Exception as exc:
        _raise(exc, "put", bucket, key, endpoint)
    return size, sha


def _check_sha(
    uri: str, expected: Optional[str], actual: str, endpoint: Optional[str], require: bool
) -> bool:
    """True when verified, False when the object had no sha256 metadata (and that is allowed)."""
    if expected is None:
        if require:
            raise ChecksumMismatch(
                f"{uri} at {_endpoint_name(endpoint)} has no sha256 metadata to verify against"
            )
        return False
    if expected.lower() != actual:
        raise ChecksumMismatch(
            f"{uri} at {_endpoint_name(endpoint)}: sha256 of the downloaded bytes is {actual}, "
            f"the object's metadata says {expected}"
        )
    return True


def _s3_get_bytes(
    client: Any, bucket: str, key: str, endpoint: Optional[str], require: bool
) -> Tuple[bytes, bool]:
    uri = f"s3://{bucket}/{key}"
    for attempt in range(_STREAM_ATTEMPTS):
        try:
            resp = client.get_object(Bucket=bucket, Key=key)
            data = resp["Body"].read()
            break
        except _stream_errors() as exc:
            if attempt == _STREAM_ATTEMPTS - 1:
                _raise(exc, "get", bucket, key, endpoint)
            log.warning("get %s: body cut off (%s), retrying", uri, exc)
            _backoff(attempt)
        except Exception as exc:
            _raise(exc, "get", bucket, key, endpoint)
    verified = _check_sha(
        uri,
        resp.get("Metadata", {}).get(SHA256_METADATA),
        hashlib.sha256(data).hexdigest(),
        endpoint,
        require,
    )
    return data, verified


def _s3_head(client: Any, bucket: str, key: str, endpoint: Optional[str]) -> Optional[dict]:
    """head_object's response, or None when the object is missing (a missing bucket raises)."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchKey", "NotFound"):
            _raise(exc, "head", bucket, key, endpoint)
    except Exception as exc:
        _raise(exc, "head", bucket, key, endpoint)
    _require_bucket(client, bucket, endpoint, "head", key)
    return None


def _s3_get_file(
    client: Any,
    bucket: str,
    key: str,
    dest: Path,
    endpoint: Optional[str],
    require: bool,
    size: Optional[int] = None,
    on_bytes: Optional[Callable[[int], None]] = None,
    fsync: bool = True,
) -> Tuple[int, bool]:
    """Download to dest via a temp file, verifying sha256 before the rename. `size` (from a listing)
    lets small objects skip the HEAD. Returns (size, verified)."""
    uri = f"s3://{bucket}/{key}"
    head = None
    if size is None or size > MULTIPART_THRESHOLD:
        head = _s3_head(client, bucket, key, endpoint)
        if head is None:
            raise NotFound(f"get {uri}: no such object at {_endpoint_name(endpoint)}")
        size = int(head["ContentLength"])
    try:
        if size <= MULTIPART_THRESHOLD:
            # One GET: data and metadata come from the same response, so they describe one version.
            data, verified = _s3_get_bytes(client, bucket, key, endpoint, require)
            with _atomic_local(dest, fsync) as (f, _):
                f.write(data)
            if on_bytes is not None:
                on_bytes(len(data))
            return len(data), verified
        assert head is not None
        expected = head.get("Metadata", {}).get(SHA256_METADATA)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(dest)
        try:
            try:
                # Concurrent ranged GETs, each pinned to the HEAD's version by If-Match: etag.
                with _transfer_manager(client) as manager:
                    counter = _ByteCounter(on_bytes, size=size, etag=head.get("ETag"))
                    manager.download(bucket, key, str(tmp), subscribers=[counter]).result()
            except Exception as exc:
                _raise(exc, "get", bucket, key, endpoint)
            verified = _check_sha(uri, expected, sha256_file(tmp), endpoint, require)
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return size, verified
    except OSError as exc:
        raise StorageError(f"get {uri} -> {dest}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Public single-object API


def put_bytes(data: bytes, uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Write `data` to uri atomically; on S3 with its sha256 as metadata."""
    uri = os.fspath(uri)
    sha = hashlib.sha256(data).hexdigest()
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        _s3_put_bytes(_client(endpoint), data, bucket, key, endpoint, sha)
    else:
        _write_local_bytes(data, _local_path(uri))
    return ObjectInfo(uri, len(data), sha)


def get_bytes(uri: PathLike, endpoint_url: Optional[str] = None, require_checksum: bool = False) -> bytes:
    """Read a whole object; S3 objects are verified against their sha256 metadata."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        return _s3_get_bytes(_client(endpoint), bucket, key, endpoint, require_checksum)[0]
    path = _local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"no such file {path}") from exc
    except OSError as exc:
        raise StorageError(f"read {path}: {exc}") from exc


def put_file(local_path: PathLike, uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Copy a local file to uri (S3 or local) atomically, storing its sha256 on S3."""
    src, uri = Path(local_path), os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        progress = _Progress(
            f"put {src} -> {uri}", 1, _file_size(src), enabled=True, quiet_below_s=_PROGRESS_INTERVAL_S
        )
        size, sha = _s3_put_file(_client(endpoint), src, bucket, key, endpoint, progress.add_bytes)
        progress.finish()
    else:
        size, sha = _copy_local(src, _local_path(uri))
    return ObjectInfo(uri, size, sha)


def get_file(
    uri: PathLike, local_path: PathLike, endpoint_url: Optional[str] = None, require_checksum: bool = False
) -> ObjectInfo:
    """Copy uri to a local file atomically; S3 objects are verified against their sha256 metadata
    (ChecksumMismatch leaves any existing file at local_path untouched)."""
    uri, dest = os.fspath(uri), Path(local_path)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        client = _client(endpoint)
        head = _s3_head(client, bucket, key, endpoint)
        if head is None:
            raise NotFound(f"get {uri}: no such object at {_endpoint_name(endpoint)}")
        size = int(head["ContentLength"])
        progress = _Progress(
            f"get {uri} -> {dest}", 1, size, enabled=True, quiet_below_s=_PROGRESS_INTERVAL_S
        )
        _s3_get_file(
            client, bucket, key, dest, endpoint, require_checksum, size=size, on_bytes=progress.add_bytes
        )
        progress.finish()
        return ObjectInfo(uri, size, head.get("Metadata", {}).get(SHA256_METADATA))
    size, sha = _copy_local(_local_path(uri), dest)
    return ObjectInfo(uri, size, sha)


def head(uri: PathLike, endpoint_url: Optional[str] = None) -> ObjectInfo:
    """Size and sha256 of an object (local files are hashed). Raises NotFound when it is missing."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        resp = _s3_head(_client(endpoint), bucket, key, endpoint)
        if resp is None:
            raise NotFound(f"head {uri}: no such object at {_endpoint_name(endpoint)}")
        return ObjectInfo(uri, int(resp["ContentLength"]), resp.get("Metadata", {}).get(SHA256_METADATA))
    path = _local_path(uri)
    if not path.is_file():
        raise NotFound(f"no such file {path}")
    return ObjectInfo(uri, path.stat().st_size, sha256_file(path))


stat = head


def exists(uri: PathLike, endpoint_url: Optional[str] = None) -> bool:
    """Whether the object / file exists. A missing bucket raises StorageError instead of answering False."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        return _s3_head(_client(endpoint), bucket, key, endpoint) is not None
    return _local_path(uri).is_file()


def delete(uri: PathLike, endpoint_url: Optional[str] = None) -> None:
    """Delete one object / file. Deleting something that does not exist is not an error."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, key = _split_object(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        try:
            _client(endpoint).delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            _raise(exc, "delete", bucket, key, endpoint)
        return
    path = _local_path(uri)
    if path.is_dir():
        raise StorageError(f"delete {path}: is a directory (use delete_prefix)")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _s3_list(client: Any, bucket: str, prefix: str, endpoint: Optional[str]) -> Iterator[Tuple[str, int]]:
    """(key, size) of every object whose key starts with prefix."""
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            resp = client.list_objects_v2(**kwargs)
        except Exception as exc:
            _raise(exc, "list", bucket, prefix, endpoint)
        for obj in resp.get("Contents", []):
            yield obj["Key"], int(obj["Size"])
        token = resp.get("NextContinuationToken")
        if not resp.get("IsTruncated") or not token:
            return


def _local_list(root: Path) -> Iterator[Tuple[str, int]]:
    """(relative posix path, size) of every regular file under root, recursively, skipping our temps."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") and ".tmp-" in name:
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            if os.path.isfile(full):
                yield Path(os.path.relpath(full, root)).as_posix(), st.st_size


def list_prefix(uri: PathLike, endpoint_url: Optional[str] = None) -> list[str]:
    """Full URIs of all objects whose name starts with uri (string prefix, like S3), sorted. For a local
    directory that is every file below it."""
    uri = os.fspath(uri)
    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        endpoint = _resolve_endpoint(endpoint_url)
        return sorted(f"s3://{bucket}/{k}" for k, _ in _s3_list(_client(endpoint), bucket, prefix, endpoint))
    path = _local_path(uri)
    # Results keep the caller's spelling of the prefix (relative, file://, trailing '/').
    if path.is_dir():
        root, base, want = path, uri, ""
    elif uri.endswith("/"):
        return []
    else:
        root, want = path.parent, path.name
        base = uri[: len(uri) - len(want)]
    if not root.is_dir():
        return []
    return sorted(join(base, rel) if base else rel for rel, _ in _local_list(root) if rel.startswith(want))


def delete_prefix(uri: PathLike, endpoint_url: Optional[str] = None) -> int:
    """Delete every object under a prefix (a local directory tree); returns how many were deleted."""
    uri = os.fspath(uri)
    if not is_s3(uri):
        path = _local_path(uri)
        if not path.exists():
            return 0
        count = sum(1 for _ in _local_list(path)) if path.is_dir() else 1
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return count
    bucket, prefix = _split_s3(uri)
    endpoint = _resolve_endpoint(endpoint_url)
    client = _client(endpoint)
    keys = [k for k, _ in _s3_list(client, bucket, prefix, endpoint)]
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        try:
            resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        except Exception as exc:
            _raise(exc, "delete", bucket, prefix, endpoint)
        if resp.get("Errors"):
            first = resp["Errors"][0]
            raise StorageError(
                f"delete s3://{bucket}/{first.get('Key')} at {_endpoint_name(endpoint)}: "
                f"{first.get('Code')}: {first.get('Message')} ({len(resp['Errors'])} keys failed)"
            )
    return len(keys)


# ---------------------------------------------------------------------------------------------
# Trees


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Progress:
    """Thread-safe counters with a log line every few seconds: files, MB, MB/s, ETA."""

    def __init__(
        self, label: str, total_files: int, total_bytes: int, enabled: bool, quiet_below_s: float = 0.0
    ):
        self.label, self.total_files, self.total_bytes, self.enabled = (
            label,
            total_files,
            total_bytes,
            enabled,
        )
        self.files = self.bytes = self.skipped = self.unverified = 0
        self.start = time.monotonic()
        self._last_log = self.start
        self._quiet_below_s = quiet_below_s
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self.maybe_log()

    def file_done(self, skipped: bool = False, verified: bool = True) -> None:
        with self._lock:
            self.files += 1
            self.skipped += int(skipped)
            self.unverified += int(not verified)

    def maybe_log(self) -> None:
        now = time.monotonic()
        with self._lock:
            if not self.enabled or now - self._last_log < _PROGRESS_INTERVAL_S:
                return
            self._last_log = now
        elapsed = now - self.start
        rate = self.bytes / 1e6 / elapsed if elapsed > 0 else 0.0
        left = max(self.total_bytes - self.bytes, 0) / 1e6
        eta = f", eta {left / rate:.0f} s" if rate > 0 else ""
        log.info(
            "%s: %d/%d files, %.1f/%.1f MB, %.1f MB/s%s",
            self.label,
            self.files,
            self.total_files,
            self.bytes / 1e6,
            self.total_bytes / 1e6,
            rate,
            eta,
        )

    def finish(self) -> TransferStats:
        seconds = time.monotonic() - self.start
        stats = TransferStats(self.files - self.skipped, self.bytes, seconds, self.skipped, self.unverified)
        if self.enabled and seconds >= self._quiet_below_s:
            log.info(
                "%s: done, %d files (%d unchanged, skipped), %.1f MB in %.1f s, %.1f MB/s",
                self.label,
                stats.files,
                stats.skipped,
                stats.bytes / 1e6,
                seconds,
                stats.mb_per_s,
            )
        return stats


def _run_pool(
    label: str, items: Iterable[Any], fn: Callable[[Any], None], workers: int, progress: _Progress
) -> None:
    """Run fn over items on `workers` threads with a bounded queue. On the first failure stop submitting,
    let running transfers finish, and raise that failure (same StorageError class) with a count."""
    workers = max(1, int(workers))
    failures: list = []
    it = iter(items)
    inflight: set[Future] = set()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="storage") as pool:

        def fill() -> None:
            while len(inflight) < workers * 4 and not failures:
                item = next(it, None)
                if item is None:
                    return
                fut = pool.submit(fn, item)
                fut.item = item  # type: ignore[attr-defined]
                inflight.add(fut)

        fill()
        while inflight:
            done, _ = wait(inflight, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                inflight.discard(fut)
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is not None:
                    failures.append((fut.item, exc))  # type: ignore[attr-defined]
            if failures:
                for fut in inflight:  # queued, not yet started: drop them
                    fut.cancel()
            progress.maybe_log()
            fill()
    if failures:
        item, exc = failures[0]
        cls = type(exc) if isinstance(exc, StorageError) else StorageError
        raise cls(
            f"{label}: {len(failures)} file(s) failed, {progress.files} done; first failure ({item}): {exc}"
        ) from exc


def _safe_relpath(key: str, prefix: str, uri: str) -> Optional[str]:
    """Relative local path for an object key under prefix; None for directory markers. Keys that would
    escape the target directory raise."""
    rel = key[len(prefix) :]
    if not rel or rel.endswith("/"):
        return None
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or any(p in ("..", ".") for p in parts):
        raise StorageError(
            f"download {uri}: refusing object key {key!r}, it would land outside the target directory"
        )
    return "/".join(parts)


def _tree_prefix(key: str) -> str:
    return key.rstrip("/") + "/" if key.strip("/") else ""


def _copy_tree_file(
    src_root: Path, dest_root: Path, rel: str, size: int, skip_unchanged: bool, fsync: bool, prog: _Progress
) -> None:
    src, dest = src_root / rel, dest_root / rel
    if (
        skip_unchanged
        and _file_size(dest) == size
        and dest.is_file()
        and sha256_file(dest) == sha256_file(src)
    ):
        prog.file_done(skipped=True)
        return
    prog.add_bytes(_copy_local(src, dest, fsync)[0])
    prog.file_done()


def upload_tree(
    local_dir: PathLike,
    uri: PathLike,
    workers: int = 16,
    progress: bool = True,
    endpoint_url: Optional[str] = None,
    skip_unchanged: bool = False,
    fsync: bool = True,
) -> TransferStats:
    """Upload every file under local_dir to uri/<relative path>, `workers` at a time. With skip_unchanged,
    objects that already hold the same bytes (size and sha256 metadata) are left alone. `fsync`
    only matters for a local destination (see download_tree)."""
    src_root, uri = Path(local_dir), os.fspath(uri)
    if not src_root.is_dir():
        raise NotFound(f"upload {src_root} -> {uri}: no such directory {src_root}")
    files = list(_local_list(src_root))
    label = f"upload {src_root} -> {uri}"
    prog = _Progress(label, len(files), sum(s for _, s in files), progress)

    if is_s3(uri):
        bucket, key = _split_s3(uri)
        prefix = _tree_prefix(key)
        endpoint = _resolve_endpoint(endpoint_url)
        client = _client(endpoint, workers * 2 + MULTIPART_CONCURRENCY)
        _require_bucket(client, bucket, endpoint, "upload", prefix)
        remote = dict(_s3_list(client, bucket, prefix, endpoint)) if skip_unchanged else {}

        def one(item: Tuple[str, int]) -> None:
            rel, size = item
            src, dest_key = src_root / rel, prefix + rel
            if remote.get(dest_key) == size:
                resp = _s3_head(client, bucket, dest_key, endpoint)
                sha = (resp or {}).get("Metadata", {}).get(SHA256_METADATA)
                if sha and sha == sha256_file(src):
                    prog.file_done(skipped=True)
                    return
            _s3_put_file(client, src, bucket, dest_key, endpoint, prog.add_bytes)
            prog.file_done()

    else:
        dest_root = _local_path(uri)

        def one(item: Tuple[str, int]) -> None:
            _copy_tree_file(src_root, dest_root, item[0], item[1], skip_unchanged, fsync, prog)

    _run_pool(label, files, one, workers, prog)
    return prog.finish()


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
    sha256 are kept. fsync=False drops the per-file fsync (about a quarter faster for small files):
    a killed process still never leaves a partial file under a final name, but a node crash may."""
    uri, dest_root = os.fspath(uri), Path(local_dir)
    label = f"download {uri} -> {dest_root}"
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        prefix = _tree_prefix(key)
        endpoint = _resolve_endpoint(endpoint_url)
        client = _client(endpoint, workers * 2 + MULTIPART_CONCURRENCY)
        listing = [(k, s) for k, s in _s3_list(client, bucket, prefix, endpoint)]
        items = [(rel, k, s) for k, s in listing if (rel := _safe_relpath(k, prefix, uri)) is not None]
        if not items:
            _require_bucket(client, bucket, endpoint, "download", prefix)
            raise NotFound(
                f"download {uri}: no objects under s3://{bucket}/{prefix} at {_endpoint_name(endpoint)}"
            )
        prog = _Progress(label, len(items), sum(s for _, _, s in items), progress)

        def one(item: Tuple[str, str, int]) -> None:
            rel, obj_key, size = item
            dest = dest_root / rel
            if skip_unchanged and _file_size(dest) == size and dest.is_file():
                resp = _s3_head(client, bucket, obj_key, endpoint)
                sha = (resp or {}).get("Metadata", {}).get(SHA256_METADATA)
                if sha and sha == sha256_file(dest):
                    prog.file_done(skipped=True)
                    return
            _, verified = _s3_get_file(
                client, bucket, obj_key, dest, endpoint, require_checksum, size, prog.add_bytes, fsync
            )
            prog.file_done(verified=verified)

    else:
        src_root = _local_path(uri)
        local_items = list(_local_list(src_root)) if src_root.is_dir() else []
        if not local_items:
            raise NotFound(f"download {uri}: no files under {src_root}")
        items = [(rel, rel, s) for rel, s in local_items]
        prog = _Progress(label, len(items), sum(s for _, _, s in items), progress)

        def one(item: Tuple[str, str, int]) -> None:
            _copy_tree_file(src_root, dest_root, item[0], item[2], skip_unchanged, fsync, prog)

    _run_pool(label, items, one, workers, prog)
    stats = prog.finish()
    if stats.unverified:
        log.warning("%s: %d object(s) had no sha256 metadata and were not verified", label, stats.unverified)
    return stats
