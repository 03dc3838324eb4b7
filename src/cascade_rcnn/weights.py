"""Pretrained weights: resolve a source, download it, check its sha256, store it as our checkpoint.

Sources:
- `detectron2://<path>`: `https://dl.fbaipublicfiles.com/detectron2/<path>` (base overridable with
  $CASCADE_RCNN_D2_BASE_URL), e.g. ImageNetPretrained/MSRA/R-50.pkl or a model-zoo model_final_*.pkl;
- `torchvision://<model>[/<WEIGHTS>]`: the URL torchvision's weight enum records (IMAGENET1K_V1 by
  default); the `https://download.pytorch.org/models` part is overridable with
  $CASCADE_RCNN_TORCHVISION_BASE_URL. Its file name carries a sha256 prefix, which is checked;
- any http(s) URL, s3:// URI or local path.

Downloads reuse the resumable downloader of cascade_rcnn.ingest. The file is read with
cascade_rcnn.checkpoint.load_weights (restricted unpickling), renamed to detectron2 names, and saved
with save_checkpoint; meta records source, url, sha256 and source_format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cascade_rcnn import storage

logger = logging.getLogger(__name__)

D2_BASE_URL = "https://dl.fbaipublicfiles.com/detectron2"
D2_BASE_ENV = "CASCADE_RCNN_D2_BASE_URL"
TORCHVISION_BASE_URL = "https://download.pytorch.org/models"
TORCHVISION_BASE_ENV = "CASCADE_RCNN_TORCHVISION_BASE_URL"
TORCHVISION_DEFAULT_WEIGHTS = "IMAGENET1K_V1"
# torch.hub's convention: "<name>-<first hex digits of the sha256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$")
# After C2 renaming the ResNet names lack the model prefix (detectron2 matches them by suffix at
# load time). Our checkpoints load by exact name, so the backbone prefix is added here.
_C2_BACKBONE = re.compile(r"^(stem|res[2-5])\.")
_BACKBONE_PREFIX = "backbone.bottom_up."


class WeightsError(RuntimeError):
    """Weights could not be resolved, fetched, verified or converted; the message names the source."""


@dataclass
class WeightsResult:
    uri: str  # where our checkpoint was written
    source: str  # as given
    sha256: str  # of the source file
    format: str  # what the source file was: "d2", "c2", "torchvision" or "ours"
    num_tensors: int
    url: str = ""  # the resolved location that was fetched


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
    path = source[len("file://") :] if source.startswith("file://") else source
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    return ResolvedSource("local", str(Path(path).resolve()))


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fetch(resolved: ResolvedSource, cache: Path, sha256: str | None) -> tuple[Path, str]:
    """(local file, its sha256). Downloads land in `cache`, named after the URL so sources never collide."""
    from cascade_rcnn.ingest.download import DownloadError, download_file

    name = PurePosixPath(urlparse(resolved.location).path).name or "weights"
    if resolved.kind == "local":
        return Path(resolved.location), _sha256(resolved.location)
    local = cache / f"{hashlib.sha256(resolved.location.encode()).hexdigest()[:12]}-{name}"
    if resolved.kind == "s3":
        try:
            storage.get_file(resolved.location, local)
        except storage.StorageError as e:
            raise WeightsError(f"cannot fetch {resolved.location}: {e}") from e
        return local, _sha256(local)
    try:
        result = download_file(resolved.location, local, sha256=sha256)
    except DownloadError as e:
        raise WeightsError(str(e)) from e
    return result.path, result.sha256


def default_cache_dir() -> Path:
    return Path(os.environ.get("CASCADE_RCNN_CACHE", Path.home() / ".cache" / "cascade_rcnn")) / "weights"


def download(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local copy of a detectron2://, torchvision://, http(s):// or s3:// weights file, kept in the cache.

    This lets `MODEL.WEIGHTS detectron2://...` work as in detectron2; a partial download resumes.
    """
    resolved = resolve_source(source)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    local, digest = _fetch(resolved, cache, None)
    if resolved.hash_prefix and not digest.startswith(resolved.hash_prefix):
        local.unlink(missing_ok=True)
        raise WeightsError(
            f"{resolved.location}: sha256 is {digest}, but the file name promises a hash starting with "
            f"{resolved.hash_prefix}"
        )
    return local


def _to_d2_names(state: dict, fmt: str) -> dict:
    if fmt != "c2":
        return state
    out = {(_BACKBONE_PREFIX + k if _C2_BACKBONE.match(k) else k): v for k, v in state.items()}
    others = sorted(k for k in state if not _C2_BACKBONE.match(k) and not k.startswith("fc1000."))
    if others:
        logger.warning(
            "%d Caffe2 tensors outside the ResNet backbone keep their short names and will only load "
            "by suffix matching: %s",
            len(others),
            ", ".join(others[:8]),
        )
    return out


def fetch_weights(
    source: str,
    output_uri: str,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> WeightsResult:
    """Fetches `source`, verifies it, converts it and writes our checkpoint to `output_uri`.

    `sha256` (hex) is checked when given; a mismatch raises WeightsError naming both hashes and
    nothing is written. `cache_dir` keeps downloads (and partial downloads) between runs.
    """
    from cascade_rcnn.checkpoint import CheckpointError, load_weights, save_checkpoint

    resolved = resolve_source(source)
    expected = sha256.lower() if sha256 else None
    if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise WeightsError(f"--sha256 {sha256!r} is not a 64-digit hex sha256")
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_weights_") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        local, digest = _fetch(resolved, cache, expected)
        if expected and digest != expected:
            raise WeightsError(f"{resolved.location}: sha256 is {digest}, expected {expected}")
        if resolved.hash_prefix and not digest.startswith(resolved.hash_prefix):
            if resolved.kind == "http":
                local.unlink(missing_ok=True)  # do not keep a file that fails its own name's check
            raise WeightsError(
                f"{resolved.location}: sha256 is {digest}, but the file name promises a hash "
                f"starting with {resolved.hash_prefix}"
            )
        try:
            weights = load_weights(str(local))
        except CheckpointError as e:
            raise WeightsError(f"{source}: {e}") from e
    state = _to_d2_names(dict(weights.state), weights.format)
    meta = {
        "source": source,
        "url": resolved.location,
        "sha256": digest,
        "source_format": weights.format,
        "num_tensors": len(state),
    }
    source_meta = {k: v for k, v in weights.meta.items() if isinstance(v, (str, int, float, bool))}
    if source_meta:
        meta["source_meta"] = source_meta
    try:
        uri = save_checkpoint(output_uri, state, meta)
    except CheckpointError as e:
        raise WeightsError(f"{source}: cannot store {output_uri}: {e}") from e
    logger.info(
        "stored %d tensors from %s (%s, sha256 %s) at %s", len(state), source, weights.format, digest, uri
    )
    return WeightsResult(uri, source, digest, weights.format, len(state), resolved.location)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cascade-rcnn fetch-weights",
        description="Fetch pretrained weights (detectron2://, torchvision://, http(s)://, s3:// or a file), "
        "verify them and store them as a cascade_rcnn checkpoint.",
    )
    parser.add_argument(
        "source", help="e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl or torchvision://resnet50"
    )
    parser.add_argument("--output", required=True, help="checkpoint URI to write (s3://... or a path)")
    parser.add_argument("--sha256", help="expected sha256 of the source file")
    parser.add_argument("--cache-dir", help="keep downloads here (resumable between runs)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = fetch_weights(args.source, args.output, sha256=args.sha256, cache_dir=args.cache_dir)
    except (WeightsError, storage.StorageError) as e:
        print(f"cascade-rcnn fetch-weights: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=1))
    return 0
