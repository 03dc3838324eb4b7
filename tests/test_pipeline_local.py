"""The whole pipeline with kfp.local's SubprocessRunner against SeaweedFS (`run-local` with a few
iterations): every step's outputs are in the bucket and pass their checksums, the metrics and
reports exist, and ingesting the same source again transfers nothing."""

import json
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from cascade_rcnn import storage  # noqa: E402
from pipelines.run_local import LocalSettings, run_local, summary  # noqa: E402
from pipelines.training import STEP_NAMES  # noqa: E402

pytestmark = pytest.mark.slow

TINY = LocalSettings(
    iterations=4, finetune_iterations=2, train_images=6, val_images=3, finetune_images=4, eval_period=2
)


@pytest.fixture(scope="module")
def local_run(s3_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run-local")
    bucket = f"pipeline-{uuid.uuid4().hex[:12]}"
    return run_local(workdir, TINY, server=s3_server, bucket=bucket), workdir


def verified(uri: str, tmp: Path) -> Path:
    """Download with the sha256 stored at upload required and checked; returns the local copy."""
    local = tmp / uri.replace("/", "_")
    storage.get_file(uri, local, require_checksum=True)
    return local


def test_every_step_ran_and_left_its_outputs(local_run):
    run, _ = local_run
    assert sorted(run.outputs) == sorted(STEP_NAMES)
    assert set(run.outputs["evaluate"]) == {"metrics", "table", "report"}
    assert set(run.outputs["train"]) == set(run.outputs["finetune"]) == {"model", "curves"}
    for step in STEP_NAMES:
        for name, art in run.outputs[step].items():
            if (step, name) != ("evaluate", "metrics"):  # KFP keeps Metrics in the metadata only
                assert Path(art["uri"]).is_file(), f"{step}.{name}: {art['uri']}"
    # Everything lives under the run's root in the bucket, checkpoints under the run's id.
    assert run.metadata("train", "model")["checkpoint_uri"].startswith(run.root + "/runs/")


def test_ingested_dataset_is_in_the_bucket_with_verified_checksums(local_run, s3_env, tmp_path):
    run, _ = local_run
    manifest_uri = run.metadata("ingest-coco", "dataset")["manifest_uri"]
    assert manifest_uri == f"{run.root}/datasets/shapes/manifest.json"
    manifest = json.loads(verified(manifest_uri, tmp_path).read_bytes())
    files = manifest["files"]
    assert len(files) == TINY.train_images + TINY.val_images + 2  # images and the two annotation files
    for entry in files:
        uri = storage.join(manifest["root"], entry["path"])
        assert storage.head(uri).sha256 == entry["sha256"], uri
        assert verified(uri, tmp_path).stat().st_size == entry["size"]


def test_weights_and_models_are_in_the_bucket_with_verified_checksums(local_run, s3_env, tmp_path):
    run, workdir = local_run
    weights = run.metadata("fetch-weights", "model")
    assert weights["format"] == "ours"
    assert weights["sha256"] == storage.sha256_file(workdir / "weights" / "random-init.pth")
    verified(weights["checkpoint_uri"], tmp_path)

    trained = run.metadata("train", "model")
    assert trained["source"] == weights["checkpoint_uri"]
    finetuned = run.metadata("finetune", "model")
    assert finetuned["source"] == trained["checkpoint_uri"]  # finetune starts from train's Model
    assert finetuned["data"] == f"s3://{run.root[5:].split('/')[0]}/finetune-data"
    for model, iterations in ((trained, TINY.iterations), (finetuned, TINY.finetune_iterations)):
        assert storage.head(model["checkpoint_uri"]).sha256 == model["sha256"]
        ckpt = torch.load(verified(model["checkpoint_uri"], tmp_path), weights_only=True)
        assert ckpt["trainer"]["iteration"] == iterations - 1
        assert storage.exists(storage.join(model["output_uri"], "last_checkpoint"))


def test_evaluation_metrics_and_reports(local_run, s3_env, tmp_path):
    run, _ = local_run
    metrics = run.metadata("evaluate", "metrics")
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"):
        assert 0.0 <= metrics[key] <= 100.0, key
    eval_uri = metrics["output_uri"]
    stored = json.loads(verified(storage.join(eval_uri, "metrics.json"), tmp_path).read_bytes())
    assert stored["segm"]["AP"] == pytest.approx(metrics["segm/AP"])
    verified(storage.join(eval_uri, "coco_instances_results.json"), tmp_path)
    html = run.local_path("evaluate", "report").read_text()
    assert html == verified(storage.join(eval_uri, "report.html"), tmp_path).read_text()
    assert "<table" in html and "mask" in html
    table = run.local_path("evaluate", "table").read_text()
    assert "| task | AP | AP50 |" in table and "| mask |" in table
    assert (run.workdir / "report.html").read_text() == html
    text = summary(run)
    assert f"HTML report: {run.workdir / 'report.html'}" in text and "segm |" in text


def test_second_ingest_transfers_nothing(local_run, s3_env):
    import kfp.local

    from components import ingest_coco

    run, workdir = local_run
    manifest_uri = run.metadata("ingest-coco", "dataset")["manifest_uri"]
    before = storage.get_bytes(manifest_uri)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "again"))
    task = ingest_coco.build("python:3.11")(
        source=str(workdir / "data"),
        root=run.root,
        name="shapes",
        splits=["train2017", "val2017"],
        max_images=0,
    )
    dataset = task.outputs["dataset"]
    assert dataset.metadata["manifest_uri"] == manifest_uri
    assert dataset.metadata["reused"] is True
    assert dataset.metadata["transferred_files"] == 0
    assert storage.get_bytes(manifest_uri) == before  # not even the manifest was rewritten


@pytest.mark.parametrize(
    "step, title, copy",
    [
        ("train", "Training curves", "training_curves.html"),
        ("finetune", "Fine-tuning curves", "finetune_curves.html"),
    ],
)
def test_training_curves_are_an_html_output_of_each_training_step(
    local_run, s3_env, chromium, step, title, copy
):
    from browser import check_page

    run, workdir = local_run
    path = run.local_path(step, "curves")  # what the KFP UI shows for the step
    page = path.read_text()
    model = run.metadata(step, "model")
    assert page == storage.get_bytes(model["training_curves"]).decode()  # the page left in the output
    assert model["training_curves"] == storage.join(model["output_uri"], "training_curves.html")
    assert f"<title>{title}</title>" in page and "<h2>Losses</h2>" in page
    assert "<h2>AP at each evaluation</h2>" in page and "No evaluation during training" not in page
    assert (workdir / copy).read_text() == page  # the copy that opens in a browser
    pages = check_page(chromium, path, min_figures=3)  # losses, lr and img/s, AP
    assert pages["kfp"].title == title


def test_evaluation_report_has_precision_recall_curves(local_run, s3_env, chromium, tmp_path):
    from browser import check_page

    run, _ = local_run
    path = run.local_path("evaluate", "report")
    page = path.read_text()
    assert "<h2>Precision/recall</h2>" in page and page.count("data:image/svg+xml") == 2  # box, mask
    eval_uri = run.metadata("evaluate", "metrics")["output_uri"]
    curves = json.loads(verified(storage.join(eval_uri, "pr_curves.json"), tmp_path).read_bytes())
    assert set(curves) == {"bbox", "segm"} and set(curves["bbox"]["iou"]) == {"0.50", "0.75"}
    check_page(chromium, path, min_figures=2)
