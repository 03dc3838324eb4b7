"""Training throughput: img/s and peak memory of full training steps (forward, backward, SGD step)
for a config on one device, with AMP off and/or on. Prints one JSON object.

    python bench/train_throughput.py --config configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml \
        --device cuda --batch 4 --iters 20 --amp both

Inputs are synthetic (fixed seed): images of --size H W with 2-8 random boxes and polygon masks each,
so the number measures the model and the step, not the data pipeline. The first --warmup iterations
are excluded (allocator growth, cudnn/NPU kernel compilation).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time

import numpy as np
import torch

from cascade_rcnn.accel import Accelerator, amp_dtype_from, resolve_accelerator
from cascade_rcnn.config import load_config
from cascade_rcnn.engine.solver import build_lr_scheduler, build_optimizer
from cascade_rcnn.engine.trainer import Trainer
from cascade_rcnn.logs import setup_logging
from cascade_rcnn.structures import Targets


def synthetic_batch(rng: np.random.Generator, batch: int, h: int, w: int, num_classes: int) -> list[dict]:
    """`batch` images (3, h, w) uint8 with random boxes and rectangle-ish polygon masks."""
    out = []
    for _ in range(batch):
        n = int(rng.integers(2, 9))
        x0 = rng.uniform(0, w * 0.7, n)
        y0 = rng.uniform(0, h * 0.7, n)
        bw = rng.uniform(16, w * 0.3, n)
        bh = rng.uniform(16, h * 0.3, n)
        boxes = np.stack([x0, y0, np.minimum(x0 + bw, w - 1), np.minimum(y0 + bh, h - 1)], 1)
        polys = [
            [np.array([b[0], b[1], b[2], b[1] + 2, b[2] - 2, b[3], b[0], b[3]], dtype=np.float64)]
            for b in boxes
        ]
        targets = Targets(
            boxes=torch.tensor(boxes, dtype=torch.float32),
            classes=torch.tensor(rng.integers(0, num_classes, n), dtype=torch.int64),
            polygons=polys,
        )
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        out.append({"image": image, "height": h, "width": w, "targets": targets})
    return out


def measure(
    cfg, device: Accelerator, amp: bool, batch: int, iters: int, warmup: int, size: tuple[int, int]
) -> dict:
    from cascade_rcnn.modeling import build_model

    dtype = cfg.SOLVER.AMP.DTYPE
    if device.type == "cpu" and amp_dtype_from(True, dtype) == torch.float16:
        dtype = "bfloat16"  # CPU autocast has no loss scaling here; bf16 is what CPUs run fast
    accel = Accelerator(device.type, device.index, amp_dtype_from(amp, dtype))
    accel.set_device()
    torch.manual_seed(0)
    model = build_model(cfg, device=accel.device)
    opt = build_optimizer(cfg, model)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, batch, *size, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)) for _ in range(4)]

    def data():
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    trainer = Trainer(
        model=model,
        optimizer=opt,
        scheduler=build_lr_scheduler(cfg, opt),
        data=data(),
        accel=accel,
        max_iter=warmup + iters,
        global_batch=batch,
    )
    model.train()
    times = []
    for it in range(warmup + iters):
        if it == warmup:
            accel.synchronize()
            accel.reset_peak_memory()
        t0 = time.perf_counter()
        trainer.run_step(it)
        accel.synchronize()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "amp": amp,
        "amp_dtype": str(accel.amp_dtype).replace("torch.", "") if amp else None,
        "iter_time_s": step,
        "img_per_s": batch / step,
        "peak_mem_mb": accel.max_memory_allocated_mb(),
        "peak_mem_kind": "process max RSS" if device.type == "cpu" else "max_memory_allocated",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda[:N] | npu[:N], as MODEL.DEVICE")
    p.add_argument("--batch", type=int, default=2, help="images per step (one device)")
    p.add_argument("--iters", type=int, default=10, help="measured iterations")
    p.add_argument("--warmup", type=int, default=3, help="iterations excluded from the timing")
    p.add_argument("--amp", choices=["on", "off", "both"], default="both")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"), help="input size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.opts)
    device = resolve_accelerator(args.device)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.amp]
    results = [
        measure(cfg, device, amp, args.batch, args.iters, args.warmup, tuple(args.size)) for amp in modes
    ]
    device_name = device.type
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device.index)
    elif device.type == "npu":
        device_name = torch.npu.get_device_name(device.index)
    print(
        json.dumps(
            {
                "bench": "train_throughput",
                "config": args.config,
                "opts": args.opts,
                "device": device_name,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "size_hw": list(args.size),
                "iters": args.iters,
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
