"""A test's view of a SeaweedFS server: a plain boto3 client, and the environment that points the
storage API at it. Its own module (not conftest.py) so that test files can import it: two conftest
modules (tests/ and tests/containers/) share one module name."""

from __future__ import annotations

import pytest

from cascade_rcnn.local_s3 import SeaweedServer


def raw_client(server: SeaweedServer):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def point_env_at(server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
