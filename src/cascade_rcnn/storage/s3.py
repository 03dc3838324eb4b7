"""S3 backend: boto3 / s3transfer, sha256 metadata on every object, errors that name bucket and endpoint."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, MutableMapping, NoReturn, Optional, Tuple

from . import secret_files
from .base import (
    SHA256_METADATA,
    ChecksumMismatch,
    NotFound,
    ObjectInfo,
    PreconditionFailed,
    StorageError,
    sha256_file,
)
from .local import atomic_write, file_size, temp_path
from .progress import Progress
from .retry import retry_call

log = logging.getLogger(__name__)

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

# ---------------------------------------------------------------------------------------------
# URIs


def split_uri(uri: str) -> Tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: no bucket (expected s3://bucket/key)")
    return bucket, key


def split_object(uri: str) -> Tuple[str, str]:
    """Like split_uri, for operations on one object: the key must name an object, not a prefix."""
    bucket, key = split_uri(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri!r} names a bucket or prefix, not an object (expected s3://bucket/key)")
    return bucket, key


def safe_relpath(key: str, prefix: str, uri: str) -> Optional[str]:
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


# ---------------------------------------------------------------------------------------------
# Clients and error translation


def resolve_endpoint(endpoint_url: Optional[str]) -> Optional[str]:
    secret_files.load_env()  # a pipeline step's S3 Secret, mounted as files
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _endpoint_name(endpoint: Optional[str]) -> str:
    return endpoint or "the default AWS S3 endpoint"


_clients: dict = {}
_clients_lock = threading.Lock()
_known_buckets: set = set()


def client(endpoint: Optional[str], pool: int = 64) -> Any:
    """A botocore S3 client shared by all threads (clients are thread-safe; sessions are not), one per
    endpoint, credential environment and pool size."""
    secret_files.load_env()
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
        found = _clients.get(key)
        if found is None:
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
            found = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
            _clients[key] = found
    return found


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
        if code in _AUTH_CODES:
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


def _is_precondition(exc: Any) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


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


class _ByteCounter:
    """s3transfer subscriber: optionally provides size/etag up front (skips its HEAD) and counts bytes."""

    def __init__(
        self,
        on_bytes: Optional[Callable[[int], None]],
        size: Optional[int] = None,
        etag: Optional[str] = None,
    ):
        self._on_bytes, self._size, self._etag = on_bytes, size, etag
        self.counted = 0

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(self._etag)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self.counted += bytes_transferred
        if self._on_bytes is not None:
            self._on_bytes(bytes_transferred)

    def take_back(self) -> None:
        """Uncount this attempt's bytes (the transfer failed and will be repeated)."""
        if self._on_bytes is not None and self.counted:
            self._on_bytes(-self.counted)
        self.counted = 0

    def on_done(self, future: Any, **kwargs: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The backend


class S3Backend:
    """The storage operations against one S3 endpoint (bucket and key come from each URI)."""

    def __init__(self, endpoint_url: Optional[str], pool: int, multipart: Tuple[int, int, int]):
        """multipart: (threshold, chunk size, concurrency); objects up to the threshold go in one
        PUT / GET from memory, larger ones as multipart uploads and concurrent ranged GETs."""
        self.endpoint = resolve_endpoint(endpoint_url)
        self.client = client(self.endpoint, pool)
        self.threshold, self.chunksize, self.concurrency = multipart

    # -- primitives (bucket and key already split) --

    def _retry(self, op: str, bucket: str, key: str, fn: Callable[[], Any]) -> Any:
        """fn(), one whole request, under the outage retry policy (retry.py). A permanent error comes
        out as botocore raised it, for the caller to read its code; a spent budget as StorageError."""
        uri = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        return retry_call(fn, op, uri, _endpoint_name(self.endpoint))

    def _transfer_manager(self) -> Any:
        from s3transfer.manager import TransferConfig, TransferManager

        config = TransferConfig(
            multipart_threshold=self.threshold,
            multipart_chunksize=self.chunksize,
            max_request_concurrency=self.concurrency,
            num_download_attempts=5,
        )
        return TransferManager(self.client, config)

    def _require_bucket(self, bucket: str, op: str, key: str) -> None:
        """HEAD answers a bare 404 for a missing object and a missing bucket alike; tell them apart once
        per bucket so a typo in a bucket name is an error rather than 'object not found'."""
        from botocore.exceptions import ClientError

        if (self.endpoint, bucket) in _known_buckets:
            return
        try:
            self._retry(op, bucket, "", lambda: self.client.head_bucket(Bucket=bucket))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"{op} s3://{bucket}/{key}: bucket {bucket!r} does not exist at {_endpoint_name(self.endpoint)}"
                ) from exc
            _raise(exc, op, bucket, key, self.endpoint)
        _known_buckets.add((self.endpoint, bucket))

    def _head(self, bucket: str, key: str) -> Optional[dict]:
        """head_object's response, or None when the object is missing (a missing bucket raises)."""
        from botocore.exceptions import ClientError

        try:
            return self._retry("head", bucket, key, lambda: self.client.head_object(Bucket=bucket, Key=key))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchKey", "NotFound"):
                _raise(exc, "head", bucket, key, self.endpoint)
        except Exception as exc:
            _raise(exc, "head", bucket, key, self.endpoint)
        self._require_bucket(bucket, "head", key)
        return None

    def _head_sha(self, bucket: str, key: str) -> Optional[str]:
        return (self._head(bucket, key) or {}).get("Metadata", {}).get(SHA256_METADATA)

    def _put(self, data: bytes, bucket: str, key: str, sha: str) -> None:
        def put() -> None:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA: sha})

        try:
            self._retry("put", bucket, key, put)
        except Exception as exc:
            _raise(exc, "put", bucket, key, self.endpoint)

    def _put_file(
        self,
        src: Path,
        bucket: str,
        key: str,
        on_bytes: Optional[Callable[[int], None]] = None,
        sha: Optional[str] = None,
    ) -> Tuple[int, str]:
        """Upload one file; small files in one PUT from memory, large ones multipart. `sha`, the file's
        sha256 when the caller already knows it, is stored as is (the file is not hashed again).
        Returns (size, sha256)."""
        try:
            size = src.stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"put {src} -> s3://{bucket}/{key}: no such file {src}") from exc
        if size <= self.threshold:
            data = src.read_bytes()
            sha = sha or hashlib.sha256(data).hexdigest()
            self._put(data, bucket, key, sha)
            if on_bytes is not None:
                on_bytes(len(data))
            return len(data), sha
        sha = sha or sha256_file(src)

        def upload() -> None:
            # A failed multipart upload is aborted by s3transfer; a retry starts a new one.
            counter = _ByteCounter(on_bytes, size=size)
            try:
                with self._transfer_manager() as manager:
                    manager.upload(
                        str(src),
                        bucket,
                        key,
                        extra_args={"Metadata": {SHA256_METADATA: sha}},
                        subscribers=[counter],
                    ).result()
            except BaseException:
                counter.take_back()
                raise

        try:
            self._retry("put", bucket, key, upload)
        except Exception as exc:
            _raise(exc, "put", bucket, key, self.endpoint)
        return size, sha

    def _get(self, bucket: str, key: str, require: bool) -> Tuple[bytes, bool, str]:
        """(data, verified, sha256 of data)."""
        uri = f"s3://{bucket}/{key}"

        def get() -> Tuple[dict, bytes]:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            return resp, resp["Body"].read()  # a body cut off mid-read repeats the whole GET

        try:
            resp, data = self._retry("get", bucket, key, get)
        except Exception as exc:
            _raise(exc, "get", bucket, key, self.endpoint)
        sha = hashlib.sha256(data).hexdigest()
        verified = _check_sha(uri, resp.get("Metadata", {}).get(SHA256_METADATA), sha, self.endpoint, require)
        return data, verified, sha

    def _get_file(
        self,
        bucket: str,
        key: str,
        dest: Path,
        require: bool,
        size: Optional[int] = None,
        on_bytes: Optional[Callable[[int], None]] = None,
        fsync: bool = True,
    ) -> Tuple[int, bool, str]:
        """Download to dest via a temp file, verifying sha256 before the rename. `size` (from a listing)
        lets small objects skip the HEAD. Returns (size, verified, sha256 of the bytes now at dest)."""
        uri = f"s3://{bucket}/{key}"
        head = None
        if size is None or size > self.threshold:
            head = self._head(bucket, key)
            if head is None:
                raise NotFound(f"get {uri}: no such object at {_endpoint_name(self.endpoint)}")
            size = int(head["ContentLength"])
        try:
            if size <= self.threshold:
                # One GET: data and metadata come from the same response, so they describe one version.
                data, verified, sha = self._get(bucket, key, require)
                with atomic_write(dest, fsync) as (f, _):
                    f.write(data)
                if on_bytes is not None:
                    on_bytes(len(data))
                return len(data), verified, sha
            assert head is not None
            expected = head.get("Metadata", {}).get(SHA256_METADATA)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(dest)
            try:

                def download() -> None:
                    # Concurrent ranged GETs, each pinned to the HEAD's version by If-Match: etag.
                    counter = _ByteCounter(on_bytes, size=size, etag=head.get("ETag"))
                    try:
                        with self._transfer_manager() as manager:
                            manager.download(bucket, key, str(tmp), subscribers=[counter]).result()
                    except BaseException:
                        counter.take_back()
                        raise

                try:
                    self._retry("get", bucket, key, download)
                except Exception as exc:
                    _raise(exc, "get", bucket, key, self.endpoint)
                sha = sha256_file(tmp)
                verified = _check_sha(uri, expected, sha, self.endpoint, require)
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
            return size, verified, sha
        except OSError as exc:
            raise StorageError(f"get {uri} -> {dest}: {exc}") from exc

    def _list(self, bucket: str, prefix: str) -> Iterator[Tuple[str, int]]:
        """(key, size) of every object whose key starts with prefix."""
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                resp = self._retry(
                    "list", bucket, prefix, lambda kw=kwargs: self.client.list_objects_v2(**kw)
                )
            except Exception as exc:
                _raise(exc, "list", bucket, prefix, self.endpoint)
            for obj in resp.get("Contents", []):
                yield obj["Key"], int(obj["Size"])
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return

    # -- the operations storage dispatches to --

    def put_bytes(self, uri: str, data: bytes, sha: str) -> None:
        self._put(data, *split_object(uri), sha)

    def get_bytes(self, uri: str, require_checksum: bool) -> bytes:
        return self._get(*split_object(uri), require_checksum)[0]

    def get_versioned(self, uri: str) -> Tuple[bytes, str]:
        """(data, ETag) from one GET, so the version names exactly these bytes."""
        bucket, key = split_object(uri)

        def get() -> Tuple[dict, bytes]:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            return resp, resp["Body"].read()

        try:
            resp, data = self._retry("get", bucket, key, get)
        except Exception as exc:
            _raise(exc, "get", bucket, key, self.endpoint)
        _check_sha(uri, resp.get("Metadata", {}).get(SHA256_METADATA), hashlib.sha256(data).hexdigest(),
                   self.endpoint, False)  # fmt: skip
        return data, resp["ETag"]

    def put_bytes_if(self, uri: str, data: bytes, sha: str, version: Optional[str]) -> str:
        """PUT with If-None-Match: * (version None) or If-Match: version; returns the new ETag."""
        from botocore.exceptions import ClientError

        bucket, key = split_object(uri)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

        def put() -> dict:
            cond = condition
            for _ in range(3):
                try:
                    return self.client.put_object(
                        Bucket=bucket, Key=key, Body=data, Metadata={SHA256_METADATA: sha}, **cond
                    )
                except ClientError as exc:
                    if not _is_precondition(exc):
                        raise
                    # Refused, but the object carries our sha256: an earlier attempt (ours or
                    # botocore's) got there and only its answer was lost. Whole, that write
                    # succeeded. Cut short (some servers, SeaweedFS among them, store the part of a
                    # body that arrived before the connection broke), it is ours to replace.
                    head = self._head(bucket, key) or {}
                    if head.get("Metadata", {}).get(SHA256_METADATA) != sha:
                        raise
                    if int(head.get("ContentLength", -1)) == len(data):
                        return {"ETag": head["ETag"]}
                    log.warning("conditional put %s: replacing our own write that was cut short", uri)
                    cond = {"IfMatch": head["ETag"]}
            raise StorageError(f"conditional put {uri}: our own writes keep arriving cut short")

        try:
            resp = self._retry("conditional put", bucket, key, put)
        except ClientError as exc:
            if _is_precondition(exc):
                what = "exists already" if version is None else f"is no longer version {version}"
                raise PreconditionFailed(
                    f"conditional put {uri} refused by {_endpoint_name(self.endpoint)}: the object {what}"
                ) from exc
            _raise(exc, "put", bucket, key, self.endpoint)
        except Exception as exc:
            _raise(exc, "put", bucket, key, self.endpoint)
        return resp["ETag"]

    def put_file(self, src: Path, uri: str) -> Tuple[int, str]:
        bucket, key = split_object(uri)
        progress = Progress(f"put {src} -> {uri}", file_size(src), quiet_below_s=5.0)
        size, sha = self._put_file(src, bucket, key, progress.update)
        progress.finish()
        return size, sha

    def get_file(self, uri: str, dest: Path, require_checksum: bool) -> ObjectInfo:
        bucket, key = split_object(uri)
        head = self._head(bucket, key)
        if head is None:
            raise NotFound(f"get {uri}: no such object at {_endpoint_name(self.endpoint)}")
        size = int(head["ContentLength"])
        progress = Progress(f"get {uri} -> {dest}", size, quiet_below_s=5.0)
        size, verified, sha = self._get_file(
            bucket, key, dest, require_checksum, size=size, on_bytes=progress.update
        )
        progress.finish()
        # The digest of the bytes written, which the object's metadata matched (None without metadata).
        return ObjectInfo(uri, size, sha if verified else None)

    def head(self, uri: str) -> ObjectInfo:
        resp = self._head(*split_object(uri))
        if resp is None:
            raise NotFound(f"head {uri}: no such object at {_endpoint_name(self.endpoint)}")
        return ObjectInfo(uri, int(resp["ContentLength"]), resp.get("Metadata", {}).get(SHA256_METADATA))

    def exists(self, uri: str) -> bool:
        return self._head(*split_object(uri)) is not None

    def delete(self, uri: str) -> None:
        bucket, key = split_object(uri)
        try:
            self._retry("delete", bucket, key, lambda: self.client.delete_object(Bucket=bucket, Key=key))
        except Exception as exc:
            _raise(exc, "delete", bucket, key, self.endpoint)

    def list_prefix(self, uri: str) -> list[str]:
        bucket, prefix = split_uri(uri)
        return sorted(f"s3://{bucket}/{k}" for k, _ in self._list(bucket, prefix))

    def delete_prefix(self, uri: str) -> int:
        bucket, prefix = split_uri(uri)
        keys = [k for k, _ in self._list(bucket, prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]

            def delete_batch(batch: list = batch) -> dict:
                return self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

            try:
                resp = self._retry("delete", bucket, prefix, delete_batch)
            except Exception as exc:
                _raise(exc, "delete", bucket, prefix, self.endpoint)
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(
                    f"delete s3://{bucket}/{first.get('Key')} at {_endpoint_name(self.endpoint)}: "
                    f"{first.get('Code')}: {first.get('Message')} ({len(resp['Errors'])} keys failed)"
                )
        return len(keys)

    def tree_uploader(
        self,
        src_root: Path,
        uri: str,
        skip_unchanged: bool,
        fsync: bool,
        prog: Progress,
        known: Mapping[str, str],
    ) -> Callable[[Tuple[str, int]], None]:
        bucket, key = split_uri(uri)
        prefix = _tree_prefix(key)
        self._require_bucket(bucket, "upload", prefix)
        remote = dict(self._list(bucket, prefix)) if skip_unchanged else {}

        def one(item: Tuple[str, int]) -> None:
            rel, size = item
            src, dest_key, src_sha = src_root / rel, prefix + rel, known.get(rel)
            if remote.get(dest_key) == size:
                sha = self._head_sha(bucket, dest_key)
                if sha:
                    src_sha = src_sha or sha256_file(src)
                    if sha == src_sha:
                        prog.file_done(skipped=True)
                        return
            self._put_file(src, bucket, dest_key, prog.update, src_sha)
            prog.file_done()

        return one

    def tree_items(self, uri: str) -> list[Tuple[str, str, int]]:
        bucket, key = split_uri(uri)
        prefix = _tree_prefix(key)
        listing = list(self._list(bucket, prefix))
        items = [(rel, k, s) for k, s in listing if (rel := safe_relpath(k, prefix, uri)) is not None]
        if not items:
            self._require_bucket(bucket, "download", prefix)
            raise NotFound(
                f"download {uri}: no objects under s3://{bucket}/{prefix} at {_endpoint_name(self.endpoint)}"
            )
        return items

    def tree_downloader(
        self,
        uri: str,
        dest_root: Path,
        skip_unchanged: bool,
        require_checksum: bool,
        fsync: bool,
        prog: Progress,
        digests: MutableMapping[str, str],
    ) -> Callable[[Tuple[str, str, int]], None]:
        bucket, _ = split_uri(uri)

        def one(item: Tuple[str, str, int]) -> None:
            rel, obj_key, size = item
            dest = dest_root / rel
            if skip_unchanged and file_size(dest) == size and dest.is_file():
                sha = self._head_sha(bucket, obj_key)
                if sha and sha == sha256_file(dest):
                    digests[rel] = sha
                    prog.file_done(skipped=True)
                    return
            _, verified, digests[rel] = self._get_file(
                bucket, obj_key, dest, require_checksum, size, prog.update, fsync
            )
            prog.file_done(verified=verified)

        return one
