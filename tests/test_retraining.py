"""The retraining pipeline under kfp.local against SeaweedFS, run after run on one bucket as a
schedule runs it: the first model is promoted, unchanged data skips, force trains anyway and a worse
challenger is evaluated and rejected, more data trains a challenger against a re-evaluated champion,
a static-shape run re-evaluates the champion in static mode; and the user's path,
`python -m pipelines run-local --pipeline retraining`, twice."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cascade_rcnn import storage
from pipelines.run_local import LocalSettings, run_retrain_local

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("d2_parity")]
REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "d2_parity"
SIZES = dict(min_size=128, max_size=192)
TINY = LocalSettings(iterations=2, finetune_iterations=2, train_images=6, val_images=4, batch=2, **SIZES)
# The fixture's slim model, trained on shapes by detectron2, on small inputs: the champion starts
# good, so a challenger from a random initialisation is clearly worse.
OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.WARMUP_ITERS", "1",
    "TEST.EVAL_PERIOD", "1",  # AP after every iteration: the training curves' and comparison's AP
    "SEED", "5",
]  # fmt: skip
STATIC = [[192, 192]]
FIXTURE_RUN = dict(
    config=str(FIXTURE / "config.yaml"),
    config_opts=OPTS,
    weights=str(FIXTURE / "model_final.pkl"),
    weights_sha256="",
    learning_rate=1e-4,
    warm_start_learning_rate=1e-4,
    model_name="shapes-fixture",
)


def random_init(path: Path) -> str:
    import torch

    from cascade_rcnn.checkpoint import save_checkpoint
    from cascade_rcnn.config import load_config
    from cascade_rcnn.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load_config(FIXTURE_RUN["config"], OPTS))
    save_checkpoint(str(path), model.state_dict(), {"source": "random initialisation (test)"})
    return str(path)


def tasks_run(summary: dict) -> set:
    return set(summary["steps"])


@pytest.fixture(scope="module")
def schedule(s3_server, tmp_path_factory):
    """The runs of one 'schedule': same workdir, bucket and registry; each call is the next run."""
    workdir = tmp_path_factory.mktemp("retrain")
    bucket = f"retrain-{uuid.uuid4().hex[:12]}"
    runs = []

    def run(**overrides):
        summary = run_retrain_local(workdir, TINY, server=s3_server, bucket=bucket,
                                    overrides={**FIXTURE_RUN, **overrides})  # fmt: skip
        for name in ("comparison.md", "comparison.html", "training_curves.html", "report.html"):
            path = workdir / name  # the next run replaces them
            summary[name] = path.read_text() if path.is_file() else None
        runs.append(summary)
        return summary

    return run, runs, workdir


@pytest.fixture(scope="module")
def history(schedule):
    """Run the schedule once: first run, unchanged, forced worse, more data."""
    run, runs, workdir = schedule
    from cascade_rcnn.data.shapes import make_shapes

    run()
    run()
    run(force=True, warm_start=False, iterations=1, weights=random_init(workdir / "random.pth"))
    more = workdir / "more-data"
    make_shapes(str(more), num_train=TINY.train_images + 3, num_val=TINY.val_images + 2, seed=0, **SIZES)
    run(data_source=str(more))
    # Static-shape mode from now on: a challenger evaluated on a canvas against a champion evaluated
    # in dynamic mode must not be compared as recorded.
    run(data_source=str(more), force=True, static_canvas=STATIC)
    return runs


def test_first_run_trains_from_pretrained_and_promotes(history):
    first = history[0]
    assert first["trained"] and first["plan"] == "from-pretrained"
    assert first["decision"] == "promoted" and first["promoted"]
    assert first["reason"].startswith("no champion yet")
    champion = first["champion"]
    assert champion["checkpoint_uri"].endswith("/train/model_final.pth")
    assert champion["metrics"]["segm"]["AP"] > 50  # the fixture's weights, barely moved
    assert "fetch-weights" in tasks_run(first) and "train" in tasks_run(first)
    comparison = first["comparison.md"]
    assert "There was no champion" in comparison and "PROMOTED" in comparison


def test_unchanged_data_skips_before_any_training(history):
    second = history[1]
    assert not second["trained"] and second["decision"] == "skipped"
    assert second["reason"] == "skipped: data unchanged"
    assert second["champion"] == history[0]["champion"]
    # Nothing after the check ran: no weights, no training pod, no evaluation.
    assert tasks_run(second) == {"ingest-coco", "check-new-data"}
    assert second["comparison.md"] is None
    assert [h["decision"] for h in second["history"]] == ["promoted", "skipped"]


def test_force_trains_anyway_and_a_worse_challenger_is_rejected(history, s3_env):
    forced = history[2]
    assert forced["trained"] and forced["plan"] == "from-pretrained"
    assert forced["decision"] == "rejected" and not forced["promoted"]
    assert forced["champion"] == history[0]["champion"]  # kept
    assert [h["decision"] for h in forced["history"]] == ["promoted", "skipped", "rejected"]
    record = json.loads(storage.get_bytes(forced["history"][-1]["uri"]))
    assert record["challenger"]["metrics"]["segm"]["AP"] < record["champion_metrics"]["segm"]["AP"]
    assert "does not beat" in record["reason"]
    md = forced["comparison.md"]
    assert md.startswith("# Champion vs challenger") and "REJECTED" in md and "Per-category AP" in md
    html = forced["comparison.html"]
    assert html.count("data:image/png") == 2 * 3  # three example images, champion and challenger each
    # Both models evaluated after their last iteration (TEST.EVAL_PERIOD): their AP over training.
    assert "<h2>AP over training</h2>" in html and html.count("data:image/svg+xml") == 1


def test_more_data_trains_a_warm_challenger_against_the_reevaluated_champion(history, s3_env):
    last = history[3]
    assert last["trained"] and last["plan"] == "warm-start"
    record = json.loads(storage.get_bytes(last["history"][-1]["uri"]))
    assert last["decision"] in ("promoted", "rejected")
    assert record["decision"] == last["decision"]
    assert record["challenger"]["data_version"] != history[0]["champion"]["data_version"]
    # The validation split grew too: the champion was evaluated again, on the challenger's data.
    reevaluated = storage.join(
        last["root"], "runs", record["run_id"], "promote", "champion_eval", "metrics.json"
    )
    again = json.loads(storage.get_bytes(reevaluated))
    assert record["champion_metrics"]["segm"]["AP"] == pytest.approx(again["segm"]["AP"])
    assert record["champion_before"]["eval_data_version"] != record["challenger"]["eval_data_version"]
    champion = last["champion"]
    assert champion["eval_data_version"] == record["challenger"]["eval_data_version"]


def test_a_static_mode_run_evaluates_the_champion_in_static_mode_too(history, s3_env, tmp_path):
    from cascade_rcnn.evaluation.evaluate import RESULTS_JSON, evaluate_checkpoint
    from cascade_rcnn.step_options import StepOptions

    static = history[4]
    assert static["trained"] and static["plan"] == "warm-start"
    record = json.loads(storage.get_bytes(static["history"][-1]["uri"]))
    before = record["champion_before"]
    # The champion's record was made in dynamic mode; this run's evaluation is on the canvas.
    assert not before["eval_data_version"].endswith("-static-192x192")
    assert record["challenger"]["eval_data_version"].endswith("-static-192x192")
    reevaluated = storage.join(static["root"], "runs", record["run_id"], "promote", "champion_eval")
    got = json.loads(storage.get_bytes(storage.join(reevaluated, RESULTS_JSON)))

    def evaluate(canvas) -> list:
        options = StepOptions(before["config"], static_canvas=canvas, device="auto", amp=True)
        out = tmp_path / f"static-{bool(canvas)}"
        evaluate_checkpoint(before["config"], before["checkpoint_uri"], record["challenger"]["dataset"],
                            record["challenger"]["eval_split"], str(out), report=False,
                            opts=options.overrides(before["config_opts"]))  # fmt: skip
        return json.loads((out / RESULTS_JSON).read_text())

    in_static, in_dynamic = evaluate(STATIC), evaluate([])
    assert in_static != in_dynamic  # the two modes are told apart by their detections
    assert got == in_static  # promote ran the champion on the challenger's canvas, in static mode


def test_make_demo_twice_trains_then_skips(tmp_path):
    """What `make demo` runs (sizes shrunk): the second run finds the data unchanged."""
    cmd = [sys.executable, "-m", "pipelines", "run-local", "--pipeline", "retraining", "--workdir",
           str(tmp_path / "demo"), "--iterations", "2", "--finetune-iterations", "1",
           "--train-images", "4", "--val-images", "2"]  # fmt: skip
    summaries = []
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
        summaries.append(json.loads((tmp_path / "demo" / "summary.json").read_text()))
    first, second = summaries
    assert (first["trained"], first["promoted"]) == (True, True)
    assert (second["trained"], second["promoted"]) == (False, False)
    assert second["champion"] == first["champion"] and second["champion"] is not None
    assert "did not train, skipped" in proc.stdout


def test_each_run_leaves_its_pages_and_they_render(history, tmp_path, chromium):
    """The pages a run leaves in the work directory (what `make demo` shows): the challenger's
    training curves, its evaluation report with the precision/recall curves, and the comparison."""
    from browser import check_page

    pages = {"training_curves.html", "report.html", "report.md", "comparison.html", "comparison.md"}
    assert set(history[0]["pages"]) == pages
    assert history[1]["pages"] == {} and history[1]["training_curves.html"] is None  # skipped: none
    for run, curves_title in ((history[0], "Training curves"), (history[3], "Fine-tuning curves")):
        assert set(run["pages"]) == pages
        assert f"<title>{curves_title}</title>" in run["training_curves.html"]
        assert "<h2>Precision/recall</h2>" in run["report.html"]
        for name, figures in (("training_curves.html", 3), ("report.html", 2), ("comparison.html", 1)):
            path = tmp_path / f"{curves_title[:4]}-{name}"
            path.write_text(run[name])
            check_page(chromium, path, min_figures=figures)
