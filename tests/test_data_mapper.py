"""Training/test mapper against detectron2's DatasetMapper rules: sizes, flip consistency, box math,
clipping, degenerate removal, crowd, RLE masks, channel order and bad-image errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from cascade_rcnn.config import get_cfg
from cascade_rcnn.data.coco import DataError, load_coco_json
from cascade_rcnn.data.mapper import DatasetMapper
from cascade_rcnn.data.shapes import make_shapes

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"


def _write_image(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)  # PNG: lossless, so pixels can be compared exactly
    return rgb


def _record(path: Path, h: int, w: int, annotations: list) -> dict:
    return {"file_name": str(path), "height": h, "width": w, "image_id": 7, "annotations": annotations}


def _poly_ann(i: int, bbox, cat: int = 0, crowd: int = 0) -> dict:
    x, y, w, h = bbox
    return {
        "id": i,
        "iscrowd": crowd,
        "bbox": [float(v) for v in bbox],
        "category_id": cat,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def _mapper(**kw) -> DatasetMapper:
    args = dict(is_train=True, min_sizes=(0,), max_size=10_000, flip="none")
    args.update(kw)
    return DatasetMapper(**args)


def _rng_with(mapper: DatasetMapper, short: int, flip: bool) -> np.random.Generator:
    """A seeded rng for which the mapper draws (short, flip)."""
    for seed in range(1000):
        if mapper._sample(np.random.default_rng(seed)) == (short, flip):
            return np.random.default_rng(seed)
    raise AssertionError("no seed gives that draw")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=6, num_val=2, seed=11, crowd_every=3)
    return load_coco_json(str(root / "annotations/instances_train2017.json"), str(root / "train2017"))[0]


# ---- sizes and sampling -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw, short, max_size, out_hw",
    [
        ((333, 251), 288, 448, (382, 288)),  # 333 * 288 / 251 = 382.09
        ((333, 251), 288, 360, (360, 271)),  # long side capped: 288 * 360 / 382.09 = 271.35
        ((8, 13), 4, 100, (4, 7)),  # 6.5 rounds up: int(x + 0.5)
    ],
)
def test_test_mapper_resizes_with_detectron2_rounding(tmp_path, hw, short, max_size, out_hw):
    _write_image(tmp_path / "a.png", *hw)
    mapper = DatasetMapper(is_train=False, min_sizes=(short,), max_size=max_size)
    out = mapper(_record(tmp_path / "a.png", *hw, [_poly_ann(1, (1, 1, 2, 2))]))
    assert out["image"].shape == (3, *out_hw) and out["image"].dtype == torch.uint8
    assert out["image"].is_contiguous()
    assert (out["height"], out["width"], out["image_id"]) == (*hw, 7)
    assert "targets" not in out


@pytest.mark.usefixtures("d2_parity")
def test_test_mapper_matches_detectron2_input_sizes():
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 288, 448
    mapper = DatasetMapper.from_config(cfg, is_train=False)
    for p in json.loads((FIXTURE / "proposals.json").read_text()):
        img = Image.open(FIXTURE / "images" / p["file_name"])
        rec = {
            "file_name": str(FIXTURE / "images" / p["file_name"]),
            "height": img.height,
            "width": img.width,
        }
        assert list(mapper(rec)["image"].shape[1:]) == p["resized_hw"]


def test_choice_and_range_sampling(tmp_path):
    mapper = _mapper(min_sizes=(640, 672, 704), flip="horizontal")
    draws = [mapper._sample(np.random.default_rng(s)) for s in range(300)]
    assert {d[0] for d in draws} == {640, 672, 704}
    assert 100 < sum(d[1] for d in draws) < 200  # p = 0.5
    ranged = _mapper(min_sizes=(10, 13), sample_style="range")
    assert {ranged._sample(np.random.default_rng(s))[0] for s in range(200)} == {10, 11, 12, 13}
    with pytest.raises(ValueError, match="needs an rng"):
        mapper._sample(None)


def test_from_config_reads_detectron2_keys():
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    train = DatasetMapper.from_config(cfg, is_train=True)
    assert train.min_sizes == tuple(cfg.INPUT.MIN_SIZE_TRAIN) and train.max_size == cfg.INPUT.MAX_SIZE_TRAIN
    assert train.flip == "horizontal" and train.image_format == "BGR" and train.use_masks
    test = DatasetMapper.from_config(cfg, is_train=False)
    assert test.min_sizes == (cfg.INPUT.MIN_SIZE_TEST,) and test.flip == "none"
    cfg.INPUT.RANDOM_FLIP = "vertical"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP must be 'horizontal' or 'none'"):
        DatasetMapper.from_config(cfg, is_train=True)


# ---- geometry -----------------------------------------------------------------------------------


def test_flip_is_consistent_between_image_boxes_and_polygons(shapes):
    mapper = _mapper(min_sizes=(200, 240), max_size=400, flip="horizontal")
    record = next(r for r in shapes if not any(a["iscrowd"] for a in r["annotations"]))
    plain = mapper(record, _rng_with(mapper, 240, False))
    flipped = mapper(record, _rng_with(mapper, 240, True))
    W = plain["image"].shape[2]
    assert torch.equal(flipped["image"], plain["image"].flip(2))
    t0, t1 = plain["targets"], flipped["targets"]
    expected = torch.stack([W - t0.boxes[:, 2], t0.boxes[:, 1], W - t0.boxes[:, 0], t0.boxes[:, 3]], 1)
    torch.testing.assert_close(t1.boxes, expected, rtol=0, atol=1e-4)
    assert torch.equal(t1.classes, t0.classes)
    for polys0, polys1 in zip(t0.polygons, t1.polygons):
        for p0, p1 in zip(polys0, polys1):
            assert p1.dtype == np.float64
            np.testing.assert_allclose(p1[0::2], W - p0[0::2])
            np.testing.assert_array_equal(p1[1::2], p0[1::2])

    # The flipped polygons still sit on the painted (bright) shapes of the flipped image.
    gray = flipped["image"].float().mean(0).numpy()
    h, w = gray.shape
    for polys in t1.polygons:
        m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w))).astype(bool)
        assert gray[m].mean() > 100 and gray[~m].mean() < gray[m].mean() - 40


def test_boxes_follow_detectron2_arithmetic(tmp_path):
    _write_image(tmp_path / "a.png", 50, 60)
    ann = _poly_ann(1, (0.1, 0.2, 10.3, 5.7), cat=2)
    mapper = _mapper(min_sizes=(37,), max_size=1000)
    out = mapper(_record(tmp_path / "a.png", 50, 60, [ann]), np.random.default_rng(0))
    newh, neww = out["image"].shape[1:]
    assert (newh, neww) == (37, 44)  # 60 * 37 / 50 = 44.4
    # XYWH -> XYXY in float32 (BoxMode.convert on a list), scaling in float64, stored as float32.
    x0, y0, w, h = (np.float32(v) for v in (0.1, 0.2, 10.3, 5.7))
    xyxy = np.array([x0, y0, x0 + w, y0 + h], dtype=np.float64)
    expected = xyxy * np.array([neww / 60, newh / 50, neww / 60, newh / 50])
    assert out["targets"].boxes.dtype == torch.float32
    assert torch.equal(out["targets"].boxes, torch.tensor([expected], dtype=torch.float32))
    assert out["targets"].classes.tolist() == [2]


def test_clipping_degenerate_removal_and_crowd(tmp_path):
    _write_image(tmp_path / "a.png", 80, 100)
    anns = [
        _poly_ann(1, (90, 70, 11, 11.5), cat=1),  # overhangs: clipped
        _poly_ann(2, (100, 10, 1.5, 5)),  # entirely right of the image: zero width after clipping
        _poly_ann(3, (10, 10, 0, 5)),  # zero width
        _poly_ann(4, (10, 10, 5e-6, 5)),  # below detectron2's 1e-5 threshold
        _poly_ann(5, (20, 20, 5, 5), crowd=1),  # crowd: dropped in training
        _poly_ann(6, (30, 30, 0.5, 0.5), cat=2),  # tiny but valid
    ]
    out = _mapper()(_record(tmp_path / "a.png", 80, 100, anns), np.random.default_rng(0))
    t = out["targets"]
    assert t.classes.tolist() == [1, 2]
    assert t.boxes.tolist() == [[90.0, 70.0, 100.0, 80.0], [30.0, 30.0, 30.5, 30.5]]
    assert len(t.polygons) == 2 and t.polygons[1][0].tolist() == [30, 30, 30.5, 30, 30.5, 30.5, 30, 30.5]
    assert t.masks is None


def test_empty_bitmask_removes_instance(tmp_path):
    _write_image(tmp_path / "a.png", 40, 40)
    line = {"id": 1, "iscrowd": 0, "bbox": [5.0, 5.0, 20.0, 2.0], "category_id": 0}
    line["segmentation"] = [[5, 5, 15, 5, 25, 5]]  # collinear: a polygon with no area
    square = _poly_ann(2, (10, 10, 10, 10), cat=1)
    record = _record(tmp_path / "a.png", 40, 40, [line, square])
    as_polygons = _mapper()(record, np.random.default_rng(0))["targets"]
    assert as_polygons.classes.tolist() == [0, 1]  # detectron2's PolygonMasks.nonempty keeps it
    as_bitmasks = _mapper(mask_format="bitmask")(record, np.random.default_rng(0))["targets"]
    assert as_bitmasks.classes.tolist() == [1] and as_bitmasks.polygons is None
    assert as_bitmasks.masks.shape == (1, 40, 40) and as_bitmasks.masks.dtype == torch.bool
    assert as_bitmasks.masks[0, 10:20, 10:20].all() and as_bitmasks.masks.sum() == 100


def test_rle_instances_become_bitmasks_through_resize_and_flip(tmp_path):
    _write_image(tmp_path / "a.png", 30, 40)
    rle_mask = np.zeros((30, 40), dtype=np.uint8, order="F")
    rle_mask[5:15, 2:12] = 1
    rle = mask_util.encode(rle_mask)
    rle_ann = {"id": 1, "iscrowd": 0, "bbox": [2.0, 5.0, 10.0, 10.0], "category_id": 0}
    rle_ann["segmentation"] = {"size": [30, 40], "counts": rle["counts"].decode()}
    anns = [rle_ann, _poly_ann(2, (20, 10, 10, 10), cat=1)]
    mapper = _mapper(min_sizes=(60,), flip="horizontal")
    out = mapper(_record(tmp_path / "a.png", 30, 40, anns), _rng_with(mapper, 60, True))
    t = out["targets"]
    assert t.polygons is None and t.masks.shape == (2, 60, 80)
    expected = np.zeros((60, 80), dtype=bool)
    expected[10:30, 80 - 24 : 80 - 4] = True  # x2 nearest-neighbour upscale, then mirrored
    np.testing.assert_array_equal(t.masks[0].numpy(), expected)
    assert t.boxes[0].tolist() == [56.0, 10.0, 76.0, 30.0]
    assert t.masks[1, 20:40, 20:40].all() and t.masks[1].sum() == 400


def test_channel_order_follows_input_format(tmp_path):
    rgb = _write_image(tmp_path / "a.png", 12, 16)
    rec = _record(tmp_path / "a.png", 12, 16, [])
    bgr = DatasetMapper(is_train=False, min_sizes=(0,), max_size=100)(rec)["image"]
    np.testing.assert_array_equal(bgr.permute(1, 2, 0).numpy(), rgb[:, :, ::-1])
    as_rgb = DatasetMapper(is_train=False, min_sizes=(0,), max_size=100, image_format="RGB")(rec)["image"]
    np.testing.assert_array_equal(as_rgb.permute(1, 2, 0).numpy(), rgb)


def test_mask_on_needs_segmentations(tmp_path):
    _write_image(tmp_path / "a.png", 20, 20)
    ann = {"id": 9, "iscrowd": 0, "bbox": [1.0, 1.0, 5.0, 5.0], "category_id": 0}
    rec = _record(tmp_path / "a.png", 20, 20, [ann])
    with pytest.raises(DataError, match="annotation id=9 has no segmentation, but the model has a mask head"):
        _mapper()(rec, np.random.default_rng(0))
    t = _mapper(use_masks=False)(rec, np.random.default_rng(0))["targets"]
    assert t.polygons is None and t.masks is None and len(t) == 1


# ---- bad images ---------------------------------------------------------------------------------


def test_bad_images_name_the_file(tmp_path):
    mapper = DatasetMapper(is_train=False, min_sizes=(10,), max_size=100)
    with pytest.raises(DataError, match=r"nothere\.jpg \(image id=7\): image file not found"):
        mapper(_record(tmp_path / "nothere.jpg", 10, 10, []))
    (tmp_path / "junk.jpg").write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"junk\.jpg \(image id=7\): cannot read image"):
        mapper(_record(tmp_path / "junk.jpg", 10, 10, []))
    _write_image(tmp_path / "a.png", 10, 12)
    with pytest.raises(DataError, match=r"a\.png \(image id=7\): image is 12x10 .* annotations say 12x11"):
        mapper(_record(tmp_path / "a.png", 11, 12, []))
