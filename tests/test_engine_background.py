"""Background checkpoints and the stop on SIGTERM, on the small regression model of test_engine_loop.py
(the detector's end-to-end runs are in test_fault_tolerance.py)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_engine_loop import _trainer

from cascade_rcnn.accel import Accelerator
from cascade_rcnn.engine.background import BackgroundWriteError
from cascade_rcnn.engine.checkpointer import POINTER, Checkpointer
from cascade_rcnn.engine.preemption import TrainingInterrupted
from cascade_rcnn.engine.trainer import training_state
from cascade_rcnn.storage.retry import RETRY_ENV


def _checkpointing(trainer, output: str, period: int = 5):
    trainer.checkpointer = Checkpointer(output)
    trainer.checkpoint_period = period
    trainer.make_state = functools.partial(
        training_state, meta={}, data_state=lambda: {"iteration": 0}, seed=1, world_size=1
    )
    return trainer


def _load(path) -> dict:
    return torch.load(path, weights_only=True)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class SlowCheckpointer(Checkpointer):
    """Writes 0.3 s late: several training steps change the live tensors before the write starts."""

    def save(self, name, payload):
        time.sleep(0.3)
        return super().save(name, payload)


def test_background_checkpoints_hold_the_state_of_their_iteration(tmp_path):
    """The optimizer keeps changing the parameters and its momentum in place while the background
    thread writes: every checkpoint must still equal the one the synchronous write stores."""
    for background in (False, True):
        torch.manual_seed(0)
        run = tmp_path / str(background)
        trainer = _checkpointing(_trainer(run, Accelerator("cpu"), max_iter=23), str(run / "out"))
        trainer.checkpointer = SlowCheckpointer(str(run / "out"))
        trainer.background = background
        trainer.train(0)
        assert len(trainer.checkpoint_stalls) == 5  # iterations 4, 9, 14, 19 and the final one
    names = sorted(p.name for p in (tmp_path / "False" / "out").glob("model_*.pth"))
    assert names == [f"model_{i:07d}.pth" for i in (4, 9, 14, 19)] + ["model_final.pth"]
    for name in names:
        sync, bg = _load(tmp_path / "False" / "out" / name), _load(tmp_path / "True" / "out" / name)
        assert _equal(sync["model"], bg["model"]), name
        assert _equal(sync["trainer"]["optimizer"], bg["trainer"]["optimizer"]), name
        assert sync["trainer"]["iteration"] == bg["trainer"]["iteration"]
    assert (tmp_path / "True" / "out" / POINTER).read_text() == "model_final.pth"


def _dead_endpoint() -> str:
    """An address where no S3 server listens any more: connections are refused, as by a dead store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_write_failing_past_the_budget_fails_the_run_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", _dead_endpoint())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(RETRY_ENV, "2")
    trainer = _checkpointing(_trainer(tmp_path, Accelerator("cpu"), max_iter=400), "s3://bucket/run")
    trainer.metrics = None
    with pytest.raises(BackgroundWriteError) as info:
        trainer.train(0)
    message = str(info.value)
    assert message.startswith("writing s3://bucket/run/model_0000004.pth failed:")
    assert "still failing after 2 s" in message and RETRY_ENV in message
    assert not trainer.writer.busy


def test_a_stop_checkpoints_the_iteration_it_ends_and_raises(tmp_path):
    trainer = _checkpointing(_trainer(tmp_path, Accelerator("cpu"), max_iter=40), str(tmp_path / "out"))
    done: list[int] = []
    step = trainer.run_step
    trainer.run_step = lambda it: (done.append(it), step(it))[1]
    trainer.stop = lambda: len(done) >= 7  # the signal arrives during iteration 6
    with pytest.raises(TrainingInterrupted) as info:
        trainer.train(0)
    assert info.value.iteration == 6 and done == list(range(7))
    assert info.value.checkpoint == str(tmp_path / "out" / "model_0000006.pth")
    assert (tmp_path / "out" / POINTER).read_text() == "model_0000006.pth"
    assert _load(tmp_path / "out" / "model_0000006.pth")["trainer"]["iteration"] == 6
    assert "resumes at iteration 7" in str(info.value)


_RANKS = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_engine_loop import _trainer
    from test_engine_background import _checkpointing
    from cascade_rcnn.accel import Accelerator
    from cascade_rcnn.engine.checkpointer import Checkpointer
    from cascade_rcnn.engine.preemption import TrainingInterrupted
    from pathlib import Path

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = Path({out!r})
    trainer = _checkpointing(_trainer(out / str(rank), Accelerator("cpu"), max_iter=40), str(out / "ckpt"))
    trainer.checkpointer = Checkpointer(str(out / "ckpt"), is_writer=rank == 0)
    done = []
    step = trainer.run_step
    trainer.run_step = lambda it: (done.append(it), step(it))[1]
    # Only rank 1 is asked to stop, during its iteration 11.
    trainer.stop = lambda: rank == 1 and len(done) >= 12
    try:
        trainer.train(0)
        result = None
    except TrainingInterrupted as e:
        result = e.iteration
    (out / f"rank{{rank}}.json").write_text(json.dumps({{"stopped_after": result, "done": done}}))
    dist.destroy_process_group()
    """
)


def test_ranks_agree_on_the_iteration_they_stop_after(tmp_path):
    """A SIGTERM that reaches one rank only (one node of a multi-node job) stops every rank after
    the same iteration, and rank 0 checkpoints it."""
    import json

    script = tmp_path / "ranks.py"
    script.write_text(_RANKS.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**os.environ, "RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        )
        for r in (0, 1)
    ]
    assert [p.wait() for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["stopped_after"] for r in results] == [11, 11]
    assert [r["done"] for r in results] == [list(range(12))] * 2
    assert (tmp_path / "ckpt" / POINTER).read_text() == "model_0000011.pth"


def test_stop_signal_notes_sigterm_without_dying():
    code = textwrap.dedent(
        """
        import os, signal
        from cascade_rcnn.engine.preemption import StopSignal
        stop = StopSignal().install()
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.received == signal.SIGTERM
        stop.uninstall()
        print("noted")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "noted" in proc.stdout, proc.stderr
    assert proc.stderr.count("SIGTERM received") == 1  # logged once, however many arrive
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process is untouched
