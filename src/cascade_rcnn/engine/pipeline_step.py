"""Training and fine-tuning as one pipeline step: the step's parameters as config overrides, one
run through cascade_rcnn.engine.launch, and the record the step's Model artifact carries."""

from __future__ import annotations

from typing import Sequence

from .. import storage
from .launch import main_for
from .metrics import last_eval


def run_training_step(
    command: str,
    *,
    config: str,
    data: str,
    init: str,
    output: str,
    iterations: int,
    learning_rate: float,
    batch_per_device: int,
    nproc_per_node: int,
    accelerator: str,
    device: str,
    amp: bool,
    opts: Sequence = (),
) -> dict:
    """Run `cascade-rcnn train|finetune` from the checkpoint `init` into `output`; return the record.

    The LR steps sit at 2/3 and 8/9 of `iterations`, where detectron2's 1x and the 8-NPU reference
    recipe put them. `opts` ("KEY", "VALUE", ... pairs) come last and override anything. train
    starts from MODEL.WEIGHTS; finetune loads `--weights` and re-initialises what does not fit.
    With TEST.EVAL_PERIOD > 0 (in `opts` or the config) the record also carries the last evaluation:
    "eval" ({"bbox/AP": ..., "segm/AP": ..., ...}, detectron2's names) and "eval_iteration".
    """
    if command not in ("train", "finetune"):
        raise ValueError(f"command must be 'train' or 'finetune', got {command!r}")
    overrides = ["MODEL.DEVICE", device]
    argv = ["--config", config]
    if command == "train":
        overrides += ["MODEL.WEIGHTS", init]
    else:
        argv += ["--weights", init]
    overrides += [
        "SOLVER.MAX_ITER", str(iterations),
        "SOLVER.STEPS", f"({round(iterations * 2 / 3)}, {round(iterations * 8 / 9)})",
        "SOLVER.BASE_LR", str(learning_rate),
        "SOLVER.IMS_PER_BATCH", str(batch_per_device * nproc_per_node),
        "SOLVER.AMP.ENABLED", str(bool(amp)),
        *[str(x) for x in opts],
    ]  # fmt: skip
    argv += ["--data", data, "--output", output, "--nproc-per-node", str(nproc_per_node)]
    argv += ["--opts", *overrides]
    print(f"cascade-rcnn {command} " + " ".join(argv), flush=True)
    if main_for(command, argv) != 0:
        raise RuntimeError(f"{command} into {output} failed")
    final = storage.join(output, "model_final.pth")
    record = {
        "checkpoint_uri": final,
        "output_uri": output,
        "source": init,
        "sha256": storage.head(final).sha256,
        "format": "cascade_rcnn",
        "iterations": iterations,
        "accelerator": f"{nproc_per_node} x {accelerator}",
        "data": data,
        "config": config,
    }
    evaluation = last_eval(output)  # TEST.EVAL_PERIOD: the evaluation after the last iteration
    if evaluation is not None:
        record["eval_iteration"] = evaluation.pop("iteration")
        record["eval"] = evaluation
    return record
