"""Cascade Mask R-CNN R50-FPN, numerically equivalent to detectron2, built on torchvision.ops."""

from .meta_arch import CascadeMaskRCNN, build_model

__all__ = ["CascadeMaskRCNN", "build_model"]
