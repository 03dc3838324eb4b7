"""Safe deserialization: a restricted unpickler for `.pkl` files and torch.load(weights_only=True).

Nothing here ever calls plain ``pickle.load`` or ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO, Union

import numpy as np
import torch

from .errors import CheckpointError


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list (it was not imported or called)."""


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    """The numpy object `name` from the first of `modules` that has it (numpy 1.x vs 2.x layout)."""
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


def torch_load_weights_only(path: str, source: str) -> Any:
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
