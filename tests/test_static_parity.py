"""Static-shape mode (MODEL.STATIC) against detectron2's training step on a fixed 448x448 canvas
(../shared/fixtures/d2_train_parity/expected_canvas448.json, see its README).

The batch goes onto the one canvas, the ground truth is padded to its bucket, and every loss is a
masked sum over fixed rows; the nine losses and the 100 gradient norms must match to float32 noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from shared_fixtures import shared_fixture

from cascade_rcnn.checkpoint import load_into_model, load_weights
from cascade_rcnn.config import load_config
from cascade_rcnn.modeling import build_model
from cascade_rcnn.structures import Targets

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-7
GRAD_NORM_RTOL = 1e-3
STATIC_OPTS = ["MODEL.STATIC.ENABLED", "True", "MODEL.STATIC.CANVAS", "((448, 448),)"]


def fixture_inputs(train) -> list[dict]:
    inputs = []
    for im in json.loads((train / "batch.json").read_text())["images"]:
        rgb = np.asarray(Image.open(train / im["file"]).convert("RGB"))
        targets = Targets(
            boxes=torch.tensor(im["boxes_xyxy"], dtype=torch.float32),
            classes=torch.tensor(im["classes"], dtype=torch.int64),
            polygons=[[np.asarray(p, dtype=np.float64) for p in polys] for polys in im["polygons"]],
        )
        image = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))
        inputs.append({"image": image, "height": im["height"], "width": im["width"], "targets": targets})
    return inputs


@pytest.fixture(scope="module")
def step():
    train = shared_fixture("fixtures/d2_train_parity")
    slim = shared_fixture("fixtures/d2_parity")
    expected = json.loads((train / "expected_canvas448.json").read_text())
    assert expected["square_pad"] == 448
    cfg = load_config(slim / "config.yaml", ["MODEL.DEVICE", "cpu", *expected["opts"], *STATIC_OPTS])
    torch.manual_seed(0)  # sampling keeps every row at these batch sizes; the seed must not matter
    model = build_model(cfg)
    report = load_into_model(model, load_weights(slim / "model_final.pkl"))
    assert not report.missing and not report.unexpected and not report.shape_mismatch, str(report)
    model.train()
    inputs = fixture_inputs(train)
    batch = model.static_batch(inputs)
    assert batch.shape_key == (2, 448, 448, 16)  # canvas 448x448, gt padded to the 16-row bucket
    losses = model(inputs)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return expected, {k: v.item() for k, v in losses.items()}, grads


def test_static_losses_match_detectron2_canvas448(step):
    expected, losses, _ = step
    assert set(losses) == set(expected["losses"])
    bad = []
    for name, want in expected["losses"].items():
        got = losses[name]
        print(f"loss {name:22s} ours {got:.9g} d2 {want:.9g} rel {abs(got - want) / abs(want):.2e}")
        if abs(got - want) > max(LOSS_ATOL, LOSS_RTOL * abs(want)):
            bad.append((name, got, want))
    assert not bad, bad
    assert sum(losses.values()) == pytest.approx(expected["total_loss"], rel=LOSS_RTOL)


def test_static_gradient_norms_match_detectron2_canvas448(step):
    expected, _, grads = step
    assert set(expected["grads"]) == set(grads)
    rows = sorted(
        ((abs(grads[n].norm().item() - w["norm"]) / w["norm"], n) for n, w in expected["grads"].items()),
        reverse=True,
    )
    print("worst gradient norms (rel, name):", rows[:5])
    assert rows[0][0] <= GRAD_NORM_RTOL, rows[:5]


@pytest.mark.slow
def test_static_step_on_the_npu_path_matches_and_reaches_no_torchvision_op():
    """ops.dispatch_as("npu") makes static mode pick what it picks on an NPU (ops.py's tensor
    RoIAlign and NMS). Every op the step's forward and backward dispatch is recorded: all are aten
    ops, none torchvision's, and the step still reproduces detectron2's canvas-448 numbers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cascade_rcnn.modeling import ops

    train = shared_fixture("fixtures/d2_train_parity")
    slim = shared_fixture("fixtures/d2_parity")
    expected = json.loads((train / "expected_canvas448.json").read_text())
    cfg = load_config(slim / "config.yaml", ["MODEL.DEVICE", "cpu", *expected["opts"], *STATIC_OPTS])
    model = build_model(cfg)
    load_into_model(model, load_weights(slim / "model_final.pkl"))
    model.train()
    namespaces: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespaces.add(func.namespace)
            return func(*args, **(kwargs or {}))

    with ops.dispatch_as("npu"), Record():
        losses = model(fixture_inputs(train))
        sum(losses.values()).backward()
    assert namespaces == {"aten"}
    for name, want in expected["losses"].items():
        assert abs(losses[name].item() - want) <= max(LOSS_ATOL, LOSS_RTOL * abs(want)), name
    for name, p in model.named_parameters():
        if p.grad is not None:
            want = expected["grads"][name]["norm"]
            assert abs(p.grad.norm().item() - want) <= GRAD_NORM_RTOL * want, name
