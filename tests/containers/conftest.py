"""Fixtures for the tests that run components in the cpu image through kfp.local's DockerRunner.

They need a Docker-API engine (DOCKER_HOST) holding the image; `make test-containers`
(images/local/test-containers.sh) prepares both and runs these tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The components are modules of the repository, not of the installed package.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMAGE_ENV = "CASCADE_RCNN_TEST_IMAGE"
DEFAULT_IMAGE = "localhost/cascade-rcnn-cpu:local"


@pytest.fixture(scope="session")
def docker_client():
    """docker-py client for DOCKER_HOST; fails (not skips) without an engine: these tests only run
    when asked for (-m containers)."""
    import docker

    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        pytest.fail("no Docker-API engine: set DOCKER_HOST, or run `make test-containers`")
    client = docker.from_env()
    try:
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(
            f"the engine at {os.environ.get('DOCKER_HOST', 'the default socket')} does not answer: {e}"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def cpu_image(docker_client) -> str:
    """The cpu image's name (CASCADE_RCNN_TEST_IMAGE, default localhost/cascade-rcnn-cpu:local)."""
    import docker

    name = os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {name} is not in the engine: build it with images/local/build-cpu.sh {name}")
    return name


@pytest.fixture
def pipeline_root(tmp_path: Path) -> Path:
    """kfp.local's pipeline root, mounted into each container: the image's user must write it."""
    root = tmp_path / "pipeline_root"
    root.mkdir()
    root.chmod(0o777)
    return root


def run_container_keeping_its_status(
    client, image: str, command: list[str], volumes: dict, **run_args
) -> int:
    """kfp.local's `run_docker_container`, without `auto_remove`: the container is removed only
    after its exit status is read.

    kfp 2.17 starts the container with auto_remove=True, and when the engine has removed it
    before `wait()`, it takes the NotFound for success: with podman a failing step is then reported
    as SUCCESS (kubeflow/pipelines#13332, fixed upstream by the same change).
    """
    container = client.containers.run(
        image=image, command=command, detach=True, stdout=True, stderr=True, volumes=volumes, **run_args
    )
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


@pytest.fixture
def docker_runner(s3_env: str, s3_server, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch):
    """kfp.local set up to run tasks in containers on the host network (so they reach the host's
    SeaweedFS at 127.0.0.1), with the S3 credentials passed as run-time environment only.
    Yields the bucket s3_env made."""
    from kfp import local
    from kfp.local import docker_task_handler

    monkeypatch.setattr(docker_task_handler, "run_docker_container", run_container_keeping_its_status)
    runner = local.DockerRunner(network_mode="host", environment=s3_server.env(), shm_size="512m")
    local.init(runner=runner, pipeline_root=str(pipeline_root))
    yield s3_env
