"""The epoch plan: every sample exactly once, equal batch counts on every rank, for many shapes."""

from __future__ import annotations

import itertools
import random

import pytest

from gensynth.data.plan import (
    exact_delivery_order,
    exact_rank_batches,
    exact_worker_plan,
    resampled_worker_range,
    shard_order,
)

SHAPES = [  # shard counts: odd numbers of uneven shards, a single shard, fewer samples than ranks
    [17, 5, 23, 1, 30, 11, 16],
    [1],
    [3],
    [2, 0, 1],
    [100],
    [7, 7, 7],
    [50, 1, 1, 1, 1],
]


def plan_cover(counts: list[int], world: int, workers: int, batch: int, epoch: int = 0) -> dict:
    covered: list[tuple[int, int]] = []
    batches_per_rank = []
    for rank in range(world):
        n_batches = 0
        for worker in range(workers):
            plan = exact_worker_plan(counts, 0, epoch, world, rank, workers, worker, batch)
            planned = sum(plan.batch_sizes)
            got = sum(s.stop - s.start for s in plan.segments)
            assert got == planned, "segments and batch sizes disagree"
            assert all(0 <= size <= batch for size in plan.batch_sizes)
            for s in plan.segments:
                covered.extend((s.shard, i) for i in range(s.start, s.stop))
            n_batches += len(plan.batch_sizes)
        batches_per_rank.append(n_batches)
    return {"covered": covered, "batches": batches_per_rank}


@pytest.mark.parametrize("counts", SHAPES, ids=str)
def test_every_sample_exactly_once_and_equal_batches(counts):
    everything = sorted((s, i) for s, n in enumerate(counts) for i in range(n))
    for world, workers, batch in itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2, 5, 8)):
        result = plan_cover(counts, world, workers, batch)
        assert sorted(result["covered"]) == everything, (world, workers, batch)
        assert len(set(result["batches"])) == 1, f"ranks differ in batch count: {result['batches']}"


def test_empty_batch_only_when_fewer_samples_than_ranks():
    # 3 samples, 4 ranks: one rank has nothing, so it steps once with an empty batch
    sizes = [exact_rank_batches(3, 4, 2, r)[1] for r in range(4)]
    assert sorted(sizes) == [[0], [1], [1], [1]]
    # 9 samples, 2 ranks, batch 4: shares 4 and 5; the rank with 4 splits it (3, 1) to match 2 steps
    sizes = [exact_rank_batches(9, 2, 4, r)[1] for r in range(2)]
    assert sizes == [[3, 1], [4, 1]]
    for total, world, batch in itertools.product(range(0, 40), (1, 2, 3, 5), (2, 3, 8)):
        all_sizes = [exact_rank_batches(total, world, batch, r)[1] for r in range(world)]
        assert sum(map(sum, all_sizes)) == total
        assert len({len(s) for s in all_sizes}) == 1
        if total >= world:
            assert all(min(s) > 0 for s in all_sizes if s), (total, world, batch, all_sizes)
        assert all(s[:-2] == [batch] * len(s[:-2]) for s in all_sizes), "only the last two may be short"


def test_shard_order_depends_on_seed_and_epoch_only():
    assert shard_order(50, 0, 0) == shard_order(50, 0, 0)
    assert shard_order(50, 0, 0) != shard_order(50, 0, 1)
    assert shard_order(50, 0, 0) != shard_order(50, 1, 0)
    assert sorted(shard_order(50, 3, 7)) == list(range(50))


def test_ranks_get_different_data_each_epoch():
    counts = [10] * 9
    r0 = exact_worker_plan(counts, 0, 0, 2, 0, 1, 0, 4).segments
    r0_next = exact_worker_plan(counts, 0, 1, 2, 0, 1, 0, 4).segments
    assert r0 != r0_next


def test_delivery_order_is_round_robin_and_complete():
    for n, k in itertools.product(range(0, 12), range(1, 4)):
        order = exact_delivery_order(n, k)
        assert len(order) == n == len(set(order))
        # each worker's own batches come in order
        for w in range(k):
            mine = [j for kk, j in order if kk == w]
            assert mine == list(range(len(mine)))
    # 5 batches over 2 workers: worker 0 holds 2, worker 1 holds 3; worker 1 finishes alone
    assert exact_delivery_order(5, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


def test_resampled_slots_partition_the_epoch():
    rng = random.Random(0)
    for _ in range(50):
        total, world, workers = rng.randrange(0, 500), rng.randrange(1, 5), rng.randrange(1, 4)
        ranges = [resampled_worker_range(total, world, r, workers, w) for r in range(world) for w in range(workers)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
