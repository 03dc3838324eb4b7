"""`cascade-rcnn evaluate` end to end on the detectron2 parity fixture (real model, real weights).

The fixture has images but no annotations; its ground truth here is detectron2's own confident
detections (score >= 0.5), so a model equivalent to detectron2 must score AP ~100 on it.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from cascade_rcnn import storage
from cascade_rcnn.evaluation.cli import main
from cascade_rcnn.evaluation.coco_eval import load_metrics_json

pytestmark = pytest.mark.usefixtures("d2_parity")
FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]
GT_SCORE = 0.5


def _write_parity_coco(root: Path) -> list[dict]:
    """COCO layout under root: annotations/instances_val2017.json and val2017/ -> the fixture's images."""
    outputs = json.loads((FIXTURE / "outputs.json").read_text())
    images, anns = [], []
    for image_id, out in enumerate(outputs, start=1):
        images.append(
            {"id": image_id, "file_name": out["file_name"], "height": out["height"], "width": out["width"]}
        )
        for inst in out["instances"]:
            if inst["score"] < GT_SCORE:
                continue
            x0, y0, x1, y1 = inst["bbox_xyxy"]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES[inst["category"]]["id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": inst["segmentation"],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES})
    )
    (root / "val2017").symlink_to(FIXTURE / "images", target_is_directory=True)
    return outputs


def _args(data: str, output: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(FIXTURE / "config.yaml"),
        "--weights",
        str(FIXTURE / "model_final.pkl"),
        "--data",
        data,
        "--output",
        output,
        "--opts",
        "DATALOADER.NUM_WORKERS",
        "0",
        *extra,
    ]


@pytest.fixture(scope="module")
def parity_coco(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("parity_coco")
    return root, _write_parity_coco(root)


@pytest.fixture(scope="module")
def local_run(parity_coco, tmp_path_factory):
    root, outputs = parity_coco
    out = tmp_path_factory.mktemp("eval_out")
    rc = main(_args(str(root), str(out)))
    assert rc == 0
    return out, outputs


def test_cli_writes_metrics_results_and_reports(local_run, capsys):
    out, outputs = local_run
    metrics = load_metrics_json((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert metrics[task]["AP"] > 99.0, (task, metrics[task])
        assert metrics[task]["AP50"] == pytest.approx(100.0)
        for cat in CATEGORIES:
            assert metrics[task][f"AP-{cat['name']}"] > 98.0

    results = json.loads((out / "coco_instances_results.json").read_text())
    # detectron2's detections, image by image: same count, XYWH of the same boxes, dataset category ids.
    for image_id, ref in enumerate(outputs, start=1):
        ours = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
        assert len(ours) == len(ref["instances"]), ref["file_name"]
        for r, inst in zip(ours, ref["instances"]):
            x0, y0, x1, y1 = inst["bbox_xyxy"]
            assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.05)
            assert r["category_id"] == CATEGORIES[inst["category"]]["id"]
            assert r["segmentation"]["size"] == [ref["height"], ref["width"]]

    md = (out / "report.md").read_text()
    assert "| box |" in md and "| mask |" in md and "| triangle |" in md
    page = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6
    assert "val2017_00001.jpg" in page and "<td>circle</td>" in page


def test_cli_prints_table(parity_coco, tmp_path, capsys):
    root, _ = parity_coco
    assert main(_args(str(root), str(tmp_path / "out"), "--max-images", "2", "--no-report")) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^bbox\s+\|\s+\d+\.\d{3}", printed, re.M) and re.search(r"^segm\s+\|", printed, re.M)
    assert not (tmp_path / "out" / "report.html").exists()
    results = json.loads((tmp_path / "out" / "coco_instances_results.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2}


def test_cli_output_defaults_to_output_dir_inference(parity_coco, tmp_path):
    root, _ = parity_coco
    argv = _args(str(root), "unused", "OUTPUT_DIR", str(tmp_path / "run"), "--max-images", "1", "--no-report")
    i = argv.index("--output")
    del argv[i : i + 2]
    assert main(argv) == 0
    assert (tmp_path / "run" / "inference" / "metrics.json").is_file()


def test_cli_reads_and_writes_s3(parity_coco, s3_env, local_run):
    root, _ = parity_coco
    bucket = s3_env
    storage.upload_tree(str(root / "annotations"), f"s3://{bucket}/coco/annotations", progress=False)
    storage.upload_tree(str(FIXTURE / "images"), f"s3://{bucket}/coco/val2017", progress=False)
    out = f"s3://{bucket}/runs/eval"
    assert main(_args(f"s3://{bucket}/coco", out)) == 0
    for name in ("metrics.json", "coco_instances_results.json", "report.md", "report.html"):
        assert storage.exists(f"{out}/{name}"), name
    local_out, _ = local_run
    assert _same_metrics(storage.get_bytes(f"{out}/metrics.json"), (local_out / "metrics.json").read_bytes())


def _same_metrics(a: bytes, b: bytes) -> bool:
    ma, mb = load_metrics_json(a), load_metrics_json(b)
    return all(ma[t] == pytest.approx(mb[t], nan_ok=True) for t in mb) and set(ma) == set(mb)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, argv: list[str], log_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    rc = main(argv)
    Path(log_dir, f"rc{rank}").write_text(str(rc))


@pytest.mark.slow  # two processes each import torch and build the model
def test_cli_under_two_gloo_ranks_matches_one_process(parity_coco, local_run, tmp_path):
    root, _ = parity_coco
    out = tmp_path / "dist_out"
    mp.spawn(
        _rank_main, args=(2, _free_port(), _args(str(root), str(out)), str(tmp_path)), nprocs=2, join=True
    )
    assert (tmp_path / "rc0").read_text() == "0" and (tmp_path / "rc1").read_text() == "0"
    local_out, outputs = local_run
    ours = json.loads((out / "coco_instances_results.json").read_text())
    single = json.loads((local_out / "coco_instances_results.json").read_text())
    assert [r["image_id"] for r in ours] == [r["image_id"] for r in single]  # each image once, in order
    for a, b in zip(ours, single):
        assert a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.01)
    assert _same_metrics((out / "metrics.json").read_bytes(), (local_out / "metrics.json").read_bytes())


def test_cli_errors_name_the_problem(parity_coco, tmp_path, capsys):
    root, _ = parity_coco
    argv = _args(str(root), str(tmp_path / "o"))
    argv[argv.index("--weights") + 1] = str(tmp_path / "missing.pth")
    assert main(argv) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main(_args(str(tmp_path / "nowhere"), str(tmp_path / "o"))) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(_args(str(root), str(tmp_path / "o"), "MODEL.NO_SUCH_KEY", "1")) == 2
    assert "NO_SUCH_KEY" in capsys.readouterr().err
    assert main(_args(str(root), str(tmp_path / "o"), "--max-images", "0")) == 2
    assert "max_images" in capsys.readouterr().err
    # Weights for 3 classes on a 5-class model: refused, not evaluated half-random.
    assert main(_args(str(root), str(tmp_path / "o"), "MODEL.ROI_HEADS.NUM_CLASSES", "5")) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "cls_score" in err
    assert not (tmp_path / "o").exists()
