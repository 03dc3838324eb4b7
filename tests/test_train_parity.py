"""Training-step parity with detectron2: one forward/backward of the slim Cascade Mask R-CNN on the
fixed batch of ../shared/fixtures/d2_train_parity (see its README), at detectron2's default padding.

Sampling there is deterministic (every labelled anchor, every stage-0 proposal), so the nine losses
and the gradient norm of each of the 100 trainable parameters must agree to float32 noise.
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
from cascade_rcnn.modeling.layers import FrozenBatchNorm2d
from cascade_rcnn.structures import Targets

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-7
GRAD_NORM_RTOL = 1e-3


@pytest.fixture(scope="module")
def step():
    """(expected, losses, {parameter name: gradient}) after one training step on the batch."""
    train = shared_fixture("fixtures/d2_train_parity")
    slim = shared_fixture("fixtures/d2_parity")
    expected = json.loads((train / "expected.json").read_text())
    assert expected["square_pad"] == 0  # default padding; expected_canvas448.json is the fixed canvas

    cfg = load_config(slim / "config.yaml", ["MODEL.DEVICE", "cpu", *expected["opts"]])
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    torch.manual_seed(0)  # nothing here should depend on it: sampling keeps everything
    model = build_model(cfg)
    report = load_into_model(model, load_weights(slim / "model_final.pkl"))
    assert not report.missing and not report.unexpected and not report.shape_mismatch, str(report)
    model.train()
    assert all(isinstance(m, FrozenBatchNorm2d) for n, m in model.named_modules() if n.endswith(".norm"))

    inputs = []
    for im in json.loads((train / "batch.json").read_text())["images"]:
        rgb = np.asarray(Image.open(train / im["file"]).convert("RGB"))
        assert rgb.shape == (im["height"], im["width"], 3), im["file"]
        bgr_chw = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))
        targets = Targets(
            boxes=torch.tensor(im["boxes_xyxy"], dtype=torch.float32),
            classes=torch.tensor(im["classes"], dtype=torch.int64),
            polygons=[[np.asarray(p, dtype=np.float64) for p in polys] for polys in im["polygons"]],
        )
        inputs.append({"image": bgr_chw, "height": im["height"], "width": im["width"], "targets": targets})
    # detectron2 pads to the largest image rounded up to SIZE_DIVISIBILITY (32): 352x320 here.
    assert tuple(model.preprocess(inputs)[0].shape[-2:]) == (352, 320)

    losses = model(inputs)
    sum(losses.values()).backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return expected, {k: v.item() for k, v in losses.items()}, grads


def test_losses_match_detectron2(step):
    expected, losses, _ = step
    assert set(losses) == set(expected["losses"])
    rows = []
    for name, want in expected["losses"].items():
        got = losses[name]
        rows.append((abs(got - want) / abs(want), abs(got - want), name, got, want))
    for rel, _diff, name, got, want in sorted(rows, reverse=True):
        print(f"loss {name:22s} ours {got:.9g} d2 {want:.9g} rel {rel:.2e}")
    bad = [r for r in rows if r[1] > max(LOSS_ATOL, LOSS_RTOL * abs(r[4]))]
    assert not bad, bad
    assert sum(losses.values()) == pytest.approx(expected["total_loss"], rel=LOSS_RTOL)


def test_gradient_norms_match_detectron2(step):
    expected, _, grads = step
    # Our parameter names are detectron2's (tests/test_modeling.py checks the state dict), so the
    # mapping is the identity; every parameter with a gradient on either side must be on both.
    assert len(expected["grads"]) == expected["params_with_grad"] == 100
    assert not set(expected["grads"]) - set(grads), "no gradient here for d2's parameters"
    assert not set(grads) - set(expected["grads"]), "gradient here for parameters d2 does not train"
    rows = []
    for name, want in expected["grads"].items():
        got = grads[name].norm().item()
        rows.append((abs(got - want["norm"]) / want["norm"], name, got, want["norm"]))
    rows.sort(reverse=True)
    for rel, name, got, want in rows[:10]:
        print(f"grad norm {name:48s} ours {got:.9g} d2 {want:.9g} rel {rel:.2e}")
    bad = [r for r in rows if r[0] > GRAD_NORM_RTOL]
    assert not bad, bad
