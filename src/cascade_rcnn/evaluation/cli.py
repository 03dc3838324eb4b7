"""`cascade-rcnn evaluate`: COCO box and mask AP of a checkpoint on a split.

One process by default; under torchrun (WORLD_SIZE > 1) every rank infers its shard and rank 0
evaluates and writes the files.
"""

from __future__ import annotations

import argparse
import sys

from cascade_rcnn.config_command import add_config_options, run_with_config

PROG = "cascade-rcnn evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a checkpoint over a COCO-layout split and report COCO box/mask AP.",
    )
    add_config_options(p)
    p.add_argument(
        "--weights", required=True, help="our checkpoint or detectron2's .pkl/.pth (local or s3://)"
    )
    p.add_argument(
        "--data", required=True, help="COCO-layout root (local or s3://) or an ingest manifest URI"
    )
    p.add_argument("--split", default="val2017", help="split folder or dataset name (default: val2017)")
    p.add_argument(
        "--output",
        default=None,
        help="where to write metrics and results (local or s3://); default: OUTPUT_DIR/inference",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write report.md and report.html (default: on)",
    )
    p.add_argument(
        "--pycocotools",
        action="store_true",
        help="use pycocotools' COCOeval instead of faster-coco-eval (same numbers, slower)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from cascade_rcnn import storage
    from cascade_rcnn.accel import accelerator_from_cfg
    from cascade_rcnn.comm import DistInfo, destroy_process_group, init_process_group
    from cascade_rcnn.config import ConfigError
    from cascade_rcnn.evaluation.evaluate import evaluate_checkpoint
    from cascade_rcnn.evaluation.report import format_table

    def evaluate(cfg) -> int:
        output = args.output
        if output is None:
            if not cfg.OUTPUT_DIR:
                raise ConfigError("no --output and the config's OUTPUT_DIR is empty")
            output = storage.join(cfg.OUTPUT_DIR, "inference")  # where detectron2's evaluators write
        info = DistInfo.from_env()
        if info.world_size > 1:
            accel = accelerator_from_cfg(cfg, info.local_rank)
            accel.set_device()  # nccl/hccl collectives run on the current device
            init_process_group(info, accel)
        try:
            metrics = evaluate_checkpoint(
                cfg,
                args.weights,
                args.data,
                args.split,
                output,
                max_images=args.max_images,
                report=args.report,
                use_fast=not args.pycocotools,
            )
        finally:
            destroy_process_group()
        if info.rank == 0:
            print(format_table(metrics))
        return 0

    return run_with_config(PROG, args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
