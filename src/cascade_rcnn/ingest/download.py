"""Resumable HTTP(S) downloads.

Bytes land in `<dest>.part`; an interrupted transfer (dropped connection, killed pod) continues
from the partial file with `Range: bytes=N-`, so an 18 GB archive is never fetched twice. The file
is renamed to `dest` only after its size and checksums were verified.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.storage import file_digests
from cascade_rcnn.storage.progress import Progress

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# Network failures worth another try; HTTP 4xx other than these is final.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


class DownloadError(IngestError):
    """A URL could not be fetched or its bytes failed the size/checksum check."""


@dataclass
class DownloadResult:
    path: Path
    size: int
    sha256: str
    bytes_fetched: int  # bytes received over the network by this call
    resumed_from: int  # bytes of a partial file found before the first request


def _check_complete(path: Path, url: str, size: int | None, md5: str | None, sha256: str | None) -> str:
    """Verifies size and checksums; returns the sha256. Raises DownloadError naming both values."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise DownloadError(f"{url}: downloaded {actual_size} bytes into {path}, expected {size}")
    algorithms = ("sha256", "md5") if md5 else ("sha256",)
    digests = file_digests(path, algorithms)
    if md5 and digests["md5"] != md5.lower():
        raise DownloadError(f"{url}: md5 of {path} is {digests['md5']}, expected {md5.lower()}")
    if sha256 and digests["sha256"] != sha256.lower():
        raise DownloadError(f"{url}: sha256 of {path} is {digests['sha256']}, expected {sha256.lower()}")
    return digests["sha256"]


class _Retry(Exception):
    """Internal: this attempt failed in a way another attempt may fix."""


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _open(url: str, offset: int, timeout_s: float, validator: str | None):
    headers = {"User-Agent": "cascade-rcnn-ingest/1", "Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            # The server sends the whole file (200) instead of the rest if it changed since.
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)


def _fetch_once(
    url: str, part: Path, offset: int, expected: int | None, timeout_s: float, on_bytes: Callable[[int], None]
) -> int | None:
    """One request from `offset`, appended to `part`. Returns the resource's total size if known.

    On a network error the bytes already written stay in `part` for the next attempt.
    """
    validator_file = _validator_path(part)
    validator = validator_file.read_text() if offset > 0 and validator_file.exists() else None
    try:
        resp = _open(url, offset, timeout_s, validator)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            # Range past the end: the partial file is either complete or longer than the resource.
            match = _UNSATISFIED_RANGE.search(e.headers.get("Content-Range", "") or "")
            if match and int(match.group(1)) == offset:
                return offset
            logger.warning("%s: server refused Range from byte %d; restarting from 0", url, offset)
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for Range bytes={offset}-") from e
        if e.code in _RETRY_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with resp:
        if resp.status == 206:
            match = _CONTENT_RANGE.search(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(
                    f"{url}: asked for bytes {offset}- but got Content-Range "
                    f"{resp.headers.get('Content-Range')!r}"
                )
            total = int(match.group(3)) if match.group(3) != "*" else expected
            mode = "ab"
        else:
            if offset > 0:
                logger.warning(
                    "%s: server sent the whole file (changed, or no Range support); restarting", url
                )
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else expected
            mode = "wb"
            # Remember which version the part file holds, for If-Range when resuming it.
            etag = resp.headers.get("ETag", "")
            new_validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
            if new_validator:
                validator_file.write_text(new_validator)
            else:
                validator_file.unlink(missing_ok=True)
        if expected is not None and total != expected:
            # A different file than the one asked for (a mirror's error page, a new release).
            raise DownloadError(f"{url}: server reports {total} bytes, expected {expected}")
        with open(part, mode) as out:
            while block := resp.read(_CHUNK):
                out.write(block)
                on_bytes(len(block))
    return total


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff_s: float = 0.5,
    timeout_s: float = 60.0,
) -> DownloadResult:
    """Downloads `url` to `dest`, resuming `<dest>.part` when present.

    `size`, `md5` and `sha256` are checked when given. `retries` counts consecutive failed attempts
    (any attempt that received bytes resets it); the wait doubles from `backoff_s` up to 30 s.
    A finished `dest` that passes the checks is reused without a request.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        try:
            digest = _check_complete(dest, url, size, md5, sha256)
            logger.info("%s: already downloaded at %s", url, dest)
            return DownloadResult(dest, dest.stat().st_size, digest, 0, dest.stat().st_size)
        except DownloadError as e:
            logger.warning("%s; downloading again", e)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    resumed_from = part.stat().st_size if part.exists() else 0
    if size is not None and resumed_from > size:
        part.unlink()
        _validator_path(part).unlink(missing_ok=True)
        resumed_from = 0
    if resumed_from:
        logger.info("%s: resuming from byte %d of %s", url, resumed_from, size or "?")
    progress = Progress(dest.name, size, start=resumed_from, logger=logger)
    fetched = 0

    def on_bytes(n: int) -> None:
        nonlocal fetched
        fetched += n
        progress.update(n)

    total = size
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        progress.done = offset
        if total is not None and offset == total:
            break
        try:
            total = _fetch_once(url, part, offset, size, timeout_s, on_bytes)
            now = part.stat().st_size if part.exists() else 0
            if total is None or now == total:
                break
            if now > total:
                part.unlink()
                raise DownloadError(f"{url}: received {now} bytes, more than the {total} announced")
            raise _Retry(f"connection closed at byte {now} of {total}")
        except (_Retry, *_NETWORK_ERRORS) as e:
            now = part.stat().st_size if part.exists() else 0
            # Only attempts that made no progress count against `retries`.
            failures = 1 if now > offset else failures + 1
            if failures > retries:
                raise DownloadError(
                    f"{url}: giving up after {retries} retries ({e}); "
                    f"{now} bytes kept in {part} for the next run to resume"
                ) from e
            wait = min(backoff_s * 2 ** (failures - 1), 30.0)
            logger.warning("%s: %s at byte %d; retry %d/%d in %.1fs", url, e, now, failures, retries, wait)
            time.sleep(wait)
    progress.finish()
    _validator_path(part).unlink(missing_ok=True)
    try:
        digest = _check_complete(part, url, size, md5, sha256)
    except DownloadError:
        part.unlink(missing_ok=True)  # wrong bytes must not be resumed from
        raise
    os.replace(part, dest)
    return DownloadResult(dest, dest.stat().st_size, digest, fetched, resumed_from)
