"""Resumable training checkpoints in a local folder or an s3:// prefix.

A checkpoint is one torch.save'd dict of tensors and plain types (loadable with weights_only=True):

    {"model": {d2 name: Tensor}, "meta": {...}, "trainer": {"iteration", "optimizer", "scheduler",
     "scaler", "rng": [one per rank], "data": {...}, "seed", "world_size"}}

`model_XXXXXXX.pth` is written after iteration XXXXXXX (0-based) completes, `model_final.pth` at the end.
Each file is written whole (storage writes are atomic); only then is the pointer `last_checkpoint`
rewritten to name it, so the pointer always names a complete checkpoint. The trainer calls `save`
on a background thread with a `HostStaging` copy of the state (engine/background.py).
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .. import storage
from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import CascadeRCNNError

log = logging.getLogger(__name__)

POINTER = "last_checkpoint"
FINAL = "model_final.pth"
_PERIODIC = re.compile(r"model_(\d{7})\.pth$")


class TrainingCheckpointError(CascadeRCNNError, RuntimeError):
    """A training checkpoint under the output, or its last_checkpoint pointer, cannot be used to
    resume; the message names the URI. (cascade_rcnn.checkpoint.CheckpointError is about a weights
    file; Checkpointer.load wraps it in this.)"""


def periodic_name(iteration: int) -> str:
    return f"model_{iteration:07d}.pth"


class Checkpointer:
    """Saves (rank 0) and finds/loads (all ranks) training checkpoints under `output_uri`.

    keep_last: how many periodic checkpoints to keep (0 keeps all); model_final.pth is never removed.
    """

    def __init__(self, output_uri: str, is_writer: bool = True, keep_last: int = 0):
        self.output_uri = output_uri
        self.is_writer = is_writer
        self.keep_last = int(keep_last)

    def uri(self, name: str) -> str:
        return storage.join(self.output_uri, name)

    def save(self, name: str, payload: dict) -> str | None:
        """Write `payload` as `name`, then point `last_checkpoint` at it. Returns the URI (None off rank 0)."""
        if not self.is_writer:
            return None
        uri = self.uri(name)
        start = time.monotonic()
        extra = {k: v for k, v in payload.items() if k not in ("model", "meta")}
        save_checkpoint(uri, payload["model"], payload.get("meta"), extra=extra)
        # The pointer changes only after the file it names is complete.
        storage.put_bytes(name.encode(), self.uri(POINTER))
        log.info("saved checkpoint %s in %.1f s; %s names it", uri, time.monotonic() - start, POINTER)
        self._prune(name)
        return uri

    def _prune(self, just_saved: str) -> None:
        if self.keep_last <= 0:
            return
        names = sorted(n for n in self.list_periodic() if n != just_saved)
        keep = self.keep_last - (1 if _PERIODIC.search(just_saved) else 0)
        for name in names[: max(0, len(names) - keep)]:
            storage.delete(self.uri(name))
            log.info("removed old checkpoint %s (--keep-checkpoints %d)", self.uri(name), self.keep_last)

    def list_periodic(self) -> list[str]:
        """Names of the periodic checkpoints present, oldest first."""
        prefix = self.output_uri.rstrip("/") + "/"
        names = []
        for uri in storage.list_prefix(prefix):
            rest = uri[len(prefix) :] if uri.startswith(prefix) else os.path.basename(uri)
            if "/" not in rest and _PERIODIC.fullmatch(rest):
                names.append(rest)
        return sorted(names)

    def last_checkpoint(self) -> str | None:
        """URI named by the pointer, or None when this output has no checkpoint yet."""
        pointer = self.uri(POINTER)
        if not storage.exists(pointer):
            return None
        name = storage.get_bytes(pointer).decode().strip()
        if not name or "/" in name or name.startswith("."):
            raise TrainingCheckpointError(f"{pointer}: expected a checkpoint file name, found {name!r}")
        uri = self.uri(name)
        if not storage.exists(uri):
            raise TrainingCheckpointError(
                f"{pointer} names {name}, but {uri} does not exist{self._others_hint(name)}"
            )
        return uri

    def _others_hint(self, bad: str) -> str:
        try:
            others = [n for n in self.list_periodic() if n != bad]
        except storage.StorageError:
            return ""
        if not others:
            return "; delete the pointer to start from scratch"
        return (
            f"; rewrite the pointer to an earlier checkpoint ({', '.join(others)}) or delete it to start over"
        )

    def load(self, uri: str) -> dict:
        """Read a checkpoint with torch.load(weights_only=True); a corrupt file raises TrainingCheckpointError."""
        try:
            payload = load_checkpoint(uri)
        except Exception as e:  # a truncated or foreign file surfaces as several error types
            name = uri.rsplit("/", 1)[-1]
            raise TrainingCheckpointError(
                f"checkpoint {uri} (named by {self.uri(POINTER)}) is corrupt or not a checkpoint: "
                f"{type(e).__name__}: {e}{self._others_hint(name)}"
            ) from None
        if not isinstance(payload, dict) or "model" not in payload or "trainer" not in payload:
            raise TrainingCheckpointError(
                f"checkpoint {uri} lacks the 'model' and 'trainer' entries of a training checkpoint"
            )
        return payload


class HostStaging:
    """Host-memory copies of checkpoint payloads that training cannot change any more, in buffers
    kept from one checkpoint to the next: copying into memory already mapped is several times
    faster than a fresh clone, whose page faults dominate (36 MB: 15 ms against 60 ms here). The
    caller must not copy again while the previous copy is still being written."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def copy(self, value: Any, path: tuple = ()) -> Any:
        """`value` with every tensor copied to host memory and containers rebuilt; plain values as
        they are."""
        if isinstance(value, torch.Tensor):
            t = value.detach()
            buf = self._buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._buffers[path] = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            return buf.copy_(t)
        if isinstance(value, Mapping):
            return {k: self.copy(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self.copy(v, (*path, i)) for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        return value


# ---- RNG state as plain types (weights_only=True cannot load numpy arrays) ----


def capture_rng(device_state: torch.Tensor | None) -> dict:
    """This process's python, numpy, torch CPU and device generator states."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "device": device_state,
    }


def restore_rng(state: dict) -> torch.Tensor | None:
    """Set python, numpy and torch CPU generators from `capture_rng`'s dict; returns the device state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    return state.get("device")
