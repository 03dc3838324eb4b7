"""cascade_rcnn.storage against a real S3 server (SeaweedFS on 127.0.0.1) and the local filesystem."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cascade_rcnn import storage
from cascade_rcnn.local_s3 import start_seaweedfs
from cascade_rcnn.storage import ChecksumMismatch, NotFound, StorageError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if ".tmp-" in p.name]


def _make_tree(root: Path, n: int, seed: int = 0) -> dict[str, bytes]:
    """n small files of varied size in nested directories; returns {relative posix path: bytes}."""
    rng = random.Random(seed)
    files = {}
    for i in range(n):
        rel = f"d{i % 13}/sub{i % 3}/img_{i:05d}.bin"
        data = rng.randbytes(rng.randrange(0, 3000))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files[rel] = data
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# URIs and the local backend


def test_join_and_uri_parsing(tmp_path: Path) -> None:
    assert storage.join("s3://b/runs", "r1/", "/model.pth") == "s3://b/runs/r1/model.pth"
    assert storage.join("s3://b/", "x") == "s3://b/x"
    assert storage.join("file:///data", "a", "b") == "file:///data/a/b"
    assert storage.join("/data", "a") == "/data/a"
    with pytest.raises(StorageError, match="no bucket"):
        storage.get_bytes("s3:///key")
    with pytest.raises(StorageError, match="not an object"):
        storage.put_bytes(b"x", "s3://bucket/prefix/")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.get_bytes("gs://bucket/key")
    with pytest.raises(StorageError, match="host 'otherhost'"):
        storage.get_bytes("file://otherhost/etc/passwd")


@pytest.mark.parametrize("style", ["path", "file_uri"])
def test_local_round_trip(tmp_path: Path, style: str) -> None:
    base = str(tmp_path / "store") if style == "path" else f"file://{tmp_path / 'store'}"
    uri = storage.join(base, "a", "b.bin")
    info = storage.put_bytes(b"payload", uri)
    assert info.sha256 == _sha(b"payload") and info.size == 7
    assert storage.get_bytes(uri) == b"payload"
    assert storage.exists(uri) and not storage.exists(storage.join(base, "a", "missing"))
    assert storage.head(uri).sha256 == _sha(b"payload")

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    storage.put_file(src, storage.join(base, "a", "c.bin"))
    storage.get_file(storage.join(base, "a", "c.bin"), tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "c.bin").read_bytes() == src.read_bytes()
    assert storage.list_prefix(storage.join(base, "a")) == [
        storage.join(base, "a", n) for n in ("b.bin", "c.bin")
    ]
    assert storage.list_prefix(storage.join(base, "a", "b")) == [uri]

    storage.delete(uri)
    storage.delete(uri)  # idempotent
    assert not storage.exists(uri)
    with pytest.raises(NotFound, match="b.bin"):
        storage.get_bytes(uri)
    with pytest.raises(NotFound, match="nope.bin"):
        storage.put_file(tmp_path / "nope.bin", storage.join(base, "x"))
    assert _no_temp_files(tmp_path)


def test_local_tree_copy_and_skip(tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src", 60)
    stats = storage.upload_tree(tmp_path / "src", tmp_path / "dst", workers=4)
    assert stats.files == 60 and _read_tree(tmp_path / "dst") == files
    (tmp_path / "src" / "d0/sub0/img_00000.bin").write_bytes(b"changed")
    stats = storage.download_tree(tmp_path / "src", tmp_path / "dst", skip_unchanged=True, fsync=False)
    assert (stats.files, stats.skipped) == (1, 59)
    assert (tmp_path / "dst" / "d0/sub0/img_00000.bin").read_bytes() == b"changed"
    with pytest.raises(NotFound, match="no files under"):
        storage.download_tree(tmp_path / "empty", tmp_path / "x")


def test_local_write_killed_midway_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGKILL a process while it copies a file: the final name never holds partial bytes."""
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    dest = tmp_path / "out" / "ckpt.pth"
    dest.parent.mkdir()
    dest.write_bytes(b"previous complete version")
    code = "import sys; from cascade_rcnn import storage; storage.put_file(sys.argv[1], sys.argv[2])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(dest)])
    try:
        while True:  # non-blocking open fails until the child opens the FIFO for reading
            try:
                wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                assert proc.poll() is None, "copy process ended before reading its source"
                time.sleep(0.01)
        os.set_blocking(wfd, True)
        os.write(wfd, os.urandom(2 * 1024 * 1024))
        # The copy is under way once its temp file holds bytes; then kill it mid-write.
        while not [p for p in dest.parent.iterdir() if ".tmp-" in p.name and p.stat().st_size > 0]:
            assert proc.poll() is None, "copy process ended early"
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        os.close(wfd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert dest.read_bytes() == b"previous complete version"
    # Leftover temp files are hidden from listings.
    assert storage.list_prefix(dest.parent) == [str(dest)]


# ------------------------------------------------------------------------------------------------
# S3 round trips


def test_s3_round_trip(s3_env: str, s3_client, tmp_path: Path) -> None:
    uri = f"s3://{s3_env}/runs/r1/meta.json"
    info = storage.put_bytes(b'{"a": 1}', uri)
    assert info.size == 8
    raw = s3_client.head_object(Bucket=s3_env, Key="runs/r1/meta.json")
    assert raw["Metadata"]["sha256"] == _sha(b'{"a": 1}')  # stored as x-amz-meta-sha256
    assert storage.get_bytes(uri) == b'{"a": 1}'
    assert storage.head(uri) == storage.ObjectInfo(uri, 8, _sha(b'{"a": 1}'))

    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(200_000))
    storage.put_file(src, f"s3://{s3_env}/runs/r1/w.bin")
    dest = tmp_path / "dl" / "w.bin"
    info = storage.get_file(f"s3://{s3_env}/runs/r1/w.bin", dest)
    assert dest.read_bytes() == src.read_bytes() and info.sha256 == _sha(src.read_bytes())

    assert storage.exists(uri) and not storage.exists(f"s3://{s3_env}/runs/r1/nope")
    assert storage.list_prefix(f"s3://{s3_env}/runs/") == [
        f"s3://{s3_env}/runs/r1/meta.json",
        f"s3://{s3_env}/runs/r1/w.bin",
    ]
    assert storage.list_prefix(f"s3://{s3_env}/runs/r1/m") == [uri]
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(NotFound, match=f"s3://{s3_env}/runs/r1/meta.json"):
        storage.get_bytes(uri)
    with pytest.raises(NotFound, match="meta.json"):
        storage.get_file(uri, tmp_path / "x")
    with pytest.raises(NotFound):
        storage.head(uri)
    assert storage.delete_prefix(f"s3://{s3_env}/runs/") == 1
    assert storage.list_prefix(f"s3://{s3_env}/") == []
    assert _no_temp_files(tmp_path)


def test_s3_multipart_round_trip(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files above the threshold go through s3transfer's multipart upload and ranged GETs."""
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024 + 17))
    uri = f"s3://{s3_env}/ckpt/big.bin"
    info = storage.put_file(src, uri)
    assert info.sha256 == storage.sha256_file(src)
    assert storage.head(uri) == storage.ObjectInfo(uri, src.stat().st_size, info.sha256)
    storage.get_file(uri, tmp_path / "back.bin")
    assert storage.sha256_file(tmp_path / "back.bin") == info.sha256


@pytest.mark.slow  # 30-50 s measured on the shared (busy) 2-core machine
def test_s3_tree_sync_2000_files(s3_env: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src", 2000)
    prefix = f"s3://{s3_env}/coco/train"
    stats = storage.upload_tree(tmp_path / "src", prefix, workers=16)
    assert stats.files == 2000 and stats.bytes == sum(len(b) for b in files.values())
    listed = storage.list_prefix(prefix + "/")
    assert listed == sorted(f"{prefix}/{rel}" for rel in files)

    # A sibling prefix that merely starts with the same string is not part of the tree.
    storage.put_bytes(b"x", f"{prefix}2/other.bin")
    stats = storage.download_tree(prefix, tmp_path / "dst", workers=16, require_checksum=True)
    assert stats.files == 2000 and stats.unverified == 0
    assert _read_tree(tmp_path / "dst") == files

    # Sync again after one local change: only that file moves.
    (tmp_path / "src" / "d5/sub2/img_00005.bin").write_bytes(b"edited")
    stats = storage.upload_tree(tmp_path / "src", prefix, skip_unchanged=True)
    assert (stats.files, stats.skipped) == (1, 1999)
    assert storage.get_bytes(f"{prefix}/d5/sub2/img_00005.bin") == b"edited"
    with pytest.raises(NotFound, match="no objects under"):
        storage.download_tree(f"s3://{s3_env}/nothing-here", tmp_path / "none")


def test_tree_transfers_carry_digests(s3_env: str, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src", 20)
    digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    odd = "d1/sub1/img_00001.bin"
    given = {**digests, odd: "0" * 64}  # not the file's: shows the given digest is used, not recomputed
    prefix = f"s3://{s3_env}/carried"
    storage.upload_tree(tmp_path / "src", prefix, workers=4, progress=False, sha256=given)
    assert storage.head(f"{prefix}/{odd}").sha256 == "0" * 64
    stats = storage.upload_tree(tmp_path / "src", prefix, progress=False, skip_unchanged=True, sha256=digests)
    assert (stats.files, stats.skipped) == (1, 19)
    assert storage.head(f"{prefix}/{odd}").sha256 == digests[odd]  # differed, so it was sent again
    # Downloads give the digest of every file they leave, downloaded or kept as unchanged.
    for src in (prefix, tmp_path / "src"):
        for skip in (False, True):
            stats = storage.download_tree(
                src, tmp_path / f"dst-{storage.is_s3(src)}", progress=False, skip_unchanged=skip
            )
            assert dict(stats.sha256) == digests and stats.skipped == (20 if skip else 0)


# ------------------------------------------------------------------------------------------------
# Integrity


def test_checksum_mismatch_is_detected(s3_env: str, s3_client, tmp_path: Path) -> None:
    uri = f"s3://{s3_env}/data/labels.json"
    storage.put_bytes(b"original", uri)
    good_sha = _sha(b"original")
    # Corrupt the object behind the API's back, keeping the metadata of the original.
    s3_client.put_object(
        Bucket=s3_env, Key="data/labels.json", Body=b"corrupted", Metadata={"sha256": good_sha}
    )

    with pytest.raises(ChecksumMismatch, match=f"s3://{s3_env}/data/labels.json"):
        storage.get_bytes(uri)
    dest = tmp_path / "labels.json"
    dest.write_bytes(b"older good copy")
    with pytest.raises(ChecksumMismatch, match="labels.json"):
        storage.get_file(uri, dest)
    assert dest.read_bytes() == b"older good copy"  # bad bytes never land under the final name
    with pytest.raises(ChecksumMismatch, match="labels.json"):
        storage.download_tree(f"s3://{s3_env}/data", tmp_path / "tree")
    assert not (tmp_path / "tree" / "labels.json").exists()
    assert _no_temp_files(tmp_path)

    # An object written by another tool carries no sha256: fetched unverified unless required.
    s3_client.put_object(Bucket=s3_env, Key="data/foreign.bin", Body=b"foreign")
    assert storage.get_bytes(f"s3://{s3_env}/data/foreign.bin") == b"foreign"
    with pytest.raises(ChecksumMismatch, match="no sha256 metadata"):
        storage.get_bytes(f"s3://{s3_env}/data/foreign.bin", require_checksum=True)


def test_checksum_mismatch_multipart(
    s3_env: str, s3_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    bad = bytearray(data)
    bad[7 * 1024 * 1024] ^= 0xFF  # one flipped bit in the second range
    s3_client.put_object(
        Bucket=s3_env, Key="ckpt/model.pth", Body=bytes(bad), Metadata={"sha256": _sha(data)}
    )
    with pytest.raises(ChecksumMismatch, match="ckpt/model.pth"):
        storage.get_file(f"s3://{s3_env}/ckpt/model.pth", tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Errors that must not be retried


def test_wrong_credentials_fail_fast_with_clear_message(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    storage.put_bytes(b"x", f"s3://{s3_env}/k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    for call in (
        lambda: storage.put_bytes(b"x", f"s3://{s3_env}/k"),
        lambda: storage.get_bytes(f"s3://{s3_env}/k"),
        lambda: storage.exists(f"s3://{s3_env}/k"),  # a HEAD: bare 403, must not read as "missing"
        lambda: storage.list_prefix(f"s3://{s3_env}/"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "access denied" in message and s3_env in message and endpoint in message
        assert info.value.__cause__.response["ResponseMetadata"]["RetryAttempts"] == 0
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NO-SUCH-KEY")
    with pytest.raises(StorageError, match="InvalidAccessKeyId") as info:
        storage.get_bytes(f"s3://{s3_env}/k")
    assert info.value.__cause__.response["ResponseMetadata"]["RetryAttempts"] == 0


def test_missing_bucket_is_a_clear_error(s3_env: str, tmp_path: Path) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    missing = s3_env + "-missing"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_bytes(b"1")
    for call in (
        lambda: storage.put_bytes(b"x", f"s3://{missing}/k"),
        lambda: storage.get_bytes(f"s3://{missing}/k"),
        lambda: storage.exists(f"s3://{missing}/k"),
        lambda: storage.get_file(f"s3://{missing}/k", tmp_path / "k"),
        lambda: storage.upload_tree(tmp_path / "t", f"s3://{missing}/t"),
        lambda: storage.download_tree(f"s3://{missing}/t", tmp_path / "d"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, NotFound)
        assert f"bucket '{missing}' does not exist at {endpoint}" in str(info.value)


def test_download_refuses_keys_that_escape_the_target() -> None:
    with pytest.raises(StorageError, match="outside the target directory"):
        storage._safe_relpath("data/../../etc/passwd", "data/", "s3://b/data")
    assert storage._safe_relpath("data/a//b.jpg", "data/", "s3://b/data") == "a/b.jpg"
    assert storage._safe_relpath("data/dir/", "data/", "s3://b/data") is None


# ------------------------------------------------------------------------------------------------
# A server that dies mid-transfer


@pytest.fixture
def doomed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private SeaweedFS this test may kill and restart; two attempts per request and no outage
    budget keep failures quick (test_storage_outage.py covers the budget)."""
    with start_seaweedfs(tmp_path / "doomed") as server:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("CASCADE_RCNN_S3_RETRY_SECONDS", "0")
        storage._client(server.endpoint_url).create_bucket(Bucket="doomed")
        yield server


def _run_in_thread(fn) -> tuple[threading.Thread, list]:
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _wait_for(predicate, thread: threading.Thread) -> None:
    while not predicate():
        assert thread.is_alive(), "transfer finished before the server could be killed"
        time.sleep(0.02)


def test_server_killed_during_multipart_upload(
    doomed_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CONCURRENCY", 1)  # parts in sequence: a wide window to kill in
    src = tmp_path / "model_final.pth"
    src.write_bytes(os.urandom(64 * 1024 * 1024))
    observer = storage._client(doomed_server.endpoint_url)

    def parts_uploaded() -> int:
        uploads = observer.list_multipart_uploads(Bucket="doomed").get("Uploads", [])
        if not uploads:
            return 0
        return len(
            observer.list_parts(
                Bucket="doomed", Key="ckpt/model_final.pth", UploadId=uploads[0]["UploadId"]
            ).get("Parts", [])
        )

    thread, outcome = _run_in_thread(lambda: storage.put_file(src, "s3://doomed/ckpt/model_final.pth"))
    _wait_for(lambda: parts_uploaded() >= 2, thread)
    doomed_server.kill()
    thread.join()
    assert isinstance(outcome[0], StorageError), outcome
    assert "s3://doomed/ckpt/model_final.pth" in str(outcome[0])

    doomed_server.restart()
    assert not storage.exists("s3://doomed/ckpt/model_final.pth")  # no half object under the final key
    monkeypatch.setattr(storage, "MULTIPART_CONCURRENCY", 8)
    storage.put_file(src, "s3://doomed/ckpt/model_final.pth")
    assert storage.head("s3://doomed/ckpt/model_final.pth").sha256 == storage.sha256_file(src)


def test_server_killed_during_tree_upload(doomed_server, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src", 600, seed=1)
    observer = storage._client(doomed_server.endpoint_url)

    def objects_stored() -> int:
        return observer.list_objects_v2(Bucket="doomed", Prefix="tree/").get("KeyCount", 0)

    thread, outcome = _run_in_thread(
        lambda: storage.upload_tree(tmp_path / "src", "s3://doomed/tree", workers=8)
    )
    _wait_for(lambda: objects_stored() >= 100, thread)
    doomed_server.kill()
    thread.join()
    assert isinstance(outcome[0], StorageError), outcome
    assert "upload" in str(outcome[0]) and "failed" in str(outcome[0])

    doomed_server.restart()
    stored = storage.list_prefix("s3://doomed/tree/")
    assert 0 < len(stored) < len(files)
    for uri in stored:  # whatever is there is complete and verifies
        rel = uri[len("s3://doomed/tree/") :]
        assert storage.get_bytes(uri, require_checksum=True) == files[rel]
    # Re-running the sync finishes the job.
    stats = storage.upload_tree(tmp_path / "src", "s3://doomed/tree", skip_unchanged=True)
    assert stats.files + stats.skipped == len(files) and stats.skipped == len(stored)
    storage.download_tree("s3://doomed/tree", tmp_path / "dst")
    assert _read_tree(tmp_path / "dst") == files


def test_request_retried_until_server_returns(doomed_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection errors back off and retry: a PUT issued while the server is down lands once it is back."""
    # botocore (1.44) waits rand(0, 1) * min(0.05 * 2**i, 20) s before retry i of a connection error:
    # 10 attempts span 12.8 s on average but under 5 s in ~3% of runs, less than a restart can take
    # on a loaded machine. 30 attempts leave minutes; the PUT still lands soon after the restart.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "30")
    client = storage._client(storage._resolve_endpoint(None))  # the client put_bytes will use
    failed: list[str] = []

    def count_failures(caught_exception=None, **_):
        if caught_exception is not None:
            failed.append(type(caught_exception).__name__)

    client.meta.events.register("needs-retry.s3", count_failures)
    try:
        doomed_server.kill()
        thread, outcome = _run_in_thread(lambda: storage.put_bytes(b"survived", "s3://doomed/retry/flag"))
        while len(failed) < 2:  # attempts failed against the dead server: a retry is under way
            assert thread.is_alive(), f"the PUT ended before two attempts failed: {outcome}"
            time.sleep(0.02)
        doomed_server.restart()
        thread.join()
    finally:
        client.meta.events.unregister("needs-retry.s3", count_failures)
    assert not isinstance(outcome[0], BaseException), outcome
    assert storage.get_bytes("s3://doomed/retry/flag", require_checksum=True) == b"survived"
