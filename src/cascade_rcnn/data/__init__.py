"""Data pipeline: COCO reading, training/test mappers, samplers, loaders and the synthetic shapes set.

Submodules are imported on demand so that ``import cascade_rcnn.data`` stays cheap (no torch import).
"""
