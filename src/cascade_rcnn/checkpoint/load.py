"""Loading weights into a model: non-strict, reported, with fine-tuning and config checks."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch

from ..comm import unwrap
from .errors import CheckpointError
from .formats import WeightsFile, load_weights, to_tensor
from .names import align_by_suffix
from .report import LoadReport, group_keys

# The package's logger: callers and tests configure "cascade_rcnn.checkpoint".
logger = logging.getLogger(__package__)

# Input normalization the torchvision ImageNet weights were trained with (RGB, 0-255 scale).
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)


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
    ckpt = {k: to_tensor(v, k, source or "<state>") for k, v in raw.items()}
    if skip_keys:
        ckpt = {k: v for k, v in ckpt.items() if not any(re.search(p, k) for p in skip_keys)}
    if matching_heuristics is None:
        matching_heuristics = fmt == "c2"

    target = unwrap(model)
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
