"""Library-level parity with detectron2 on the shared fixture (slim Cascade Mask R-CNN, 6 images).

detectron2's outputs were produced one image at a time (DefaultPredictor), so each image is run
as a batch of one here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from cascade_rcnn.checkpoint import load_into_model, load_weights
from cascade_rcnn.config import load_config
from cascade_rcnn.data.image_io import read_image
from cascade_rcnn.data.transforms import resize_image, resize_shortest_edge_shape
from cascade_rcnn.modeling import build_model

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "d2_parity"
pytestmark = pytest.mark.usefixtures("d2_parity")

BOX_TOL = 0.01  # px, original resolution
SCORE_TOL = 1e-4
MIN_MASK_IOU = 0.99


@pytest.fixture(scope="module")
def model():
    cfg = load_config(FIXTURE / "config.yaml", ["MODEL.DEVICE", "cpu"])
    m = build_model(cfg).eval()
    report = load_into_model(m, load_weights(FIXTURE / "model_final.pkl"))
    assert not report.missing and not report.unexpected and not report.shape_mismatch, str(report)
    m.cfg = cfg
    return m


@pytest.fixture(scope="module")
def inputs(model):
    cfg = model.cfg
    out = {}
    for ref in json.loads((FIXTURE / "outputs.json").read_text()):
        img = read_image(FIXTURE / "images" / ref["file_name"], format=cfg.INPUT.FORMAT)
        h, w = img.shape[:2]
        nh, nw = resize_shortest_edge_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        image = torch.from_numpy(np.ascontiguousarray(resize_image(img, nh, nw).transpose(2, 0, 1)))
        out[ref["file_name"]] = {"image": image, "height": h, "width": w, "file_name": ref["file_name"]}
    return out


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_detections_match_detectron2(model, inputs):
    refs = json.loads((FIXTURE / "outputs.json").read_text())
    worst = {"box": 0.0, "score": 0.0, "mask_iou": 1.0}
    for ref in refs:
        name = ref["file_name"]
        (det,) = model([inputs[name]])
        inst = ref["instances"]
        assert len(det) == len(inst), f"{name}: {len(det)} detections, detectron2 has {len(inst)}"
        assert det.image_size == (ref["height"], ref["width"])
        assert det.classes.tolist() == [i["category"] for i in inst], name
        box_diff = (det.boxes - torch.tensor([i["bbox_xyxy"] for i in inst])).abs().max().item()
        score_diff = (det.scores - torch.tensor([i["score"] for i in inst])).abs().max().item()
        assert box_diff <= BOX_TOL, f"{name}: box differs by {box_diff} px"
        assert score_diff <= SCORE_TOL, f"{name}: score differs by {score_diff}"
        assert det.masks.shape == (len(inst), ref["height"], ref["width"]) and det.masks.dtype == torch.bool
        for k, (mask, i) in enumerate(zip(det.masks.numpy(), inst)):
            iou = _mask_iou(mask, mask_util.decode(i["segmentation"]).astype(bool))
            assert iou >= MIN_MASK_IOU, f"{name} detection {k}: mask IoU {iou:.4f}"
            worst["mask_iou"] = min(worst["mask_iou"], iou)
        worst["box"] = max(worst["box"], box_diff)
        worst["score"] = max(worst["score"], score_diff)
    print(f"parity worst case over {len(refs)} images: {worst}")


def test_rpn_proposals_match_detectron2(model, inputs):
    """Diagnostic: the top RPN proposals (after NMS) in resized-image pixels, and their logits."""
    for ref in json.loads((FIXTURE / "proposals.json").read_text()):
        x = inputs[ref["file_name"]]
        assert list(x["image"].shape[-2:]) == ref["resized_hw"]
        with torch.no_grad():
            images, sizes = model.preprocess([x])
            rpn = model.proposal_generator
            boxes, logits = rpn.predict_proposals(*rpn.dense_outputs(model.backbone(images)), sizes)
        expected_boxes = torch.tensor(ref["boxes_xyxy"])
        expected_logits = torch.tensor(ref["objectness_logits"])
        n = len(expected_boxes)
        assert boxes[0].shape[0] >= n
        assert (boxes[0][:n] - expected_boxes).abs().max().item() <= BOX_TOL, ref["file_name"]
        assert (logits[0][:n] - expected_logits).abs().max().item() <= 1e-3, ref["file_name"]
