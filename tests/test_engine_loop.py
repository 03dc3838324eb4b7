"""The iteration loop on a small regression model: logging, metrics files, non-finite losses, AMP."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from cascade_rcnn.accel import Accelerator
from cascade_rcnn.config import get_cfg
from cascade_rcnn.engine.metrics import METRICS_FILE, MetricsWriter
from cascade_rcnn.engine.solver import build_lr_scheduler, build_optimizer
from cascade_rcnn.engine.trainer import Trainer


class Regressor(nn.Module):
    """model(list[dict]) -> dict of losses, with random sampling of the terms like the detector's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 1)
        self.norm = nn.LayerNorm(8)
        self.poison = False

    def forward(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        err = (self.fc(self.norm(x)).squeeze(1) - y) ** 2
        keep = torch.randperm(len(batch))[: max(1, len(batch) // 2)]
        loss_fit = err[keep].mean().float()
        if self.poison:
            loss_fit = loss_fit * float("nan")
        return {"loss_fit": loss_fit, "loss_l1": 0.01 * self.fc.weight.abs().sum()}


def batches(seed: int, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.arange(8.0) / 8
    while True:
        xs = torch.randn(batch, 8, generator=g)
        yield [{"x": x, "y": (x * w).sum()} for x in xs]


def _trainer(tmp_path, accel: Accelerator, max_iter: int = 45, model: nn.Module | None = None) -> Trainer:
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 5
    cfg.SOLVER.STEPS = (30,)
    cfg.SOLVER.MAX_ITER = max_iter
    torch.manual_seed(0)
    model = model or Regressor()
    opt = build_optimizer(cfg, model)
    return Trainer(
        model=model,
        optimizer=opt,
        scheduler=build_lr_scheduler(cfg, opt),
        data=batches(1),
        accel=accel,
        max_iter=max_iter,
        global_batch=4,
        metrics=MetricsWriter(str(tmp_path), tmp_path / "staging", 0),
    )


def test_loop_logs_and_writes_metrics(tmp_path, caplog):
    trainer = _trainer(tmp_path, Accelerator("cpu"))
    with caplog.at_level(logging.INFO, logger="cascade_rcnn.engine.metrics"):
        trainer.train(0)
    lines = [r.getMessage() for r in caplog.records if "iter:" in r.getMessage()]
    assert len(lines) == 3  # iterations 19, 39 and the last (44)
    for key in (
        "eta:",
        "iter:",
        "total_loss:",
        "loss_fit:",
        "loss_l1:",
        "lr:",
        "img/s:",
        "data_time:",
        "max_mem:",
    ):
        assert key in lines[0], (key, lines[0])
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [19, 39, 44]
    for r in rows:
        assert r["img_per_s"] > 0 and r["eta_seconds"] >= 0 and r["max_mem_mb"] > 0
        assert r["total_loss"] == pytest.approx(r["loss_fit"] + r["loss_l1"])
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[2]["lr"] == pytest.approx(0.001)
    assert rows[-1]["eta_seconds"] == 0
    assert rows[-1]["loss_fit"] < rows[0]["loss_fit"]  # it learns
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resumed_metrics_drop_entries_past_the_checkpoint(tmp_path):
    (tmp_path / METRICS_FILE).write_text(
        "\n".join(json.dumps({"iteration": i}) for i in (19, 39, 59)) + '\n{"iteration": 7'  # cut by a kill
    )
    MetricsWriter(str(tmp_path), tmp_path / "staging", start_iter=40)
    kept = [json.loads(x)["iteration"] for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert kept == [19, 39]


def test_non_finite_loss_raises_naming_the_loss(tmp_path):
    model = Regressor()
    trainer = _trainer(tmp_path, Accelerator("cpu"), model=model)
    trainer.run_step(0)
    model.poison = True
    with pytest.raises(FloatingPointError, match=r"iteration 1: rank 0: loss_fit=nan"):
        trainer.run_step(1)


def test_bf16_autocast_loop_runs_on_cpu(tmp_path):
    trainer = _trainer(tmp_path, Accelerator("cpu", amp_dtype=torch.bfloat16), max_iter=25)
    assert not trainer.scaler.is_enabled()
    first = trainer.run_step(0).losses["loss_fit"]
    trainer.train(1)
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows[-1]["loss_fit"] < first
    assert trainer.model.fc.weight.dtype == torch.float32  # master weights stay fp32


def test_evaluation_hook_iterations_train_mode_and_rng(tmp_path):
    import random

    import numpy as np

    reference = _trainer(tmp_path / "a", Accelerator("cpu"), max_iter=10)
    reference.train(0)
    calls = []

    def evaluate(model, iteration, final):
        # An evaluation that leaves the model in eval mode and draws from every generator.
        model.eval()
        torch.rand(5), random.random(), np.random.rand()
        calls.append((iteration, final))
        return {"val": {"bbox": {"AP": 50.0 + iteration, "APl": float("nan")}}}

    trainer = _trainer(tmp_path / "b", Accelerator("cpu"), max_iter=10)
    trainer.eval_period, trainer.evaluate = 4, evaluate
    modes = []
    step = trainer.run_step
    trainer.run_step = lambda it: (modes.append(trainer.model.training), step(it))[1]
    trainer.train(0)
    assert calls == [(3, False), (7, False), (9, True)]  # every 4 iterations, then after the last
    assert all(modes)  # every step ran in train mode, evaluation or not
    for k, v in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k  # the random streams were put back
    rows = [json.loads(x) for x in (tmp_path / "b" / METRICS_FILE).read_text().splitlines()]
    evals = [r for r in rows if "bbox/AP" in r]
    assert evals == [{"iteration": i, "bbox/AP": 50.0 + i, "bbox/APl": None} for i in (3, 7, 9)]


def test_deferred_metrics_match_per_step_metrics(tmp_path):
    """defer_metrics (static mode) reads the losses every log_period steps; the rows are the same."""
    rows = {}
    for defer in (False, True):
        out = tmp_path / str(defer)
        out.mkdir()
        trainer = _trainer(out, Accelerator("cpu"))
        trainer.defer_metrics = defer
        trainer.train(0)
        rows[defer] = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    drop = ("time", "data_time", "eta_seconds", "max_mem_mb", "img_per_s")  # timings
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in rows[d]] for d in (False, True)]
    assert len(strip[0]) == 3 and strip[0] == strip[1]


def test_deferred_metrics_raise_naming_the_first_non_finite_iteration(tmp_path):
    model = Regressor()
    trainer = _trainer(tmp_path, Accelerator("cpu"), model=model)
    trainer.defer_metrics = True
    assert trainer.run_step(0) is None and trainer.run_step(1) is None
    model.poison = True
    trainer.run_step(2)
    trainer.run_step(3)
    with pytest.raises(FloatingPointError, match=r"iteration 2: rank 0: loss_fit=nan"):
        trainer.flush_metrics()
