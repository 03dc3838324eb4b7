"""End-to-end training through `cascade-rcnn train|finetune` on the synthetic shapes set with a slim
Cascade Mask R-CNN (the detectron2 parity fixture's config, made smaller with --opts).

Runs start from the fixture's trained weights (MODEL.WEIGHTS) so that a few iterations are cheap and
numerically tame; the learning test at the end trains from scratch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cascade_rcnn import storage

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "d2_parity"
CONFIG = str(FIXTURE / "config.yaml")
WEIGHTS = str(FIXTURE / "model_final.pkl")

# Small inputs and few proposals: a training step takes a fraction of a second on 2 cores.
FAST = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", WEIGHTS,
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.01",
    "SOLVER.WARMUP_ITERS", "2",
    "SEED", "5",
]  # fmt: skip


def cli(command: str, data: str, output: str, opts: list[str], *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cascade_rcnn.cli", command,
        "--config", CONFIG, "--data", data, "--output", output, "--train-split", "train2017",
        *extra, "--opts", *opts,
    ]  # fmt: skip


def run_ok(cmd: list[str], log: Path) -> str:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def final_weights(output: str, tmp: Path) -> dict[str, torch.Tensor]:
    local = tmp / f"final-{abs(hash(output))}.pth"
    storage.get_file(storage.join(output, "model_final.pth"), str(local))
    return torch.load(local, weights_only=True)["model"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    from cascade_rcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), num_train=12, num_val=4, seed=0, min_size=128, max_size=160)
    return str(root)


# ---- kill with SIGKILL after the first checkpoint, restart, compare with an uninterrupted run ----

RESUME = [*FAST, "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"]


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = str(tmp / "out")
    run_ok(cli("train", shapes, out, RESUME), tmp / "log.txt")
    return final_weights(out, tmp)


def kill_after_first_checkpoint(cmd: list[str], output: str, log: Path) -> str:
    """Start the run, SIGKILL it as soon as `last_checkpoint` appears; returns the pointer's content."""
    pointer = storage.join(output, "last_checkpoint")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None and not storage.exists(pointer):
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return storage.get_bytes(pointer).decode()


def check_kill_and_resume(shapes: str, output: str, tmp: Path, reference: dict[str, torch.Tensor]) -> None:
    cmd = cli("train", shapes, output, RESUME)
    named = kill_after_first_checkpoint(cmd, output, tmp / "killed.txt")
    assert named.startswith("model_000000") and named != "model_final.pth", named
    resumed_at = int(named[len("model_") : -len(".pth")]) + 1
    text = run_ok(cmd, tmp / "resumed.txt")
    assert f"resuming from {storage.join(output, named)}: iteration {resumed_at}" in text
    got = final_weights(output, tmp)
    assert got.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:5]}"
    rows = [
        json.loads(x) for x in storage.get_bytes(storage.join(output, "metrics.jsonl")).decode().splitlines()
    ]
    assert [r["iteration"] for r in rows] == [5]  # one log line at the last iteration, no duplicates


def test_kill_and_resume_local_is_exact(shapes, uninterrupted, tmp_path):
    check_kill_and_resume(shapes, str(tmp_path / "out"), tmp_path, uninterrupted)


def test_kill_and_resume_s3_is_exact(shapes, uninterrupted, tmp_path, s3_env):
    check_kill_and_resume(shapes, f"s3://{s3_env}/runs/resume", tmp_path, uninterrupted)


# ---- 2-process DDP (gloo) against 1 process over the same global batch ----
#
# detectron2's losses are normalized per device, and DDP averages gradients over devices. The average
# of the per-device gradients equals the single-process gradient over the union of the images only if
# every normalizer is the same per image, and if no random choice differs between the two runs:
# - RPN: the normalizer is BATCH_SIZE_PER_IMAGE x images (linear in images). A huge batch size makes
#   every labelled anchor count, so the random subsampling picks the same set in both runs.
# - ROI heads: losses are averaged over the device's R RoIs. Without gt appending, with POST_NMS_TOPK
#   proposals per image, a RoI batch larger than that and POSITIVE_FRACTION 1, every image contributes
#   exactly POST_NMS_TOPK RoIs to each stage, all of them used (no random subsampling).
# - The mask loss is averaged over the device's foreground RoIs, whose count differs per image: masks off.
# - Equal-size images (square shapes, one train size) so batching pads nothing differently, and no aspect
#   grouping, so rank r gets stream items r, r+2, ... exactly the pairs the single process batches.
# Augmentations are seeded by stream position, so both runs flip the same images.
# The launcher gives each of the 2 workers one thread (as torchrun does); the single process keeps two.

DDP = [
    *FAST,
    "MODEL.MASK_ON", "False",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "100000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
    "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT", "False",
    "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    "SOLVER.BASE_LR", "0.02",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
]  # fmt: skip


@pytest.fixture(scope="module")
def square_shapes(tmp_path_factory) -> str:
    from cascade_rcnn.data.shapes import make_shapes

    root = tmp_path_factory.mktemp("square_shapes")
    make_shapes(str(root), num_train=8, num_val=2, seed=1, min_size=128, max_size=128)
    return str(root)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(square_shapes, tmp_path):
    from cascade_rcnn.checkpoint import load_weights

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_ok(cli("train", square_shapes, one, DDP), tmp_path / "one.txt")
    text = run_ok(cli("train", square_shapes, two, DDP, "--nproc-per-node", "2"), tmp_path / "two.txt")
    assert "starting 2 workers" in text and "img/s" in text and "OMP_NUM_THREADS=1" in text

    start = load_weights(WEIGHTS)
    w1, w2 = final_weights(one, tmp_path), final_weights(two, tmp_path)
    trained = [k for k in w1 if k in start and not torch.equal(w1[k], start[k].to(w1[k].dtype))]
    assert len(trained) > 50  # res3..res5, FPN, RPN and the three box heads moved
    step1 = torch.cat([(w1[k] - start[k]).flatten() for k in trained])
    gap = torch.cat([(w2[k] - w1[k]).flatten() for k in trained])
    # The updates agree to float32 summation-order noise (a missing all-reduce would leave each rank
    # with its own image's update: an error of the size of the update itself).
    assert step1.norm() > 1e-3
    assert gap.norm() / step1.norm() < 1e-3, (gap.norm().item(), step1.norm().item())
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k not in trained)

    meta = torch.load(tmp_path / f"final-{abs(hash(two))}.pth", weights_only=True)["meta"]
    assert meta["world_size"] == 2


# ---- finetune to another label set ----


def two_class_copy(root: str, dest: Path) -> str:
    """The shapes set without triangles: 2 categories, same images (linked, not copied)."""
    ann = json.loads(Path(root, "annotations", "instances_train2017.json").read_text())
    drop = {c["id"] for c in ann["categories"] if c["name"] == "triangle"}
    ann["categories"] = [c for c in ann["categories"] if c["id"] not in drop]
    ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] not in drop]
    (dest / "annotations").mkdir(parents=True)
    (dest / "annotations" / "instances_train2017.json").write_text(json.dumps(ann))
    (dest / "train2017").symlink_to(Path(root, "train2017"))
    return str(dest)


def test_finetune_to_other_classes_reinitializes_only_class_layers(shapes, tmp_path):
    from cascade_rcnn.checkpoint import load_weights

    data = two_class_copy(shapes, tmp_path / "two_class")
    out = str(tmp_path / "out")
    opts = [*FAST, "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "1"]
    text = run_ok(cli("finetune", data, out, opts, "--weights", WEIGHTS), tmp_path / "log.txt")
    assert "3 classes, the config 2: re-initializing the class-specific layers" in text

    ckpt = torch.load(Path(out) / "model_final.pth", weights_only=True)
    expected = {f"roi_heads.box_predictor.{s}.cls_score.{p}" for s in range(3) for p in ("weight", "bias")}
    expected |= {"roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    assert set(ckpt["meta"]["init"]["reinitialized"]) == expected
    assert ckpt["meta"]["init"]["init_weights"] == WEIGHTS
    model, start = ckpt["model"], load_weights(WEIGHTS)
    assert model["roi_heads.box_predictor.0.cls_score.weight"].shape[0] == 3  # 2 classes + background
    assert model["roi_heads.mask_head.predictor.weight"].shape[0] == 2
    # Frozen layers (stem, res2 with FREEZE_AT 2) and every FrozenBN statistic kept the loaded values.
    frozen = [k for k in model if k.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))]
    frozen += [k for k in model if k.endswith(("running_mean", "running_var"))]
    assert frozen and all(torch.equal(model[k], start[k].to(model[k].dtype)) for k in frozen)
    assert ckpt["trainer"]["iteration"] == 0  # a fresh schedule: one iteration was trained


# ---- learning: from scratch on the shapes set, then COCO AP through --eval-after ----
#
# Measured (torch 2.14.1, 2-core x86 CPU): after these 100 iterations box AP 25.9 and mask AP 19.9 on the
# 16 validation images; a random initialization scores ~0. The thresholds (about half) leave room for the
# numeric drift of another CPU.
LEARN = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.NORM", "BN",  # trainable BN and no frozen stage: random features need normalizing
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.PIXEL_STD", "[57.375,57.12,58.395]",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "500",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.BASE_LR", "0.02",
    "SOLVER.WARMUP_ITERS", "50",
    "SOLVER.STEPS", "(240,)",
    "SOLVER.CLIP_GRADIENTS.ENABLED", "True",  # from scratch, an unlucky batch can otherwise blow up
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "5.0",
    "SOLVER.MAX_ITER", "100",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "SEED", "3",
]  # fmt: skip
# 100 iterations from scratch are chaotic: scaling one RoIAlign gradient by (1 + 1e-6) moved box AP
# from 9.1 to 24.8 for one seed. Over 12 runs (5 seeds, 3 numerically different builds) box AP was
# 9.1-24.8 and mask AP 4.5-23.8; an untrained model scores about 0. The bounds sit below that range.
MIN_BOX_AP, MIN_MASK_AP = 6.0, 3.0


@pytest.mark.slow
def test_training_from_scratch_learns_shapes(tmp_path):
    from cascade_rcnn.data.shapes import make_shapes

    data = tmp_path / "shapes"
    make_shapes(str(data), num_train=64, num_val=16, seed=0, min_size=128, max_size=160)
    out = str(tmp_path / "out")
    text = run_ok(
        cli("train", str(data), out, LEARN, "--val-split", "val2017", "--eval-after"), tmp_path / "log.txt"
    )
    assert "iter: 99" in text
    metrics = json.loads((Path(out) / "eval" / "metrics.json").read_text())
    assert metrics["bbox"]["AP"] > MIN_BOX_AP, metrics["bbox"]
    assert metrics["segm"]["AP"] > MIN_MASK_AP, metrics["segm"]
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [19, 39, 59, 79, 99]
    assert rows[-1]["loss_mask"] < 0.5 < rows[0]["loss_mask"]
