"""Cascade Mask R-CNN, numerically equivalent to detectron2, for NPU, CUDA and CPU."""

__version__ = "0.1.0"
