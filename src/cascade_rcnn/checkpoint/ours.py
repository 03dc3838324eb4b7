"""Our checkpoint format: a torch.save'd dict of tensors and plain values.

{"model": {name: Tensor}, "meta": JSON-able dict, **extra}; it always loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Union

import torch

from .. import storage
from .errors import CheckpointError
from .formats import local_copy
from .unpickle import torch_load_weights_only

# The package's logger: callers and tests configure "cascade_rcnn.checkpoint".
logger = logging.getLogger(__package__)

OUR_FORMAT_TAG = "cascade_rcnn/1"


def _saveable_copy(value: Any, where: str) -> Any:
    """A copy of `value` that torch.load(weights_only=True) reads back: tensors detached, on the
    CPU and compact; plain values as they are. Anything else raises CheckpointError at `where`."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        # A view would drag its whole base storage into the file.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone()
        return t
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_saveable_copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(
                    f"{where}: key {k!r} has type {type(k).__name__}; only str/int keys are saved"
                )
            out[k] = _saveable_copy(v, f"{where}.{k}")
        return out
    raise CheckpointError(
        f"{where} has type {type(value).__name__}; checkpoints hold only tensors and plain "
        "values (None, bool, int, float, str, list, tuple, dict)"
    )


def save_checkpoint(
    uri: Union[str, os.PathLike],
    model_state: Mapping[str, torch.Tensor],
    meta: dict | None = None,
    extra: dict | None = None,
) -> str:
    """Write {"model": tensors, "meta": JSON-able dict, **extra} to a local path or s3:// URI.

    Everything must be tensors or plain values so that `torch.load(weights_only=True)` reads it
    back. Local writes go to a temp file then rename; s3 uploads go through cascade_rcnn.storage.
    Returns the URI written.
    """
    uri = os.fspath(uri)
    for k, v in model_state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{uri}: model entry {k!r} is {type(v).__name__}, not a tensor")
    meta = dict(meta or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: meta must be JSON-serializable: {e}") from e
    meta.setdefault("format", OUR_FORMAT_TAG)
    extra = dict(extra or {})
    for reserved in ("model", "meta"):
        if reserved in extra:
            raise CheckpointError(f"{uri}: extra may not contain the reserved key {reserved!r}")
    payload = {"model": _saveable_copy(dict(model_state), "model"), "meta": meta}
    payload.update(_saveable_copy(extra, "extra"))

    # storage writes atomically on both backends (temp + rename locally, one PUT or a completed
    # multipart upload on S3) and honours the umask, unlike mkstemp's 0600.
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_ckpt_") as tmp:
        local = os.path.join(tmp, "checkpoint.pth")
        torch.save(payload, local)
        storage.put_file(local, uri)
    logger.info("Saved checkpoint %s (%d tensors)", uri, len(model_state))
    return uri


def load_checkpoint(uri: Union[str, os.PathLike]) -> dict:
    """Read one of our checkpoints (or any torch.save'd tensor dict) with weights_only=True."""
    uri = os.fspath(uri)
    with local_copy(uri) as path:
        obj = torch_load_weights_only(path, uri)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj
