"""inference_on_dataset: per-image outputs on the CPU, model mode restored, and a 2-process gloo gather."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cascade_rcnn.evaluation.inference import gather_predictions, inference_on_dataset
from cascade_rcnn.structures import Detections


class BrightnessDetector(nn.Module):
    """A real (tiny) module: one box per image whose score is the image's mean intensity."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0 / 255))

    def forward(self, batch: list[dict]) -> list[Detections]:
        assert not self.training, "inference must run in eval mode"
        out = []
        for inp in batch:
            img = inp["image"].float()
            h, w = inp["height"], inp["width"]
            score = (img.mean() * self.scale).reshape(1)
            out.append(
                Detections(
                    boxes=torch.tensor([[0.0, 0.0, w / 2, h / 2]]),
                    scores=score,
                    classes=torch.tensor([inp["image_id"] % 3]),
                    masks=torch.ones((1, h, w), dtype=torch.bool),
                    image_size=(h, w),
                )
            )
        return out


def make_inputs(image_ids: list[int]) -> list[dict]:
    return [
        {
            "image": torch.full((3, 8, 10), float(i), dtype=torch.uint8),
            "height": 16,
            "width": 20,
            "image_id": i,
            "file_name": f"img_{i}.jpg",
        }
        for i in image_ids
    ]


def test_single_process_outputs_sorted_on_cpu(caplog):
    model = BrightnessDetector().train()
    ids = [12, 3, 7, 40, 1, 9, 25, 5]
    inputs = make_inputs(ids)
    loader = [inputs[i : i + 2] for i in range(0, len(inputs), 2)]  # batches of 2
    with caplog.at_level(logging.INFO, logger="cascade_rcnn.evaluation.inference"):
        preds = inference_on_dataset(model, loader, device="cpu")
    assert model.training, "the model's train/eval mode is restored"
    assert [p["image_id"] for p in preds] == sorted(ids)
    for p in preds:
        det = p["instances"]
        assert isinstance(det, Detections) and det.scores.device.type == "cpu"
        assert det.scores.item() == pytest.approx(p["image_id"] / 255)
        assert det.masks.shape == (1, 16, 20)
        assert (p["height"], p["width"], p["file_name"]) == (16, 20, f"img_{p['image_id']}.jpg")
    assert "inference done 4/4" in caplog.text
    assert "excluding 3 warmup iterations" in caplog.text


def test_postprocess_runs_per_image():
    model = BrightnessDetector().eval()
    preds = inference_on_dataset(
        model,
        [make_inputs([2, 1])],
        device="cpu",
        progress=False,
        postprocess=lambda inp, det: {"id": inp["image_id"], "n": len(det)},
    )
    assert [p["instances"] for p in preds] == [{"id": 1, "n": 1}, {"id": 2, "n": 1}]


def test_gather_without_process_group_deduplicates():
    preds = [{"image_id": 3, "v": "a"}, {"image_id": 1, "v": "b"}, {"image_id": 3, "v": "c"}]
    assert gather_predictions(preds) == [{"image_id": 1, "v": "b"}, {"image_id": 3, "v": "a"}]


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        ids = list(range(100, 111))  # 11 images: uneven shards
        # Contiguous shards as an InferenceSampler makes them; rank 1 also repeats its last image,
        # as a sampler that pads shards to equal length would.
        shard = ids[:6] if rank == 0 else ids[6:] + ids[-1:]
        loader = [[x] for x in make_inputs(shard)]
        preds = inference_on_dataset(BrightnessDetector(), loader, device="cpu", progress=False)
        summary = [
            [p["image_id"], p["instances"].scores.item(), list(p["instances"].masks.shape)] for p in preds
        ]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(summary, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_gather(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == [], "only rank 0 holds the gathered predictions"
    assert [r[0] for r in rank0] == list(range(100, 111)), "every image once, in image_id order"
    for image_id, score, mask_shape in rank0:
        assert score == pytest.approx(image_id / 255)
        assert mask_shape == [1, 16, 20]
