"""Inference over a data set split: each rank runs its shard, results are gathered to rank 0.

Timing and progress follow detectron2's inference_on_dataset: the first iterations are warmup and
excluded from the per-image times, and progress is logged every few seconds with an ETA.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from cascade_rcnn.comm import rank_and_world_size

logger = logging.getLogger(__name__)

NUM_WARMUP = 5
LOG_EVERY_S = 5.0


def detections_to_cpu(detections: Any) -> Any:
    """Move every tensor field of a Detections (any dataclass) to the CPU."""
    changes = {
        f.name: getattr(detections, f.name).cpu()
        for f in dataclasses.fields(detections)
        if isinstance(getattr(detections, f.name), torch.Tensor)
    }
    return dataclasses.replace(detections, **changes)


def _default_postprocess(inp: Mapping[str, Any], detections: Any) -> Any:
    return detections_to_cpu(detections)


def _synchronize(device: torch.device) -> None:
    # Kernels are asynchronous on accelerators; without this the compute time lands in the next step.
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.npu (after torch_npu import)
    if device.type != "cpu" and backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


def _loader_length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def gather_predictions(predictions: list[dict]) -> list[dict]:
    """All ranks' predictions on rank 0, one per image_id, ordered by image_id; [] on other ranks.

    Without an initialised process group this only sorts and de-duplicates. Uses gather_object, which
    works with gloo; with nccl/hccl the current device must be set (torch.cuda.set_device) beforehand.
    """
    rank, world_size = rank_and_world_size()
    if world_size > 1:
        gathered: list[list[dict]] | None = [None] * world_size if rank == 0 else None  # type: ignore[list-item]
        dist.gather_object(predictions, gathered, dst=0)
        if rank != 0:
            return []
        predictions = [p for part in gathered for p in part]  # type: ignore[union-attr]
    # A sampler may pad shards to equal length; keep the first prediction of each image.
    unique: dict[Any, dict] = {}
    for p in predictions:
        unique.setdefault(p["image_id"], p)
    return [unique[k] for k in sorted(unique)]


def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable[list[dict]],
    *,
    device: torch.device | str,
    progress: bool = True,
    postprocess: Callable[[Mapping[str, Any], Any], Any] | None = None,
) -> list[dict]:
    """Run `model` (eval mode) over this rank's `loader` and gather the predictions to rank 0.

    loader: yields batches, list[dict] with "image" (3,H,W), "height", "width", "image_id", "file_name".
    postprocess(input_dict, detections) -> what is kept per image (default: the Detections on the CPU);
    use it to encode large masks right away (e.g. to COCO RLE) instead of holding them for the split.
    Returns, on rank 0, [{"image_id", "file_name", "height", "width", "instances"}] sorted by image_id,
    each image once; [] on other ranks.
    """
    device = torch.device(device)
    postprocess = postprocess or _default_postprocess
    rank, world_size = rank_and_world_size()
    total = _loader_length(loader)
    num_warmup = min(NUM_WARMUP, total - 1) if total else NUM_WARMUP
    results: list[dict] = []
    was_training = model.training
    model.eval()
    data_time = compute_time = 0.0
    timed = 0
    images = 0
    start = last_log = time.perf_counter()
    timed_start = start
    try:
        with torch.inference_mode():
            batch_start = time.perf_counter()
            for idx, batch in enumerate(loader):
                if idx == num_warmup:
                    # Warmup iterations (allocator, autotuning, lazy init) are not representative.
                    timed_start = batch_start
                    data_time = compute_time = 0.0
                    timed = 0
                t0 = time.perf_counter()
                data_time += t0 - batch_start
                inputs = [_to_device(inp, device) for inp in batch]
                outputs = model(inputs)
                _synchronize(device)
                t1 = time.perf_counter()
                compute_time += t1 - t0
                if len(outputs) != len(batch):
                    raise RuntimeError(f"model returned {len(outputs)} outputs for a batch of {len(batch)}")
                for inp, det in zip(batch, outputs):
                    results.append(
                        {
                            "image_id": inp["image_id"],
                            "file_name": inp.get("file_name", ""),
                            "height": int(inp["height"]),
                            "width": int(inp["width"]),
                            "instances": postprocess(inp, det),
                        }
                    )
                images += len(batch)
                timed += 1
                now = time.perf_counter()
                if progress and (now - last_log >= LOG_EVERY_S or (total and idx + 1 == total)):
                    last_log = now
                    _log_progress(idx + 1, total, timed, data_time, compute_time, now - timed_start, rank)
                batch_start = time.perf_counter()
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    if progress:
        per_iter = (time.perf_counter() - timed_start) / max(timed, 1)
        logger.info(
            "rank %d/%d: inference on %d images took %s (%.4f s/iter total, %.4f s/iter pure compute, "
            "excluding %d warmup iterations)",
            rank,
            world_size,
            images,
            datetime.timedelta(seconds=int(elapsed)),
            per_iter,
            compute_time / max(timed, 1),
            min(num_warmup, images),
        )
    return gather_predictions(results)


def _to_device(inp: Mapping[str, Any], device: torch.device) -> dict:
    out = dict(inp)
    if isinstance(out.get("image"), torch.Tensor):
        out["image"] = out["image"].to(device, non_blocking=True)
    return out


def _log_progress(
    done: int, total: int | None, timed: int, data_time: float, compute_time: float, wall: float, rank: int
) -> None:
    per_iter = wall / max(timed, 1)
    eta = f" ETA={datetime.timedelta(seconds=int(per_iter * (total - done)))}" if total is not None else ""
    logger.info(
        "rank %d: inference done %d/%s. data %.4f s/iter, inference %.4f s/iter, total %.4f s/iter.%s",
        rank,
        done,
        total if total is not None else "?",
        data_time / max(timed, 1),
        compute_time / max(timed, 1),
        per_iter,
        eta,
    )
