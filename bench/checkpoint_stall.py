"""The stall a checkpoint costs the training loop: the background write (issue 22) against the
synchronous write it replaces, in one run, for the slim fixture config and R50-FPN, to a local
folder and to SeaweedFS on 127.0.0.1. Prints one JSON object.

    flock /work/cpu-heavy.lock python bench/checkpoint_stall.py [--repeats 2] [--configs slim r50]

Each case builds the model and an SGD optimizer with momentum, trains two steps (so the momentum
buffers exist and the checkpoint has its real size) and then checkpoints through
`Trainer.save`, as a run does:
- sync: `Trainer(background=False)`; the stall is the whole `save` (state gathered, serialized,
  uploaded, pointer written);
- background: the stall is what `save` holds up the loop (state gathered and copied to host
  memory), plus what the training steps that run during the write lose to it (their time beyond
  the median of the steps before and after the write: the writer thread competes for the CPU and
  the GIL, which on an accelerator host with cores to spare matters far less than here).
The steps run on small synthetic images (--size) so that they are short; the checkpoint does not
depend on them. Repeats alternate sync and background; each figure is the median.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synthetic_batch  # noqa: E402

from cascade_rcnn import storage  # noqa: E402
from cascade_rcnn.accel import Accelerator  # noqa: E402
from cascade_rcnn.config import load_config  # noqa: E402
from cascade_rcnn.engine.checkpointer import Checkpointer  # noqa: E402
from cascade_rcnn.engine.solver import build_lr_scheduler, build_optimizer  # noqa: E402
from cascade_rcnn.engine.trainer import Trainer, training_state  # noqa: E402
from cascade_rcnn.local_s3 import start_seaweedfs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "slim": ROOT.parent / "shared" / "fixtures" / "d2_parity" / "config.yaml",
    "r50": ROOT / "configs" / "Misc" / "cascade_mask_rcnn_R_50_FPN_1x.yaml",
}


def make_trainer(cfg, size: tuple[int, int], output: str, background: bool) -> Trainer:
    from cascade_rcnn.modeling import build_model

    torch.manual_seed(0)
    accel = Accelerator("cpu")
    model = build_model(cfg, device=accel.device)
    opt = build_optimizer(cfg, model)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(rng, 1, *size, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)) for _ in range(4)]

    def data():
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    return Trainer(
        model=model,
        optimizer=opt,
        scheduler=build_lr_scheduler(cfg, opt),
        data=data(),
        accel=accel,
        max_iter=10**6,
        global_batch=1,
        checkpointer=Checkpointer(output),
        make_state=functools.partial(training_state, meta={}, data_state=dict, seed=0, world_size=1),
        background=background,
    )


def one(cfg, size, output: str, background: bool, baseline_steps: int) -> dict:
    trainer = make_trainer(cfg, size, output, background)
    trainer.model.train()
    it = 0
    for _ in range(2):  # momentum buffers, allocator warm
        trainer.run_step(it)
        it += 1
    steps = []

    def timed_steps(n: int) -> None:
        nonlocal it
        for _ in range(n):
            t0 = time.perf_counter()
            trainer.run_step(it)
            steps.append(time.perf_counter() - t0)
            it += 1

    timed_steps(baseline_steps)

    name = f"model_{it - 1:07d}.pth"
    t0 = time.perf_counter()
    trainer.save(name, it - 1)
    held = time.perf_counter() - t0
    during: list[float] = []
    while trainer.writer.busy:  # the steps that run while the write goes on
        t1 = time.perf_counter()
        trainer.run_step(it)
        during.append(time.perf_counter() - t1)
        it += 1
    trainer.writer.wait()
    write_s = time.perf_counter() - t0
    timed_steps(baseline_steps)
    step = statistics.median(steps)
    lost = sum(during) - len(during) * step
    size_mb = storage.head(trainer.checkpointer.uri(name)).size / 1e6
    return {
        "mode": "background" if background else "sync",
        "checkpoint_mb": round(size_mb, 1),
        "step_s": round(step, 3),
        "held_s": round(held, 3),  # save() itself
        "steps_during_write": len(during),
        "steps_slower_by_s": round(lost, 3),
        "stall_s": round(held + max(lost, 0.0), 3),
        "write_s": round(write_s, 3),  # from save() to the pointer naming the checkpoint
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--storage", nargs="+", default=["local", "seaweedfs"], choices=["local", "seaweedfs"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    p.add_argument("--baseline-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt-stall-") as tmp:
        server = None
        if "seaweedfs" in args.storage:
            server = start_seaweedfs(Path(tmp) / "s3")
            os.environ.update(server.env())
            server.client().create_bucket(Bucket="bench")
        try:
            for name in args.configs:
                opts = [
                    "MODEL.DEVICE",
                    "cpu",
                    "MODEL.WEIGHTS",
                    "",
                    "SOLVER.BASE_LR",
                    "0.0001",
                ]  # random init: keep it tame
                cfg = load_config(str(CONFIGS[name]), opts)
                for where in args.storage:
                    runs: dict = {"sync": [], "background": []}
                    for r in range(args.repeats):
                        for background in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                            output = (
                                f"s3://bench/{name}/{r}-{int(background)}"
                                if where == "seaweedfs"
                                else str(Path(tmp) / f"{name}-{r}-{int(background)}")
                            )
                            res = one(cfg, tuple(args.size), output, background, args.baseline_steps)
                            runs[res["mode"]].append(res)
                    row = {"config": name, "storage": where, "load_avg": round(os.getloadavg()[0], 1)}
                    for mode, rs in runs.items():
                        row[mode] = {
                            k: (
                                statistics.median(r[k] for r in rs)
                                if isinstance(rs[0][k], (int, float))
                                else rs[0][k]
                            )
                            for k in rs[0]
                            if k != "mode"
                        }
                    row["stall_ratio"] = round(row["background"]["stall_s"] / row["sync"]["stall_s"], 3)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    results.append(row)
        finally:
            if server is not None:
                server.close()
    print(
        json.dumps(
            {"torch": torch.__version__, "threads": args.threads, "size": args.size, "results": results}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
