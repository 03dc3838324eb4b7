"""`cascade-rcnn predict` against detectron2's own outputs, image modes, EXIF and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from cascade_rcnn.config import load_config
from cascade_rcnn.predict import Predictor, main, predict_files

# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("d2_parity"),
]

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"
CONFIG = FIXTURE / "config.yaml"
WEIGHTS = FIXTURE / "model_final.pkl"
IMAGES = sorted((FIXTURE / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory) -> tuple[list[dict], dict]:
    """Run the CLI once on all fixture images, with a COCO categories file for dataset ids."""
    tmp = tmp_path_factory.mktemp("predict")
    categories = {
        "categories": [
            {"id": 11, "name": "triangle"},
            {"id": 3, "name": "circle"},
            {"id": 7, "name": "square"},
        ]
    }
    (tmp / "cats.json").write_text(json.dumps(categories))
    out = tmp / "out" / "pred.json"
    rc = main(
        [
            "--config",
            str(CONFIG),
            "--weights",
            str(WEIGHTS),
            "--opts",
            "MODEL.DEVICE",
            "cpu",
            "--output",
            str(out),
            "--categories",
            str(tmp / "cats.json"),
            *map(str, IMAGES),
        ]
    )
    assert rc == 0
    return json.loads(out.read_text()), categories


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_config(CONFIG), str(WEIGHTS))


def _mask(seg: dict) -> np.ndarray:
    return mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode("ascii")}).astype(bool)


def test_predict_matches_detectron2_outputs(cli_output):
    ours, _ = cli_output
    reference = json.loads((FIXTURE / "outputs.json").read_text())
    assert [r["file_name"] for r in ours] == [r["file_name"] for r in reference]
    for mine, ref in zip(ours, reference):
        name = ref["file_name"]
        assert (mine["height"], mine["width"]) == (ref["height"], ref["width"]), name
        assert len(mine["instances"]) == len(ref["instances"]), name
        for i, (a, b) in enumerate(zip(mine["instances"], ref["instances"])):
            where = f"{name} detection {i}"
            np.testing.assert_allclose(a["bbox_xyxy"], b["bbox_xyxy"], atol=0.01, rtol=0, err_msg=where)
            assert abs(a["score"] - b["score"]) <= 1e-4, where
            assert a["category"] == b["category"], where
            assert a["segmentation"]["size"] == [ref["height"], ref["width"]], where
            ma, mb = _mask(a["segmentation"]), _mask(b["segmentation"])
            union = np.logical_or(ma, mb).sum()
            iou = np.logical_and(ma, mb).sum() / union if union else 1.0
            assert iou >= 0.99, f"{where}: mask IoU {iou:.4f}"


def test_dataset_category_ids_from_coco_file(cli_output):
    ours, categories = cli_output
    ids = sorted(c["id"] for c in categories["categories"])
    names = {c["id"]: c["name"] for c in categories["categories"]}
    instances = [inst for r in ours for inst in r["instances"]]
    assert instances
    for inst in instances:
        assert inst["category_id"] == ids[inst["category"]]
        assert inst["category_name"] == names[inst["category_id"]]


def _assert_same(a, b) -> None:
    """The same detections from a batch of two and from one image: the convolutions may sum in
    another order, so boxes differ by a fraction of their size. Measured on the fixture's 6 images,
    plain and flipped, with 1 and 2 threads: boxes (up to 377 px) at most 3.6e-6 relative (2.4e-4 px,
    which a bare 1e-4 px bound would fail), scores at most 3.4e-6; the bounds leave 5x."""
    assert len(a) == len(b)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=2e-5)
    assert torch.equal(a.classes, b.classes)
    assert torch.equal(a.masks, b.masks)


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _records_equal(record: dict, det) -> None:
    """A predict_files record equals Detections computed from an in-memory image."""
    assert len(record["instances"]) == len(det)
    for inst, box, score, cls, mask in zip(
        record["instances"], det.boxes, det.scores, det.classes, det.masks
    ):
        np.testing.assert_allclose(inst["bbox_xyxy"], box.numpy(), atol=1e-4, rtol=0)
        assert abs(inst["score"] - float(score)) <= 1e-5 and inst["category"] == int(cls)
        assert np.array_equal(_mask(inst["segmentation"]), mask.numpy())


def test_batched_call_matches_single_images(predictor):
    rgb = np.asarray(Image.open(IMAGES[1]).convert("RGB"))
    # Same-size images: batching adds no padding, so results must match image by image.
    images = [_bgr(rgb), _bgr(rgb[:, ::-1])]
    batched = predictor(images)
    assert len(batched) == 2 and len(batched[0]) > 0
    for image, det in zip(images, batched):
        _assert_same(det, predictor([image])[0])
    # Each image got its own detections: the confident boxes of the flipped image are the mirrored
    # boxes (within a pixel; the network itself is not exactly flip-equivariant).
    w = rgb.shape[1]
    confident = batched[0].boxes[batched[0].scores > 0.9]
    mirrored = confident[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([w, 0, w, 0])
    assert len(confident) >= 2
    assert torch.cdist(mirrored, batched[1].boxes).min(dim=1).values.max() < 1.5


def test_image_modes_read_like_detectron2(tmp_path, predictor):
    cfg = predictor.cfg
    rgb = np.asarray(Image.open(IMAGES[0]).convert("RGB"))
    cases = {}

    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "gray.png")
    g = np.asarray(gray)
    cases["gray.png"] = np.stack([g, g, g], axis=2)

    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, size=rgb.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    cases["rgba.png"] = _bgr(rgb)  # detectron2 drops alpha without compositing

    pal = Image.fromarray(rgb).quantize(colors=64)
    pal.save(tmp_path / "palette.png")
    lut = np.asarray(pal.getpalette(), dtype=np.uint8).reshape(-1, 3)
    cases["palette.png"] = _bgr(lut[np.asarray(pal)])

    # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise for display.
    stored = np.ascontiguousarray(np.rot90(rgb, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "exif6.jpg", exif=exif.tobytes(), quality=95)
    decoded = np.asarray(Image.open(tmp_path / "exif6.jpg").convert("RGB"))  # no EXIF applied
    cases["exif6.jpg"] = _bgr(np.rot90(decoded, k=-1))

    paths = [str(tmp_path / name) for name in cases]
    records = predict_files(cfg, None, paths, predictor=predictor)
    for record, (name, expected_bgr) in zip(records, cases.items()):
        assert record["file_name"] == name
        assert (record["height"], record["width"]) == expected_bgr.shape[:2], name
        det = predictor([expected_bgr])[0]
        assert len(det) > 0, name
        _records_equal(record, det)
    # The displayed EXIF image has the original's orientation (height 333, width 251).
    assert (records[-1]["height"], records[-1]["width"]) == rgb.shape[:2]


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    out = str(tmp_path / "o.json")
    base = ["--config", str(CONFIG), "--weights", str(WEIGHTS), "--output", out]

    rc, err = _run_main(base + [str(tmp_path / "nope.jpg")], capsys)
    assert rc == 2 and "image not found" in err and "nope.jpg" in err

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    rc, err = _run_main(base + [str(bad)], capsys)
    assert rc == 2 and "cannot read image" in err and "broken.jpg" in err

    rc, err = _run_main(
        [
            "--config",
            str(CONFIG),
            "--weights",
            str(tmp_path / "missing.pkl"),
            "--output",
            out,
            str(IMAGES[0]),
        ],
        capsys,
    )
    assert rc == 2 and "missing.pkl" in err

    rc, err = _run_main(["--config", str(CONFIG), "--output", out, str(IMAGES[0])], capsys)
    assert rc == 2 and "no weights" in err and "MODEL.WEIGHTS" in err

    rc, err = _run_main(
        base[:4] + ["--opts", "MODEL.NOT_A_KEY", "1", "--output", out, str(IMAGES[0])], capsys
    )
    assert rc == 2 and "MODEL.NOT_A_KEY" in err

    rc, err = _run_main(base[:4] + ["--opts", "MODEL.DEVICE", "--output", out, str(IMAGES[0])], capsys)
    assert rc == 2 and "KEY VALUE" in err
    assert not Path(out).exists()


def test_cascade_rcnn_cli_dispatches_predict(capsys):
    from cascade_rcnn import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "--help"])
    assert exit_info.value.code == 0
    assert "--weights" in capsys.readouterr().out
