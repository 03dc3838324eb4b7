"""TEST.EVAL_PERIOD: COCO evaluation during training, as detectron2's EvalHook (every EVAL_PERIOD
iterations and after the last one), on every rank, without changing what training computes.

Same slim model, shapes set and settings as test_engine_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_engine_train import CONFIG, FAST, cli, final_weights, kill_after_first_checkpoint, run_ok

from cascade_rcnn import storage

VAL = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]  # inference at the training scale
RUN = [*FAST, *VAL, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]
EVERY_2 = [*RUN, "TEST.EVAL_PERIOD", "2"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    from cascade_rcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=12, num_val=4, seed=0, min_size=128, max_size=160)
    return str(root)


@pytest.fixture(scope="module")
def without_eval(shapes, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("without_eval")
    out = str(tmp / "out")
    run_ok(cli("train", shapes, out, RUN), tmp / "log.txt")
    return final_weights(out, tmp)


def rows_of(output: str) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of the output's metrics.jsonl."""
    rows = [
        json.loads(x) for x in storage.get_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()
    ]
    evals = [r for r in rows if "bbox/AP" in r]
    return [r for r in rows if r not in evals], evals


def assert_same_weights(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def test_eval_period_evaluates_and_leaves_training_unchanged(shapes, without_eval, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "out")
    text = run_ok(
        cli("train", shapes, out, EVERY_2, "--val-split", "val2017", "--eval-after"), tmp_path / "log"
    )
    # Evaluation swaps the model to eval mode and draws random numbers (the test loader's seed), yet
    # the weights after 6 iterations are bit-identical to a run that never evaluated.
    assert_same_weights(final_weights(out, tmp_path), without_eval)

    train_rows, evals = rows_of(out)
    assert [r["iteration"] for r in train_rows] == [5]
    assert [r["iteration"] for r in evals] == [1, 3, 5]  # every 2 iterations, the last one once
    for row in evals:
        for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/APm", "bbox/AP-circle", "segm/AP-triangle"):
            assert isinstance(row[key], float), (key, row)
        assert row["bbox/APl"] is None  # no large objects: NaN, stored as null
    assert evals[0]["bbox/AP"] > 20  # the fixture's trained weights find the shapes
    for it in (1, 3, 5):
        assert f"evaluation at iteration {it} on val2017:" in text
    assert "segm |" in text  # the AP table on stdout

    # --eval-after: the final evaluation during training wrote its files; no second evaluation ran.
    final = json.loads((Path(out) / "eval" / "metrics.json").read_text())
    assert final["bbox"]["AP"] == pytest.approx(evals[-1]["bbox/AP"])
    assert (Path(out) / "eval" / "report.html").is_file()
    assert "evaluating " + str(Path(out) / "model_final.pth") not in text

    events = EventAccumulator(str(Path(out) / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("bbox/AP")]
    assert steps == [1, 3, 5] and "segm/AP-square" in events.Tags()["scalars"]


def test_kill_and_resume_with_eval_period_is_exact(shapes, without_eval, tmp_path, s3_env):
    output = f"s3://{s3_env}/runs/eval-resume"
    cmd = cli("train", shapes, output, EVERY_2, "--val-split", "val2017")
    named = kill_after_first_checkpoint(cmd, output, tmp_path / "killed.txt")
    assert named.startswith("model_000000"), named
    text = run_ok(cmd, tmp_path / "resumed.txt")
    assert "resuming from" in text
    assert_same_weights(final_weights(output, tmp_path), without_eval)
    train_rows, evals = rows_of(output)
    assert [r["iteration"] for r in train_rows] == [5]
    # The kill may come before the evaluation after the first checkpoint; none is ever duplicated.
    iterations = [r["iteration"] for r in evals]
    assert iterations in ([1, 3, 5], [3, 5]), iterations


def test_final_evaluation_killed_is_done_by_the_rerun(shapes, tmp_path):
    """A run killed between model_final and its evaluation: the rerun trains nothing and evaluates."""
    from cascade_rcnn.engine.metrics import METRICS_FILE

    out = tmp_path / "out"
    opts = [*FAST, *VAL, "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "2"]
    cmd = cli("train", shapes, str(out), opts, "--val-split", "val2017")
    run_ok(cmd, tmp_path / "first.txt")
    rows = (out / METRICS_FILE).read_text().splitlines()
    assert "bbox/AP" in rows[-1]
    (out / METRICS_FILE).write_text("\n".join(rows[:-1]) + "\n")  # as if killed during the evaluation
    text = run_ok(cmd, tmp_path / "rerun.txt")
    assert "nothing to train" in text and "the final evaluation did not finish" in text
    assert [r["iteration"] for r in rows_of(str(out))[1]] == [1]
    text = run_ok(cmd, tmp_path / "again.txt")
    assert "nothing to train" in text and "did not finish" not in text


@pytest.mark.slow
def test_two_processes_evaluate_their_shards(shapes, tmp_path):
    from cascade_rcnn.config import load_config
    from cascade_rcnn.evaluation import evaluate_checkpoint

    out = str(tmp_path / "out")
    opts = [*FAST, *VAL, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "2"]
    text = run_ok(
        cli("train", shapes, out, opts, "--val-split", "val2017", "--eval-after", "--nproc-per-node", "2"),
        tmp_path / "log.txt",
    )
    assert "starting 2 workers" in text
    # Each rank ran inference on its half of the 4 validation images.
    assert "rank 0/2: inference on 2 images" in text
    _, evals = rows_of(out)
    assert [r["iteration"] for r in evals] == [1, 3]
    results = json.loads((Path(out) / "eval" / "coco_instances_results.json").read_text())
    val = json.loads(Path(shapes, "annotations", "instances_val2017.json").read_text())
    assert {r["image_id"] for r in results} == {im["id"] for im in val["images"]}  # both shards
    # The same numbers as one process evaluating the final checkpoint on its own.
    alone = evaluate_checkpoint(
        load_config(CONFIG, [*opts, "DATALOADER.NUM_WORKERS", "0"]),
        storage.join(out, "model_final.pth"),
        shapes,
        "val2017",
        report=False,
    )
    for task in ("bbox", "segm"):
        assert evals[-1][f"{task}/AP"] == pytest.approx(alone[task]["AP"], abs=0.05), task


def test_pipeline_step_record_carries_the_last_evaluation(shapes, tmp_path):
    from cascade_rcnn.engine.launch import TrainJob, run_training

    out = str(tmp_path / "out")
    record = run_training(
        TrainJob(
            config=CONFIG,
            data=shapes,
            init_weights=FAST[FAST.index("MODEL.WEIGHTS") + 1],
            output=out,
            iterations=2,
            learning_rate=0.01,
            batch_per_device=2,
            nproc_per_node=1,
            accelerator="cpu",
            device="cpu",
            amp=False,
            opts=[*FAST, *VAL, "TEST.EVAL_PERIOD", "1"],  # validation: DATASETS.TEST (coco_2017_val)
        )
    )
    _, evals = rows_of(out)
    assert [r["iteration"] for r in evals] == [0, 1]
    assert record["eval_iteration"] == 1
    assert record["eval"] == {k: v for k, v in evals[-1].items() if k != "iteration"}
    assert record["eval"]["bbox/AP"] > 0 and "segm/AP" in record["eval"]
    json.dumps(record, allow_nan=False)  # fits a KFP artifact's metadata


def test_eval_period_without_a_validation_split_is_an_error(shapes):
    from cascade_rcnn.config import load_config
    from cascade_rcnn.engine.periodic_eval import TrainingEvaluator, eval_splits

    cfg = load_config(CONFIG, ["TEST.EVAL_PERIOD", "100", "DATASETS.TEST", "()"])
    with pytest.raises(ValueError, match=r"TEST.EVAL_PERIOD=100 needs a validation split.*--val-split"):
        TrainingEvaluator.prepare(cfg, shapes, eval_splits(cfg, None), torch.device("cpu"))
    cfg = load_config(CONFIG, ["DATASETS.TEST", "('coco_2017_val', 'val2017')"])
    assert eval_splits(cfg, None) == ["coco_2017_val", "val2017"] and eval_splits(cfg, "x") == ["x"]
