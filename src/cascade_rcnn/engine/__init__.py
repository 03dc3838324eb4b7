"""Training engine: solver (SGD + warmup multi-step LR), the iteration loop, metrics, resumable
checkpoints in object storage, and the `train`/`finetune` commands with torchrun-style launch.

Submodules are imported on demand; `cascade_rcnn.engine.launch` is the command-line entry point.
"""
