"""One process of a training run: build everything from the config, resume from the output's last
checkpoint if there is one, train, and leave `model_final.pth` under the output."""

from __future__ import annotations

import functools
import itertools
import logging
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import storage
from ..accel import Accelerator, accelerator_from_cfg
from ..comm import (
    DistInfo,
    broadcast_object,
    destroy_process_group,
    init_process_group,
    seed_all,
    shared_seed,
)
from ..config import ConfigError
from ..data.coco import DataError
from ..logs import setup_training_logging
from .checkpointer import FINAL, Checkpointer, restore_rng
from .metrics import MetricsWriter, is_eval_row
from .periodic_eval import TrainingEvaluator, eval_output, eval_splits
from .preemption import StopSignal, TrainingInterrupted
from .solver import build_grad_clipper, build_lr_scheduler, build_optimizer
from .trainer import Trainer, training_state

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainJob:
    """One `train` or `finetune` run: what `cascade-rcnn train|finetune`'s flags and the pipeline
    step's parameters say. Plain values, so it can be handed to spawned processes.

    config: the YAML file; `overrides()` turns the fields below into the config's overrides.
    init_weights: weights to start from when the output has no checkpoint. finetune: loaded as
    `--weights`, with the class-specific layers dropped when NUM_CLASSES differs; train: set as
    MODEL.WEIGHTS (before `opts`, which may override it). None: the config's MODEL.WEIGHTS.
    opts: KEY VALUE overrides, applied last.
    iterations, learning_rate, batch_per_device, device, amp: the pipeline step's schedule, set as
    SOLVER.MAX_ITER (with SOLVER.STEPS at 2/3 and 8/9 of it, where detectron2's 1x and the 8-NPU
    reference recipe put them), SOLVER.BASE_LR, SOLVER.IMS_PER_BATCH (times the node's workers),
    MODEL.DEVICE and SOLVER.AMP.ENABLED; None leaves the config's value.
    nproc_per_node: worker processes on this node (None or 0: PET_NPROC_PER_NODE, else 1).
    accelerator: the device plugin resource (e.g. huawei.com/Ascend910) of which this node's pod
    requested nproc_per_node; the run then fails at once unless MODEL.DEVICE finds that many devices
    (accel.require_requested). "": nothing requested, no check (the CLI, local runs).
    """

    config: str
    data: str
    output: str
    opts: list = field(default_factory=list)
    train_split: str | None = None
    val_split: str | None = None
    init_weights: str | None = None
    finetune: bool = False
    eval_after: bool = False
    keep_checkpoints: int = 0
    iterations: int | None = None
    learning_rate: float | None = None
    batch_per_device: int | None = None
    device: str | None = None
    amp: bool | None = None
    nproc_per_node: int | None = None
    accelerator: str = ""

    def overrides(self, nproc_per_node: int) -> list:
        """KEY VALUE pairs for config.load_config, typed values (no string round trip) and `opts` last."""
        pairs: list = []
        if self.device is not None:
            pairs += ["MODEL.DEVICE", self.device]
        if not self.finetune and self.init_weights:
            pairs += ["MODEL.WEIGHTS", self.init_weights]
        if self.iterations is not None:
            steps = (round(self.iterations * 2 / 3), round(self.iterations * 8 / 9))
            pairs += ["SOLVER.MAX_ITER", int(self.iterations), "SOLVER.STEPS", steps]
        if self.learning_rate is not None:
            pairs += ["SOLVER.BASE_LR", float(self.learning_rate)]
        if self.batch_per_device is not None:
            pairs += ["SOLVER.IMS_PER_BATCH", int(self.batch_per_device) * nproc_per_node]
        if self.amp is not None:
            pairs += ["SOLVER.AMP.ENABLED", bool(self.amp)]
        return [*pairs, *self.opts]


def batch_per_device(ims_per_batch: int, world_size: int) -> int:
    if ims_per_batch <= 0 or ims_per_batch % world_size:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={ims_per_batch} must be a positive multiple of the world size {world_size} "
            "(it is the total batch over all processes)"
        )
    return ims_per_batch // world_size


def train_splits(cfg, job: TrainJob) -> list[str]:
    if job.train_split:
        return [job.train_split]
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ConfigError("no training split: set DATASETS.TRAIN in the config or pass --train-split")
    return names


def load_train_records(cfg, job: TrainJob):
    """Records of every training split (concatenated) and the category metadata they share."""
    from ..data.splits import load_split

    records, meta = [], None
    for name in train_splits(cfg, job):
        recs, m = load_split(job.data, name)
        if meta is not None and m.thing_classes != meta.thing_classes:
            raise DataError(
                f"{job.data}: split {name!r} has classes {m.thing_classes}, others {meta.thing_classes}"
            )
        records += recs
        meta = m
    if meta.num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ConfigError(
            f"MODEL.ROI_HEADS.NUM_CLASSES={cfg.MODEL.ROI_HEADS.NUM_CLASSES} but {job.data} "
            f"({', '.join(train_splits(cfg, job))}) has {meta.num_classes} categories: {meta.thing_classes}"
        )
    return records, meta


def initialize_weights(model: nn.Module, cfg, job: TrainJob) -> dict:
    """Load the starting weights (no checkpoint yet); returns a summary for the checkpoint meta."""
    from ..checkpoint import CLASS_SPECIFIC_PATTERNS, load_pretrained, load_weights

    uri = (job.init_weights if job.finetune else None) or cfg.MODEL.WEIGHTS  # train: in MODEL.WEIGHTS
    if not uri:
        log.info("no initial weights: training from the model's own initialization")
        return {}
    drop = False
    weights = uri
    if job.finetune:
        weights = load_weights(uri)  # read once: counted here, loaded below (no second download)
        theirs = _num_classes_of(weights)
        ours = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        drop = theirs is not None and theirs != ours
        if drop:
            log.info(
                "%s has %d classes, the config %d: re-initializing the class-specific layers (%s), loading the rest",
                uri,
                theirs,
                ours,
                ", ".join(_matching_keys(model, CLASS_SPECIFIC_PATTERNS)),
            )
    _, report = load_pretrained(model, cfg, weights, drop_classes=drop)
    return {
        "init_weights": uri,
        "reinitialized": sorted(report.missing) if drop else [],
        "loaded": len(report.loaded),
        "model_tensors": report.expected,
    }


def _num_classes_of(weights) -> int | None:
    for name, tensor in weights.items():
        if name.endswith("cls_score.weight"):
            return int(tensor.shape[0]) - 1  # + background
    return None


def _matching_keys(model: nn.Module, patterns) -> list[str]:
    import re

    return [k for k in model.state_dict() if any(re.search(p, k) for p in patterns)]


def train(
    cfg, job: TrainJob, accel: Accelerator, info: DistInfo, stop: StopSignal | None = None
) -> str | None:
    """Train with this process's share of the batch; returns the final checkpoint URI on rank 0.
    stop: the process's SIGTERM flag; the run then checkpoints and raises TrainingInterrupted."""
    from ..data.loader import build_train_loader
    from ..modeling import build_model

    per_device = batch_per_device(int(cfg.SOLVER.IMS_PER_BATCH), info.world_size)
    ckpt = Checkpointer(job.output, is_writer=info.is_main, keep_last=job.keep_checkpoints)
    resume_uri = ckpt.last_checkpoint()
    state = ckpt.load(resume_uri) if resume_uri else None
    trainer_state = state["trainer"] if state else None

    seed = int(trainer_state["seed"]) if trainer_state else shared_seed(int(cfg.SEED))
    seed_all(seed + info.rank)
    log.info(
        "seed %d (rank %d uses %d)%s",
        seed,
        info.rank,
        seed + info.rank,
        " [from checkpoint]" if state else "",
    )

    model = build_model(cfg, accel.device)  # this worker's device, not local rank 0's
    init_summary: dict = {}
    if state is not None:
        model.load_state_dict(state["model"])
        init_summary = dict(state["meta"].get("init", {}))
    else:
        init_summary = initialize_weights(model, cfg, job)

    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    scaler = accel.grad_scaler()
    start_iter = 0
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        scaler.load_state_dict(trainer_state["scaler"])
        start_iter = int(trainer_state["iteration"]) + 1
        log.info("resuming from %s: iteration %d", resume_uri, start_iter)

    if info.world_size > 1:
        device_ids = None if accel.type == "cpu" else [accel.index]
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    records, data_meta = load_train_records(cfg, job)
    loader = build_train_loader(
        cfg,
        records,
        batch_per_device=per_device,
        rank=info.rank,
        world_size=info.world_size,
        seed=seed,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        start_iter=start_iter,
        pin_memory=accel.type != "cpu",
    )
    if trainer_state is not None:
        check_data_state(loader, trainer_state.get("data", {}))
    # Fetch the first batch now: starting a DataLoader iterator draws its base seed from torch's global
    # RNG. Restoring the RNG states after that draw (below) makes the model's random sampling continue
    # exactly where the checkpointed run left it.
    data_iter = iter(loader)
    data_iter = itertools.chain([next(data_iter)], data_iter)
    if trainer_state is not None:
        rng = trainer_state["rng"]
        if len(rng) == info.world_size:
            accel.set_rng_state(restore_rng(rng[info.rank]))
        else:
            log.warning(
                "checkpoint was written by %d processes, this run has %d: RNG states not restored",
                len(rng),
                info.world_size,
            )

    # An s3:// output gets its metrics files staged locally and copied at checkpoint time.
    staging = (
        tempfile.mkdtemp(prefix="cascade-rcnn-metrics-") if storage.is_s3(job.output) and info.is_main else ""
    )
    metrics = MetricsWriter(job.output, staging, start_iter, enabled=info.is_main)
    meta = {
        "config": cfg.dump(),
        "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "thing_classes": list(data_meta.thing_classes),
        "dataset": data_meta.to_dict(),
        "seed": seed,
        "init": init_summary,
        "world_size": info.world_size,
    }

    evaluator = None
    eval_period = int(cfg.TEST.EVAL_PERIOD)
    if eval_period > 0:
        evaluator = TrainingEvaluator.prepare(
            cfg,
            job.data,
            eval_splits(cfg, job.val_split),
            accel.device,
            write_final_to=job.output if job.eval_after else None,
            final_weights=ckpt.uri(FINAL),
        )

    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data_iter,
        accel=accel,
        max_iter=int(cfg.SOLVER.MAX_ITER),
        global_batch=int(cfg.SOLVER.IMS_PER_BATCH),
        scaler=scaler,
        clip_grads=build_grad_clipper(cfg),
        checkpointer=ckpt,
        checkpoint_period=int(cfg.SOLVER.CHECKPOINT_PERIOD),
        metrics=metrics,
        eval_period=eval_period,
        evaluate=evaluator,
        make_state=functools.partial(
            training_state, meta=meta, data_state=loader.state_dict, seed=seed, world_size=info.world_size
        ),
        defer_metrics=bool(cfg.MODEL.STATIC.ENABLED),
        stop=stop.__bool__ if stop is not None else None,
    )
    if start_iter >= trainer.max_iter and resume_uri and resume_uri.endswith("/" + FINAL):
        log.info(
            "%s already holds the final checkpoint of %d iterations; nothing to train",
            job.output,
            trainer.max_iter,
        )
        if evaluator is not None and broadcast_object(final_eval_missing(metrics, evaluator, job)):
            log.info("the final evaluation did not finish; evaluating %s", ckpt.uri(FINAL))
            trainer.run_eval(trainer.max_iter - 1, final=True)
        metrics.close()
    else:
        trainer.train(start_iter)
    return ckpt.uri(FINAL) if info.is_main else None


def final_eval_missing(metrics: MetricsWriter, evaluator: TrainingEvaluator, job: TrainJob) -> bool:
    """On rank 0: whether a run that ended in its final checkpoint lacks the final evaluation (killed
    during it), or the files --eval-after asks for."""
    if not metrics.enabled:
        return False
    final_iter = int(evaluator.cfg.SOLVER.MAX_ITER) - 1
    evals = [r["iteration"] for r in metrics.rows() if is_eval_row(r)]
    if not evals or evals[-1] != final_iter:
        return True
    if evaluator.write_final_to:
        n = len(evaluator.splits)
        return not all(
            storage.exists(storage.join(eval_output(job.output, s.name, n), "metrics.json"))
            for s in evaluator.splits
        )
    return False


def check_data_state(loader, saved: dict) -> None:
    """Make sure the resumed loader continues the interrupted run's batch stream (warn if it cannot)."""
    if not saved:
        return
    try:
        loader.load_state_dict(saved)
    except ValueError as e:
        log.warning("the data order after resuming differs from the interrupted run: %s", e)


def run_worker(cfg, job: TrainJob) -> str | None:
    """Entry point of every process (in-process, spawned by elastic_launch, or started by torchrun).

    cfg: the run's config, loaded once by launch.run_training (a CfgNode pickles as it is)."""
    setup_training_logging()
    info = DistInfo.from_env()
    accel = accelerator_from_cfg(cfg, info.local_rank)
    accel.set_device()
    if accel.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
    init_process_group(info, accel)
    stop = StopSignal().install()
    try:
        final = train(cfg, job, accel, info, stop)
    except TrainingInterrupted as e:
        if info.world_size > 1:
            log.warning("%s", e)  # every rank says where it stopped; a launcher reports one failure
        raise
    finally:
        stop.uninstall()
        destroy_process_group()
    # With TEST.EVAL_PERIOD the final evaluation during training already wrote the --eval-after files.
    if final and job.eval_after and int(cfg.TEST.EVAL_PERIOD) <= 0:
        evaluate_after(cfg, job, final)
    return final


def evaluate_after(cfg, job: TrainJob, weights: str) -> None:
    """--eval-after: evaluate `weights` on every validation split, files under eval_output(...)."""
    from ..evaluation import evaluate_checkpoint

    splits = eval_splits(cfg, job.val_split)
    if not splits:
        log.warning("--eval-after: no validation split (DATASETS.TEST or --val-split); skipping evaluation")
        return
    for split in splits:
        evaluate_checkpoint(cfg, weights, job.data, split, eval_output(job.output, split, len(splits)))
