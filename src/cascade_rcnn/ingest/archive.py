"""Safe zip extraction: every entry is checked before anything is written.

Entries that would land outside the target (absolute paths, `..`, drive letters, symlinks) are
refused, a truncated or corrupt archive is reported by name, and files are unpacked into a temporary
directory beside the target and renamed into place only when the whole archive read cleanly.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable

from cascade_rcnn.ingest.errors import IngestError
from cascade_rcnn.storage.progress import Progress

logger = logging.getLogger(__name__)


def _safe_relpath(archive: Path, info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's path relative to the target; IngestError when it could escape the target."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise IngestError(f"{archive}: refusing symlink entry {name!r}")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise IngestError(f"{archive}: refusing absolute entry {name!r}")
    if ".." in path.parts:
        raise IngestError(f"{archive}: refusing entry {name!r} that escapes the target directory")
    if "\x00" in name:
        raise IngestError(f"{archive}: refusing entry {name!r} with a NUL byte")
    return path


def open_zip(archive: str | os.PathLike) -> zipfile.ZipFile:
    """Opens a zip, turning the low-level errors of a truncated download into one that names it."""
    archive = Path(archive)
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise IngestError(f"{archive}: not a readable zip archive, truncated or corrupt ({e})") from e


def extract_zip(
    archive: str | os.PathLike,
    target_dir: str | os.PathLike,
    *,
    select: Callable[[str], bool] | None = None,
) -> list[str]:
    """Extracts the file entries of `archive` (those `select(name)` accepts) into `target_dir`.

    Returns the extracted paths relative to `target_dir` (POSIX form). Existing files with the same
    paths are replaced; other files in `target_dir` are left alone.
    """
    archive = Path(archive)
    target = Path(target_dir)
    with open_zip(archive) as zf:
        try:
            infos = zf.infolist()
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise IngestError(f"{archive}: corrupt central directory ({e})") from e
        # Check every entry, selected or not, before writing anything.
        entries = [(info, _safe_relpath(archive, info)) for info in infos]
        files = [(i, p) for i, p in entries if not i.is_dir() and (select is None or select(i.filename))]
        need = sum(i.file_size for i, _ in files)
        target.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target).free
        if need > free:
            raise IngestError(
                f"{archive}: needs {need / 1e9:.2f} GB to extract into {target}, only {free / 1e9:.2f} GB free"
            )
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target))
        try:
            progress = Progress(f"extract {archive.name}", len(files), unit="files", logger=logger)
            for info, rel in files:
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
                    raise IngestError(
                        f"{archive}: entry {info.filename!r} is truncated or corrupt ({e})"
                    ) from e
                progress.update(1)
            progress.finish()
            names = []
            for _, rel in files:
                dst = target.joinpath(*rel.parts)
                if dst.is_dir():
                    raise IngestError(f"{archive}: entry {rel} would replace the directory {dst}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp.joinpath(*rel.parts), dst)
                names.append(rel.as_posix())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("extracted %d files from %s into %s", len(names), archive, target)
    return names
