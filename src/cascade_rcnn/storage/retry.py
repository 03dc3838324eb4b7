"""Outage-tolerant object-store requests: one retry policy for every S3 call of training, evaluation
and promotion.

Two layers, each for what it is good at:
- botocore retries one HTTP request a few times within seconds ("standard" mode, $AWS_MAX_ATTEMPTS,
  default 8: about 3 s in all). That rides out a dropped connection or a throttled burst, and it
  retries one part of a multipart upload without starting the upload over.
- `retry_call`, above it, repeats a whole operation (a GET with its body, a PUT, a multipart upload,
  a listing page) while it keeps failing transiently, with capped exponential backoff, until the
  time budget $CASCADE_RCNN_S3_RETRY_SECONDS (default 600 s, 0 turns this layer off) is spent. That
  rides out a store that restarts or upgrades: seconds to minutes.

Transient: connection refused/reset/closed, connect and read timeouts, a body cut off mid-stream,
HTTP 5xx, 429 and S3's throttling codes. Everything else is permanent and raises at once, as it
did before this layer: 403 and other credential errors, a missing bucket or key, a refused
conditional write, a checksum mismatch, a local disk error.

Each operation that has to wait logs one line when it starts waiting and one when it recovers (or
gives up), naming the URI, the endpoint and the time waited. The budget is when the last attempt
may start; an attempt under way (botocore's own retries, a 10 s connect timeout) may run past it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from typing import Callable, Optional, TypeVar

from .base import StorageError

log = logging.getLogger("cascade_rcnn.storage")

RETRY_ENV = "CASCADE_RCNN_S3_RETRY_SECONDS"
DEFAULT_BUDGET_S = 600.0
BASE_DELAY_S = 1.0
# A store that is back is found within this (plus jitter); with thousands of clients (data loader
# workers on every node) a shorter cap would hammer a store that is still starting.
MAX_DELAY_S = 10.0

T = TypeVar("T")
# Our own generator: the global one is part of the training state a checkpoint captures.
_jitter = random.Random()

# S3 error codes (AWS and the S3-compatible servers we support) that say "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",  # S3: a conflicting operation on the bucket is in progress
        "XMinioServerNotInitialized",  # MinIO while it starts
    }
)
_PERMANENT_5XX = frozenset({"NotImplemented", "HttpVersionNotSupported"})
# Socket-level errors (a plain OSError from the local disk, e.g. ENOSPC, is not among them).
_TRANSIENT_OS = (ConnectionError, socket.timeout, TimeoutError)


def budget_seconds() -> float:
    """$CASCADE_RCNN_S3_RETRY_SECONDS as seconds (read at each call, so a process can change it)."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET_S
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"environment {RETRY_ENV}={raw!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise StorageError(f"environment {RETRY_ENV}={raw!r} must be 0 (no retries) or a positive number")
    return value


def is_transient(exc: BaseException) -> bool:
    """Whether retrying `exc` later may succeed (see the module docstring)."""
    from botocore import exceptions as bx

    if isinstance(exc, StorageError):
        return False  # already a verdict: missing, refused, checksum mismatch, budget spent
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code.isdigit():
            status = status or int(code)
        if code in _PERMANENT_5XX or status in (501, 505):
            return False  # e.g. a server without conditional writes: it will not learn them
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, bx.SSLError):
        return False  # a certificate problem does not fix itself
    if isinstance(
        exc,
        (
            bx.EndpointConnectionError,
            bx.ConnectionClosedError,
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            bx.ProxyConnectionError,
            bx.ResponseStreamingError,
            bx.IncompleteReadError,
            bx.HTTPClientError,
        ),
    ):
        return True
    from s3transfer.exceptions import RetriesExceededError
    from urllib3 import exceptions as ux

    if isinstance(exc, RetriesExceededError):
        return exc.last_exception is not None and is_transient(exc.last_exception)
    if isinstance(
        exc, (ux.ProtocolError, ux.ReadTimeoutError, ux.ConnectTimeoutError, ux.NewConnectionError)
    ):
        return True
    return isinstance(exc, _TRANSIENT_OS)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def next_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): BASE * 2^(attempt-1), capped at
    MAX_DELAY_S, times a random factor in [0.5, 1] so that many clients do not retry in step."""
    return min(MAX_DELAY_S, BASE_DELAY_S * 2 ** min(attempt - 1, 30)) * _jitter.uniform(0.5, 1.0)


def retry_call(
    fn: Callable[[], T],
    op: str,
    uri: str,
    where: str,
    *,
    budget_s: Optional[float] = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """fn() until it succeeds, raises a permanent error (re-raised as is), or keeps failing
    transiently past the budget (StorageError naming `op uri at where`, the wait and the last error).

    `fn` must be safe to repeat: a whole request, not half of one."""
    budget = budget_seconds() if budget_s is None else budget_s
    start = clock()
    attempt = 0
    first: Optional[BaseException] = None
    while True:
        attempt += 1
        try:
            result = fn()
        except BaseException as exc:
            if not isinstance(exc, Exception) or not is_transient(exc):
                if first is not None:
                    log.warning(
                        "%s %s at %s: store reachable again after %.1f s, but the request failed: %s",
                        op, uri, where, clock() - start, _short(exc),
                    )  # fmt: skip
                raise
            elapsed = clock() - start
            if elapsed >= budget:
                if budget <= 0:
                    raise
                raise StorageError(
                    f"{op} {uri} at {where}: still failing after {elapsed:.0f} s and {attempt} attempts "
                    f"({RETRY_ENV}={budget:g}); last error: {_short(exc)}"
                ) from exc
            if first is None:
                first = exc
                log.warning(
                    "%s %s at %s failed (%s): the object store looks unavailable; retrying for up to "
                    "%.0f s (%s)",
                    op, uri, where, _short(exc), budget, RETRY_ENV,
                )  # fmt: skip
            sleep(max(0.0, min(next_delay(attempt), budget - elapsed)))
            continue
        if first is not None:
            log.warning(
                "%s %s at %s: recovered after %.1f s of waiting (%d attempts)",
                op, uri, where, clock() - start, attempt,
            )  # fmt: skip
        return result
