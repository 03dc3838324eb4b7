"""Training engine: solver (SGD + warmup multi-step LR), the iteration loop, metrics, resumable
checkpoints in object storage, and the `train`/`finetune` commands with torchrun-style launch.

Submodules are imported on demand; `cascade_rcnn.engine.launch.run_training(TrainJob)` runs a training
(the pipeline's train/finetune steps and the `cascade-rcnn train|finetune` commands).
"""
