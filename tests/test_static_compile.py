"""torch.compile(fullgraph=True) of static mode's training forward + losses, and of its inference.

fullgraph=True fails on any graph break, host read (.item(), .tolist(), bool(tensor)) or
data-dependent shape (nonzero, boolean indexing). Over 24 steps with 0 to 60 objects per image and
varied image sizes on two canvases, every batch's shapes fall into a few buckets (canvas x
ground-truth rows), so after one warm-up step per bucket nothing compiles again (counted with
torch._dynamo's counters). The aot_eager backend traces forward and backward as inductor would,
without its code generation (bench/static_shapes.py times inductor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shared_fixtures import shared_fixture
from torch._dynamo.utils import counters

from cascade_rcnn.config import load_config
from cascade_rcnn.modeling import build_model
from cascade_rcnn.modeling.static_rcnn import compile_inference, compile_train_losses
from cascade_rcnn.structures import Targets

pytestmark = pytest.mark.slow

CANVASES = "((192, 256), (256, 192))"


def _config():
    path = shared_fixture("fixtures/d2_parity") / "config.yaml"  # the slim model
    opts = [
        "MODEL.STATIC.ENABLED",
        "True",
        "MODEL.STATIC.CANVAS",
        CANVASES,
        "MODEL.STATIC.GT_BUCKET_MIN",
        "32",
    ]
    return load_config(path, opts)


def random_batch(rng: np.random.Generator, landscape: bool, num_objects: list[int]) -> list[dict]:
    """Images that fit the landscape (192x256) or portrait canvas, with box + bitmask targets."""
    out = []
    for n in num_objects:
        h, w = (int(rng.integers(96, 193)), int(rng.integers(160, 257)))
        if not landscape:
            h, w = w, h
        image = torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8))
        x0 = rng.uniform(0, w - 8, n)
        y0 = rng.uniform(0, h - 8, n)
        x1 = np.minimum(x0 + rng.uniform(4, w / 2, n), w)
        y1 = np.minimum(y0 + rng.uniform(4, h / 2, n), h)
        boxes = torch.tensor(np.stack([x0, y0, x1, y1], 1), dtype=torch.float32).reshape(n, 4)
        masks = torch.zeros((n, h, w), dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.round().to(torch.int64).tolist()):
            masks[i, b:d, a:c] = True
        targets = Targets(boxes=boxes, classes=torch.from_numpy(rng.integers(0, 3, n)), masks=masks)
        out.append({"image": image, "height": h, "width": w, "targets": targets})
    return out


def test_training_step_compiles_once_per_bucket():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = _config()
    model = build_model(cfg).train()
    step = compile_train_losses(model, backend="aot_eager")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(24):
        counts = [int(v) for v in rng.integers(0, 61, 2)]
        batches.append(model.static_batch(random_batch(rng, bool(rng.integers(2)), counts)))
    first = {}
    for b in batches:
        first.setdefault(b.shape_key, b)
    assert len(first) == 4  # 2 canvases x gt buckets {32, 64}: the only shapes a step sees

    def run(batch):
        losses = step(batch)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        return losses

    for b in first.values():  # warm-up: one step per bucket
        run(b)
    warm = counters["stats"]["unique_graphs"]
    assert warm == 4 and counters["graph_break"] == {}
    for b in batches:
        losses = run(b)
        assert all(torch.isfinite(v) for v in losses.values())
    assert counters["graph_break"] == {}
    assert counters["stats"]["unique_graphs"] == warm, "recompiled after warm-up"


def test_inference_compiles_once_per_canvas():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    infer = compile_inference(model, backend="aot_eager")
    rng = np.random.default_rng(1)
    for i in range(6):
        inputs = random_batch(rng, i % 2 == 0, [0, 0])
        batch = model.static_batch([{k: v for k, v in x.items() if k != "targets"} for x in inputs])
        out = infer(batch.images, batch.image_sizes)
        assert out["valid"].shape == (2, model.roi_heads.test_topk_per_image)
        if i == 1:
            warm = counters["stats"]["unique_graphs"]
    assert counters["graph_break"] == {}
    assert warm == 2 and counters["stats"]["unique_graphs"] == warm
