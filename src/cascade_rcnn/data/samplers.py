"""Index samplers: the seeded infinite training stream, inference shards and aspect-ratio grouped batches.

Training order, as detectron2's TrainingSampler: one seed, shared by every rank, drives an infinite stream
of ``torch.randperm(size)`` epochs; rank r takes stream positions r, r + world_size, r + 2*world_size, ...
A position is unique across ranks, so it also names the item for its augmentation seed (see loader.py).

Resume is exact because nothing here depends on wall-clock or worker scheduling: the stream is a function
of (seed, size), and the aspect grouping below is a function of the stream and the images' (w, h), known
from the records without reading any image. Restarting at batch k replays the index-level grouping for k
batches (cheap: no image is read) and continues with identical batches.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class TrainingSampler:
    """Infinite seeded index stream, sharded by rank; yields dataset indices.

    start_iter_items: items this rank has already consumed (to resume the stream).
    """

    def __init__(
        self,
        size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_iter_items: int = 0,
        shuffle: bool = True,
    ):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty data set, got size={size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size = size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.consumed = int(start_iter_items)

    def _epoch_order(self, g: torch.Generator) -> list[int]:
        if self.shuffle:
            return torch.randperm(self.size, generator=g).tolist()
        return list(range(self.size))

    def iter_positions(self) -> Iterator[tuple[int, int]]:
        """Yield (global stream position, dataset index), counting each item in `consumed`."""
        g = torch.Generator()
        g.manual_seed(self.seed)
        pos = self.rank + self.consumed * self.world_size
        epoch = 0
        order = self._epoch_order(g)
        while True:
            while pos >= (epoch + 1) * self.size:
                epoch += 1
                order = self._epoch_order(g)
            self.consumed += 1
            yield pos, order[pos - epoch * self.size]
            pos += self.world_size

    def __iter__(self) -> Iterator[int]:
        for _, index in self.iter_positions():
            yield index

    def state_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "consumed": self.consumed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("size", "seed", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "the stream would not continue where it stopped"
                )
        self.consumed = int(state["consumed"])


class InferenceSampler:
    """Contiguous shard of range(size) for `rank`; shard sizes differ by at most one."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        base, extra = divmod(size, world_size)
        sizes = [base + int(r < extra) for r in range(world_size)]
        begin = sum(sizes[:rank])
        self.indices = range(begin, begin + sizes[rank])

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def aspect_buckets(records: Sequence[dict]) -> list[int]:
    """Bucket per record: 0 when width > height, else 1 (original image size, as detectron2)."""
    return [0 if r["width"] > r["height"] else 1 for r in records]


class TrainBatchSampler:
    """Per-device batches of (position, index) pairs from a TrainingSampler.

    buckets: per dataset index, its aspect bucket (see `aspect_buckets`); None disables grouping, and
    batches are then consecutive stream items. With grouping, an item joins its bucket and a batch is
    emitted as soon as a bucket holds `batch_size` items.
    start_batch: batches to skip (resume). Without grouping this is a jump; with grouping it replays
    the index stream (no images are read) so the bucket contents match an uninterrupted run.
    """

    def __init__(
        self,
        sampler: TrainingSampler,
        batch_size: int,
        buckets: Sequence[int] | None = None,
        start_batch: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if buckets is not None and len(buckets) != sampler.size:
            raise ValueError(f"{len(buckets)} aspect buckets for a data set of {sampler.size} items")
        self.sampler = sampler
        self.batch_size = batch_size
        self.buckets = buckets
        self.start_batch = start_batch

    def _batches(self, sampler: TrainingSampler) -> Iterator[list[tuple[int, int]]]:
        stream = sampler.iter_positions()
        if self.buckets is None:
            while True:
                yield list(itertools.islice(stream, self.batch_size))
        pending: tuple[list, list] = ([], [])
        for pos, index in stream:
            bucket = pending[self.buckets[index]]
            bucket.append((pos, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # Each iteration restarts from the same point, so iterating twice gives the same batches.
        sampler = copy.copy(self.sampler)
        skip = self.start_batch
        if self.buckets is None:
            sampler.consumed += skip * self.batch_size
            skip = 0
        return itertools.islice(self._batches(sampler), skip, None)
