"""Local backend: plain paths and file:// URIs, written atomically (temp file, fsync, rename)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Optional, Tuple

from .base import (
    IO_CHUNK,
    NotFound,
    ObjectInfo,
    PathLike,
    PreconditionFailed,
    StorageError,
    join,
    sha256_file,
)
from .progress import Progress


def local_path(uri: PathLike) -> str:
    """The filesystem path of a local path or file:// URI (file:///p and file://localhost/p); any other
    string comes back as it is. A file:// URI naming another host raises StorageError."""
    text = os.fspath(uri)
    if not text.startswith("file://"):
        return text
    rest = text[len("file://") :]
    if not rest.startswith("/"):
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URI {text!r} names host {host!r}; only local files are supported")
        rest = "/" + path
    return rest


def cache_dir() -> Path:
    """Where local copies of remote files (images, weights) are kept between runs: $CASCADE_RCNN_CACHE,
    else ~/.cache/cascade_rcnn."""
    return Path(os.environ.get("CASCADE_RCNN_CACHE") or Path.home() / ".cache" / "cascade_rcnn")


def _path(uri: PathLike) -> Path:
    text = os.fspath(uri)
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {text!r}: use s3://bucket/key, file:///path or a path")
    return Path(local_path(text))


def temp_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_write(dest: Path, fsync: bool = True) -> Iterator[Tuple[Any, Path]]:
    """Yield (file, temp path) in dest's directory; on success (fsync and) rename onto dest, on any error
    remove the temp file so nothing partial is ever visible under dest. The rename alone protects
    against a killed process; the fsync also against a node crash (data reaches disk before the name)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def copy_file(src: Path, dest: Path, fsync: bool = True, sha256: Optional[str] = None) -> Tuple[int, str]:
    """Copy src to dest atomically; returns (size, sha256) of the bytes written. A `sha256` the caller
    already knows for src is returned as is instead of hashing the bytes again."""
    digest = hashlib.sha256() if sha256 is None else None
    size = 0
    try:
        with open(src, "rb") as fin, atomic_write(dest, fsync) as (fout, _):
            for block in iter(lambda: fin.read(IO_CHUNK), b""):
                if digest is not None:
                    digest.update(block)
                fout.write(block)
                size += len(block)
    except FileNotFoundError as exc:
        raise NotFound(f"no such file {src}") from exc
    except OSError as exc:
        raise StorageError(f"copy {src} -> {dest}: {exc}") from exc
    return size, digest.hexdigest() if digest is not None else sha256


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def list_files(root: Path) -> Iterator[Tuple[str, int]]:
    """(relative posix path, size) of every regular file under root, recursively, skipping our temps."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") and ".tmp-" in name:
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            if os.path.isfile(full):
                yield Path(os.path.relpath(full, root)).as_posix(), st.st_size


def _copy_tree_file(
    src_root: Path,
    dest_root: Path,
    rel: str,
    size: int,
    skip_unchanged: bool,
    fsync: bool,
    prog: Progress,
    src_sha: Optional[str] = None,
) -> str:
    """Copy one file of a tree (kept when skip_unchanged and dest holds the same bytes); returns the
    sha256 of what dest now holds. `src_sha`, when the caller knows it, saves hashing src."""
    src, dest = src_root / rel, dest_root / rel
    if skip_unchanged and file_size(dest) == size and dest.is_file():
        dest_sha = sha256_file(dest)
        if dest_sha == (src_sha or sha256_file(src)):
            prog.file_done(skipped=True)
            return dest_sha
    copied, sha = copy_file(src, dest, fsync, src_sha)
    prog.update(copied)
    prog.file_done()
    return sha


class LocalBackend:
    """The storage operations on the local filesystem."""

    def put_bytes(self, uri: str, data: bytes, sha: str) -> None:
        dest = _path(uri)
        try:
            with atomic_write(dest) as (f, _):
                f.write(data)
        except OSError as exc:
            raise StorageError(f"write {dest}: {exc}") from exc

    def get_versioned(self, uri: str) -> Tuple[bytes, str]:
        """(data, sha256 of data): a local file's version is its content."""
        data = self.get_bytes(uri, False)
        return data, hashlib.sha256(data).hexdigest()

    def put_bytes_if(self, uri: str, data: bytes, sha: str, version: Optional[str]) -> str:
        """Compare and swap under an exclusive lock on a file beside `uri` (flock: every writer on this
        filesystem goes through it); returns the new version."""
        import fcntl

        dest = _path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = dest.parent / f".{dest.name}.lock"
        try:
            with open(lock, "a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                try:
                    current = hashlib.sha256(dest.read_bytes()).hexdigest()
                except FileNotFoundError:
                    current = None
                if current != version:
                    what = "exists already" if version is None else f"is no longer version {version}"
                    raise PreconditionFailed(f"conditional write {dest} refused: the file {what}")
                with atomic_write(dest) as (f, _):
                    f.write(data)
        except OSError as exc:
            raise StorageError(f"write {dest}: {exc}") from exc
        return sha

    def get_bytes(self, uri: str, require_checksum: bool) -> bytes:
        path = _path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no such file {path}") from exc
        except OSError as exc:
            raise StorageError(f"read {path}: {exc}") from exc

    def put_file(self, src: Path, uri: str) -> Tuple[int, str]:
        return copy_file(src, _path(uri))

    def get_file(self, uri: str, dest: Path, require_checksum: bool) -> ObjectInfo:
        size, sha = copy_file(_path(uri), dest)
        return ObjectInfo(uri, size, sha)

    def head(self, uri: str) -> ObjectInfo:
        path = _path(uri)
        if not path.is_file():
            raise NotFound(f"no such file {path}")
        return ObjectInfo(uri, path.stat().st_size, sha256_file(path))

    def exists(self, uri: str) -> bool:
        return _path(uri).is_file()

    def delete(self, uri: str) -> None:
        path = _path(uri)
        if path.is_dir():
            raise StorageError(f"delete {path}: is a directory (use delete_prefix)")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def list_prefix(self, uri: str) -> list[str]:
        path = _path(uri)
        # Results keep the caller's spelling of the prefix (relative, file://, trailing '/').
        if path.is_dir():
            root, base, want = path, uri, ""
        elif uri.endswith("/"):
            return []
        else:
            root, want = path.parent, path.name
            base = uri[: len(uri) - len(want)]
        if not root.is_dir():
            return []
        return sorted(join(base, rel) if base else rel for rel, _ in list_files(root) if rel.startswith(want))

    def delete_prefix(self, uri: str) -> int:
        path = _path(uri)
        if not path.exists():
            return 0
        count = sum(1 for _ in list_files(path)) if path.is_dir() else 1
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return count

    def tree_uploader(
        self,
        src_root: Path,
        uri: str,
        skip_unchanged: bool,
        fsync: bool,
        prog: Progress,
        known: Mapping[str, str],
    ) -> Callable[[Tuple[str, int]], None]:
        dest_root = _path(uri)

        def one(item: Tuple[str, int]) -> None:
            rel, size = item
            _copy_tree_file(src_root, dest_root, rel, size, skip_unchanged, fsync, prog, known.get(rel))

        return one

    def tree_items(self, uri: str) -> list[Tuple[str, str, int]]:
        src_root = _path(uri)
        items = list(list_files(src_root)) if src_root.is_dir() else []
        if not items:
            raise NotFound(f"download {uri}: no files under {src_root}")
        return [(rel, rel, size) for rel, size in items]

    def tree_downloader(
        self,
        uri: str,
        dest_root: Path,
        skip_unchanged: bool,
        require_checksum: bool,
        fsync: bool,
        prog: Progress,
        digests: MutableMapping[str, str],
    ) -> Callable[[Tuple[str, str, int]], None]:
        src_root = _path(uri)

        def one(item: Tuple[str, str, int]) -> None:
            rel, _, size = item
            digests[rel] = _copy_tree_file(src_root, dest_root, rel, size, skip_unchanged, fsync, prog)

        return one
