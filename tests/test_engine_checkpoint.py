"""Training checkpoints: atomic save + pointer, resume lookup, corrupt files, pruning, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cascade_rcnn import storage
from cascade_rcnn.engine.checkpointer import (
    FINAL,
    POINTER,
    Checkpointer,
    TrainingCheckpointError,
    capture_rng,
    periodic_name,
    restore_rng,
)


def _payload(it: int) -> dict:
    return {
        "model": {"w": torch.full((3,), float(it))},
        "meta": {"iteration": it},
        "trainer": {
            "iteration": it,
            "rng": [capture_rng(None)],
            "optimizer": {"state": {}, "param_groups": []},
        },
    }


def _roundtrip(output: str) -> None:
    ck = Checkpointer(output)
    assert ck.last_checkpoint() is None
    ck.save(periodic_name(4), _payload(4))
    assert ck.last_checkpoint() == storage.join(output, "model_0000004.pth")
    assert storage.get_bytes(storage.join(output, POINTER)).decode() == "model_0000004.pth"
    ck.save(periodic_name(9), _payload(9))
    loaded = ck.load(ck.last_checkpoint())
    assert loaded["trainer"]["iteration"] == 9 and torch.equal(loaded["model"]["w"], torch.full((3,), 9.0))
    assert loaded["meta"]["format"].startswith("cascade_rcnn")
    # Everything loads with weights_only=True.
    raw = storage.get_bytes(storage.join(output, "model_0000009.pth"))
    import io

    torch.load(io.BytesIO(raw), weights_only=True)
    assert ck.list_periodic() == ["model_0000004.pth", "model_0000009.pth"]


def test_save_and_find_last_local(tmp_path):
    _roundtrip(str(tmp_path / "run"))


def test_save_and_find_last_s3(s3_env):
    _roundtrip(f"s3://{s3_env}/runs/r1")


def test_non_writer_ranks_do_not_write(tmp_path):
    ck = Checkpointer(str(tmp_path), is_writer=False)
    assert ck.save(periodic_name(0), _payload(0)) is None
    assert not (tmp_path / POINTER).exists()


def test_corrupt_checkpoint_is_reported_clearly(tmp_path):
    ck = Checkpointer(str(tmp_path))
    ck.save(periodic_name(1), _payload(1))
    ck.save(periodic_name(3), _payload(3))
    path = tmp_path / "model_0000003.pth"
    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    with pytest.raises(TrainingCheckpointError) as e:
        ck.load(ck.last_checkpoint())
    msg = str(e.value)
    assert "model_0000003.pth" in msg and "corrupt" in msg and "model_0000001.pth" in msg


def test_pointer_to_missing_file(tmp_path):
    ck = Checkpointer(str(tmp_path))
    (tmp_path / POINTER).write_text("model_0000042.pth")
    with pytest.raises(TrainingCheckpointError, match="model_0000042.pth.*does not exist"):
        ck.last_checkpoint()
    (tmp_path / POINTER).write_text("../elsewhere.pth")
    with pytest.raises(TrainingCheckpointError, match="expected a checkpoint file name"):
        ck.last_checkpoint()


def test_foreign_file_lacks_trainer_state(tmp_path):
    ck = Checkpointer(str(tmp_path))
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "model_0000000.pth")
    (tmp_path / POINTER).write_text("model_0000000.pth")
    with pytest.raises(TrainingCheckpointError, match="'trainer'"):
        ck.load(ck.last_checkpoint())


def test_keep_last_prunes_periodic_only(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=2)
    for it in (0, 1, 2, 3):
        ck.save(periodic_name(it), _payload(it))
    ck.save(FINAL, _payload(4))
    assert ck.list_periodic() == ["model_0000002.pth", "model_0000003.pth"]
    assert (tmp_path / FINAL).exists()
    assert (tmp_path / POINTER).read_text() == FINAL


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng(None)
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pth")
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
