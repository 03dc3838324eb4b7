"""Weights in and out of the model: detectron2, Caffe2/MSRA, torchvision and our own checkpoints.

- `unpickle`: the restricted unpickler used for every `.pkl` (numpy arrays, dtypes and plain
  containers only) and torch.load(weights_only=True);
- `formats`: `load_weights` reads any supported file (local path, ``file://``, ``s3://`` or a
  weights URL, see `cascade_rcnn.weight_sources`) into a flat {name: Tensor} state with the
  format it was recognised as;
- `names`: Caffe2/torchvision -> detectron2 names, and matching by longest ``.``-suffix;
- `load` and `report`: `load_into_model`, non-strict loading with detectron2-style grouped reports
  of missing, unexpected and shape-mismatched keys;
- `ours`: `save_checkpoint` / `load_checkpoint`, a torch.save'd dict of tensors and plain values
  that always loads with ``torch.load(weights_only=True)``.

Nothing here ever calls plain ``pickle.load`` or ``torch.load(weights_only=False)``.
"""

from .errors import CheckpointError
from .formats import WeightsFile, load_weights
from .load import (
    CLASS_SPECIFIC_PATTERNS,
    TORCHVISION_PIXEL_MEAN,
    TORCHVISION_PIXEL_STD,
    check_weights_config,
    drop_class_specific,
    load_into_model,
    load_pretrained,
)
from .names import align_by_suffix, c2_name_to_d2, convert_c2_names, convert_torchvision_names
from .ours import OUR_FORMAT_TAG, load_checkpoint, save_checkpoint
from .report import LoadReport, group_keys
from .unpickle import UnsafePickleError, restricted_unpickle

__all__ = [
    "CLASS_SPECIFIC_PATTERNS",
    "OUR_FORMAT_TAG",
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "CheckpointError",
    "LoadReport",
    "UnsafePickleError",
    "WeightsFile",
    "align_by_suffix",
    "c2_name_to_d2",
    "check_weights_config",
    "convert_c2_names",
    "convert_torchvision_names",
    "drop_class_specific",
    "group_keys",
    "load_checkpoint",
    "load_into_model",
    "load_pretrained",
    "load_weights",
    "restricted_unpickle",
    "save_checkpoint",
]
