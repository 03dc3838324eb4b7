"""Static-mode inference (MODEL.STATIC) returns dynamic mode's detections on the same canvas.

Both run the slim parity model (../shared/fixtures/d2_parity) on the batch padded to its canvas:
the dynamic path through CascadeMaskRCNN.detect, the static one through fixed rows and masks.
Cases: the six parity images, a crowded image (64 objects), an empty one, and the most extreme
aspect ratios the canvas allows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from shared_fixtures import shared_fixture

from cascade_rcnn.checkpoint import load_into_model, load_weights
from cascade_rcnn.config import load_config
from cascade_rcnn.data.image_io import read_image
from cascade_rcnn.data.transforms import resize_image, resize_shortest_edge_shape
from cascade_rcnn.modeling import build_model

BOX_TOL = 0.01  # px, original resolution
MIN_MASK_IOU = 0.99
CANVAS = 448


@pytest.fixture(scope="module")
def setup():
    slim = shared_fixture("fixtures/d2_parity")
    opts = [
        "MODEL.DEVICE",
        "cpu",
        "MODEL.STATIC.ENABLED",
        "True",
        "MODEL.STATIC.CANVAS",
        f"(({CANVAS}, {CANVAS}),)",
    ]
    cfg = load_config(slim / "config.yaml", opts)
    model = build_model(cfg).eval()
    report = load_into_model(model, load_weights(slim / "model_final.pkl"))
    assert not report.missing and not report.unexpected and not report.shape_mismatch, str(report)
    return slim, cfg, model


def _compare(model, inputs):
    """Static inference vs the dynamic path on the static canvas; returns the detection counts."""
    static = model(inputs)
    batch = model.static_batch(inputs)
    images = batch.images.contiguous(memory_format=torch.channels_last)
    sizes = [tuple(int(v) for v in s) for s in batch.image_sizes.tolist()]
    dynamic = model.detect(images, sizes, inputs)
    counts = []
    for s, d in zip(static, dynamic):
        assert len(s) == len(d)
        assert torch.equal(s.classes, d.classes)
        if len(d):
            assert (s.boxes - d.boxes).abs().max().item() <= BOX_TOL
            assert (s.scores - d.scores).abs().max().item() <= 1e-5
            inter = (s.masks & d.masks).flatten(1).sum(1).double()
            union = (s.masks | d.masks).flatten(1).sum(1).double()
            iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
            assert iou.min().item() >= MIN_MASK_IOU
        counts.append(len(d))
    return counts


def _item(image: np.ndarray) -> dict:
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "height": image.shape[0],
        "width": image.shape[1],
    }


def test_parity_images(setup):
    slim, cfg, model = setup
    inputs = []
    for ref in json.loads((slim / "outputs.json").read_text()):
        img = read_image(slim / "images" / ref["file_name"], format=cfg.INPUT.FORMAT)
        h, w = img.shape[:2]
        nh, nw = resize_shortest_edge_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        item = _item(resize_image(img, nh, nw))
        item.update(height=h, width=w)
        inputs.append(item)
    counts = _compare(model, inputs[:3]) + _compare(model, inputs[3:])
    assert sum(counts) > 0


def _shapes_image(rng, h: int, w: int, grid: tuple[int, int]) -> np.ndarray:
    """Background noise with bright squares on a rows x cols grid (64 objects for 8 x 8)."""
    img = rng.normal(40, 7, size=(h, w, 3))
    rows, cols = grid
    for r in range(rows):
        for c in range(cols):
            ch, cw = h / rows, w / cols
            s = 0.6 * min(ch, cw)
            y0, x0 = int(r * ch + (ch - s) / 2), int(c * cw + (cw - s) / 2)
            img[y0 : y0 + int(s), x0 : x0 + int(s)] = rng.integers(120, 246, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_crowded_empty_and_extreme_aspect_images(setup):
    _, _, model = setup
    rng = np.random.default_rng(0)
    crowded = _item(_shapes_image(rng, CANVAS, CANVAS, (8, 8)))
    empty = _item(np.full((320, 288, 3), 40, dtype=np.uint8))
    counts = _compare(model, [crowded, empty])
    assert counts[0] >= 60 and counts[1] == 0
    wide = _item(_shapes_image(rng, 32, CANVAS, (1, 8)))
    tall = _item(_shapes_image(rng, CANVAS, 32, (8, 1)))
    _compare(model, [wide, tall])
