"""Static-shape mode against dynamic mode, eager and compiled, in one process; print one JSON line.

    python bench/static_shapes.py --config configs/Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml --iters 5

Every iteration draws one batch (--batch images of varied sizes from the config's resize rule,
0 to 60 random boxes with bitmask masks each) and times, on that same batch and in this order:
eager dynamic, eager static, compiled static (torch.compile inductor, fullgraph, static shapes),
for a train step (forward + backward + SGD step at lr 0, so every variant sees the same weights)
and for inference. Before timing, each (canvas, gt bucket) seen gets one untimed warm-up call of
the compiled variants; recompiles_after_warmup counts graphs compiled after that.

With --d2-python (the python of a venv holding ../shared/peers' detectron2), detectron2's own
model is built from the same config (and --weights) in a peer process (bench/d2_peer.py) and
timed on each batch right after ours, as a fourth variant; this process waits while it runs.

The canvases are MODEL.STATIC.CANVAS when the config sets them, else a landscape and a portrait
canvas just holding the largest resized image, and a square one for batches mixing both (not with
--aspect-grouping). The model is freshly initialized unless --weights is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cascade_rcnn.config import load_config  # noqa: E402
from cascade_rcnn.data.transforms import resize_shortest_edge_shape  # noqa: E402
from cascade_rcnn.modeling import build_model  # noqa: E402
from cascade_rcnn.modeling.static_rcnn import compile_inference, compile_train_losses  # noqa: E402
from cascade_rcnn.structures import Targets  # noqa: E402


def _round_up(v: int, d: int) -> int:
    return (v + d - 1) // d * d


def synthetic_image(rng, cfg, num_objects: int, train: bool, landscape=None) -> dict:
    """landscape True/False: only that orientation (as DATALOADER.ASPECT_RATIO_GROUPING batches)."""
    short = cfg.INPUT.MIN_SIZE_TRAIN if train else (cfg.INPUT.MIN_SIZE_TEST,)
    longest = cfg.INPUT.MAX_SIZE_TRAIN if train else cfg.INPUT.MAX_SIZE_TEST
    aspect = float(rng.choice([0.5, 0.75, 1.0, 1.33, 1.5, 2.0]))  # w / h of the original
    if landscape is not None:
        aspect = float(rng.choice([1.0, 1.33, 1.5, 1.78]))
        aspect = aspect if landscape else 1 / aspect
    h0 = 1000
    h, w = resize_shortest_edge_shape(h0, int(h0 * aspect), int(rng.choice(short)), longest)
    image = torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8))
    item = {"image": image, "height": h, "width": w}
    if train:
        n = num_objects
        x0, y0 = rng.uniform(0, w - 16, n), rng.uniform(0, h - 16, n)
        x1 = np.minimum(x0 + rng.uniform(8, w / 3, n), w)
        y1 = np.minimum(y0 + rng.uniform(8, h / 3, n), h)
        boxes = torch.tensor(np.stack([x0, y0, x1, y1], 1), dtype=torch.float32).reshape(n, 4)
        masks = torch.zeros((n, h, w), dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.round().to(torch.int64).tolist()):
            masks[i, b:d, a:c] = True
        classes = torch.from_numpy(rng.integers(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, n))
        item["targets"] = Targets(boxes=boxes, classes=classes, masks=masks)
    return item


class Detectron2Peer:
    """detectron2 in its own venv (bench/d2_peer.py), timing one call per request."""

    def __init__(
        self, python: str, config: str, weights, device: str, threads: int, opts: list[str], amp_dtype=None
    ):
        # MODEL.STATIC is ours; detectron2 gets the rest, and bitmask targets like our batches.
        d2_opts, i = [], 0
        while i < len(opts):
            if not opts[i].startswith("MODEL.STATIC."):
                d2_opts += opts[i : i + 2]
            i += 2
        cmd = [python, str(Path(__file__).with_name("d2_peer.py")), "--config", config, "--device", device]
        cmd += ["--threads", str(threads)] + (["--weights", weights] if weights else [])
        cmd += ["--amp-dtype", amp_dtype] if amp_dtype else []
        cmd += ["INPUT.MASK_FORMAT", "bitmask", *d2_opts]
        env = {**os.environ, "PYTHONPATH": ""}
        self.tmp = tempfile.TemporaryDirectory(prefix="d2peer-")
        self.log = open(os.path.join(self.tmp.name, "stderr.log"), "w+")  # its warnings stay out of ours
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        ready = self._read()
        self.version = ready.get("detectron2")

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                msg = json.loads(line)
                if "error" in msg:
                    raise RuntimeError(f"detectron2 peer: {msg['error']}\n{msg.get('trace', '')}")
                return msg
        self.log.seek(0)
        tail = self.log.read()[-4000:]
        raise RuntimeError(f"detectron2 peer exited with {self.proc.wait()}; its stderr ends:\n{tail}")

    def time(self, op: str, inputs: list[dict]) -> float:
        batch = []
        for item in inputs:
            row = {"image": item["image"], "height": item["height"], "width": item["width"]}
            if "targets" in item:
                t = item["targets"]
                row.update(boxes=t.boxes, classes=t.classes, masks=t.masks)
            batch.append(row)
        path = os.path.join(self.tmp.name, "batch.pt")
        torch.save(batch, path)
        self.proc.stdin.write(json.dumps({"op": op, "path": path}) + "\n")
        self.proc.stdin.flush()
        return float(self._read()["s"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


@torch.no_grad()
def calibrate_frozen_bn(model, images: list[dict]) -> None:
    """Set every FrozenBatchNorm2d's statistics from one forward of `images`, in forward order, so
    each layer's output is normalized given the layers before it: a stand-in for pretrained
    weights. A freshly initialized ResNet's activations grow layer by layer; its RPN then keeps few
    valid proposals and dynamic mode does almost no RoI-head work, which no trained model does."""
    from cascade_rcnn.modeling.layers import FrozenBatchNorm2d

    def pre_hook(mod, inputs):
        x = inputs[0].float()
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)))
        mod.weight.fill_(1.0)
        mod.bias.zero_()

    handles = [
        m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        was_training, static = model.training, model.static
        model.eval()
        model.static = None
        images_t, _ = model.preprocess(images)
        model.backbone(images_t)
        model.train(was_training)
        model.static = static
    finally:
        for h in handles:
            h.remove()


def count_head_rows(model, inputs) -> dict:
    """RoI rows the box heads (per stage) and the mask head see in one train forward."""
    rows = []
    heads = list(model.roi_heads.box_head) + (
        [model.roi_heads.mask_head] if model.roi_heads.mask_head else []
    )
    handles = [h.register_forward_hook(lambda m, i, o: rows.append(int(i[0].shape[0]))) for h in heads]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    return {
        "box_rows_per_stage": rows[: len(model.roi_heads.box_head)],
        "mask_rows": rows[len(model.roi_heads.box_head) :],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast, --amp-dtype (detectron2's step too)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", help="weights to load (default: fresh initialization)")
    p.add_argument(
        "--aspect-grouping",
        action="store_true",
        help="each batch all landscape or all portrait (detectron2's default grouping); no square canvas",
    )
    p.add_argument(
        "--calibrate-bn",
        action="store_true",
        help="fresh weights with FrozenBN statistics set from one batch (see calibrate_frozen_bn)",
    )
    p.add_argument(
        "--size-buckets",
        action="store_true",
        help="a canvas per short side of INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST and orientation, not one per orientation",
    )
    p.add_argument(
        "--landscape",
        action="store_true",
        help="every batch landscape: one canvas, one graph per gt bucket (the full config's compile is long)",
    )
    p.add_argument(
        "--d2-python",
        help="python of a venv with ../shared/peers' detectron2: time detectron2 on the same batches",
    )
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.size_buckets and not (args.aspect_grouping or args.landscape):
        p.error(
            "--size-buckets has no canvas for batches mixing orientations: add --aspect-grouping or --landscape"
        )

    cfg = load_config(args.config, ["MODEL.DEVICE", args.device, *args.opts])
    if not cfg.MODEL.STATIC.CANVAS:
        s = _round_up(max(cfg.INPUT.MIN_SIZE_TRAIN), 32)
        m = _round_up(cfg.INPUT.MAX_SIZE_TRAIN, 32)
        shorts = sorted({_round_up(v, 32) for v in (*cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST)})
        if args.size_buckets:
            cfg.MODEL.STATIC.CANVAS = [(v, m) for v in shorts]
            if not args.landscape:
                cfg.MODEL.STATIC.CANVAS += [(m, v) for v in shorts]
        elif args.landscape:
            cfg.MODEL.STATIC.CANVAS = [(s, m)]
        elif args.aspect_grouping:
            cfg.MODEL.STATIC.CANVAS = [(s, m), (m, s)]
        else:
            cfg.MODEL.STATIC.CANVAS = [(s, m), (m, s), (m, m)]
    cfg.MODEL.STATIC.ENABLED = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    if args.weights:
        from cascade_rcnn.checkpoint import load_into_model, load_weights

        load_into_model(model, load_weights(args.weights))
    static_shapes = model.static
    device = model.device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    amp_dtype = getattr(torch, args.amp_dtype)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else contextlib.nullcontext

    from torch._dynamo.utils import counters

    compiled_train = compile_train_losses(model)
    compiled_infer = compile_inference(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "npu":
            torch.npu.synchronize()

    def train_step(variant, inputs):
        model.train()
        model.static = None if variant == "eager_dynamic" else static_shapes
        with autocast():
            if variant == "compiled_static":
                losses = compiled_train(model.static_batch(inputs))
            else:
                losses = model(inputs)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    def infer(variant, inputs):
        model.eval()
        model.static = None if variant == "eager_dynamic" else static_shapes
        with torch.no_grad(), autocast():
            if variant == "compiled_static":
                batch = model.static_batch(inputs)
                compiled_infer(batch.images, batch.image_sizes)
            else:
                model(inputs)

    rng = np.random.default_rng(args.seed)
    batches = []
    for _ in range(args.iters):
        counts = [int(v) for v in rng.integers(0, 61, args.batch)]
        side = True if args.landscape else bool(rng.integers(2)) if args.aspect_grouping else None
        train_in = [synthetic_image(rng, cfg, n, True, side) for n in counts]
        test_in = [synthetic_image(rng, cfg, 0, False, side) for _ in range(args.batch)]
        batches.append((train_in, test_in))
    if args.calibrate_bn:
        calibrate_frozen_bn(model, batches[0][0])
    model.train()
    model.static = None
    rows_dynamic = count_head_rows(model, batches[0][0])
    model.static = static_shapes
    rows_static = count_head_rows(model, batches[0][0])
    # Warm-up: one compiled call per distinct static shape (and one eager call of each kind).
    model.train()
    train_keys, test_keys = {}, {}
    for train_in, test_in in batches:
        train_keys.setdefault(model.static_batch(train_in).shape_key, train_in)
        model.eval()
        test_keys.setdefault(model.static_batch(test_in).shape_key, test_in)
        model.train()
    t0 = time.perf_counter()
    for inputs in train_keys.values():
        train_step("compiled_static", inputs)
    for inputs in test_keys.values():
        infer("compiled_static", inputs)
    compile_s = time.perf_counter() - t0
    train_step("eager_dynamic", batches[0][0])
    train_step("eager_static", batches[0][0])
    warm_graphs = counters["stats"]["unique_graphs"]
    peer = None
    if args.d2_python:
        peer_weights = args.weights
        if args.calibrate_bn:  # detectron2 gets the same calibrated weights
            peer_weights = os.path.join(tempfile.mkdtemp(prefix="calibrated-"), "model.pth")
            torch.save({"model": model.state_dict()}, peer_weights)
        peer = Detectron2Peer(
            args.d2_python,
            args.config,
            peer_weights,
            args.device,
            torch.get_num_threads(),
            args.opts,
            args.amp_dtype if args.amp else None,
        )
        peer.time("train", batches[0][0])
        peer.time("infer", batches[0][1])

    variants = ("eager_dynamic", "eager_static", "compiled_static")
    names = variants + (("detectron2",) if peer else ())
    times = {f"{v}_{k}": [] for v in names for k in ("train_step_s", "inference_s")}
    for train_in, test_in in batches:
        for v in variants:
            sync()
            t = time.perf_counter()
            train_step(v, train_in)
            sync()
            times[f"{v}_train_step_s"].append(time.perf_counter() - t)
        if peer:
            times["detectron2_train_step_s"].append(peer.time("train", train_in))
        for v in variants:
            sync()
            t = time.perf_counter()
            infer(v, test_in)
            sync()
            times[f"{v}_inference_s"].append(time.perf_counter() - t)
        if peer:
            times["detectron2_inference_s"].append(peer.time("infer", test_in))
    if peer:
        peer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {}
    for kind in ("train_step_s", "inference_s"):
        base = med[f"eager_dynamic_{kind}"]
        ratios[f"compiled_static_vs_eager_dynamic_{kind[:-2]}"] = round(
            med[f"compiled_static_{kind}"] / base, 3
        )
        if peer:
            d2 = med[f"detectron2_{kind}"]
            ratios[f"compiled_static_vs_detectron2_{kind[:-2]}"] = round(
                med[f"compiled_static_{kind}"] / d2, 3
            )
            ratios[f"eager_dynamic_vs_detectron2_{kind[:-2]}"] = round(base / d2, 3)
    out = {
        "config": args.config,
        "device": str(device),
        "amp": args.amp_dtype if args.amp else False,
        "batch": args.batch,
        "iters": args.iters,
        "weights": args.weights or "fresh",
        "threads": torch.get_num_threads(),
        "aspect_grouping": args.aspect_grouping,
        "landscape": args.landscape,
        "size_buckets": args.size_buckets,
        "calibrate_bn": args.calibrate_bn,
        "first_batch_rows": {"eager_dynamic": rows_dynamic, "static": rows_static},
        "canvases": [list(c) for c in static_shapes.canvases],
        "graph_breaks": sum(counters["graph_break"].values()),
        "recompiles_after_warmup": counters["stats"]["unique_graphs"] - warm_graphs,
        "distinct_shapes": len(train_keys) + len(test_keys),
        "train_shapes": [list(k) for k in train_keys],
        "compile_warmup_s": round(compile_s, 1),
        "detectron2": peer.version if peer else None,
        **{k: round(v, 4) for k, v in med.items()},
        **ratios,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
