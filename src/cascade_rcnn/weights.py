"""Pretrained weights: resolve a source, download it, check its sha256, store it as our checkpoint.

Sources (detectron2://, torchvision://, http(s)://, s3:// or a path) are resolved and downloaded
by cascade_rcnn.weight_sources. The file is read with
cascade_rcnn.checkpoint.load_weights (restricted unpickling), renamed to detectron2 names, and saved
with save_checkpoint; meta records source, url, sha256 and source_format.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cascade_rcnn import errors
from cascade_rcnn.logs import setup_logging

# Resolving and downloading live in weight_sources, which checkpoint uses too.
from cascade_rcnn.weight_sources import WeightsError, fetch_resolved, resolve_source

logger = logging.getLogger(__name__)

# After C2 renaming the ResNet names lack the model prefix (detectron2 matches them by suffix at
# load time). Our checkpoints load by exact name, so the backbone prefix is added here.
_C2_BACKBONE = re.compile(r"^(stem|res[2-5])\.")
_BACKBONE_PREFIX = "backbone.bottom_up."


@dataclass
class WeightsResult:
    uri: str  # where our checkpoint was written
    source: str  # as given
    sha256: str  # of the source file
    format: str  # what the source file was: "d2", "c2", "torchvision" or "ours"
    num_tensors: int
    url: str = ""  # the resolved location that was fetched


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
    # Imported here so that `fetch-weights --help` does not import torch.
    from cascade_rcnn.checkpoint import CheckpointError, load_weights, save_checkpoint

    resolved = resolve_source(source)
    expected = sha256.lower() if sha256 else None
    if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise WeightsError(f"--sha256 {sha256!r} is not a 64-digit hex sha256")
    with tempfile.TemporaryDirectory(prefix="cascade_rcnn_weights_") as tmp:
        cache = Path(cache_dir) if cache_dir is not None else Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        local, digest = fetch_resolved(resolved, cache, expected)
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
    errors.add_debug_option(parser)
    args = parser.parse_args(argv)
    setup_logging()

    def fetch() -> int:
        result = fetch_weights(args.source, args.output, sha256=args.sha256, cache_dir=args.cache_dir)
        print(json.dumps(asdict(result), indent=1))
        return 0

    return errors.run_command("cascade-rcnn fetch-weights", fetch, args.debug)
