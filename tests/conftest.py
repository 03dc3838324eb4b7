"""Shared fixtures: repository paths and a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from s3_test_env import point_env_at, raw_client
from shared_fixtures import shared_fixture, under_ci

from cascade_rcnn.local_s3 import SeaweedServer, start_seaweedfs


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir(repo_root: Path) -> Path:
    """Read-only shared material (reference facts, fixtures) next to the repository."""
    return repo_root.parent / "shared"


@pytest.fixture(scope="session")
def d2_parity() -> Path:
    """../shared/fixtures/d2_parity; skips when absent, fails under CI (see shared_fixtures.py)."""
    return shared_fixture("fixtures/d2_parity")


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the session (tests/browser.py). Without one the test skips, and
    fails under CI, whose `make test` installs Debian's package (the Makefile's `browser` target)."""
    from browser import Chromium, find_chromium

    if find_chromium() is None:
        if under_ci():
            pytest.fail("no Chromium (CI is set, so this fails instead of skipping): run `make browser`")
        pytest.skip("no Chromium: `make browser` (or apt-get install chromium) for the page tests")
    with Chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> SeaweedServer:
    """One SeaweedFS for the whole session; stopped and its data removed at the end."""
    with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_client(s3_server: SeaweedServer):
    """A plain boto3 client for the session's server, for work behind the storage API's back."""
    return raw_client(s3_server)


@pytest.fixture
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Env pointing at the session's S3 server; yields the name of a fresh, existing bucket."""
    # No user AWS config may leak in (profile, region, another endpoint).
    point_env_at(s3_server, monkeypatch)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    raw_client(s3_server).create_bucket(Bucket=bucket)
    yield bucket
