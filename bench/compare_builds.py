"""Time two builds of the model code in one process, interleaved; print one JSON line.

    python bench/compare_builds.py --old-src /path/to/other/checkout/src --config CFG \
        --height 320 --width 448 --batch 4 --iters 7

The other checkout's `cascade_rcnn` package is imported under another name, both models get the
same weights and inputs, and each iteration runs old then new with the same RNG seed (so both
sample the same RoIs). Alternating inside one process keeps machine noise out of the ratio, which
a pair of separate bench/model_speed.py runs on a shared machine does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_speed import synthetic_batch  # noqa: E402

from cascade_rcnn.config import load_config  # noqa: E402
from cascade_rcnn.modeling import build_model  # noqa: E402


def import_other(src: Path):
    """The `cascade_rcnn` package under `src` as module `cascade_rcnn_other`."""
    spec = importlib.util.spec_from_file_location(
        "cascade_rcnn_other",
        src / "cascade_rcnn" / "__init__.py",
        submodule_search_locations=[str(src / "cascade_rcnn")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["cascade_rcnn_other"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("cascade_rcnn_other.modeling")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-src", required=True, type=Path, help="the other checkout's src/ folder")
    p.add_argument("--config", required=True)
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1216)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = load_config(args.config, args.opts)
    num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    new = build_model(cfg)
    old = import_other(args.old_src.resolve()).build_model(cfg)
    old.load_state_dict(new.state_dict())
    models = {"old": old, "new": new}
    result: dict = {"config": args.config, "old_src": str(args.old_src), "height": args.height,
                    "width": args.width, "batch": args.batch, "iters": args.iters}  # fmt: skip

    def measure(name: str, make_step) -> None:
        times: dict[str, list[float]] = {"old": [], "new": []}
        for i in range(args.iters + 1):  # the first round is warm-up
            for variant, model in models.items():
                step = make_step(model, i)
                torch.manual_seed(args.seed + i)
                start = time.perf_counter()
                step()
                if i > 0:
                    times[variant].append(time.perf_counter() - start)
        ratios = [o / n for o, n in zip(times["old"], times["new"])]
        result[f"{name}_old_s"] = round(statistics.median(times["old"]), 4)
        result[f"{name}_new_s"] = round(statistics.median(times["new"]), 4)
        result[f"{name}_speedup"] = round(statistics.median(ratios), 3)

    if not args.skip_infer:
        images = [synthetic_batch(rng, 1, args.height, args.width, num_classes) for _ in range(2)]
        for b in images:
            del b[0]["targets"]

        def infer_step(model, i):
            def run():
                model.eval()
                with torch.inference_mode():
                    model(images[i % 2])

            return run

        measure("infer_s_per_image", infer_step)

    if not args.skip_train:
        batches = [synthetic_batch(rng, args.batch, args.height, args.width, num_classes) for _ in range(2)]

        def train_step(model, i):
            params = [q for q in model.parameters() if q.requires_grad]
            opt = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)

            def run():
                model.train()
                total = sum(model(batches[i % 2]).values())
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()

            return run

        measure("train_step_s", train_step)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
