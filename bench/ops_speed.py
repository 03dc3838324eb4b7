"""Time the tensor-op RoIAlign and fixed-size NMS (cascade_rcnn.modeling.ops) against torchvision.

    python bench/ops_speed.py --runs 5 --device cpu

One process, the implementations interleaved in every run; prints one JSON line of medians (s).
RoIAlign: 512 RoIs of 16-112 image px (the sizes FPN routes to p2) on a (1, 256, 200, 304) map
at scale 1/4, 7x7, sampling ratio 0, aligned; forward + backward w.r.t. the map.
NMS: N random boxes, IoU 0.7, all valid, max_out N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cascade_rcnn.modeling import ops, poolers  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = args.device
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 256, 200, 304, generator=gen).to(dev).requires_grad_()
    xy = torch.rand(512, 2, generator=gen) * torch.tensor([1216.0, 800.0])
    wh = 16 + torch.rand(512, 2, generator=gen) * 96
    rois = torch.cat([torch.zeros(512, 1), xy, xy + wh], dim=1).to(dev)
    grad = torch.randn(512, 256, 7, 7, generator=gen).to(dev)

    def pool(fn):
        def run():
            out = fn(feat, rois, (7, 7), 0.25, 0, True)
            (g,) = torch.autograd.grad(out, feat, grad)

        return run

    nms_boxes = {}
    for n in (1000, 2000):
        xy = torch.rand(n, 2, generator=gen) * 600
        b = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=gen) * 150], dim=1).to(dev)
        nms_boxes[n] = (b, torch.rand(n, generator=gen).to(dev))

    cases = {
        "roi_align_fwd_bwd_torchvision": pool(torchvision.ops.roi_align),
        "roi_align_fwd_bwd_tensor": pool(ops.roi_align_tensor),
    }
    if dev == "cpu":
        cases["roi_align_fwd_bwd_poolers_cpu"] = pool(poolers.roi_align)
    for n, (b, s) in nms_boxes.items():
        cases[f"nms_{n}_torchvision"] = lambda b=b, s=s: torchvision.ops.nms(b, s, 0.7)
        cases[f"nms_{n}_fixed"] = lambda b=b, s=s, n=n: ops.nms_fixed(b, s, None, 0.7, n)
    times = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.runs):
        for k, fn in cases.items():
            times[k].append(_timed(fn, dev))
    result = {k: round(statistics.median(v), 4) for k, v in times.items()}
    result.update(runs=args.runs, device=dev, threads=torch.get_num_threads())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
