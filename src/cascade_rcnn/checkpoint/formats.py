"""Reading weights files: a local copy of any URI, format detection, a flat {name: Tensor} state."""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

from .. import storage
from ..weight_sources import WeightsError, download
from .errors import CheckpointError
from .names import convert_c2_names, convert_torchvision_names
from .unpickle import restricted_unpickle, torch_load_weights_only

# The package's logger: callers and tests configure "cascade_rcnn.checkpoint".
logger = logging.getLogger(__package__)


@dataclass
class WeightsFile(Mapping):
    """A loaded weights file: flat {name: Tensor} plus the recognised format and metadata.

    Behaves as a read-only mapping of its `state`, so it can be used where a state dict is expected.
    `format` is "ours", "d2", "c2" or "torchvision". For "c2" the names are the renamed Caffe2 names
    (e.g. "res2.0.conv1.weight"), which `load_into_model` matches to the model by suffix.
    """

    state: dict[str, torch.Tensor]
    format: str
    meta: dict = field(default_factory=dict)
    source: str = ""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


@contextmanager
def local_copy(uri: Union[str, os.PathLike]) -> Iterator[str]:
    """A local path for `uri`: local files as they are, weights URLs from the download cache,
    s3:// objects downloaded to a temp dir that is removed on exit."""
    uri = str(uri)
    remote = "://" in uri and not uri.startswith("file://")
    if not remote:
        path = storage.local_path(uri)
        if not os.path.isfile(path):
            raise CheckpointError(f"weights file not found: {path}")
        yield path
        return
    if uri.startswith(("detectron2://", "torchvision://", "http://", "https://")):
        try:
            path = str(download(uri))
        except WeightsError as e:
            raise CheckpointError(f"cannot fetch weights {uri}: {e}") from e
        yield path
        return
    if not uri.startswith("s3://"):
        raise CheckpointError(
            f"{uri}: unsupported URI scheme; use a local path, file://, s3://, http(s)://, "
            "detectron2:// or torchvision://"
        )
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_weights_") as tmp:
        local = os.path.join(tmp, os.path.basename(uri.rstrip("/")) or "weights")
        logger.info("Downloading %s", uri)
        try:
            storage.get_file(uri, local)
        except storage.NotFound as e:
            raise CheckpointError(f"weights file not found: {uri} ({e})") from e
        yield local


def _read_raw(path: str, source: str) -> tuple[Any, str]:
    """Deserialize `path` safely. Returns (object, how) with how in {"pickle", "torch"}."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        return torch_load_weights_only(path, source), "torch"
    if path.endswith(".pkl") or path.endswith(".pickle"):
        with open(path, "rb") as f:
            return restricted_unpickle(f, source=source), "pickle"
    # Legacy (non-zip) torch.save files are pickles too; weights_only handles them.
    return torch_load_weights_only(path, source), "torch"


def to_tensor(value: Any, key: str, source: str) -> torch.Tensor:
    """One state entry as a CPU tensor; numpy arrays and numbers are converted, anything else raises."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise CheckpointError(f"{source}: entry {key!r} is an object array, not numeric weights")
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        if not value.flags.writeable:  # e.g. arrays rebuilt from protocol-5 bytes
            value = value.copy()
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (np.generic, int, float)) and not isinstance(value, bool):
        return torch.as_tensor(np.asarray(value))
    raise CheckpointError(f"{source}: entry {key!r} has type {type(value).__name__}, expected an array")


def _looks_torchvision(keys: list[str]) -> bool:
    return "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys)


def _looks_c2(keys: list[str]) -> bool:
    return any(k.startswith(("res2_", "conv1_w", "res_conv1_")) for k in keys)


def _strip_module_prefix(state: dict[str, Any]) -> dict[str, Any]:
    # DDP-wrapped models save "module."-prefixed names.
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(path_or_uri: Union[str, os.PathLike]) -> WeightsFile:
    """Read a weights file of any supported format into a flat {name: Tensor} state.

    Formats: our checkpoints (`save_checkpoint`), detectron2 model-zoo `.pkl` and training `.pth`
    (exact detectron2 names), Caffe2/MSRA `R-50.pkl` (renamed with the C2 rules, fused or unfused
    BN, `*_momentum` dropped) and torchvision ResNet state dicts (mapped to backbone.bottom_up.*).
    `num_batches_tracked` entries are dropped. Accepts local paths, file:// and s3:// URIs.
    """
    uri = os.fspath(path_or_uri)
    with local_copy(uri) as path:
        raw, how = _read_raw(path, uri)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{uri}: expected a dict of weights, got {type(raw).__name__}")

    meta: dict = {}
    if "model" in raw and isinstance(raw["model"], Mapping):
        model = dict(raw["model"])
        if isinstance(raw.get("meta"), Mapping) and how == "torch":
            fmt, meta = "ours", dict(raw["meta"])
        else:
            fmt = "d2"
            meta = {
                k: v for k, v in raw.items() if k in ("__author__", "iteration") and isinstance(v, (str, int))
            }
        model = _strip_module_prefix(model)
    elif "blobs" in raw and isinstance(raw["blobs"], Mapping):
        fmt, model = "c2", dict(raw["blobs"])
    else:
        model = _strip_module_prefix(dict(raw))
        keys = list(model)
        if _looks_torchvision(keys):
            fmt = "torchvision"
        elif _looks_c2(keys):
            fmt = "c2"
        else:
            # A bare state dict in detectron2 names (e.g. torch.save(model.state_dict())).
            fmt = "d2"

    model = {k: v for k, v in model.items() if not k.endswith("num_batches_tracked")}
    if fmt == "c2":
        model = {k: v for k, v in model.items() if not k.endswith("_momentum")}
    state = {k: to_tensor(v, k, uri) for k, v in model.items()}
    if fmt == "c2":
        state = convert_c2_names(state)
    elif fmt == "torchvision":
        state = convert_torchvision_names(state)
    logger.info("Loaded %d tensors from %s (format %s)", len(state), uri, fmt)
    return WeightsFile(state=state, format=fmt, meta=meta, source=uri)
