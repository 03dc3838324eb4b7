"""detectron2-style configuration: YAML files with `_BASE_` inheritance and `KEY VALUE` overrides.

The key names and defaults are detectron2's (`config/defaults.py`), restricted to what a
Cascade Mask R-CNN with a ResNet-FPN backbone uses, so a model-zoo YAML loads unchanged.
Keys we add are marked "ours". Any key not declared here is an error that names the key and
the file it came from: a typo must never silently fall back to a default. Keys that detectron2
defines but we do not implement (NOT_IMPLEMENTED) load only at their defaults.
"""

from __future__ import annotations

import ast
import copy
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from cascade_rcnn.errors import CascadeRCNNError

BASE_KEY = "_BASE_"


class ConfigError(CascadeRCNNError, ValueError):
    """A config file or override is invalid; the message names the key and the source."""


class CfgNode(dict):
    """A dict with attribute access whose key set is fixed once `freeze()` or a merge checks it."""

    def __init__(self, entries: dict | None = None):
        super().__init__()
        self.__dict__["_frozen"] = False
        for key, value in (entries or {}).items():
            self[key] = (
                CfgNode(value) if isinstance(value, dict) and not isinstance(value, CfgNode) else value
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"config is frozen; cannot set {name!r} (use cfg.clone())")
        self[name] = value

    def __deepcopy__(self, memo):
        return CfgNode({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def clone(self) -> CfgNode:
        return copy.deepcopy(self)

    def freeze(self) -> CfgNode:
        self.__dict__["_frozen"] = True
        for v in self.values():
            if isinstance(v, CfgNode):
                v.freeze()
        return self

    def is_frozen(self) -> bool:
        return self._frozen

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, CfgNode) else _plain(v) for k, v in self.items()}

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def merge_from_file(self, path: str | os.PathLike) -> CfgNode:
        merge_file_into(self, Path(path))
        return self

    def merge_from_list(self, opts: Iterable[str], source: str = "command line") -> CfgNode:
        merge_opts_into(self, list(opts), source)
        return self


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _defaults() -> dict:
    # Values follow detectron2's defaults.py; the fact sheet §1 lists the effective ones.
    return {
        "VERSION": 2,
        "MODEL": {
            "DEVICE": "cpu",  # ours: auto | cpu | cuda[:N] | npu[:N] (cascade_rcnn.accel; d2 defaults to cuda)
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "WEIGHTS": "",
            "MASK_ON": False,
            "KEYPOINT_ON": False,
            "LOAD_PROPOSALS": False,
            "PIXEL_MEAN": [103.530, 116.280, 123.675],
            "PIXEL_STD": [1.0, 1.0, 1.0],
            "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
            "RESNETS": {
                "DEPTH": 50,
                "OUT_FEATURES": ["res4"],
                "NUM_GROUPS": 1,
                "NORM": "FrozenBN",
                "WIDTH_PER_GROUP": 64,
                "STRIDE_IN_1X1": True,
                "RES5_DILATION": 1,
                "RES2_OUT_CHANNELS": 256,
                "STEM_OUT_CHANNELS": 64,
                "DEFORM_ON_PER_STAGE": [False, False, False, False],
                "DEFORM_MODULATED": False,
                "DEFORM_NUM_GROUPS": 1,
            },
            "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
            "ANCHOR_GENERATOR": {
                "NAME": "DefaultAnchorGenerator",
                "SIZES": [[32, 64, 128, 256, 512]],
                "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
                "ANGLES": [[-90, 0, 90]],
                "OFFSET": 0.0,
            },
            "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
            "RPN": {
                "HEAD_NAME": "StandardRPNHead",
                "IN_FEATURES": ["res4"],
                "BOUNDARY_THRESH": -1,
                "IOU_THRESHOLDS": [0.3, 0.7],
                "IOU_LABELS": [0, -1, 1],
                "BATCH_SIZE_PER_IMAGE": 256,
                "POSITIVE_FRACTION": 0.5,
                "BBOX_REG_LOSS_TYPE": "smooth_l1",
                "BBOX_REG_LOSS_WEIGHT": 1.0,
                "BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
                "SMOOTH_L1_BETA": 0.0,
                "LOSS_WEIGHT": 1.0,
                "PRE_NMS_TOPK_TRAIN": 12000,
                "PRE_NMS_TOPK_TEST": 6000,
                "POST_NMS_TOPK_TRAIN": 2000,
                "POST_NMS_TOPK_TEST": 1000,
                "NMS_THRESH": 0.7,
                "CONV_DIMS": [-1],
            },
            "ROI_HEADS": {
                "NAME": "Res5ROIHeads",
                "NUM_CLASSES": 80,
                "IN_FEATURES": ["res4"],
                "IOU_THRESHOLDS": [0.5],
                "IOU_LABELS": [0, 1],
                "BATCH_SIZE_PER_IMAGE": 512,
                "POSITIVE_FRACTION": 0.25,
                "SCORE_THRESH_TEST": 0.05,
                "NMS_THRESH_TEST": 0.5,
                "PROPOSAL_APPEND_GT": True,
            },
            "ROI_BOX_HEAD": {
                "NAME": "",
                "BBOX_REG_LOSS_TYPE": "smooth_l1",
                "BBOX_REG_LOSS_WEIGHT": 1.0,
                "BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
                "SMOOTH_L1_BETA": 0.0,
                "POOLER_RESOLUTION": 14,
                "POOLER_SAMPLING_RATIO": 0,
                "POOLER_TYPE": "ROIAlignV2",
                "NUM_FC": 0,
                "FC_DIM": 1024,
                "NUM_CONV": 0,
                "CONV_DIM": 256,
                "NORM": "",
                "CLS_AGNOSTIC_BBOX_REG": False,
                "TRAIN_ON_PRED_BOXES": False,
                "USE_FED_LOSS": False,
                "USE_SIGMOID_CE": False,
                "FED_LOSS_FREQ_WEIGHT_POWER": 0.5,
                "FED_LOSS_NUM_CLASSES": 50,
            },
            "ROI_BOX_CASCADE_HEAD": {
                "BBOX_REG_WEIGHTS": (
                    (10.0, 10.0, 5.0, 5.0),
                    (20.0, 20.0, 10.0, 10.0),
                    (30.0, 30.0, 15.0, 15.0),
                ),
                "IOUS": (0.5, 0.6, 0.7),
            },
            "ROI_MASK_HEAD": {
                "NAME": "MaskRCNNConvUpsampleHead",
                "POOLER_RESOLUTION": 14,
                "POOLER_SAMPLING_RATIO": 0,
                "NUM_CONV": 0,
                "CONV_DIM": 256,
                "NORM": "",
                "CLS_AGNOSTIC_MASK": False,
                "POOLER_TYPE": "ROIAlignV2",
            },
            # ours: static-shape mode (modeling/static_rcnn.py). CANVAS lists the fixed (H, W) canvases;
            # each batch goes onto the smallest that holds it. Ground truth is padded to the smallest
            # GT_BUCKET_MIN * 2^k rows that hold every image's boxes (never cut). COMPILE names a
            # torch.compile backend ("inductor") that runs the static train step and inference as one
            # graph each (fullgraph, static shapes); "" runs them eagerly.
            "STATIC": {"ENABLED": False, "CANVAS": [], "GT_BUCKET_MIN": 16, "COMPILE": ""},
        },
        "INPUT": {
            "MIN_SIZE_TRAIN": (800,),
            "MIN_SIZE_TRAIN_SAMPLING": "choice",
            "MAX_SIZE_TRAIN": 1333,
            "MIN_SIZE_TEST": 800,
            "MAX_SIZE_TEST": 1333,
            "RANDOM_FLIP": "horizontal",
            "CROP": {"ENABLED": False, "TYPE": "relative_range", "SIZE": [0.9, 0.9]},
            "FORMAT": "BGR",
            "MASK_FORMAT": "polygon",
        },
        "DATASETS": {
            "TRAIN": (),
            "PROPOSAL_FILES_TRAIN": (),
            "PRECOMPUTED_PROPOSAL_TOPK_TRAIN": 2000,
            "TEST": (),
            "PROPOSAL_FILES_TEST": (),
            "PRECOMPUTED_PROPOSAL_TOPK_TEST": 1000,
        },
        "DATALOADER": {
            "NUM_WORKERS": 4,
            "ASPECT_RATIO_GROUPING": True,
            "SAMPLER_TRAIN": "TrainingSampler",
            "REPEAT_THRESHOLD": 0.0,
            "REPEAT_SQRT": True,
            "FILTER_EMPTY_ANNOTATIONS": True,
        },
        "SOLVER": {
            "LR_SCHEDULER_NAME": "WarmupMultiStepLR",
            "MAX_ITER": 40000,
            "BASE_LR": 0.001,
            "BASE_LR_END": 0.0,
            "MOMENTUM": 0.9,
            "NESTEROV": False,
            "WEIGHT_DECAY": 0.0001,
            "WEIGHT_DECAY_NORM": 0.0,
            "GAMMA": 0.1,
            "STEPS": (30000,),
            "NUM_DECAYS": 3,
            "WARMUP_FACTOR": 1.0 / 1000,
            "WARMUP_ITERS": 1000,
            "WARMUP_METHOD": "linear",
            "RESCALE_INTERVAL": False,
            "CHECKPOINT_PERIOD": 5000,
            "IMS_PER_BATCH": 16,
            "REFERENCE_WORLD_SIZE": 0,
            "BIAS_LR_FACTOR": 1.0,
            "WEIGHT_DECAY_BIAS": None,
            "CLIP_GRADIENTS": {"ENABLED": False, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0, "NORM_TYPE": 2.0},
            # DTYPE is ours: "float16" (with GradScaler) or "bfloat16" (no scaler needed).
            "AMP": {"ENABLED": False, "DTYPE": "float16"},
        },
        "TEST": {
            "EXPECTED_RESULTS": [],
            "EVAL_PERIOD": 0,
            "KEYPOINT_OKS_SIGMAS": [],
            "DETECTIONS_PER_IMAGE": 100,
            "AUG": {
                "ENABLED": False,
                "MIN_SIZES": (400, 500, 600, 700, 800, 900, 1000, 1100, 1200),
                "MAX_SIZE": 4000,
                "FLIP": True,
            },
            "PRECISE_BN": {"ENABLED": False, "NUM_ITER": 200},
        },
        "OUTPUT_DIR": "./output",
        "SEED": -1,
        "CUDNN_BENCHMARK": False,
        "FLOAT32_PRECISION": "",
        "VIS_PERIOD": 0,
        "GLOBAL": {"HACK": 1.0},
    }


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of the defaults."""
    return CfgNode(_defaults())


# Keys that exist so that detectron2's YAML files load, but whose feature this implementation does not
# have. Any value other than the default is an error naming the key (a detectron2 user who sets one
# expects it to act). Keys whose feature a *value* switches off elsewhere (e.g. MODEL.KEYPOINT_ON,
# ROI_BOX_HEAD.USE_FED_LOSS) are refused where the model reads them; these are read nowhere.
NOT_IMPLEMENTED: dict[str, str] = {
    "VERSION": "only version-2 configs are read; detectron2 upgrades older ones, we do not",
    "MODEL.RESNETS.DEFORM_MODULATED": "deformable convolutions are not implemented",
    "MODEL.RESNETS.DEFORM_NUM_GROUPS": "deformable convolutions are not implemented",
    "MODEL.ANCHOR_GENERATOR.ANGLES": "rotated anchors (RotatedAnchorGenerator) are not implemented",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": (
        "CascadeROIHeads takes one set per stage from MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS"
    ),
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": "the federated loss is not implemented",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": "the federated loss is not implemented",
    "INPUT.CROP.ENABLED": "random cropping is not implemented",
    "INPUT.CROP.TYPE": "random cropping is not implemented",
    "INPUT.CROP.SIZE": "random cropping is not implemented",
    "DATASETS.PROPOSAL_FILES_TRAIN": "precomputed proposals are not implemented",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN": "precomputed proposals are not implemented",
    "DATASETS.PROPOSAL_FILES_TEST": "precomputed proposals are not implemented",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST": "precomputed proposals are not implemented",
    "DATALOADER.SAMPLER_TRAIN": "only TrainingSampler is implemented",
    "DATALOADER.REPEAT_THRESHOLD": "RepeatFactorTrainingSampler is not implemented",
    "DATALOADER.REPEAT_SQRT": "RepeatFactorTrainingSampler is not implemented",
    "SOLVER.BASE_LR_END": "only WarmupMultiStepLR is implemented (BASE_LR_END is WarmupCosineLR's)",
    "SOLVER.NUM_DECAYS": "only WarmupMultiStepLR is implemented (NUM_DECAYS is WarmupStepWithFixedGammaLR's)",
    "SOLVER.RESCALE_INTERVAL": "only WarmupMultiStepLR is implemented (RESCALE_INTERVAL is WarmupStepWithFixedGammaLR's)",
    "SOLVER.REFERENCE_WORLD_SIZE": (
        "automatic rescaling of the batch, LR and schedule to the world size is not implemented; "
        "set SOLVER.IMS_PER_BATCH, BASE_LR, MAX_ITER and STEPS for the run"
    ),
    "TEST.EXPECTED_RESULTS": "checking results against expected values is not implemented",
    "TEST.KEYPOINT_OKS_SIGMAS": "keypoints are not implemented",
    "TEST.AUG.ENABLED": "test-time augmentation is not implemented",
    "TEST.AUG.MIN_SIZES": "test-time augmentation is not implemented",
    "TEST.AUG.MAX_SIZE": "test-time augmentation is not implemented",
    "TEST.AUG.FLIP": "test-time augmentation is not implemented",
    "TEST.PRECISE_BN.ENABLED": "precise BN is not implemented",
    "TEST.PRECISE_BN.NUM_ITER": "precise BN is not implemented",
    "FLOAT32_PRECISION": "setting torch's float32 matmul precision is not implemented",
    "VIS_PERIOD": "training visualizations are not implemented",
    "GLOBAL.HACK": "not used",
}


def get_key(cfg: dict, key: str) -> Any:
    """The value of the dotted `key` in `cfg`."""
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_supported(cfg: CfgNode, source: str = "config") -> None:
    """ConfigError listing every NOT_IMPLEMENTED key whose value is not the default."""
    defaults = get_cfg()
    problems = []
    for key, why in NOT_IMPLEMENTED.items():
        value, default = get_key(cfg, key), get_key(defaults, key)
        if _plain(value) != _plain(default):
            problems.append(f"{key}={value!r} is not supported: {why} (leave it at {default!r})")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def load_config(
    path: str | os.PathLike, opts: Iterable[str] | None = None, *, freeze: bool = False
) -> CfgNode:
    """Defaults, then `path` (after its `_BASE_` chain), then `KEY VALUE` pairs from `opts`.

    A key in NOT_IMPLEMENTED set to anything but its default is a ConfigError (check_supported).
    """
    cfg = get_cfg()
    merge_file_into(cfg, Path(path))
    if opts:
        merge_opts_into(cfg, list(opts), "command line")
    check_supported(cfg, f"{path}{' with the command-line overrides' if opts else ''}")
    return cfg.freeze() if freeze else cfg


def read_yaml_chain(path: Path, _seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file and its `_BASE_` ancestors, root first, as (path, mapping) pairs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"{path}: _BASE_ cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    chain: list[tuple[Path, dict]] = []
    if base:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: {BASE_KEY} must be a path string")
        base_path = Path(os.path.expanduser(base))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        chain = read_yaml_chain(base_path, (*_seen, resolved))
    chain.append((path, data))
    return chain


def merge_file_into(cfg: CfgNode, path: Path) -> None:
    for source, data in read_yaml_chain(path):
        _merge_mapping(cfg, data, prefix="", source=str(source))


def _merge_mapping(node: CfgNode, data: dict, prefix: str, source: str) -> None:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in node:
            raise ConfigError(f"{source}: unknown config key {full!r}{_suggest(node, key, prefix)}")
        current = node[key]
        if isinstance(current, CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full} is a group of keys, got the value {value!r}")
            _merge_mapping(current, value, f"{full}.", source)
        else:
            dict.__setitem__(node, key, _coerce(current, value, full, source))


def merge_opts_into(cfg: CfgNode, opts: list[str], source: str = "command line") -> None:
    if len(opts) % 2:
        raise ConfigError(f"{source}: overrides must be KEY VALUE pairs, got an odd count: {opts}")
    for key, raw in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i])
            if not isinstance(node, CfgNode) or part not in node:
                where = f"{prefix}." if prefix else ""
                raise ConfigError(f"{source}: unknown config key {key!r}{_suggest(node, part, where)}")
            if i < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CfgNode):
            raise ConfigError(f"{source}: {key} is a group of keys; set one of its leaves")
        value = _parse_literal(raw) if isinstance(raw, str) else raw
        dict.__setitem__(node, parts[-1], _coerce(node[parts[-1]], value, key, source))


def _suggest(node: Any, key: str, prefix: str) -> str:
    import difflib

    if not isinstance(node, dict):
        return ""
    close = difflib.get_close_matches(str(key), [str(k) for k in node], n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _coerce(default: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against the default's type the way yacs does (strings are parsed as literals)."""
    if isinstance(value, str) and not isinstance(default, str) and default is not None:
        value = _parse_literal(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) if isinstance(default, float) else _as_int(value, key, source)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    raise ConfigError(
        f"{source}: {key} expects {type(default).__name__} (default {default!r}), got {type(value).__name__} {value!r}"
    )


def _as_int(value: float | int, key: str, source: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
    return int(value)


def static_opts(canvas: Sequence) -> list[str]:
    """Config overrides that turn static-shape mode on for these (height, width) canvases, as the
    pipelines' `static_canvas` parameter gives them ([[800, 1344], [1344, 800]]); none when empty
    (dynamic mode, detectron2's own padding)."""
    if not canvas:
        return []
    pairs = []
    for entry in canvas:
        # KFP hands list parameters over as JSON numbers, so 800 arrives as 800.0.
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
                for v in entry
            )
        ):
            raise ConfigError(f"static_canvas entries must be [height, width] integer pairs, got {entry!r}")
        pairs.append((int(entry[0]), int(entry[1])))
    return ["MODEL.STATIC.ENABLED", "True", "MODEL.STATIC.CANVAS", repr(tuple(pairs))]
