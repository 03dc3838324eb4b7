"""detectron2's side of a same-run timing: run under the peer's own venv, driven over stdin/stdout.

    /tmp/d2/bin/python bench/d2_peer.py --config CONFIG [--weights W] [--threads N] [KEY VALUE ...]

bench/static_shapes.py (and anything else that wants detectron2 in the same run) starts this
process, writes each batch to a file with torch.save (plain tensors only), and sends one JSON
request per line: {"op": "train" | "infer", "path": FILE}. The answer is one JSON line,
{"s": seconds} for that call, or {"error": "..."}. The caller blocks while detectron2 runs, so
the two never share the cores. detectron2 is never imported by the package or its tests; it
lives in a venv of its own (../shared/peers/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback


def _build(args):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(args.config)
    cfg.merge_from_list(["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", *args.opts])
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if args.weights and args.weights.endswith(".pth"):
        # Our model's own state dict (detectron2's names): every key must match.
        model.load_state_dict(torch.load(args.weights, weights_only=True)["model"], strict=True)
    elif args.weights:
        DetectionCheckpointer(model).load(args.weights)
    return cfg, model


def _instances(item, device):
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    h, w = int(item["height"]), int(item["width"])
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(item["boxes"].to(device))
    inst.gt_classes = item["classes"].to(device=device, dtype=torch.int64)
    if "masks" in item:
        inst.gt_masks = BitMasks(item["masks"].to(device))
    return inst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument(
        "--weights", help="a detectron2 checkpoint, or a .pth of {'model': state dict} loaded strictly"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), help="autocast the step, as ours")
    p.add_argument("opts", nargs="*")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model = _build(args)
    device = torch.device(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def autocast():
        if not args.amp_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    from detectron2.utils.events import EventStorage

    # detectron2's losses log into an event storage, as its trainer provides.
    storage = EventStorage(0)
    storage.__enter__()
    print(json.dumps({"ready": True, "detectron2": __import__("detectron2").__version__}), flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            batch = torch.load(req["path"], weights_only=True)
            if req["op"] == "train":
                inputs = [
                    {
                        "image": b["image"],
                        "height": b["height"],
                        "width": b["width"],
                        "instances": _instances(b, device),
                    }
                    for b in batch
                ]
                model.train()
                sync()
                t = time.perf_counter()
                with autocast():
                    losses = model(inputs)
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                optimizer.step()
                sync()
            elif req["op"] == "infer":
                inputs = [{"image": b["image"], "height": b["height"], "width": b["width"]} for b in batch]
                model.eval()
                sync()
                t = time.perf_counter()
                with torch.no_grad(), autocast():
                    model(inputs)
                sync()
            else:
                raise ValueError(f"unknown op {req['op']!r}")
            print(json.dumps({"s": time.perf_counter() - t}), flush=True)
        except Exception as exc:  # the caller reports it and stops
            print(
                json.dumps({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
