"""Time Cascade Mask R-CNN on synthetic inputs; print one JSON line.

    python bench/model_speed.py --config configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml \
        --height 800 --width 1216 --batch 2 --iters 3

Inputs are random uint8 images with 6 random boxes per image, each with a polygon mask inside
its box (as detectron2's numbers in the parity fixture's README were measured). The model is
freshly initialized (MODEL.WEIGHTS is not loaded unless --weights is given).

train_step_s: median seconds of forward + backward + SGD step at --batch images per step.
infer_s_per_image: median seconds of one eval-mode forward at batch 1 (postprocessing included).

With --flops, one extra untimed call of each is counted with torch's FlopCounterMode and the JSON
gets *_gflop and the achieved *_gflop_per_s. The rate compares runs across machines; the FLOPs
also show how much of the work depends on how many proposals a random model happens to keep.

machine_sgemm_gflop_per_s is the best of five 4096^3 float32 matmuls on the same threads, taken
before the model runs: the most this machine delivered at that moment. Reference figures taken
elsewhere compare through it (skip with --no-calibrate).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cascade_rcnn.config import load_config  # noqa: E402
from cascade_rcnn.logs import setup_logging  # noqa: E402
from cascade_rcnn.modeling import build_model  # noqa: E402
from cascade_rcnn.structures import Targets  # noqa: E402


def synthetic_targets(
    rng: np.random.Generator, height: int, width: int, num_classes: int, n: int = 6
) -> Targets:
    """n random boxes (at least 16 px a side) with an 8-point star-ish polygon inside each."""
    boxes, polygons = [], []
    for _ in range(n):
        bw = rng.uniform(16, width / 2)
        bh = rng.uniform(16, height / 2)
        x0 = rng.uniform(0, width - bw)
        y0 = rng.uniform(0, height - bh)
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=8))
        radii = rng.uniform(0.5, 1.0, size=8)
        cx, cy = x0 + bw / 2, y0 + bh / 2
        xs = cx + np.cos(angles) * radii * bw / 2
        ys = cy + np.sin(angles) * radii * bh / 2
        polygons.append([np.stack([xs, ys], axis=1).reshape(-1).astype(np.float64)])
    return Targets(
        boxes=torch.tensor(boxes, dtype=torch.float32),
        classes=torch.from_numpy(rng.integers(0, num_classes, size=n)).long(),
        polygons=polygons,
        masks=None,
    )


def synthetic_batch(
    rng: np.random.Generator, batch: int, height: int, width: int, num_classes: int
) -> list[dict]:
    return [
        {
            "image": torch.from_numpy(rng.integers(0, 256, size=(3, height, width), dtype=np.uint8)),
            "height": height,
            "width": width,
            "targets": synthetic_targets(rng, height, width, num_classes),
        }
        for _ in range(batch)
    ]


def _timed(fn, iters: int, warmup: int) -> tuple[list[float], list[float], list[int]]:
    """Wall seconds, process-CPU seconds and minor page faults of each of `iters` calls after `warmup`.

    CPU seconds (all threads) help read results taken on a busy machine; page faults do not depend
    on the load at all (each is a freshly mapped 4 KiB page the kernel had to zero).
    """
    for _ in range(warmup):
        fn()
    wall, cpu, faults = [], [], []
    for _ in range(iters):
        start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return wall, cpu, faults


def sgemm_rate(n: int = 4096, tries: int = 5) -> float:
    """Best GFLOP/s of an n x n x n float32 matmul on torch's current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return round(best, 1)


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed blocks up to 32 MiB instead of unmapping them.

    By default each activation over the (dynamic) mmap threshold is a fresh mmap, so every step
    page-faults and zeroes its activations again. Same effect as starting the process with
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=<large>. Returns False without glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.add_argument("--batch", type=int, default=2, help="images per training step")
    p.add_argument("--iters", type=int, default=5, help="timed iterations of each measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before each measurement")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--weights", default=None, help="optionally load these weights first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0, help="SGD learning rate of the timed steps (see below)")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="tune glibc malloc to keep freed activations mapped (see keep_freed_memory)",
    )
    p.add_argument("--flops", action="store_true", help="also count FLOPs (see above)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the sgemm probe")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print the top-N ops of one train step and one inference to stderr",
    )
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)

    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory() if args.keep_freed_memory else False
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = load_config(args.config, args.opts)
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    model = build_model(cfg)
    if args.weights:
        from cascade_rcnn.checkpoint import load_pretrained

        load_pretrained(model, cfg, args.weights)

    result: dict = {
        "config": args.config,
        "opts": args.opts,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": malloc_tuned,
        "torch": torch.__version__,
    }
    if not args.no_calibrate:
        result["machine_sgemm_gflop_per_s"] = sgemm_rate()

    # Inference first, on the freshly initialized (or loaded) weights, so that training steps on
    # random data do not change what it measures.
    if not args.skip_infer:
        model.eval()
        images = [synthetic_batch(rng, 1, args.height, args.width, num_classes) for _ in range(2)]
        for b in images:
            del b[0]["targets"]
        state = {"i": 0, "dets": 0}

        def infer() -> None:
            data = images[state["i"] % len(images)]
            state["i"] += 1
            with torch.inference_mode():
                state["dets"] = len(model(data)[0])

        times, cpu, faults = _timed(infer, args.iters, args.warmup)
        result["infer_s_per_image"] = statistics.median(times)
        result["infer_page_faults"] = int(statistics.median(faults))
        result["infer_all_s"] = [round(t, 4) for t in times]
        result["infer_cpu_s_per_image"] = statistics.median(cpu)
        result["detections_per_image"] = state["dets"]
        if args.flops:
            _add_flops(result, "infer", infer, result["infer_s_per_image"])
        if args.profile:
            _profile(infer, args.profile, "inference")

    if not args.skip_train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # lr 0 by default: the step does all its arithmetic but the weights stay put, so every timed
        # iteration does the same work (random data quickly drives a randomly initialized model
        # to huge losses, which changes the proposals and so the cost).
        opt = torch.optim.SGD(
            params,
            lr=args.lr,
            momentum=float(cfg.SOLVER.MOMENTUM),
            weight_decay=float(cfg.SOLVER.WEIGHT_DECAY),
        )
        batches = [synthetic_batch(rng, args.batch, args.height, args.width, num_classes) for _ in range(2)]
        state = {"i": 0, "loss": None}

        def train_step() -> None:
            data = batches[state["i"] % len(batches)]
            state["i"] += 1
            losses = model(data)
            total = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            state["loss"] = float(total.detach())

        times, cpu, faults = _timed(train_step, args.iters, args.warmup)
        result["train_step_s"] = statistics.median(times)
        result["train_step_page_faults"] = int(statistics.median(faults))
        result["train_step_all_s"] = [round(t, 4) for t in times]
        result["train_step_cpu_s"] = statistics.median(cpu)
        result["last_total_loss"] = state["loss"]
        result["lr"] = args.lr
        if args.flops:
            _add_flops(result, "train_step", train_step, result["train_step_s"])
        if args.profile:
            _profile(train_step, args.profile, "train step")

    # Other work on the machine skews wall times; record how busy it was.
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


def _add_flops(result: dict, name: str, fn, seconds: float) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    gflop = counter.get_total_flops() / 1e9
    result[f"{name}_gflop"] = round(gflop, 2)
    result[f"{name}_gflop_per_s"] = round(gflop / seconds, 1)


def _profile(fn, top: int, what: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- {what}: top {top} ops by self CPU time", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
