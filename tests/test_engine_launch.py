"""Command-line parsing, process layout from the environment, and batch splitting."""

from __future__ import annotations

import pytest

from cascade_rcnn.comm import DistInfo
from cascade_rcnn.config import ConfigError
from cascade_rcnn.engine.launch import build_parser, job_from_args
from cascade_rcnn.engine.run import batch_per_device


def test_batch_per_device_splits_the_global_batch():
    assert batch_per_device(16, 8) == 2
    assert batch_per_device(4, 1) == 4
    with pytest.raises(
        ValueError, match="SOLVER.IMS_PER_BATCH=6 must be a positive multiple of the world size 4"
    ):
        batch_per_device(6, 4)


def test_dist_info_from_torchrun_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert DistInfo.from_env() == DistInfo(0, 0, 1)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = DistInfo.from_env()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (5, 1, 8, False)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="RANK=8 is outside WORLD_SIZE=8"):
        DistInfo.from_env()


def test_train_and_finetune_arguments():
    args = build_parser("train").parse_args(
        ["--config", "c.yaml", "--data", "s3://b/coco", "--output", "s3://b/run", "--nproc-per-node", "8",
         "--opts", "SOLVER.MAX_ITER", "10", "SEED", "3"]
    )  # fmt: skip
    job = job_from_args("train", args)
    assert (job.config, job.data, job.output) == ("c.yaml", "s3://b/coco", "s3://b/run")
    assert (
        job.opts == ["SOLVER.MAX_ITER", "10", "SEED", "3"] and not job.finetune and job.init_weights is None
    )
    assert args.nproc_per_node == 8

    with pytest.raises(SystemExit):  # finetune needs --weights
        build_parser("finetune").parse_args(["--config", "c", "--data", "d", "--output", "o"])
    args = build_parser("finetune").parse_args(
        ["--config", "c", "--data", "d", "--output", "o", "--weights", "w.pkl"]
    )
    job = job_from_args("finetune", args)
    assert job.finetune and job.init_weights == "w.pkl"

    args = build_parser("train").parse_args(
        ["--config", "c", "--data", "d", "--output", "o", "--opts", "SEED"]
    )
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        job_from_args("train", args)


def test_output_defaults_to_the_configs_output_dir(tmp_path):
    from pathlib import Path

    config = str(
        Path(__file__).resolve().parents[1] / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml"
    )
    base = ["--config", config, "--data", "d"]
    job = job_from_args("train", build_parser("train").parse_args(base))
    assert job.output == "./output"  # detectron2's default OUTPUT_DIR
    args = build_parser("train").parse_args([*base, "--opts", "OUTPUT_DIR", str(tmp_path / "run")])
    assert job_from_args("train", args).output == str(tmp_path / "run")
    args = build_parser("train").parse_args([*base, "--output", "s3://b/r", "--opts", "OUTPUT_DIR", "x"])
    assert job_from_args("train", args).output == "s3://b/r"  # --output wins
    args = build_parser("train").parse_args([*base, "--opts", "OUTPUT_DIR", ""])
    with pytest.raises(ConfigError, match="OUTPUT_DIR is empty"):
        job_from_args("train", args)


def test_pipeline_step_settings_become_typed_overrides_before_opts():
    """TrainJob.overrides() gives the config the pipeline step's string opts used to give it."""
    import pickle
    from pathlib import Path

    from cascade_rcnn.config import load_config
    from cascade_rcnn.engine.run import TrainJob

    config = str(
        Path(__file__).resolve().parents[1] / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml"
    )
    job = TrainJob(
        config=config, data="d", output="o", init_weights="w.pkl", iterations=90, learning_rate=0.02,
        batch_per_device=2, device="cpu", amp=True, opts=["SOLVER.BASE_LR", "0.03"],
    )  # fmt: skip
    strings = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "w.pkl", "SOLVER.MAX_ITER", "90",
               "SOLVER.STEPS", "(60, 80)", "SOLVER.BASE_LR", "0.02", "SOLVER.IMS_PER_BATCH", "16",
               "SOLVER.AMP.ENABLED", "True", "SOLVER.BASE_LR", "0.03"]  # fmt: skip
    cfg = load_config(config, job.overrides(8))
    assert cfg == load_config(config, strings)
    assert cfg.SOLVER.BASE_LR == 0.03 and cfg.SOLVER.STEPS == (60, 80) and cfg.MODEL.WEIGHTS == "w.pkl"
    finetune = TrainJob(config=config, data="d", output="o", init_weights="w.pkl", finetune=True)
    assert finetune.overrides(1) == []  # finetune loads init_weights itself; the CLI sets nothing
    # The workers get the CfgNode itself: it pickles exactly (tuples stay tuples).
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and type(again.SOLVER) is type(cfg.SOLVER) and again.SOLVER.STEPS == (60, 80)
