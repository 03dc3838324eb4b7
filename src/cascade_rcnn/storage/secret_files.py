"""Object-store settings from a Kubernetes Secret mounted as files.

The pipeline steps get the S3 Secret as a volume, not as env variables (pipelines/tasks.py):
kfp-kubernetes writes an `optional` field into every secretAsEnv, which KFP backends before 2.15
reject. $CASCADE_RCNN_ENV_FROM_FILES says, as JSON, which file becomes which variable:
{"required": {"AWS_ACCESS_KEY_ID": "/var/run/secrets/.../AWS_ACCESS_KEY_ID", ...},
 "optional": {"AWS_ENDPOINT_URL": "...", ...}}.
A variable already set in the environment wins (a local run's own credentials); a required one
that is neither set nor in the mounted Secret is an error naming the key; without the mount (a
local run) nothing is required and boto3's usual chain applies. Values are never logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import MutableMapping

from .base import StorageError

log = logging.getLogger(__name__)

ENV = "CASCADE_RCNN_ENV_FROM_FILES"


def load_env(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Set the variables named in $CASCADE_RCNN_ENV_FROM_FILES from their files; returns the names
    set. Cheap when the variable is absent, so callers may call it before every client."""
    spec_text = environ.get(ENV)
    if not spec_text:
        return []
    try:
        spec = json.loads(spec_text)
        groups = {kind: dict(spec.get(kind) or {}) for kind in ("required", "optional")}
    except (ValueError, AttributeError, TypeError) as e:
        raise StorageError(
            f"{ENV} is not a JSON object of 'required'/'optional' env -> file maps: {e}"
        ) from None
    loaded = []
    for kind, files in groups.items():
        for name, path in files.items():
            if environ.get(name):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().strip()
            except FileNotFoundError:
                # No volume at all: not a pipeline pod (kfp.local, a shell), so the usual credential
                # chain (env, profile, role) applies.
                if kind == "required" and os.path.isdir(os.path.dirname(path)):
                    raise StorageError(
                        f"{name} is not set and the S3 Secret mounted at {os.path.dirname(path)} has no "
                        f"key {os.path.basename(path)!r}: add it to the Secret the run parameter "
                        "s3_secret names"
                    ) from None
                continue
            if value:
                environ[name] = value
                loaded.append(name)
    if loaded:
        log.debug("object-store settings from the mounted Secret: %s", ", ".join(sorted(loaded)))
    return loaded
