"""Training metrics: windowed medians, the periodic log line, `metrics.jsonl` and TensorBoard events.

Evaluations during training (TEST.EVAL_PERIOD) add rows of their own to `metrics.jsonl`:
{"iteration": N, "bbox/AP": ..., "segm/AP50": ..., "bbox/AP-<class>": ...}, detectron2's names; with
several validation splits each key starts with the split ("val2017/bbox/AP"). NaN is stored as null.

Only rank 0 writes. For an s3:// output, `metrics.jsonl` and the event files are kept in a local
staging folder and copied to the output when a checkpoint is written, so they never run ahead of
the state a resumed run starts from: `snapshot` takes their bytes at the checkpoint, and the
checkpoint's background write uploads them (`sync` does both at once).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import storage

log = logging.getLogger(__name__)

LOG_PERIOD = 20  # iterations between log lines, as detectron2's PeriodicWriter
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class IterationRecord:
    """What one iteration reports, already reduced over ranks (losses averaged, data_time maxed)."""

    iteration: int
    losses: dict[str, float]
    lr: float
    iter_time: float
    data_time: float


@dataclass
class MetricWindows:
    """Sliding windows: losses and data_time over `window` iterations, iteration times over `eta_window`."""

    window: int = LOG_PERIOD
    eta_window: int = 1000
    losses: dict[str, deque] = field(default_factory=dict)
    data_times: deque = field(default_factory=deque)
    iter_times: deque = field(default_factory=deque)

    def add(self, rec: IterationRecord) -> None:
        for name, value in rec.losses.items():
            self.losses.setdefault(name, deque(maxlen=self.window)).append(value)
        _push(self.data_times, rec.data_time, self.window)
        _push(self.iter_times, rec.iter_time, self.eta_window)

    def summary(self, rec: IterationRecord, max_iter: int, global_batch: int, max_mem_mb: float) -> dict:
        """The values a log line shows, as a JSON-able dict."""
        losses = {k: statistics.median(v) for k, v in self.losses.items()}
        recent = list(self.iter_times)[-self.window :]
        iter_time = statistics.median(recent) if recent else float("nan")
        eta = statistics.median(self.iter_times) * (max_iter - rec.iteration - 1) if self.iter_times else 0.0
        return {
            "iteration": rec.iteration,
            "total_loss": sum(losses.values()),
            **losses,
            "lr": rec.lr,
            "time": iter_time,
            "img_per_s": global_batch / iter_time if iter_time > 0 else float("nan"),
            "data_time": statistics.median(self.data_times) if self.data_times else 0.0,
            "eta_seconds": eta,
            "max_mem_mb": max_mem_mb,
        }


def _push(d: deque, value: float, maxlen: int) -> None:
    d.append(value)
    while len(d) > maxlen:
        d.popleft()


def format_line(s: dict) -> str:
    """One log line: eta, iter, total_loss, each loss, lr, img/s, time, data_time, max_mem."""
    eta = str(datetime.timedelta(seconds=int(s["eta_seconds"])))
    losses = "  ".join(
        f"{k}: {v:.4g}" for k, v in s.items() if k.startswith("loss") and k not in ("total_loss",)
    )
    return (
        f"eta: {eta}  iter: {s['iteration']}  total_loss: {s['total_loss']:.4g}  {losses}  "
        f"lr: {s['lr']:.6g}  img/s: {s['img_per_s']:.2f}  time: {s['time']:.4f}  "
        f"data_time: {s['data_time']:.4f}  max_mem: {s['max_mem_mb']:.0f}M"
    )


class MetricsWriter:
    """Writes the periodic summaries of rank 0 to the log, `metrics.jsonl` and TensorBoard."""

    def __init__(
        self, output_uri: str, staging_dir: str | os.PathLike, start_iter: int, enabled: bool = True
    ):
        self.output_uri = output_uri
        self.enabled = enabled
        self.remote = output_uri.startswith("s3://")
        self.local_dir = Path(staging_dir) if self.remote else Path(storage.local_path(output_uri))
        self.jsonl_path = self.local_dir / METRICS_FILE
        self._tb = None
        self._tb_warned = False
        if enabled:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            self._restore(start_iter)

    def _restore(self, start_iter: int) -> None:
        """Bring back the history of earlier runs, minus entries past the iteration we resume from.

        A run killed between checkpoints logged iterations that will be trained again.
        """
        lines: list[str] = []
        if self.remote:
            uri = storage.join(self.output_uri, METRICS_FILE)
            if storage.exists(uri):
                lines = storage.get_bytes(uri).decode().splitlines()
        elif self.jsonl_path.exists():
            lines = self.jsonl_path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) < start_iter:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.jsonl_path.write_text("".join(x + "\n" for x in kept))

    def write(self, summary: dict) -> None:
        if not self.enabled:
            return
        log.info(format_line(summary))
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(summary) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            it = summary["iteration"]
            for key, value in summary.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    tb.add_scalar(key, value, it)
            tb.flush()

    def rows(self) -> list[dict]:
        """The rows written so far (rank 0; [] elsewhere), history of earlier runs included."""
        if not self.enabled or not self.jsonl_path.exists():
            return []
        out = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write_eval(self, iteration: int, results: dict[str, dict[str, dict[str, float]]]) -> dict:
        """Log, store and plot one evaluation: results is {split: {task: {metric: value}}}."""
        row = {"iteration": iteration, **flatten_eval(results)}
        if not self.enabled:
            return row
        from ..evaluation.report import format_table

        for split, metrics in results.items():
            log.info("evaluation at iteration %d on %s:\n%s", iteration, split, format_table(metrics))
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    tb.add_scalar(key, value, iteration)
            tb.flush()
        return row

    def _tensorboard(self):
        if self._tb is None and not self._tb_warned:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb_warned = True
                log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
                return None
            self._tb = SummaryWriter(log_dir=str(self.local_dir / TENSORBOARD_DIR))
        return self._tb

    def snapshot(self) -> Callable[[], None] | None:
        """metrics.jsonl and the event files as they are now, and the call that copies those bytes to
        an s3:// output later (on the checkpoint's background thread, while training appends more).
        None when there is nothing to copy (a local output, or not rank 0)."""
        if not (self.enabled and self.remote):
            return None
        if self._tb is not None:
            self._tb.flush()
        files = [(self.jsonl_path.read_bytes(), storage.join(self.output_uri, METRICS_FILE))]
        tb_dir = self.local_dir / TENSORBOARD_DIR
        if tb_dir.is_dir():
            for path in sorted(tb_dir.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(self.local_dir).as_posix()
                    files.append((path.read_bytes(), storage.join(self.output_uri, rel)))

        def upload() -> None:
            for data, uri in files:
                storage.put_bytes(data, uri)

        return upload

    def sync(self) -> None:
        """Copy metrics.jsonl and the event files to an s3:// output now (no-op for a local output)."""
        upload = self.snapshot()
        if upload is not None:
            upload()

    def close(self) -> None:
        self.sync()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def flatten_eval(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, float | None]:
    """{split: {task: {metric: v}}} -> {"task/metric": v} (one split) or {"split/task/metric": v}."""
    flat: dict[str, float | None] = {}
    for split, metrics in results.items():
        prefix = f"{split}/" if len(results) > 1 else ""
        for task, values in metrics.items():
            for name, value in values.items():
                value = float(value) if value is not None else None
                flat[f"{prefix}{task}/{name}"] = None if value is None or math.isnan(value) else value
    return flat


def is_eval_row(row: dict) -> bool:
    """Whether a metrics.jsonl row is an evaluation (its metric names hold a "/"); else a training one."""
    return any("/" in key for key in row)


def read_rows(output_uri: str) -> list[dict]:
    """The rows of `metrics.jsonl` under an output (local or s3://); [] when there is none."""
    uri = storage.join(output_uri, METRICS_FILE)
    if storage.is_s3(output_uri):
        text = storage.get_bytes(uri).decode() if storage.exists(uri) else ""
    else:
        path = Path(storage.local_path(uri))
        text = path.read_text() if path.exists() else ""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return rows


def last_eval(output_uri: str) -> dict | None:
    """The last evaluation row of an output's `metrics.jsonl` (None when it has none)."""
    evals = [r for r in read_rows(output_uri) if is_eval_row(r)]
    return evals[-1] if evals else None
