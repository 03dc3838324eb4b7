"""Weights in and out of the model: detectron2, Caffe2/MSRA, torchvision and our own checkpoints.

Owns
- the restricted unpickler used for every `.pkl` (numpy arrays, dtypes and plain containers only);
- `load_weights`: reads any supported file (local path, ``file://`` or ``s3://``) into a flat
  {name: Tensor} state with the format it was recognised as;
- `load_into_model`: non-strict loading with detectron2-style grouped reports of missing,
  unexpected and shape-mismatched keys (Caffe2 names matched by longest ``.``-suffix);
- `save_checkpoint` / `load_checkpoint`: our format, a torch.save'd dict of tensors and plain
  values that always loads with ``torch.load(weights_only=True)``.

Nothing here ever calls plain ``pickle.load`` or ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS = ("ours", "d2", "c2", "torchvision")
OUR_FORMAT_TAG = "cascade_rcnn/1"

# Input normalization the torchvision ImageNet weights were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


class CheckpointError(Exception):
    """A weights file that cannot be read or used; the message names the file."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list (it was not imported or called)."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    """The numpy object `name` from the first of `modules` that has it (numpy 1.x vs 2.x layout)."""
    import importlib

    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Protocol-2 pickles of bytes call _codecs.encode(str, "latin1"); allow nothing else.
    if encoding.lower().replace("-", "") != "latin1" or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything a weights pickle legitimately references."""
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        # Protocol-2 pickles written by Python 3 rebuild (empty) bytes through bytes().
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
    }
    for mod in multiarray:
        allowed[(mod, "_reconstruct")] = _numpy_attr(multiarray, "_reconstruct")
        allowed[(mod, "scalar")] = _numpy_attr(multiarray, "scalar")
    for mod in numeric:
        # Protocol-5 pickles of arrays (the default from Python 3.14) rebuild through _frombuffer.
        allowed[(mod, "_frombuffer")] = _numpy_attr(numeric, "_frombuffer")
    return {k: v for k, v in allowed.items() if v is not None}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._source}: refused to unpickle global '{module}.{name}'. Weights pickles may only "
                "hold numpy arrays, dtypes and plain containers; this file is not a weights file "
                "or may be malicious."
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: pickle uses persistent ids, which weights pickles never do")


def restricted_unpickle(fileobj_or_bytes: Union[bytes, bytearray, BinaryIO], *, source: str) -> Any:
    """Unpickle weights data, admitting only numpy arrays/dtypes/scalars and plain containers.

    Any other global raises UnsafePickleError naming `source` and the refused "module.name"
    before it is imported or called.
    """
    stream = (
        io.BytesIO(fileobj_or_bytes) if isinstance(fileobj_or_bytes, (bytes, bytearray)) else fileobj_or_bytes
    )
    try:
        return _RestrictedUnpickler(stream, source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # a corrupt stream can fail in many ways; none of them is safe to pass on raw
        raise CheckpointError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


@dataclass
class WeightsFile(Mapping):
    """A loaded weights file: flat {name: Tensor} plus the recognised format and metadata.

    Behaves as a read-only mapping of its `state`, so it can be used where a state dict is expected.
    `format` is one of FORMATS. For "c2" the names are the renamed Caffe2 names
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


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


class _Fetched:
    """Context manager yielding a local path for `uri`, downloading s3:// objects to a temp dir."""

    def __init__(self, uri: str):
        self.uri = str(uri)
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        if not _is_remote(self.uri):
            path = _local_path(self.uri)
            if not os.path.isfile(path):
                raise CheckpointError(f"weights file not found: {path}")
            return path
        if self.uri.startswith(("detectron2://", "torchvision://", "http://", "https://")):
            from cascade_rcnn import weights

            try:
                return str(weights.download(self.uri))
            except weights.WeightsError as e:
                raise CheckpointError(f"cannot fetch weights {self.uri}: {e}") from e
        if not self.uri.startswith("s3://"):
            raise CheckpointError(
                f"{self.uri}: unsupported URI scheme; use a local path, file://, s3://, http(s)://, "
                "detectron2:// or torchvision://"
            )
        from cascade_rcnn import storage

        self._tmp = tempfile.TemporaryDirectory(prefix="cascade_rcnn_weights_")
        local = os.path.join(self._tmp.name, os.path.basename(self.uri.rstrip("/")) or "weights")
        logger.info("Downloading %s", self.uri)
        try:
            storage.get_file(self.uri, local)
        except storage.NotFound as e:
            raise CheckpointError(f"weights file not found: {self.uri} ({e})") from e
        return local

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _numpy_safe_globals() -> list[Any]:
    # numpy objects a detectron2 training .pth may hold (e.g. a numpy scalar iteration); still an allow-list.
    objs = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        obj = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), name)
        if obj is not None:
            objs.append(obj)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        objs += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return objs


def _torch_load_weights_only(path: str, source: str) -> Any:
    """torch.load with weights_only=True; retried with numpy scalars/dtypes allowed, never unsafe."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # torch raises UnpicklingError or RuntimeError depending on version
        if hasattr(torch.serialization, "safe_globals"):
            try:
                with torch.serialization.safe_globals(_numpy_safe_globals()):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                pass
        msg = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        raise CheckpointError(
            f"{source}: cannot load with torch.load(weights_only=True): {msg}. "
            "Checkpoints holding arbitrary Python objects are not loaded; re-save the state dict "
            "as plain tensors (e.g. torch.save({'model': model.state_dict()}, path))."
        ) from first


def _read_raw(path: str, source: str) -> tuple[Any, str]:
    """Deserialize `path` safely. Returns (object, how) with how in {"pickle", "torch"}."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path):
        return _torch_load_weights_only(path, source), "torch"
    if path.endswith(".pkl") or path.endswith(".pickle"):
        with open(path, "rb") as f:
            return restricted_unpickle(f, source=source), "pickle"
    # Legacy (non-zip) torch.save files are pickles too; weights_only handles them.
    return _torch_load_weights_only(path, source), "torch"


def _to_tensor(value: Any, key: str, source: str) -> torch.Tensor:
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


_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")


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
    with _Fetched(uri) as path:
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
    state = {k: _to_tensor(v, k, uri) for k, v in model.items()}
    if fmt == "c2":
        state = convert_c2_names(state)
    elif fmt == "torchvision":
        state = convert_torchvision_names(state)
    logger.info("Loaded %d tensors from %s (format %s)", len(state), uri, fmt)
    return WeightsFile(state=state, format=fmt, meta=meta, source=uri)


# --------------------------------------------------------------------------------------------
# Name conversions
# --------------------------------------------------------------------------------------------

# C2 -> detectron2 rewrites applied after "_" became "."; ordered, first-to-last.
_C2_BASIC_RULES: list[tuple[str, str]] = [
    (r"\.b$", ".bias"),
    (r"\.w$", ".weight"),
    (r"bn\.s$", "norm.weight"),
    (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm$", "norm.running_mean"),
    (r"bn\.running\.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"),
    (r"bn\.running\.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"),
    (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"),
    (r"gn\.bias$", "norm.bias"),
    (r"^res\.conv1\.norm\.", "conv1.norm."),
    # Only the stem's conv1 is a bare "conv1." at the start; prefixing avoids matching head convs.
    (r"^conv1\.", "stem.conv1."),
    (r"\.branch1\.", ".shortcut."),
    (r"\.branch2a\.", ".conv1."),
    (r"\.branch2b\.", ".conv2."),
    (r"\.branch2c\.", ".conv3."),
]

# Detectron1 detection-head names (FPN, RPN, box and mask heads).
_C2_HEAD_RULES: list[tuple[str, str]] = [
    (r"^fpn\.inner\.res(\d)\..*?(\.norm)?\.(weight|bias)$", r"fpn_lateral\1\2.\3"),
    (r"^fpn\.res(\d)\..*?(\.norm)?\.(weight|bias)$", r"fpn_output\1\2.\3"),
    (r"^conv\.rpn\.fpn2\.", "proposal_generator.rpn_head.conv."),
    (r"^rpn\.cls\.logits\.fpn2\.", "proposal_generator.rpn_head.objectness_logits."),
    (r"^rpn\.bbox\.pred\.fpn2\.", "proposal_generator.rpn_head.anchor_deltas."),
    (r"^fc6\.", "box_head.fc1."),
    (r"^fc7\.", "box_head.fc2."),
    (r"^cls\.score\.", "cls_score."),
    (r"^bbox\.pred\.", "bbox_pred."),
    (r"^\.?\[?mask\]?\.fcn(\d)\.", r"mask_head.mask_fcn\1."),
    (r"^conv5\.mask\.", "mask_head.deconv."),
    (r"^mask\.fcn\.logits\.", "mask_head.predictor."),
]


def c2_name_to_d2(name: str) -> str:
    """Rename one Caffe2/Detectron1 blob, e.g. "res2_0_branch2a_w" -> "res2.0.conv1.weight"."""
    new = name.replace("_", ".")
    for pattern, repl in _C2_BASIC_RULES + _C2_HEAD_RULES:
        new = re.sub(pattern, repl, new)
    return new


def convert_c2_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Caffe2 blobs and drop Caffe2's background class from the box/mask predictors.

    Caffe2 puts background at index 0; detectron2 puts it last in cls_score and has none in
    bbox_pred or the mask predictor.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        new = c2_name_to_d2(name)
        if new in out:
            raise CheckpointError(f"two Caffe2 blobs map to {new!r} (the second is {name!r})")
        if new.startswith("cls_score."):
            value = torch.cat([value[1:], value[:1]])
        elif new.startswith("bbox_pred.") and value.shape[0] % 4 == 0 and value.shape[0] > 4:
            value = value[4:]
        elif new.startswith("mask_head.predictor.") and value.shape[0] > 1:
            value = value[1:]
        out[new] = value
    return out


def convert_torchvision_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet names -> detectron2 backbone names.

    conv1/bn1 -> stem.conv1(.norm); layerL.i.convJ/bnJ -> res{L+1}.i.convJ(.norm);
    downsample.0/1 -> shortcut(.norm). Other keys (fc.*) keep their names and end up unexpected.
    """
    prefix = "backbone.bottom_up."
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        new = name
        if name.startswith("conv1."):
            new = prefix + "stem." + name
        elif name.startswith("bn1."):
            new = prefix + "stem.conv1.norm." + name[len("bn1.") :]
        else:
            m = _TV_LAYER.match(name)
            if m:
                layer, block, part, leaf = m.groups()
                stage = f"res{int(layer) + 1}.{block}"
                part = {
                    "bn1": "conv1.norm",
                    "bn2": "conv2.norm",
                    "bn3": "conv3.norm",
                    "downsample.0": "shortcut",
                    "downsample.1": "shortcut.norm",
                }.get(part, part)
                new = f"{prefix}{stage}.{part}.{leaf}"
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_into_model` did. Keys are model names (checkpoint names for `unexpected`).

    `expected` counts the model tensors a checkpoint can supply: the model's state_dict (parameters
    and persistent buffers, FrozenBN statistics included; non-persistent buffers such as the pixel
    mean and cell anchors are not in it) minus BatchNorm's num_batches_tracked counters, which
    load_weights drops from every file. Every one of them is in exactly one of `loaded` (taken from the checkpoint),
    `filled_bn_stats` (running stats set to 0/1 because the file has none), `missing` and
    `shape_mismatch`, so a complete load reads `len(loaded) == expected`.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    filled_bn_stats: list[str] = field(default_factory=list)
    expected: int = 0

    @property
    def complete(self) -> bool:
        """Every expected model tensor came from the checkpoint or was a filled BN statistic."""
        return not self.missing and not self.shape_mismatch

    def summary(self) -> str:
        """One line of counts, e.g. "loaded 315 of 323 model tensors, 8 missing"."""
        parts = [f"loaded {len(self.loaded)} of {self.expected} model tensors"]
        if self.filled_bn_stats:
            parts.append(f"{len(self.filled_bn_stats)} BN statistics set to mean 0 / var 1")
        if self.missing:
            parts.append(f"{len(self.missing)} missing")
        if self.shape_mismatch:
            parts.append(f"{len(self.shape_mismatch)} skipped for their shape")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} checkpoint tensors unused")
        return ", ".join(parts)

    def format(self) -> str:
        lines = []
        for key, ckpt_shape, model_shape in self.shape_mismatch:
            lines.append(
                f"Skip loading '{key}': shape {tuple(ckpt_shape)} in the checkpoint but "
                f"{tuple(model_shape)} in the model."
            )
        if self.missing:
            lines.append("Some model parameters or buffers are not found in the checkpoint:")
            lines += [f"  {g}" for g in group_keys(self.missing)]
        if self.unexpected:
            lines.append("The checkpoint contains keys that are not used by the model:")
            lines += [f"  {g}" for g in group_keys(self.unexpected)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format() or self.summary().capitalize() + "."


def group_keys(keys: list[str]) -> list[str]:
    """Compress dotted names into readable groups.

    ["a.0.w", "a.0.b", "a.1.w", "a.1.b"] -> ["a.{0, 1}.{b, w}"]. Only keys with the same number
    of components are merged, and a group is always the full product of its alternatives.
    """
    by_len: dict[int, list[list[frozenset]]] = {}
    for k in keys:
        parts = k.split(".")
        by_len.setdefault(len(parts), []).append([frozenset([p]) for p in parts])
    out: list[str] = []
    for n, groups in by_len.items():
        changed = True
        while changed:
            changed = False
            for pos in reversed(range(n)):
                merged: dict[tuple, set] = {}
                order: list[tuple] = []
                for g in groups:
                    sig = tuple(g[:pos] + g[pos + 1 :])
                    if sig not in merged:
                        merged[sig] = set()
                        order.append(sig)
                    merged[sig] |= g[pos]
                if len(order) < len(groups):
                    changed = True
                    groups = [list(sig[:pos]) + [frozenset(merged[sig])] + list(sig[pos:]) for sig in order]
        for g in groups:
            out.append(
                ".".join(next(iter(s)) if len(s) == 1 else "{" + ", ".join(sorted(s)) + "}" for s in g)
            )
    return sorted(out)


def align_by_suffix(
    model_shapes: Mapping[str, tuple], ckpt: Mapping[str, torch.Tensor]
) -> tuple[dict[str, str], list[tuple[str, str, tuple, tuple]]]:
    """Match checkpoint names to model names by the longest checkpoint name that is the model
    name or a "."-suffix of it (detectron2's heuristic for Caffe2 files).

    Returns ({model_key: ckpt_key}, [(model_key, ckpt_key, ckpt_shape, model_shape)] for shape
    mismatches). One checkpoint key matching two model keys is an error.
    """
    mapping: dict[str, str] = {}
    mismatches: list[tuple[str, str, tuple, tuple]] = []
    used_by: dict[str, str] = {}
    for mkey, mshape in model_shapes.items():
        best = ""
        for ckey in ckpt:
            if (mkey == ckey or mkey.endswith("." + ckey)) and len(ckey) > len(best):
                best = ckey
        if not best:
            continue
        cshape = tuple(ckpt[best].shape)
        if cshape != tuple(mshape):
            mismatches.append((mkey, best, cshape, tuple(mshape)))
            continue
        if best in used_by:
            raise CheckpointError(
                f"ambiguous checkpoint key {best!r}: it matches both {used_by[best]!r} and {mkey!r} in the model"
            )
        used_by[best] = mkey
        mapping[mkey] = best
    return mapping, mismatches


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def load_into_model(
    model: torch.nn.Module,
    state: Union[WeightsFile, Mapping[str, Any]],
    *,
    source: str = "",
    matching_heuristics: bool | None = None,
    skip_keys: tuple[str, ...] = (),
) -> LoadReport:
    """Load `state` into `model` non-strictly and log a detectron2-style report.

    - Names match exactly, or by longest "."-suffix when `matching_heuristics` (default: only
      for Caffe2 files).
    - Tensors whose shape differs from the model's are skipped (e.g. a classifier for another
      NUM_CLASSES), as are keys matching any regex in `skip_keys`.
    - Normalization layers whose weight was loaded but whose running stats are absent get
      running_mean 0 and running_var 1 (fused-BN Caffe2 files).
    The model's num_batches_tracked buffers are not counted (load_weights drops them; see LoadReport).
    """
    fmt = state.format if isinstance(state, WeightsFile) else "d2"
    source = source or (state.source if isinstance(state, WeightsFile) else "")
    raw = state.state if isinstance(state, WeightsFile) else state
    ckpt = {k: _to_tensor(v, k, source or "<state>") for k, v in raw.items()}
    if skip_keys:
        ckpt = {k: v for k, v in ckpt.items() if not any(re.search(p, k) for p in skip_keys)}
    if matching_heuristics is None:
        matching_heuristics = fmt == "c2"

    target = _unwrap(model)
    model_state = target.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in model_state.items()}

    if matching_heuristics:
        mapping, mismatches = align_by_suffix(model_shapes, ckpt)
    else:
        mapping, mismatches = {}, []
        for k, v in ckpt.items():
            if k not in model_shapes:
                continue
            if tuple(v.shape) != model_shapes[k]:
                mismatches.append((k, k, tuple(v.shape), model_shapes[k]))
            else:
                mapping[k] = k

    to_load = {mkey: ckpt[ckey] for mkey, ckey in mapping.items()}
    filled: list[str] = []
    for mkey in model_state:
        for stat, fill in (("running_mean", 0.0), ("running_var", 1.0)):
            if not mkey.endswith("." + stat) or mkey in to_load:
                continue
            weight_key = mkey[: -len(stat)] + "weight"
            if weight_key in to_load:
                to_load[mkey] = torch.full(model_shapes[mkey], fill, dtype=model_state[mkey].dtype)
                filled.append(mkey)

    mismatched_keys = {m[0] for m in mismatches}
    used_ckpt = set(mapping.values()) | {m[1] for m in mismatches}
    expected = [k for k in model_state if not k.endswith("num_batches_tracked")]
    report = LoadReport(
        missing=sorted(k for k in expected if k not in to_load and k not in mismatched_keys),
        unexpected=sorted(k for k in ckpt if k not in used_ckpt),
        shape_mismatch=[(m, c, s) for m, _, c, s in mismatches],
        loaded=sorted(k for k in mapping if not k.endswith("num_batches_tracked")),
        filled_bn_stats=sorted(filled),
        expected=len(expected),
    )

    result = target.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # to_load only holds model keys

    where = f" from {source}" if source else ""
    logger.info("Weights%s (format %s): %s", where, fmt, report.summary())
    if filled:
        logger.info("No running stats for %s; using mean 0 and var 1", ", ".join(group_keys(filled)))
    for key, _, cshape, mshape in mismatches:
        logger.warning(
            "Skip loading '%s'%s: shape %s in the checkpoint but %s in the model.", key, where, cshape, mshape
        )
    if report.missing:
        logger.warning(
            "Some model parameters or buffers are not found in the checkpoint:\n%s",
            "\n".join("  " + g for g in group_keys(report.missing)),
        )
    if report.unexpected:
        logger.warning(
            "The checkpoint contains keys that are not used by the model:\n%s",
            "\n".join("  " + g for g in group_keys(report.unexpected)),
        )
    return report


# Class-specific layers: re-initialized when fine-tuning to another label set. bbox_pred is
# class-agnostic in the cascade, so it is kept.
CLASS_SPECIFIC_PATTERNS = (r"(^|\.)cls_score\.", r"(^|\.)mask_head\.predictor\.")


def drop_class_specific(state: Union[WeightsFile, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A copy of `state` without the classifier and mask predictor, for fine-tuning to new classes."""
    raw = state.state if isinstance(state, WeightsFile) else state
    kept = {k: v for k, v in raw.items() if not any(re.search(p, k) for p in CLASS_SPECIFIC_PATTERNS)}
    if isinstance(state, WeightsFile):
        return WeightsFile(state=kept, format=state.format, meta=state.meta, source=state.source)
    return kept


def check_weights_config(weights: WeightsFile, cfg: Any) -> list[str]:
    """Warnings about a config that does not suit the weights' origin (logged and returned).

    torchvision ResNets put the stride on the 3x3 conv and expect RGB input normalized with the
    ImageNet mean/std; MSRA/Caffe2 weights put it on the 1x1 and expect BGR with std 1.
    Our checkpoints converted by `cascade-rcnn fetch-weights` carry the origin in
    meta["source_format"].
    """
    warnings: list[str] = []
    resnets = cfg.MODEL.RESNETS
    src = weights.source or "the weights"
    origin = weights.format
    if origin == "ours" and weights.meta.get("source_format") in ("torchvision", "c2"):
        origin = weights.meta["source_format"]
    if origin == "torchvision":
        if resnets.STRIDE_IN_1X1:
            warnings.append(
                f"{src} are torchvision ResNet weights (stride on the 3x3 conv) but "
                "MODEL.RESNETS.STRIDE_IN_1X1 is True; set it to False or the features will be wrong."
            )
        if cfg.INPUT.FORMAT != "RGB":
            warnings.append(
                f"{src} are torchvision weights, trained on RGB input, but INPUT.FORMAT is {cfg.INPUT.FORMAT}."
            )
        if not np.allclose(cfg.MODEL.PIXEL_MEAN, TORCHVISION_PIXEL_MEAN) or not np.allclose(
            cfg.MODEL.PIXEL_STD, TORCHVISION_PIXEL_STD
        ):
            warnings.append(
                f"{src} are torchvision weights; they expect MODEL.PIXEL_MEAN {list(TORCHVISION_PIXEL_MEAN)} "
                f"and MODEL.PIXEL_STD {list(TORCHVISION_PIXEL_STD)} (RGB), got "
                f"{list(cfg.MODEL.PIXEL_MEAN)} and {list(cfg.MODEL.PIXEL_STD)}."
            )
    elif origin == "c2" and not resnets.STRIDE_IN_1X1:
        warnings.append(
            f"{src} are MSRA/Caffe2 weights (stride on the 1x1 conv) but MODEL.RESNETS.STRIDE_IN_1X1 is False."
        )
    for w in warnings:
        logger.warning(w)
    return warnings


def load_pretrained(
    model: torch.nn.Module,
    cfg: Any,
    uri: str | os.PathLike | WeightsFile | None = None,
    *,
    drop_classes: bool = False,
) -> tuple[WeightsFile, LoadReport]:
    """load_weights + check_weights_config + load_into_model for `uri` (default cfg.MODEL.WEIGHTS).

    `uri` may also be a WeightsFile already read by `load_weights`: it is used as is, so a caller
    that had to look at the weights first (say, to count their classes) does not fetch them twice.
    """
    uri = uri if uri is not None else cfg.MODEL.WEIGHTS
    if isinstance(uri, WeightsFile):
        weights = uri
    else:
        if not uri:
            raise CheckpointError("no weights given (MODEL.WEIGHTS is empty)")
        weights = load_weights(uri)
    check_weights_config(weights, cfg)
    state = drop_class_specific(weights) if drop_classes else weights
    return weights, load_into_model(model, state, source=weights.source or str(uri))


# --------------------------------------------------------------------------------------------
# Our checkpoint format
# --------------------------------------------------------------------------------------------


def _check_plain(value: Any, where: str) -> Any:
    """Validate (and make CPU-resident) a tree of tensors and plain Python values."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        # A view would drag its whole base storage into the file.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone()
        return t
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_check_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(
                    f"{where}: key {k!r} has type {type(k).__name__}; only str/int keys are saved"
                )
            out[k] = _check_plain(v, f"{where}.{k}")
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
    payload = {"model": _check_plain(dict(model_state), "model"), "meta": meta}
    payload.update(_check_plain(extra, "extra"))

    # storage writes atomically on both backends (temp + rename locally, one PUT or a completed
    # multipart upload on S3) and honours the umask, unlike mkstemp's 0600.
    from cascade_rcnn import storage

    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_ckpt_") as tmp:
        local = os.path.join(tmp, "checkpoint.pth")
        torch.save(payload, local)
        storage.put_file(local, uri)
    logger.info("Saved checkpoint %s (%d tensors)", uri, len(model_state))
    return uri


def load_checkpoint(uri: Union[str, os.PathLike]) -> dict:
    """Read one of our checkpoints (or any torch.save'd tensor dict) with weights_only=True."""
    uri = os.fspath(uri)
    with _Fetched(uri) as path:
        obj = _torch_load_weights_only(path, uri)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj
