"""The S3 Secret as a pipeline step sees it: mounted as files (pipelines/tasks.py), turned into the
AWS_* variables by cascade_rcnn.storage.secret_files before any S3 client is made."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from cascade_rcnn import storage
from cascade_rcnn.storage import secret_files
from cascade_rcnn.storage.base import StorageError

REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def mount(tmp_path, values: dict) -> dict:
    """A Secret volume as the kubelet writes it (one file per key), and the map the step gets."""
    for key, value in values.items():
        (tmp_path / key).write_text(value)
    return {
        "required": {k: str(tmp_path / k) for k in REQUIRED},
        "optional": {k: str(tmp_path / k) for k in OPTIONAL},
    }


def test_files_become_the_variables_and_set_ones_win(tmp_path):
    spec = mount(
        tmp_path,
        {"AWS_ACCESS_KEY_ID": "id\n", "AWS_SECRET_ACCESS_KEY": "key", "AWS_ENDPOINT_URL": "http://s3:9000"},
    )
    environ = {secret_files.ENV: json.dumps(spec), "AWS_ACCESS_KEY_ID": "from-env"}
    assert sorted(secret_files.load_env(environ)) == ["AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"]
    assert environ["AWS_ACCESS_KEY_ID"] == "from-env"  # a local run's own credentials win
    assert environ["AWS_SECRET_ACCESS_KEY"] == "key"
    assert environ["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert "AWS_DEFAULT_REGION" not in environ  # optional, and not in the Secret
    assert secret_files.load_env({}) == []  # nothing mounted: nothing to do


def test_a_required_key_missing_from_the_secret_is_named(tmp_path):
    spec = mount(tmp_path, {"AWS_ACCESS_KEY_ID": "id"})
    with pytest.raises(StorageError) as err:
        secret_files.load_env({secret_files.ENV: json.dumps(spec)})
    assert f"AWS_SECRET_ACCESS_KEY is not set and the S3 Secret mounted at {tmp_path} has no key " in str(
        err.value
    )
    # No Secret mounted at all (kfp.local, a shell): boto3's own chain (a profile, a role) decides.
    elsewhere = {"required": {"AWS_ACCESS_KEY_ID": str(tmp_path / "not-mounted" / "AWS_ACCESS_KEY_ID")}}
    assert secret_files.load_env({secret_files.ENV: json.dumps(elsewhere)}) == []
    with pytest.raises(StorageError, match=secret_files.ENV):
        secret_files.load_env({secret_files.ENV: "[1, 2]"})


def test_a_step_reaches_the_object_store_through_the_mounted_secret_alone(
    s3_server, s3_client, tmp_path, monkeypatch
):
    bucket = f"secret-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    for name in (
        *REQUIRED,
        *OPTIONAL,
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    spec = mount(
        tmp_path,
        {
            "AWS_ACCESS_KEY_ID": s3_server.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
            "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        },
    )
    monkeypatch.setenv(secret_files.ENV, json.dumps(spec))
    storage.put_bytes(b"hello", f"s3://{bucket}/x")
    assert storage.get_bytes(f"s3://{bucket}/x") == b"hello"
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
