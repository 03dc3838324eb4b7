"""Parameter names: Caffe2/Detectron1 and torchvision names to detectron2's, and suffix matching."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .errors import CheckpointError

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


_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")


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
