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
    with pytest.raises(storage.StorageError, match=env["AWS_ENDPOINT_URL"]):
        storage.get_bytes("s3://demo/greeting.txt")
