"""COCO evaluation during training (TEST.EVAL_PERIOD), as detectron2's EvalHook with COCOEvaluator:
every rank runs its shard of each validation split, rank 0 computes the AP, and every rank gets the
result back (so all of them leave the evaluation together and agree on what it said)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import storage
from ..comm import broadcast_object, unwrap
from ..config import ConfigError

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def eval_splits(cfg, val_split: str | None) -> list[str]:
    """--val-split if given, else every DATASETS.TEST entry (detectron2 evaluates each of them)."""
    return [val_split] if val_split else [str(s) for s in cfg.DATASETS.TEST]


def eval_output(output: str, split: str, num_splits: int) -> str:
    """Where the files of `split`'s evaluation go: <output>/eval, or <output>/eval/<split> for several."""
    return storage.join(output, EVAL_DIR, split) if num_splits > 1 else storage.join(output, EVAL_DIR)


@dataclass
class TrainingEvaluator:
    """Evaluates the model being trained on the prepared validation splits.

    write_final_to: an output URI; the final evaluation then also writes evaluate_checkpoint's files
    (results JSON, metrics.json, reports) under eval_output(...), naming `final_weights` in them.
    """

    cfg: object
    splits: list  # of cascade_rcnn.evaluation.evaluate.EvalSplit
    device: torch.device
    write_final_to: str | None = None
    final_weights: str = ""
    evaluations: int = field(default=0, init=False)

    @classmethod
    def prepare(cls, cfg, data: str, names: list[str], device: torch.device, **kwargs) -> TrainingEvaluator:
        from ..evaluation.evaluate import prepare_split

        if not names:
            raise ConfigError(
                f"TEST.EVAL_PERIOD={cfg.TEST.EVAL_PERIOD} needs a validation split: "
                "set DATASETS.TEST in the config or pass --val-split"
            )
        splits = [prepare_split(data, name) for name in names]
        for split in splits:
            log.info(
                "evaluating every %d iterations on %s (%d images)",
                cfg.TEST.EVAL_PERIOD,
                split.name,
                len(split.records),
            )
        return cls(cfg, splits, device, **kwargs)

    def __call__(self, model: nn.Module, iteration: int, final: bool) -> dict:
        """{split: {task: {metric: value}}} of `model` after `iteration`, on every rank."""
        from ..evaluation.evaluate import evaluate_model, write_results

        module = unwrap(model)  # no DDP in inference: shards differ in length, nothing to reduce
        results = {}
        for split in self.splits:
            found = evaluate_model(module, self.cfg, split, device=self.device)
            if final and self.write_final_to and _rank() == 0:
                out = eval_output(self.write_final_to, split.name, len(self.splits))
                write_results(
                    out,
                    found.metrics,
                    found.predictions,
                    split,
                    weights=self.final_weights,
                    curves=found.curves,
                )
            results[split.name] = found.metrics
        self.evaluations += 1
        return broadcast_object(results)
