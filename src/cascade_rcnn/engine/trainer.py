"""The iteration loop: next(data) -> losses -> backward (scaled under AMP) -> optimizer and LR step,
with periodic metrics and checkpoints, as detectron2's SimpleTrainer/AMPTrainer with its default hooks.

Unlike detectron2's PeriodicCheckpointer, a checkpoint does not stop training for its write: the
state is copied to host memory and a background thread (engine/background.py) writes it and then
the pointer, while the loop goes on; the next checkpoint waits only if that write still runs, and
the final checkpoint waits for its own. On SIGTERM (engine/preemption.py) every rank finishes its
iteration, the ranks agree on it, its checkpoint is written and waited for, and the loop raises
TrainingInterrupted.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..accel import Accelerator
from ..comm import all_gather_objects, any_rank, is_distributed, reduce_step_metrics, unwrap
from .background import BackgroundWriter
from .checkpointer import FINAL, POINTER, Checkpointer, HostStaging, capture_rng, periodic_name, restore_rng
from .metrics import LOG_PERIOD, IterationRecord, MetricsWriter, MetricWindows
from .preemption import TrainingInterrupted

log = logging.getLogger(__name__)


def main_lr_group(optimizer: torch.optim.Optimizer) -> int:
    """Index of the param group with the most parameters, whose LR is the one logged (as detectron2)."""
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    return sizes.index(max(sizes))


@dataclass
class Trainer:
    """Runs iterations [start_iter, max_iter) of one process.

    model(batch) returns a dict of scalar losses; their plain sum is minimised.
    make_state(trainer, iteration) -> dict builds the checkpoint payload (called on every rank, saved
    by rank 0).
    evaluate(model, iteration, final) -> {split: {task: {metric: value}}} on every rank: called, as
    detectron2's EvalHook, after every `eval_period` iterations (after that iteration's checkpoint)
    and once more after the final checkpoint, when eval_period > 0. It may use any random number
    generator: their states are put back afterwards, so training continues exactly as without it.
    stop() -> bool: whether this process was asked to stop (a StopSignal); checked after every
    iteration, and the ranks stop together when any of them was. None: never stop early.
    background: write checkpoints on a background thread (False: in the loop, as detectron2 does).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: Iterator
    accel: Accelerator
    max_iter: int
    global_batch: int
    scaler: torch.amp.GradScaler | None = None
    clip_grads: Callable[[torch.optim.Optimizer], None] | None = None
    checkpointer: Checkpointer | None = None
    checkpoint_period: int = 0
    make_state: Callable[[Trainer, int], dict] | None = None
    metrics: MetricsWriter | None = None
    eval_period: int = 0
    evaluate: Callable[[nn.Module, int, bool], dict] | None = None
    log_period: int = LOG_PERIOD
    windows: MetricWindows = field(default_factory=MetricWindows)
    # Static mode: losses stay on the device and are read (and checked) every log_period steps,
    # before any checkpoint or evaluation, after backward(); no per-step host sync.
    defer_metrics: bool = False
    stop: Callable[[], bool] | None = None
    background: bool = True
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    staging: HostStaging = field(default_factory=HostStaging)
    # Seconds each checkpoint held up the loop (state gathered and copied, the previous write waited
    # for, or the whole write when not in the background); rank 0's are the ones that mean much.
    checkpoint_stalls: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = self.accel.grad_scaler()
        self._lr_group = main_lr_group(self.optimizer)
        self._pending: list[tuple[int, list[str], torch.Tensor, float, float, float]] = []

    def run_step(self, iteration: int) -> IterationRecord | None:
        """One iteration; raises FloatingPointError (on every rank) if any rank's loss is not finite.

        With defer_metrics the losses are queued on the device and None is returned (see flush_metrics).
        """
        start = time.perf_counter()
        batch = next(self.data)
        data_time = time.perf_counter() - start

        with self.accel.autocast():
            loss_dict = self.model(batch)
        losses = sum(loss_dict.values())
        if self.defer_metrics:
            names = sorted(loss_dict)
            values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names])
            self._optimize(losses)
            lr = self.optimizer.param_groups[self._lr_group]["lr"]
            self.scheduler.step()
            self._pending.append((iteration, names, values, lr, time.perf_counter() - start, data_time))
            return None

        mean_losses, max_data_time, per_rank = reduce_step_metrics(loss_dict, data_time, self.accel.device)
        bad = [
            f"rank {r}: " + ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if not math.isfinite(v))
            for r, d in enumerate(per_rank)
            if not all(math.isfinite(v) for v in d.values())
        ]
        if bad:
            raise FloatingPointError(
                f"loss became infinite or NaN at iteration {iteration}: "
                + "; ".join(bad)
                + f" (all losses: {per_rank})"
            )

        self._optimize(losses)
        lr = self.optimizer.param_groups[self._lr_group]["lr"]
        self.scheduler.step()
        return IterationRecord(iteration, mean_losses, lr, time.perf_counter() - start, max_data_time)

    def _optimize(self, losses: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses).backward()
        if self.clip_grads is not None:
            self.scaler.unscale_(self.optimizer)
            self.clip_grads(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def flush_metrics(self) -> list[IterationRecord]:
        """The queued iterations' records, reduced over ranks with one all_gather and one host read.

        Raises FloatingPointError naming the first iteration whose loss is not finite on some rank.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        names = pending[0][1]
        local = torch.stack([p[2] for p in pending])  # (k, num_losses), on the device
        finite = torch.isfinite(local).all(dim=1, keepdim=True).to(local.dtype)
        data = torch.tensor([[p[5]] for p in pending], dtype=local.dtype, device=local.device)
        local = torch.cat([local, finite, data], dim=1).to(self.accel.device)
        if is_distributed():
            import torch.distributed as dist

            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            table = torch.stack(gathered).cpu()
        else:
            table = local.unsqueeze(0).cpu()
        records = []
        for j, (iteration, _, _, lr, iter_time, _) in enumerate(pending):
            if not bool(table[:, j, -2].all()):
                per_rank = [dict(zip(names, row[:-2].tolist())) for row in table[:, j]]
                bad = [
                    f"rank {r}: "
                    + ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if not math.isfinite(v))
                    for r, d in enumerate(per_rank)
                    if not all(math.isfinite(v) for v in d.values())
                ]
                raise FloatingPointError(
                    f"loss became infinite or NaN at iteration {iteration}: "
                    + "; ".join(bad)
                    + f" (all losses: {per_rank})"
                )
            mean = dict(zip(names, table[:, j, :-2].mean(dim=0).tolist()))
            records.append(IterationRecord(iteration, mean, lr, iter_time, float(table[:, j, -1].max())))
        return records

    def train(self, start_iter: int) -> None:
        """Iterations start_iter .. max_iter-1, then the final checkpoint. Raises TrainingInterrupted
        after checkpointing the last finished iteration when stop() says so."""
        log.info("starting training at iteration %d of %d", start_iter, self.max_iter)
        self.model.train()
        try:
            self._loop(start_iter)
            self.save_final()
        except BaseException:
            self.writer.drain()  # whatever failed, a checkpoint already being written still lands
            raise

    def _loop(self, start_iter: int) -> None:
        for it in range(start_iter, self.max_iter):
            rec = self.run_step(it)
            last = it == self.max_iter - 1
            log_now = (it + 1) % self.log_period == 0 or last
            checkpointed = not last and self.checkpoint_period > 0 and (it + 1) % self.checkpoint_period == 0
            evaluating = not last and self.eval_period > 0 and (it + 1) % self.eval_period == 0
            if rec is None:
                if log_now or checkpointed or evaluating:
                    for r in self.flush_metrics():
                        self.windows.add(r)
                        rec = r
            else:
                self.windows.add(rec)
            if rec is not None and self.metrics is not None and log_now:
                summary = self.windows.summary(
                    rec, self.max_iter, self.global_batch, self.accel.max_memory_allocated_mb()
                )
                self.metrics.write(summary)
            if checkpointed:
                self.save(periodic_name(it), it)
            if evaluating:
                self.run_eval(it, final=False, sync=checkpointed)
            self.writer.raise_if_failed()
            if not last and self.stop_agreed():
                self._stop_after(it, checkpointed)

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop; the same answer on every rank (one small collective
        per call, none without a stop())."""
        return self.stop is not None and any_rank(bool(self.stop()))

    def _stop_after(self, iteration: int, checkpointed: bool) -> None:
        name = periodic_name(iteration)
        if not checkpointed:
            self.save(name, iteration)
        self.writer.wait()
        where = ""
        if self.checkpointer is not None and self.make_state is not None:
            where = self.checkpointer.uri(name)
        raise TrainingInterrupted(
            f"stopped on request (SIGTERM) after iteration {iteration}"
            + (f": {where} is stored and {POINTER} names it; " if where else "; ")
            + f"the same command (the step's retry) resumes at iteration {iteration + 1}",
            iteration,
            where,
        )

    def run_eval(self, iteration: int, *, final: bool, sync: bool = False) -> dict:
        """One evaluation after `iteration`, RNG-neutral; its row goes to the metrics (with `sync`
        also to an s3:// output, in the background)."""
        if self.evaluate is None:
            return {}
        # Inference draws from the generators too (a DataLoader iterator takes its base seed from
        # torch's); a resumed run never evaluated before it resumed, so put every stream back.
        rng = capture_rng(self.accel.rng_state())
        try:
            results = self.evaluate(self.model, iteration, final)
        finally:
            self.accel.set_rng_state(restore_rng(rng))
            self.model.train()
        row = self.metrics.write_eval(iteration, results) if self.metrics is not None else {}
        if sync and self.metrics is not None:
            # This iteration's checkpoint is written (or being written): its evaluation may land too.
            upload = self.metrics.snapshot()
            if upload is not None:
                self._write(upload, f"the metrics under {self.metrics.output_uri}")
        return row

    def _write(self, job: Callable[[], None], what: str) -> float:
        """job() in the background (after the previous one) or now; returns the seconds waited for
        the previous job."""
        if self.background:
            return self.writer.submit(job, what)
        job()
        return 0.0

    def save(self, name: str, iteration: int) -> None:
        """Checkpoint the state after `iteration` as `name`: built on every rank (it gathers their RNG
        states), copied to host memory and written by rank 0, in the background."""
        if self.checkpointer is None or self.make_state is None:
            return
        start = time.perf_counter()
        payload = self.make_state(self, iteration)
        if not self.checkpointer.is_writer:
            return
        waited = self.writer.wait()  # the previous write is done with the staging buffers
        upload_metrics = self.metrics.snapshot() if self.metrics is not None else None
        copied = time.perf_counter()
        if self.background:
            payload = self.staging.copy(payload)  # training may now change the live tensors
        copied = time.perf_counter() - copied
        checkpointer = self.checkpointer

        def write() -> None:
            if upload_metrics is not None:
                upload_metrics()  # metrics up to this iteration land with the checkpoint
            checkpointer.save(name, payload)

        self._write(write, checkpointer.uri(name))
        stall = time.perf_counter() - start
        self.checkpoint_stalls.append(stall)
        if self.background:
            log.info(
                "checkpoint %s: training held up %.2f s (%.2f s waiting for the previous write, "
                "state copied in %.2f s); writing it in the background",
                name, stall, waited, copied,
            )  # fmt: skip

    def save_final(self) -> None:
        """The final checkpoint, waited for; then the final evaluation, unless a stop was requested
        (the final checkpoint is stored: the retry only evaluates)."""
        self.save(FINAL, self.max_iter - 1)
        self.writer.wait()
        if self.eval_period > 0:
            if self.stop_agreed():
                raise TrainingInterrupted(
                    f"stopped on request (SIGTERM) after the final checkpoint "
                    f"{self.checkpointer.uri(FINAL) if self.checkpointer else ''}; the same command "
                    "(the step's retry) runs the final evaluation",
                    self.max_iter - 1,
                )
            self.run_eval(self.max_iter - 1, final=True)
        if self.metrics is not None:
            self.metrics.close()


def training_state(
    trainer: Trainer,
    iteration: int,
    *,
    meta: dict,
    data_state: Callable[[], dict],
    seed: int,
    world_size: int,
) -> dict:
    """The checkpoint payload after `iteration` completed; plain types and tensors only.

    data_state() returns the data loader's position (its `state_dict`)."""
    data = data_state()
    rng = all_gather_objects(capture_rng(trainer.accel.rng_state()))
    model_state = {k: v.detach().cpu() for k, v in unwrap(trainer.model).state_dict().items()}
    return {
        "model": model_state,
        "meta": {**meta, "iteration": iteration},
        "trainer": {
            "iteration": iteration,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "rng": rng,
            "data": data,
            "seed": seed,
            "world_size": world_size,
        },
    }
