"""Elastic resume: continue an epoch on another world size, worker count or batch size.

A rank's loader state says how many batches each of its workers delivered; with every rank's state,
the plan (plan.py: deterministic from seed, epoch, world, workers, batch size and the pool) tells
which samples those batches held, so nothing about the samples themselves is saved:

- exact mode: each old (rank, worker) slot's delivered samples are replayed on sample positions
  (its shuffle buffer draws the same random numbers whatever the items are). What no slot delivered
  (the samples still in a shuffle buffer, and each slot's unread tail) becomes the *pool* of the
  epoch: sorted ranges of the epoch's sample order, split over the new ranks and workers like a
  whole epoch (each rank still takes the same number of steps). The epochs after it use the normal
  plan of the new world. A pool survives another resume: it is saved with the position.
- resampled mode: the slots are at slightly different points of their endless streams; the new
  world starts the first epoch no old slot had begun, with its fresh shard order.

Cost: the replay walks each old slot's delivered samples once (positions only, no reading). The pool
holds, per old slot, its tail plus up to shuffle_buffer single samples (those still in its buffer),
and every rank's state carries it until the epoch ends: at R ranks x K workers that is up to
R * K * shuffle_buffer ranges; an ordinary state stays a few counters.

Samples a damaged shard lost shift that slot's stream, so after a damaged epoch the replay (and the
pool) can be off by the lost samples.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from gensynth.data.plan import (
    Pool,
    pool_slice,
    pool_total,
    resampled_worker_range,
    sample_rng,
    worker_items,
)
from gensynth.errors import UsageError

# what every rank's saved state must agree on (and, but for world, workers and batch, this loader too)
SHARED = ("epoch", "world_size", "num_workers", "batch_size", "mode", "seed", "num_samples", "pool")


def encode_pool(pool: Pool | None) -> list[int] | None:
    """[a0, b0, a1, b1, ...]: a flat list of ints, compact in JSON."""
    return None if pool is None else [x for r in pool for x in r]


def decode_pool(flat: Any, total: int) -> Pool | None:
    if flat is None:
        return None
    if not isinstance(flat, list) or len(flat) % 2 or not all(isinstance(x, int) for x in flat):
        raise UsageError("cannot resume the data stream: its saved pool is not a list of [start, stop) pairs")
    pool = list(zip(flat[::2], flat[1::2]))
    if any(not 0 <= a < b <= total for a, b in pool) or any(p[1] > q[0] for p, q in zip(pool, pool[1:])):
        raise UsageError(f"cannot resume the data stream: its saved pool is not sorted ranges within 0..{total}")
    return pool


def merge(ranges: list[tuple[int, int]]) -> Pool:
    out: Pool = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif lo < hi:
            out.append((lo, hi))
    return out


def check_group(states: list[dict[str, Any]]) -> None:
    """Every old rank's state, once each, from one save; else one line saying what is wrong."""
    if not states or not all(isinstance(s, dict) for s in states):
        raise UsageError("cannot resume the data stream on another world size: no saved rank states")
    world = states[0].get("world_size")
    ranks = sorted(s.get("rank", -1) for s in states)
    if not isinstance(world, int) or ranks != list(range(world)):
        raise UsageError(f"cannot resume the data stream on another world size: it needs the states of all "
                         f"{world} saved ranks, got ranks {ranks}")
    for key in SHARED:
        values = {repr(s.get(key)) for s in states}
        if len(values) > 1:
            raise UsageError(f"cannot resume the data stream: the saved ranks disagree on {key} ({', '.join(values)})")


def _unconsumed_slot(ranges: Pool, delivered: int, buffer: int, seed: int, epoch: int, rank: int,
                     worker: int) -> list[tuple[int, int]]:
    """The positions of a slot's `ranges` its first `delivered` samples did not take: replays
    plan.shuffle_buffer draw for draw (same RNG calls), on positions instead of samples."""
    items = chain.from_iterable(range(lo, hi) for lo, hi in ranges)
    span = pool_total(ranges)
    if buffer <= 1:
        return list(pool_slice(ranges, delivered, span))
    rng = sample_rng(seed, epoch, rank, worker)
    uniform = rng.random
    buf: list[int] = []
    read = out = 0
    while out < delivered and read < span:
        item = next(items)
        read += 1
        if len(buf) < buffer:
            buf.append(item)
            continue
        buf[int(uniform() * buffer)] = item  # the element it replaces was delivered
        out += 1
    if out < delivered:  # the slot's samples ran out: the buffer drains, shuffled
        rng.shuffle(buf)
        buf = buf[delivered - out:]
    return [(p, p + 1) for p in buf] + pool_slice(ranges, read, span)


def remaining_pool(states: list[dict[str, Any]], buffer_default: int) -> Pool:
    """Exact mode: the samples of the saved epoch that no old rank delivered (check_group first)."""
    s0 = states[0]
    total = s0["num_samples"]
    pool = decode_pool(s0.get("pool"), total) or [(0, total)]
    world, workers, batch = s0["world_size"], max(1, s0["num_workers"]), s0["batch_size"]
    left: list[tuple[int, int]] = []
    for state in states:
        rank = state["rank"]
        buffer = state.get("shuffle_buffer", buffer_default)
        for worker, delivered in enumerate(state["delivered"]):
            start, sizes, _ = worker_items(pool_total(pool), world, rank, workers, worker, batch)
            ranges = pool_slice(pool, start, start + sum(sizes))
            left += _unconsumed_slot(ranges, sum(sizes[:delivered]), buffer, s0["seed"], s0["epoch"], rank, worker)
    return merge(left)


def resampled_next_epoch(states: list[dict[str, Any]]) -> int:
    """Resampled mode: the first epoch no old (rank, worker) slot had begun."""
    s0 = states[0]
    world, workers = s0["world_size"], max(1, s0["num_workers"])
    begun = 0
    for state in states:
        for worker, delivered in enumerate(state["delivered"]):
            lo, hi = resampled_worker_range(s0["num_samples"], world, state["rank"], workers, worker)
            begun = max(begun, -(-delivered * s0["batch_size"] // max(hi - lo, 1)))
    return s0["epoch"] + begun
