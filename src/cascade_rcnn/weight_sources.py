"""Where pretrained weights come from: resolve a source and download it into the cache.

Sources:
- `detectron2://<path>`: `https://dl.fbaipublicfiles.com/detectron2/<path>` (base overridable with
  $CASCADE_RCNN_D2_BASE_URL), e.g. ImageNetPretrained/MSRA/R-50.pkl or a model-zoo model_final_*.pkl;
- `torchvision://<model>[/<WEIGHTS>]`: the URL torchvision's weight enum records (IMAGENET1K_V1 by
  default); the `https://download.pytorch.org/models` part is overridable with
  $CASCADE_RCNN_TORCHVISION_BASE_URL. Its file name carries a sha256 prefix, which is checked;
- any http(s) URL, s3:// URI or local path.

Downloads reuse the resumable downloader of cascade_rcnn.ingest. Both `cascade_rcnn.checkpoint`
(which reads `MODEL.WEIGHTS detectron2://...`) and `cascade_rcnn.weights` (fetch-weights) use this
module; it imports neither, and no torch, so `cascade-rcnn fetch-weights --help` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cascade_rcnn import storage
from cascade_rcnn.errors import CascadeRCNNError

D2_BASE_URL = "https://dl.fbaipublicfiles.com/detectron2"
D2_BASE_ENV = "CASCADE_RCNN_D2_BASE_URL"
TORCHVISION_BASE_URL = "https://download.pytorch.org/models"
TORCHVISION_BASE_ENV = "CASCADE_RCNN_TORCHVISION_BASE_URL"
TORCHVISION_DEFAULT_WEIGHTS = "IMAGENET1K_V1"
# torch.hub's convention: "<name>-<first hex digits of the sha256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")


class WeightsError(CascadeRCNNError, RuntimeError):
    """Weights could not be resolved, fetched, verified or converted; the message names the source."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "http" | "s3" | "local"
    location: str  # URL, s3:// URI or local path
    hash_prefix: str | None = None  # sha256 prefix the file name promises, when it does


def _torchvision_url(spec: str) -> str:
    name, _, tag = spec.partition("/")
    try:
        from torchvision.models import get_model_weights

        enum = get_model_weights(name)
    except (ImportError, ValueError, KeyError) as e:
        raise WeightsError(
            f"torchvision://{spec}: torchvision has no weights for model {name!r} ({e})"
        ) from e
    tag = tag or (TORCHVISION_DEFAULT_WEIGHTS if hasattr(enum, TORCHVISION_DEFAULT_WEIGHTS) else "DEFAULT")
    weights = getattr(enum, tag, None)
    if weights is None:
        choices = ", ".join(w.name for w in enum)
        raise WeightsError(f"torchvision://{spec}: {name} has no weights {tag!r} (choices: {choices})")
    url = weights.url
    base = os.environ.get(TORCHVISION_BASE_ENV)
    if base and url.startswith(TORCHVISION_BASE_URL):
        url = base.rstrip("/") + url[len(TORCHVISION_BASE_URL) :]
    return url


def _name_hash(url: str) -> str | None:
    match = _HASH_IN_NAME.search(PurePosixPath(urlparse(url).path).name)
    return match.group(1) if match else None


def resolve_source(source: str) -> ResolvedSource:
    """Maps a weights source to what to fetch. Raises WeightsError for an unknown scheme or file."""
    if source.startswith("detectron2://"):
        base = os.environ.get(D2_BASE_ENV, D2_BASE_URL).rstrip("/")
        return ResolvedSource("http", f"{base}/{source[len('detectron2://') :].lstrip('/')}")
    if source.startswith("torchvision://"):
        url = _torchvision_url(source[len("torchvision://") :].strip("/"))
        return ResolvedSource("http", url, _name_hash(url))
    if source.startswith(("http://", "https://")):
        # Only torchvision's own host is known to follow the hash-in-name convention.
        official = source.startswith(TORCHVISION_BASE_URL + "/")
        return ResolvedSource("http", source, _name_hash(source) if official else None)
    if source.startswith("s3://"):
        return ResolvedSource("s3", source)
    if "://" in source and not source.startswith("file://"):
        raise WeightsError(
            f"unsupported weights source {source!r}: use detectron2://, torchvision://, http(s)://, s3:// or a path"
        )
    path = storage.local_path(source)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    return ResolvedSource("local", str(Path(path).resolve()))


def fetch_resolved(resolved: ResolvedSource, cache: Path, sha256: str | None) -> tuple[Path, str]:
    """(local file, its sha256). Downloads land in `cache`, named after the URL so sources never collide."""
    from cascade_rcnn.ingest.download import DownloadError, download_file

    name = PurePosixPath(urlparse(resolved.location).path).name or "weights"
    if resolved.kind == "local":
        return Path(resolved.location), storage.sha256_file(resolved.location)
    local = cache / f"{hashlib.sha256(resolved.location.encode()).hexdigest()[:12]}-{name}"
    if resolved.kind == "s3":
        try:
            storage.get_file(resolved.location, local)
        except storage.StorageError as e:
            raise WeightsError(f"cannot fetch {resolved.location}: {e}") from e
        return local, storage.sha256_file(local)
    try:
        result = download_file(resolved.location, local, sha256=sha256)
    except DownloadError as e:
        raise WeightsError(str(e)) from e
    return result.path, result.sha256


def download(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of a detectron2://, torchvision://, http(s):// or s3:// weights file, kept in the cache.

    This lets `MODEL.WEIGHTS detectron2://...` work as in detectron2; a partial download resumes.
    """
    resolved = resolve_source(source)
    cache = Path(cache_dir) if cache_dir is not None else storage.cache_dir() / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    local, digest = fetch_resolved(resolved, cache, None)
    if resolved.hash_prefix and not digest.startswith(resolved.hash_prefix):
        local.unlink(missing_ok=True)
        raise WeightsError(
            f"{resolved.location}: sha256 is {digest}, but the file name promises a hash starting with "
            f"{resolved.hash_prefix}"
        )
    return local
