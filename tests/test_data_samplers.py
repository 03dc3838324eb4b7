"""Training stream (detectron2's randperm semantics, sharding, resume), inference shards and
aspect-ratio grouped batching."""

from __future__ import annotations

import itertools

import pytest
import torch

from cascade_rcnn.data.samplers import InferenceSampler, TrainBatchSampler, TrainingSampler, aspect_buckets


def _take(it, n):
    return list(itertools.islice(it, n))


def test_stream_is_seeded_randperm_epochs():
    g = torch.Generator()
    g.manual_seed(17)
    expected = sum((torch.randperm(7, generator=g).tolist() for _ in range(4)), [])
    assert _take(iter(TrainingSampler(7, seed=17)), 28) == expected
    assert _take(iter(TrainingSampler(7, seed=18)), 28) != expected
    assert sorted(_take(iter(TrainingSampler(7, seed=17)), 7)) == list(range(7))


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_ranks_take_interleaved_positions_of_one_stream(world_size):
    full = _take(TrainingSampler(5, seed=3).iter_positions(), 60)
    for rank in range(world_size):
        mine = _take(
            TrainingSampler(5, seed=3, rank=rank, world_size=world_size).iter_positions(), 60 // world_size
        )
        assert mine == full[rank::world_size][: len(mine)]
    with pytest.raises(ValueError, match="rank 2 is not in"):
        TrainingSampler(5, seed=3, rank=2, world_size=2)


def test_state_dict_resumes_exactly():
    a = TrainingSampler(6, seed=9, rank=1, world_size=2)
    it = iter(a)
    first = _take(it, 10)
    state = a.state_dict()
    assert state["consumed"] == 10
    rest = _take(it, 15)

    b = TrainingSampler(6, seed=9, rank=1, world_size=2)
    b.load_state_dict(state)
    assert _take(iter(b), 15) == rest
    assert _take(iter(TrainingSampler(6, 9, 1, 2, start_iter_items=10)), 15) == rest
    assert first + rest == _take(iter(TrainingSampler(6, 9, 1, 2)), 25)
    with pytest.raises(ValueError, match="sampler state has seed=9 but this sampler has 10"):
        TrainingSampler(6, seed=10, rank=1, world_size=2).load_state_dict(state)


def test_inference_shards_are_contiguous_and_cover_everything():
    for size, world in [(10, 3), (2, 4), (9, 1)]:
        shards = [list(InferenceSampler(size, r, world)) for r in range(world)]
        assert sum(shards, []) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(InferenceSampler(size, r, world)) for r in range(world)] == list(map(len, shards))


def test_aspect_buckets_from_original_sizes():
    recs = [{"width": 5, "height": 4}, {"width": 4, "height": 4}, {"width": 3, "height": 4}]
    assert aspect_buckets(recs) == [0, 1, 1]


def test_grouped_batches_fill_buckets_in_stream_order():
    buckets = [0, 1, 1, 0, 1, 0, 0, 1]
    sampler = TrainingSampler(8, seed=0, shuffle=False)
    got = _take(iter(TrainBatchSampler(sampler, 2, buckets)), 4)
    # Stream 0..7: wide items 0,3,5,6, tall items 1,2,4,7; a batch leaves when its bucket has 2.
    assert [[i for _, i in b] for b in got] == [[1, 2], [0, 3], [5, 6], [4, 7]]
    shuffled = _take(iter(TrainBatchSampler(TrainingSampler(8, seed=4), 3, buckets)), 50)
    for batch in shuffled:
        assert len(batch) == 3 and len({buckets[i] for _, i in batch}) == 1
        positions = [p for p, _ in batch]
        assert positions == sorted(positions)


@pytest.mark.parametrize("buckets", [None, [0, 1, 1, 0, 1, 0, 0, 1, 1]])
def test_batch_sampler_resume_matches_uninterrupted(buckets):
    full = _take(iter(TrainBatchSampler(TrainingSampler(9, 5, 1, 2), 2, buckets)), 40)
    for start in (1, 7, 25):
        resumed = TrainBatchSampler(TrainingSampler(9, 5, 1, 2), 2, buckets, start_batch=start)
        assert _take(iter(resumed), 40 - start) == full[start:]
        assert _take(iter(resumed), 3) == full[start : start + 3]  # iterating again starts over


def test_ungrouped_batches_are_consecutive_items():
    batches = _take(iter(TrainBatchSampler(TrainingSampler(5, seed=1), 3)), 5)
    stream = _take(TrainingSampler(5, seed=1).iter_positions(), 15)
    assert sum(batches, []) == stream
