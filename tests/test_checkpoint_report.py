"""What load_into_model reports after loading our own checkpoints: complete loads read as complete,
and a finetune that drops the class layers reports exactly those; finetune reads its weights once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cascade_rcnn import storage
from cascade_rcnn.checkpoint import load_pretrained, load_weights
from cascade_rcnn.config import load_config
from cascade_rcnn.engine.checkpointer import Checkpointer
from cascade_rcnn.modeling import build_model

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"
CONFIG = str(FIXTURE / "config.yaml")
CLASS_LAYERS = {f"roi_heads.box_predictor.{s}.cls_score.{p}" for s in range(3) for p in ("weight", "bias")}
CLASS_LAYERS |= {"roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}


def _cfg(*opts: str):
    return load_config(CONFIG, ["MODEL.DEVICE", "cpu", *opts])


def _trained_checkpoint(cfg, output: str) -> tuple[str, dict[str, torch.Tensor]]:
    """A model with every tensor perturbed, saved the way the trainer saves (Checkpointer, our format)."""
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": state, "meta": {"config": cfg.dump()}, "trainer": {"iteration": 3}}
    return Checkpointer(output).save("model_final.pth", payload), state


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_our_checkpoint_loads_completely(norm, tmp_path, caplog):
    cfg = _cfg("MODEL.RESNETS.NORM", norm)
    uri, saved = _trained_checkpoint(cfg, str(tmp_path / "out"))
    model = build_model(cfg, "cpu")
    counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    assert bool(counters) == (norm == "BN")
    with caplog.at_level(logging.INFO, logger="cascade_rcnn.checkpoint"):
        weights, report = load_pretrained(model, cfg, uri)
    assert weights.format == "ours"
    assert report.complete and not report.missing and not report.unexpected and not report.shape_mismatch
    expected = len(saved) - len(counters)
    assert report.expected == expected and len(report.loaded) == expected
    # FrozenBN statistics are state (counted and loaded); non-persistent buffers are not counted.
    assert "backbone.bottom_up.stem.conv1.norm.running_var" in report.loaded
    assert not any("pixel_mean" in k or "cell_anchors" in k for k in report.loaded)
    assert f"loaded {expected} of {expected} model tensors" in caplog.text
    assert str(report) == f"Loaded {expected} of {expected} model tensors."
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if k not in counters)


def test_dropping_class_layers_reports_exactly_those(tmp_path, caplog):
    cfg = _cfg()
    uri, saved = _trained_checkpoint(cfg, str(tmp_path / "out"))
    model = build_model(cfg, "cpu")
    with caplog.at_level(logging.INFO, logger="cascade_rcnn.checkpoint"):
        _, report = load_pretrained(model, cfg, uri, drop_classes=True)
    assert set(report.missing) == CLASS_LAYERS and not report.unexpected and not report.complete
    assert len(report.loaded) == report.expected - len(CLASS_LAYERS) == len(saved) - len(CLASS_LAYERS)
    assert f"loaded {len(saved) - 8} of {len(saved)} model tensors, 8 missing" in caplog.text


def test_finetune_reads_s3_weights_once_and_summarizes_truthfully(tmp_path, s3_env, caplog):
    from cascade_rcnn.engine.run import TrainJob, initialize_weights

    uri, saved = _trained_checkpoint(_cfg(), f"s3://{s3_env}/base")  # 3 classes
    cfg = _cfg("MODEL.ROI_HEADS.NUM_CLASSES", "2")
    model = build_model(cfg, "cpu")
    job = TrainJob(config=CONFIG, data="unused", output=str(tmp_path), init_weights=uri, finetune=True)
    with caplog.at_level(logging.INFO):
        summary = initialize_weights(model, cfg, job)
    downloads = [r for r in caplog.records if r.getMessage() == f"Downloading {uri}"]
    assert len(downloads) == 1, [r.getMessage() for r in caplog.records]
    assert set(summary["reinitialized"]) == CLASS_LAYERS
    assert summary["model_tensors"] == len(saved)
    assert summary["loaded"] == len(saved) - len(CLASS_LAYERS)
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if k not in CLASS_LAYERS)
    assert storage.exists(uri)


def test_load_pretrained_takes_loaded_weights(tmp_path):
    cfg = _cfg()
    uri, saved = _trained_checkpoint(cfg, str(tmp_path / "out"))
    weights = load_weights(uri)
    model = build_model(cfg, "cpu")
    again, report = load_pretrained(model, cfg, weights)
    assert again is weights and report.complete and len(report.loaded) == len(saved)


def test_filled_bn_statistics_are_counted_apart_from_loaded_ones(tmp_path):
    cfg = _cfg()
    _, saved = _trained_checkpoint(cfg, str(tmp_path / "out"))
    fused = {k: v for k, v in saved.items() if not k.endswith(("running_mean", "running_var"))}
    model = build_model(cfg, "cpu")
    from cascade_rcnn.checkpoint import load_into_model

    report = load_into_model(model, fused)
    stats = sorted(set(saved) - set(fused))
    assert stats and report.filled_bn_stats == stats and report.complete
    assert len(report.loaded) == len(fused) and len(report.loaded) + len(stats) == report.expected
    assert "BN statistics set to mean 0 / var 1" in report.summary()
