"""cascade_rcnn.local_s3: the standalone server command used by `make demo` and local pipeline runs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_rcnn import storage


def test_standalone_server_serves_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "s3data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascade_rcnn.local_s3", "--data", str(data), "--bucket", "demo", "--remove"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        env = {}
        while len(env) < 4:
            line = proc.stdout.readline()
            assert line, f"server command exited with {proc.wait()} before printing its endpoint"
            name, _, value = line.strip().removeprefix("export ").partition("=")
            env[name] = value
        assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        storage.put_bytes(b"hello", "s3://demo/greeting.txt")
        assert storage.get_bytes("s3://demo/greeting.txt") == b"hello"
        assert (data / "weed").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    assert code == 0
    assert not data.exists()  # --remove deletes the data directory
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("CASCADE_RCNN_S3_RETRY_SECONDS", "0")  # a store that is gone, not restarting
    with pytest.raises(storage.StorageError, match=env["AWS_ENDPOINT_URL"]):
        storage.get_bytes("s3://demo/greeting.txt")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 300 MB tmpfs: SeaweedFS's automatic volume cap there would be 2 volumes (300 MB / 128 MB)."""
    from shared_fixtures import under_ci

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        message = f"cannot mount a tmpfs here (root needed): {done.stderr.decode().strip()}"
        if under_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_many_buckets_on_a_nearly_full_disk(small_disk: Path) -> None:
    """Each bucket takes volumes of its own. Left to size its volume cap from the free disk, the
    server refused every PUT with InternalError from the 5th bucket on here (and, on a shared disk
    at 16 GB free, partway through a test session); local_s3 fixes the cap."""
    from cascade_rcnn.local_s3 import start_seaweedfs

    with start_seaweedfs(small_disk / "s3") as server:
        client = server.client()
        for i in range(30):
            client.create_bucket(Bucket=f"many-{i}")
            client.put_object(Bucket=f"many-{i}", Key="k", Body=b"x")
        assert client.get_object(Bucket="many-29", Key="k")["Body"].read() == b"x"
