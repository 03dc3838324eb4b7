"""What both backends share: errors, result types, URI joining, hashing."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from cascade_rcnn.errors import CascadeRCNNError

PathLike = Union[str, "os.PathLike[str]"]

SHA256_METADATA = "sha256"  # stored by S3 as the header x-amz-meta-sha256
IO_CHUNK = 1024 * 1024
_HASH_BLOCK = 8 << 20  # hashlib releases the GIL on large blocks, so threads hash in parallel


class StorageError(CascadeRCNNError):
    """A storage operation failed; the message names the URI (bucket/key) and the endpoint."""


class NotFound(StorageError):
    """The object, file or prefix does not exist."""


class ChecksumMismatch(StorageError):
    """Downloaded bytes do not hash to the sha256 stored with the object."""


class PreconditionFailed(StorageError):
    """A conditional write was refused: the object changed (or appeared) since the caller read it."""


@dataclass(frozen=True)
class ObjectInfo:
    """What `head` knows about an object: size in bytes and its sha256 (hex), None when the object
    carries no sha256 metadata."""

    uri: str
    size: int
    sha256: Optional[str]


@dataclass(frozen=True)
class TransferStats:
    """Outcome of a tree transfer: files and bytes moved, files skipped as unchanged, wall time. A
    download also gives the sha256 of every file it left under the target, by relative path (each
    computed once, while verifying or checking it), so callers need not read the files again."""

    files: int
    bytes: int
    seconds: float
    skipped: int = 0
    unverified: int = 0  # downloaded objects that had no sha256 metadata
    sha256: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


def is_s3(uri: PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(uri: PathLike, *parts: str) -> str:
    """Append path parts with '/', e.g. join('s3://b/runs', 'r1', 'model.pth') -> 's3://b/runs/r1/model.pth'."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else f"{out}/{part}"
    return out


def file_digests(path: PathLike, algorithms: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a local file, read once for all `algorithms`."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a local file."""
    return file_digests(path)["sha256"]
