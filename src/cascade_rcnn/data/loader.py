"""Training and test DataLoaders: records -> mapped batches (list[dict]) in worker processes.

Determinism and resume (what the trainer's bit-identical resume relies on):
- Which items form batch k depends only on (seed, records, rank, world_size, batch_per_device, aspect
  grouping); see samplers.py. Restarting with start_iter=k replays the index stream without reading
  images, so the bucket contents, and hence batches k, k+1, ..., equal those of an uninterrupted run.
- The augmentation of an item (resize size, flip) draws from ``numpy.random.default_rng([seed, p])``,
  where p is the item's global stream position. It never touches a global RNG, so it does not depend
  on the number of workers, which worker maps the item, or the process's RNG state. A 2-rank run sees
  the same items with the same augmentations as a 1-rank run over the same global batch (ranks take
  the even/odd positions); with aspect grouping on, the split into per-device batches may differ.

Workers ignore SIGTERM unless their own trainer process sends it. On preemption the pod's whole
process group gets SIGTERM while the trainer finishes its iteration and checkpoints it
(engine/preemption.py); a worker dying of it would make the DataLoader raise in the middle of that
iteration. The trainer's own SIGTERM (the DataLoader's shutdown, multiprocessing's exit) still
ends a worker, even one that is waiting out a storage outage.

Errors: a worker never raises; it hands back an `_ItemFailure` carrying a message that names the file
and image id, and the main process raises DataError with that message when the batch arrives.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch.utils.data import DataLoader, Dataset

from cascade_rcnn.data.coco import DataError, filter_empty
from cascade_rcnn.data.mapper import DatasetMapper
from cascade_rcnn.data.samplers import InferenceSampler, TrainBatchSampler, TrainingSampler, aspect_buckets

logger = logging.getLogger(__name__)


class SerializedRecords(Sequence):
    """Records stored as JSON bytes in one numpy buffer.

    Forked workers that touch a list of Python dicts copy its pages (refcounts are written on every
    access), so a large list would be duplicated per worker; one flat buffer is shared for free.
    """

    def __init__(self, records: Sequence[dict]):
        blobs = [json.dumps(r, separators=(",", ":")).encode() for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return json.loads(self._buffer[self._offsets[i] : self._offsets[i + 1]].tobytes())


@dataclass
class _ItemFailure:
    """A mapping error, carried back from a worker (exceptions would arrive as opaque tracebacks)."""

    message: str


class MappedDataset(Dataset):
    """dataset[(position, index)] -> mapper(record, rng seeded by (seed, position)); dataset[index] -> test."""

    def __init__(self, records: Sequence[dict], mapper: Callable[..., dict], seed: int = 0):
        self.records = records if isinstance(records, SerializedRecords) else SerializedRecords(records)
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Any) -> dict | _ItemFailure:
        if isinstance(key, tuple):
            position, index = key
            rng = np.random.default_rng([self.seed, int(position)])
        else:
            index, rng = key, None
        record = self.records[index]
        try:
            return self.mapper(record, rng)
        except DataError as e:
            return _ItemFailure(str(e))
        except Exception as e:  # noqa: BLE001 - any failure is reported with the file that caused it
            return _ItemFailure(
                f"{record.get('file_name')} (image id={record.get('image_id')}): {type(e).__name__}: {e}"
            )


def _worker_sigterm(worker_id: int) -> None:
    """worker_init_fn: SIGTERM is blocked and taken by a thread that ends the worker only when the
    sender is the trainer (see the module docstring); the sender's pid needs sigwaitinfo."""
    trainer = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == trainer:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="sigterm", daemon=True).start()


def _collate(batch: list) -> list:
    return batch


def _raise_failures(batch: list) -> list[dict]:
    for item in batch:
        if isinstance(item, _ItemFailure):
            raise DataError(item.message)
    return batch


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"the data seed must be a non-negative integer, got {seed!r}")
    return int(seed)


class TrainLoader:
    """Infinite iterator over per-device training batches (list[dict]); see the module docstring.

    `iteration` counts the batches handed out (start_iter + those yielded); `state_dict()` records it
    together with what the stream depends on, so a resume can be checked with `load_state_dict`.
    """

    def __init__(
        self,
        dataset: MappedDataset,
        *,
        batch_per_device: int,
        rank: int,
        world_size: int,
        seed: int,
        aspect_grouping: bool,
        num_workers: int,
        pin_memory: bool,
        start_iter: int = 0,
        mp_context: str | None = None,
    ):
        self.dataset = dataset
        self.batch_per_device = batch_per_device
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.aspect_grouping = aspect_grouping
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.iteration = start_iter
        self.mp_context = mp_context
        self._buckets = aspect_buckets(dataset.records) if aspect_grouping else None

    def _dataloader(self) -> DataLoader:
        sampler = TrainingSampler(len(self.dataset), self.seed, self.rank, self.world_size)
        batches = TrainBatchSampler(sampler, self.batch_per_device, self._buckets, start_batch=self.iteration)
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_sigterm,
            multiprocessing_context=self.mp_context if self.num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[list[dict]]:
        if self.iteration:
            logger.info("Train loader continues at iteration %d (replaying the index stream)", self.iteration)
        for batch in self._dataloader():
            self.iteration += 1
            yield _raise_failures(batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "seed": self.seed,
            "dataset_size": len(self.dataset),
            "world_size": self.world_size,
            "batch_per_device": self.batch_per_device,
            "aspect_grouping": self.aspect_grouping,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state["iteration"]` batches; raises if the stream would differ."""
        for key in ("seed", "dataset_size", "world_size", "batch_per_device", "aspect_grouping"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(
                    f"train loader state has {key}={state[key]!r} but this loader has {mine!r}; "
                    "resuming would not reproduce the interrupted run's batches"
                )
        self.iteration = int(state["iteration"])


def build_train_loader(
    cfg: Any,
    records: Sequence[dict],
    *,
    batch_per_device: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int | None = None,
    start_iter: int = 0,
    pin_memory: bool = False,
    mapper: Callable[..., dict] | None = None,
    mp_context: str | None = None,
) -> TrainLoader:
    """Training loader over `records` (from load_coco_json) for one rank.

    Applies cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and ASPECT_RATIO_GROUPING; num_workers defaults to
    cfg.DATALOADER.NUM_WORKERS. start_iter: batches already consumed (resume). pin_memory: set it when
    batches go to an accelerator. mp_context: worker start method ("fork", "spawn", ...; default: torch's).
    mapper: replaces DatasetMapper.from_config(cfg, is_train=True); called as mapper(record, rng).
    """
    seed = _check_seed(seed)
    from ..config import check_supported

    check_supported(cfg)  # e.g. DATALOADER.SAMPLER_TRAIN, INPUT.CROP set in code, not through load_config
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        records = filter_empty(list(records))
    if not records:
        raise DataError("no training images left (all images lack non-crowd annotations?)")
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=True)
    workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    return TrainLoader(
        MappedDataset(records, mapper, seed),
        batch_per_device=batch_per_device,
        rank=rank,
        world_size=world_size,
        seed=seed,
        aspect_grouping=bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING),
        num_workers=workers,
        pin_memory=pin_memory,
        start_iter=start_iter,
        mp_context=mp_context,
    )


class InferenceLoader:
    """This rank's contiguous shard of the records, in order, as batches (list[dict]); has len()."""

    def __init__(
        self,
        dataset: MappedDataset,
        sampler: InferenceSampler,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        mp_context: str | None = None,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.mp_context = mp_context

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[dict]]:
        loader = DataLoader(
            self.dataset,
            sampler=self.sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_sigterm,
            multiprocessing_context=self.mp_context if self.num_workers > 0 else None,
        )
        for batch in loader:
            yield _raise_failures(batch)


def build_test_loader(
    cfg: Any,
    records: Sequence[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    num_workers: int | None = None,
    pin_memory: bool = False,
    mapper: Callable[..., dict] | None = None,
    mp_context: str | None = None,
) -> InferenceLoader:
    """Inference loader: this rank's contiguous shard, resized to MIN/MAX_SIZE_TEST, no targets."""
    mapper = mapper or DatasetMapper.from_config(cfg, is_train=False)
    workers = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    dataset = MappedDataset(records, mapper)
    sampler = InferenceSampler(len(dataset), rank, world_size)
    return InferenceLoader(dataset, sampler, batch_size, workers, pin_memory, mp_context)


__all__ = [
    "MappedDataset",
    "SerializedRecords",
    "InferenceLoader",
    "TrainLoader",
    "build_test_loader",
    "build_train_loader",
]
