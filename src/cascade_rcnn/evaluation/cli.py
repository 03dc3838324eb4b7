"""`cascade-rcnn evaluate`: COCO box and mask AP of a checkpoint on a split.

One process by default; under torchrun (WORLD_SIZE > 1) every rank infers its shard and rank 0
evaluates and writes the files.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cascade-rcnn evaluate",
        description="Run a checkpoint over a COCO-layout split and report COCO box/mask AP.",
    )
    p.add_argument("--config", required=True, help="detectron2-style YAML config")
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
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides, in pairs")
    return p


def _storage_errors() -> tuple[type[Exception], ...]:
    from cascade_rcnn.storage import StorageError

    return (StorageError,)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.opts) % 2:
        print(f"cascade-rcnn evaluate: --opts takes KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from cascade_rcnn.accel import AcceleratorError, accelerator_from_cfg
    from cascade_rcnn.checkpoint import CheckpointError
    from cascade_rcnn.config import load_config
    from cascade_rcnn.engine.distributed import DistInfo, destroy_process_group, init_process_group
    from cascade_rcnn.evaluation.evaluate import evaluate_checkpoint
    from cascade_rcnn.evaluation.report import format_table

    try:
        cfg = load_config(args.config, args.opts)
        output = args.output
        if output is None:
            if not cfg.OUTPUT_DIR:
                raise ValueError("no --output and the config's OUTPUT_DIR is empty")
            from cascade_rcnn import storage

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
    except (OSError, ValueError, AcceleratorError, CheckpointError, *_storage_errors()) as e:
        # Config, data, checkpoint and storage errors carry messages that name the file or key;
        # anything else is a bug and keeps its traceback.
        logger.debug("evaluation failed", exc_info=True)
        print(f"cascade-rcnn evaluate: error: {e}", file=sys.stderr)
        return 1
    if info.rank == 0:
        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
