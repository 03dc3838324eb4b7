"""A checkpoint written by `cascade-rcnn train` goes through predict, evaluate, finetune and the
evaluate component, all with MODEL.DEVICE auto (the pipeline's default): class names and the data
set's category ids come from what the trainer recorded, and every entry point resolves the device.

The shapes set's category ids are 1, 3 and 7 (circle, square, triangle), so output ids that were
left contiguous (0, 1, 2) would show. Training starts from the parity fixture's weights, trained on
the same shapes, so two iterations leave a model that still finds them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn import cli

# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("d2_parity"),  # skips without ../shared, fails under CI
]

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"
CONFIG = str(FIXTURE / "config.yaml")
CLASSES = ["circle", "square", "triangle"]
DATASET_IDS = [1, 3, 7]

TRAIN = [
    "MODEL.DEVICE", "auto",
    "MODEL.WEIGHTS", str(FIXTURE / "model_final.pkl"),
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.001",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "SEED", "5",
]  # fmt: skip
# Inference at the size the fixture's weights were trained for, on CPU threads shared with others.
TEST = ["MODEL.DEVICE", "auto", "DATALOADER.NUM_WORKERS", "0"]


def run_cli(command: str, *args: str, log: Path) -> None:
    """`python -m cascade_rcnn.cli COMMAND ...` in a fresh process, as a user runs it."""
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "cascade_rcnn.cli", command, *args], stdout=f, stderr=subprocess.STDOUT
        )
    assert proc.returncode == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(shapes data root, model_final.pth) of a 2-iteration `cascade-rcnn train` run."""
    from cascade_rcnn.data.shapes import make_shapes

    tmp = tmp_path_factory.mktemp("trained")
    data = tmp / "shapes"
    make_shapes(str(data), num_train=4, num_val=3, seed=0, min_size=128, max_size=160)
    out = tmp / "train"
    run_cli(
        "train", "--config", CONFIG, "--data", str(data), "--output", str(out),
        "--train-split", "train2017", "--opts", *TRAIN, log=tmp / "train.log",
    )  # fmt: skip
    final = out / "model_final.pth"
    assert final.is_file()
    return data, final


def ground_truth(data: Path) -> tuple[dict, dict]:
    """({file_name: image id}, {image id: [(xyxy box, category id), ...]}) of the val split."""
    coco = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    ids = {im["file_name"]: im["id"] for im in coco["images"]}
    boxes: dict = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    return ids, boxes


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def matched_gt_category(box, gts) -> int | None:
    best = max(gts, key=lambda g: iou(box, g[0]))
    return best[1] if iou(box, best[0]) > 0.5 else None


def test_trainer_records_classes_and_dataset_ids(trained):
    _, final = trained
    meta = torch.load(final, weights_only=True)["meta"]
    assert meta["thing_classes"] == CLASSES
    assert meta["dataset"]["thing_classes"] == CLASSES
    assert meta["dataset"]["thing_dataset_ids"] == DATASET_IDS


def test_predict_labels_detections_with_names_and_dataset_ids(trained, tmp_path):
    data, final = trained
    images = sorted(str(p) for p in (data / "val2017").glob("*.jpg"))
    out = tmp_path / "pred.json"
    rc = cli.main(
        ["predict", "--config", CONFIG, "--weights", str(final), "--output", str(out),
         "--opts", *TEST, "--", *images]
    )  # fmt: skip
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["path"] for r in records] == images
    image_ids, gt = ground_truth(data)
    confident = 0
    for record in records:
        for inst in record["instances"]:
            k = inst["category"]
            assert inst["category_name"] == CLASSES[k] and inst["category_id"] == DATASET_IDS[k], inst
            if inst["score"] > 0.9:
                # The id is the data set's: it is the category of the shape the box lies on.
                gt_id = matched_gt_category(inst["bbox_xyxy"], gt[image_ids[record["file_name"]]])
                assert gt_id == inst["category_id"], (record["file_name"], inst["bbox_xyxy"], gt_id)
                confident += 1
    assert confident >= 3


def test_predict_categories_file_must_fit_the_model(trained, tmp_path, capsys):
    data, final = trained
    cats = tmp_path / "two.json"
    cats.write_text(json.dumps({"categories": [{"id": 5, "name": "a"}, {"id": 2, "name": "b"}]}))
    image = str(next((data / "val2017").glob("*.jpg")))
    out = tmp_path / "pred.json"
    rc = cli.main(
        ["predict", "--config", CONFIG, "--weights", str(final), "--output", str(out),
         "--categories", str(cats), "--opts", *TEST, "--", image]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{cats} has 2 categories but MODEL.ROI_HEADS.NUM_CLASSES is 3" in err, err
    assert not out.exists()


def test_evaluate_writes_dataset_ids_and_scores_the_shapes(trained, tmp_path):
    data, final = trained
    out = tmp_path / "eval"
    rc = cli.main(
        ["evaluate", "--config", CONFIG, "--weights", str(final), "--data", str(data),
         "--split", "val2017", "--output", str(out), "--no-report", "--opts", *TEST]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "coco_instances_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(DATASET_IDS)
    assert {r["category_id"] for r in results if r["score"] > 0.9} & {3, 7}
    metrics = json.loads((out / "metrics.json").read_text())
    # Ids mapped wrongly would put the detections on other classes: AP near 0.
    assert metrics["bbox"]["AP"] > 50.0, metrics["bbox"]
    assert {f"AP-{name}" for name in CLASSES} <= set(metrics["bbox"])


def test_evaluate_refuses_data_with_other_classes(trained, tmp_path, capsys):
    data, final = trained
    other = tmp_path / "renamed"
    (other / "annotations").mkdir(parents=True)
    coco = json.loads((data / "annotations" / "instances_val2017.json").read_text())
    for c in coco["categories"]:
        c["name"] = {"circle": "square", "square": "circle"}.get(c["name"], c["name"])
    (other / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    (other / "val2017").symlink_to(data / "val2017", target_is_directory=True)
    rc = cli.main(
        ["evaluate", "--config", CONFIG, "--weights", str(final), "--data", str(other),
         "--split", "val2017", "--output", str(tmp_path / "eval"), "--opts", *TEST]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and str(final) in err, err
    assert "'circle', 'square', 'triangle'" in err and "'square', 'circle', 'triangle'" in err, err
    assert not (tmp_path / "eval").exists()


def test_finetune_with_auto_device(trained, tmp_path):
    data, final = trained
    out = tmp_path / "finetune"
    opts = [*TRAIN, "SOLVER.MAX_ITER", "1"]
    run_cli(
        "finetune", "--config", CONFIG, "--weights", str(final), "--data", str(data),
        "--output", str(out), "--train-split", "train2017", "--opts", *opts, log=tmp_path / "ft.log",
    )  # fmt: skip
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["meta"]["init"]["init_weights"] == str(final)
    assert ckpt["meta"]["dataset"]["thing_dataset_ids"] == DATASET_IDS
    assert ckpt["trainer"]["iteration"] == 0


def test_evaluate_component_with_auto_device(trained, tmp_path):
    """The component's own function body, with kfp's artifact classes at local paths."""
    from kfp.dsl import HTML, Dataset, Markdown, Metrics

    from components.evaluate import evaluate

    data, final = trained
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    table, report = Markdown(uri=str(tmp_path / "table.md")), HTML(uri=str(tmp_path / "report.html"))
    evaluate(
        dataset=Dataset(uri=str(data), metadata={"manifest_uri": str(data)}),
        checkpoint=str(final),
        config=CONFIG,
        config_opts=["DATALOADER.NUM_WORKERS", 0],
        static_canvas=[],
        device="auto",
        amp=True,
        root=str(tmp_path / "root"),
        run_id="run-1",
        job_id="job-1",
        split="val2017",
        max_images=2,
        metrics=metrics,
        table=table,
        report=report,
    )
    assert metrics.metadata["output_uri"] == str(tmp_path / "root" / "runs" / "run-1" / "eval")
    assert np.isfinite(metrics.metadata["bbox/AP"]) and metrics.metadata["bbox/AP"] > 50.0
    assert "| triangle |" in Path(table.path).read_text()
    assert "<td>circle</td>" in Path(report.path).read_text()
