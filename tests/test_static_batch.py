"""MODEL.STATIC's data side: canvas choice, ground-truth buckets (no box dropped), config errors."""

from __future__ import annotations

import pytest
import torch

from cascade_rcnn.config import get_cfg
from cascade_rcnn.data.static_batch import StaticShapes, build_static_batch
from cascade_rcnn.structures import Targets


def _shapes(canvas, bucket_min=16) -> StaticShapes:
    cfg = get_cfg()
    cfg.MODEL.STATIC.CANVAS = canvas
    cfg.MODEL.STATIC.GT_BUCKET_MIN = bucket_min
    return StaticShapes.from_config(cfg, 32)


def test_smallest_canvas_that_holds_the_batch():
    s = _shapes([(448, 448), (320, 448), (448, 320)])
    assert s.canvases[-1] == (448, 448)
    assert s.canvas_for([(300, 440), (320, 400)]) == (320, 448)
    assert s.canvas_for([(440, 300)]) == (448, 320)
    assert s.canvas_for([(300, 440), (440, 300)]) == (448, 448)  # landscape + portrait
    with pytest.raises(ValueError, match=r"MODEL.STATIC.CANVAS.*\(449, 10\)"):
        s.canvas_for([(449, 10)])


def test_gt_buckets_grow_without_cap():
    s = _shapes([(64, 64)], bucket_min=16)
    assert [s.gt_bucket(n) for n in (0, 16, 17, 60, 300)] == [16, 16, 32, 64, 512]
    n = 300
    boxes = torch.rand(n, 4) * 30
    boxes[:, 2:] += boxes[:, :2] + 1
    item = {
        "image": torch.zeros(3, 64, 64, dtype=torch.uint8),
        "targets": Targets(boxes, torch.zeros(n, dtype=torch.int64)),
    }
    batch = build_static_batch([item], s, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), training=True)
    assert batch.shape_key == (1, 64, 64, 512)
    assert int(batch.gt_valid.sum()) == n and torch.equal(batch.gt_boxes[0, :n], boxes)


@pytest.mark.parametrize(
    "canvas, match",
    [
        ([], "at least one MODEL.STATIC.CANVAS"),
        ([(100, 128)], "multiples of the backbone's size divisibility 32"),
        ([(128,)], r"\(height, width\) integer pairs"),
    ],
)
def test_bad_canvas_is_named(canvas, match):
    with pytest.raises(ValueError, match=match):
        _shapes(canvas)


def test_gt_box_outside_its_image_is_named():
    """Static mode's RoIAlign sample bound assumes boxes inside the image; the mapper clips them."""
    s = _shapes([(64, 64)])
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [10.0, 10.0, 50.5, 20.0]])
    item = {
        "file_name": "a.jpg",
        "image": torch.zeros(3, 48, 50, dtype=torch.uint8),
        "targets": Targets(boxes, torch.zeros(2, dtype=torch.int64)),
    }
    with pytest.raises(ValueError, match=r"input 0 \(a.jpg\): gt box 1 .*leaves the 48x50 image"):
        build_static_batch([item], s, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), training=True)
    item["targets"] = Targets(boxes.clamp(max=48.0), torch.zeros(2, dtype=torch.int64))
    batch = build_static_batch([item], s, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), training=True)
    assert int(batch.gt_valid.sum()) == 2


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.STATIC.COMPILE", "inductor"], "needs MODEL.STATIC.ENABLED True"),
        (
            ["MODEL.STATIC.ENABLED", "True", "MODEL.STATIC.COMPILE", "inductor"],
            "needs INPUT.MASK_FORMAT bitmask",
        ),
        (
            [
                "MODEL.STATIC.ENABLED",
                "True",
                "INPUT.MASK_FORMAT",
                "bitmask",
                "MODEL.STATIC.COMPILE",
                "inductr",
            ],
            "'inductr' is not a torch.compile backend",
        ),
    ],
)
def test_bad_static_compile_is_named(opts, match):
    from pathlib import Path

    from cascade_rcnn.config import load_config
    from cascade_rcnn.modeling import build_model

    config = Path(__file__).resolve().parents[1] / "configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
    cfg = load_config(str(config), ["MODEL.DEVICE", "cpu", "MODEL.STATIC.CANVAS", "((64, 64),)", *opts])
    with pytest.raises(ValueError, match=match):
        build_model(cfg)
