"""The outage retry policy (cascade_rcnn/storage/retry.py) against a real SeaweedFS of the test's own,
which it kills and restarts: transient failures cost time within $CASCADE_RCNN_S3_RETRY_SECONDS,
permanent ones fail at once, a spent budget fails naming the URI."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
from s3_proxy import S3Proxy
from s3_test_env import point_env_at
from test_storage import _run_in_thread

from cascade_rcnn import storage
from cascade_rcnn.local_s3 import start_seaweedfs
from cascade_rcnn.storage import NotFound, PreconditionFailed, StorageError
from cascade_rcnn.storage.retry import RETRY_ENV, is_transient, next_delay, retry_call

BUCKET = "outage"
WAITING = "the object store looks unavailable"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private SeaweedFS (killing it must not touch the session's), two botocore attempts per
    request so the outage is ridden out by our layer, and a budget of two minutes."""
    with start_seaweedfs(tmp_path / "s3") as srv:
        point_env_at(srv, monkeypatch)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setenv(RETRY_ENV, "120")
        storage._client(srv.endpoint_url).create_bucket(Bucket=BUCKET)
        yield srv


def _wait_for_log(caplog: pytest.LogCaptureFixture, text: str, thread: threading.Thread) -> None:
    while not any(text in r.getMessage() for r in caplog.records):
        assert thread.is_alive(), f"the call ended before logging {text!r}"
        time.sleep(0.05)


def test_operations_wait_out_an_outage_and_log_it(server, tmp_path: Path, caplog) -> None:
    """Reads, writes, listings and file transfers issued while the store is down all complete once it
    is back; each logs one line when it starts waiting and one when it recovers."""
    caplog.set_level(logging.INFO, logger="cascade_rcnn.storage")
    storage.put_bytes(b"before", f"s3://{BUCKET}/a")
    (tmp_path / "up.bin").write_bytes(b"u" * 1000)
    calls = {
        "get": lambda: storage.get_bytes(f"s3://{BUCKET}/a"),
        "put": lambda: storage.put_bytes(b"during", f"s3://{BUCKET}/b").size,
        "head": lambda: storage.exists(f"s3://{BUCKET}/a"),
        "list": lambda: f"s3://{BUCKET}/a" in storage.list_prefix(f"s3://{BUCKET}/"),
        "put_file": lambda: storage.put_file(tmp_path / "up.bin", f"s3://{BUCKET}/up.bin").size,
        "get_file": lambda: storage.get_file(f"s3://{BUCKET}/a", tmp_path / "a.bin").size,
    }
    server.kill()
    started = time.monotonic()
    running = {name: _run_in_thread(fn) for name, fn in calls.items()}
    for thread, _ in running.values():
        _wait_for_log(caplog, WAITING, thread)
    time.sleep(3)  # longer than botocore's two attempts: only our layer can still be waiting
    assert all(thread.is_alive() for thread, _ in running.values())
    server.restart()
    for thread, _ in running.values():
        thread.join()
    down = time.monotonic() - started
    results = {name: outcome[0] for name, (_, outcome) in running.items()}
    assert results == {
        "get": b"before",
        "put": 6,
        "head": True,
        "list": True,
        "put_file": 1000,
        "get_file": 6,
    }, results
    assert storage.get_bytes(f"s3://{BUCKET}/b", require_checksum=True) == b"during"
    assert storage.get_bytes(f"s3://{BUCKET}/up.bin", require_checksum=True) == b"u" * 1000

    messages = [r.getMessage() for r in caplog.records]
    waiting = [m for m in messages if WAITING in m]
    recovered = [m for m in messages if "recovered after" in m]

    def request(line: str) -> str:  # "get s3://outage/a"
        return line.split(" at ")[0]

    # One line when a request starts waiting and one when it recovers. A call may be two requests
    # (get_file: a HEAD, then a GET), and a request may wait twice (a freshly restarted SeaweedFS
    # answers InternalError until its volumes are back).
    assert sorted(map(request, waiting)) == sorted(map(request, recovered)), messages
    first = [f"get s3://{BUCKET}/a", f"put s3://{BUCKET}/b", f"head s3://{BUCKET}/a",
             f"list s3://{BUCKET}", f"put s3://{BUCKET}/up.bin", f"head s3://{BUCKET}/a"]  # fmt: skip
    assert sorted(first) == sorted(request(m) for m in waiting[: len(calls)]), messages
    assert all(f"at {server.endpoint_url} failed" in m and f"up to 120 s ({RETRY_ENV})" in m for m in waiting)
    waits = [float(m.split("recovered after ")[1].split(" s")[0]) for m in recovered]
    assert all(w <= down + 0.05 for w in waits)  # the line rounds to 0.1 s
    assert sorted(waits)[-len(calls)] >= 3.0  # the calls issued while the store was down waited


def test_spent_budget_fails_naming_the_uri(server, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv(RETRY_ENV, "4")
    server.kill()
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.get_bytes(f"s3://{BUCKET}/never")
    assert time.monotonic() - start >= 4
    message = str(info.value)
    assert f"get s3://{BUCKET}/never at {server.endpoint_url}: still failing after" in message
    assert f"({RETRY_ENV}=4)" in message and "EndpointConnectionError" in message


def test_budget_zero_fails_after_botocores_attempts(server, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cascade_rcnn.storage")
    monkeypatch.setenv(RETRY_ENV, "0")
    server.kill()
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/k"):
        storage.put_bytes(b"x", f"s3://{BUCKET}/k")
    assert not [r for r in caplog.records if WAITING in r.getMessage()]


def test_permanent_errors_are_not_retried(server, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A missing key, a missing bucket, bad credentials and a refused conditional write fail on the
    first answer even with a budget of ten minutes: no waiting line is ever logged."""
    caplog.set_level(logging.INFO, logger="cascade_rcnn.storage")
    monkeypatch.setenv(RETRY_ENV, "600")
    storage.put_bytes(b"x", f"s3://{BUCKET}/k")
    with pytest.raises(NotFound):
        storage.get_bytes(f"s3://{BUCKET}/missing")
    with pytest.raises(StorageError, match="does not exist"):
        storage.get_bytes(f"s3://{BUCKET}-missing/k")
    with pytest.raises(PreconditionFailed):
        storage.put_bytes_if(b"y", f"s3://{BUCKET}/k", None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(StorageError, match="access denied"):
        storage.get_bytes(f"s3://{BUCKET}/k")
    assert not [r for r in caplog.records if WAITING in r.getMessage()]


def test_conditional_write_whose_answer_was_lost_is_a_success(
    server, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The registry's champion update is a conditional PUT. If its answer is lost after the object was
    written, the repeat finds the condition failed by our own write: that is a success, not a lost
    race (and a real conflict still raises)."""
    proxy = S3Proxy(int(server.endpoint_url.rsplit(":", 1)[1]))
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        uri = f"s3://{BUCKET}/registry/champion.json"
        lost = proxy.on(r"If-None-Match: \*", drop_answer="final")
        version = storage.put_bytes_if(b'{"run": 1}', uri, None)
        assert lost.fired.is_set()
        data, current = storage.get_versioned(uri)
        assert data == b'{"run": 1}' and current == version

        lost = proxy.on("If-Match: ", drop_answer="final")
        newer = storage.put_bytes_if(b'{"run": 2}', uri, version)
        assert lost.fired.is_set() and newer != version
        assert storage.get_versioned(uri) == (b'{"run": 2}', newer)
        with pytest.raises(PreconditionFailed):
            storage.put_bytes_if(b'{"run": 3}', uri, version)  # a stale version is still refused

        # Cut before the body arrived: SeaweedFS stores what it got, an empty object carrying our
        # metadata. The repeat is refused by that object, finds it is ours and cut short, and
        # replaces it.
        other = f"s3://{BUCKET}/registry/other.json"
        lost = proxy.on(r"/registry/other\.json", drop_answer="first")
        version = storage.put_bytes_if(b'{"run": 4}', other, None)
        assert lost.fired.is_set()
        assert storage.get_versioned(other) == (b'{"run": 4}', version)
        assert "replacing our own write that was cut short" in caplog.text
    finally:
        proxy.close()


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


def test_transient_and_permanent_classification() -> None:
    transient = [
        _client_error("InternalError", 500),
        _client_error("ServiceUnavailable", 503),
        _client_error("SlowDown", 503),
        _client_error("Throttling", 400),
        _client_error("RequestTimeout", 400),
        _client_error("", 502),
        _client_error("TooManyRequests", 429),
        EndpointConnectionError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectionResetError(),
        ConnectionRefusedError(),
    ]
    permanent = [
        _client_error("AccessDenied", 403),
        _client_error("InvalidAccessKeyId", 403),
        _client_error("NoSuchBucket", 404),
        _client_error("NoSuchKey", 404),
        _client_error("404", 404),
        _client_error("PreconditionFailed", 412),
        _client_error("NotImplemented", 501),
        StorageError("a verdict"),
        OSError(28, "No space left on device"),
        ValueError("a bug"),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_backoff_is_capped_exponential_and_stays_in_the_budget() -> None:
    delays = [next_delay(a) for a in range(1, 12)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(5.0 <= d <= 10.0 for d in delays[5:])

    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    def failing() -> None:
        now[0] += 0.1  # each attempt takes a little time
        raise ConnectionRefusedError()

    with pytest.raises(StorageError, match="still failing after 30 s"):
        retry_call(failing, "get", "s3://b/k", "here", budget_s=30, clock=lambda: now[0], sleep=sleep)
    assert 30 <= now[0] <= 30.2 and 6 <= len(slept) <= 12
