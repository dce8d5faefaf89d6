"""Who reads which samples: the epoch plan shared by every rank and worker, computed, never communicated.

Every process derives the same plan from (shard sample counts, seed, epoch, world size, workers,
batch size):

1. the shard order is shuffled with Random(seed, epoch): identical on every rank;
2. the samples, in that order, are cut into one contiguous range per rank (sizes differ by at most
   one). In *exact* mode every rank cuts its range into the same number of batches T (see
   `exact_rank_batches`), so no rank runs dry while another still steps: no hang at epoch end;
3. a rank's batches are cut into one contiguous run per DataLoader worker; a range may start or
   end inside a shard (balance down to the sample, not the shard).

The DataLoader asks its workers in turn, so the rank's batches arrive round-robin over workers;
`exact_delivery_order` is that order, and the loader delivers batches in it whatever the workers'
timing, which is what makes a resumed run see the very same batches as an uninterrupted one.

A *pool* (sorted, disjoint [start, stop) ranges of the epoch's sample order) narrows steps 2-3 to
those samples: after a resume on another world size or worker count, the pool is what the old
ranks had not delivered yet (gensynth/data/elastic.py), and it is split the same way.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Pool = list[tuple[int, int]]  # sorted, disjoint [start, stop) ranges of the epoch's sample order


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, the same in every process and Python version."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Fill a buffer of `size`, then emit a random element for each new one; drain shuffled at the end.
    (elastic.unconsumed replays it on sample positions: change both together.)"""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    uniform = rng.random  # int(random() * size), not randrange: a tenth of the cost, bias below 2**-40
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(uniform() * size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def sample_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    """The shuffle buffer's RNG of one (rank, worker) slot in one epoch."""
    return random.Random(derive_seed("samples", seed, epoch, rank, worker))


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the shard list
    start: int  # first sample (within the shard)
    stop: int  # one past the last


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


def segments_for_range(counts: list[int], order: list[int], start: int, stop: int) -> list[Segment]:
    """The samples [start, stop) of the concatenation of shards in `order`, as per-shard segments."""
    out = []
    pos = 0
    for shard in order:
        n = counts[shard]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append(Segment(shard, lo - pos, hi - pos))
        pos += n
        if pos >= stop:
            break
    return out


def pool_total(pool: Pool) -> int:
    return sum(hi - lo for lo, hi in pool)


def pool_slice(pool: Pool, start: int, stop: int) -> Pool:
    """The sample ranges of the pool's items [start, stop) (item i = the i-th sample of the pool, in order)."""
    out = []
    seen = 0  # pool items before the current range
    for lo, hi in pool:
        a, b = max(start, seen), min(stop, seen + hi - lo)
        if a < b:
            out.append((lo + a - seen, lo + b - seen))
        seen += hi - lo
        if seen >= stop:
            break
    return out


def segments_for_pool(counts: list[int], order: list[int], ranges: Pool) -> list[Segment]:
    """segments_for_range over each range in turn, neighbours in one shard joined."""
    out: list[Segment] = []
    for lo, hi in ranges:
        for seg in segments_for_range(counts, order, lo, hi):
            if out and out[-1].shard == seg.shard and out[-1].stop == seg.start:
                seg = Segment(seg.shard, out.pop().start, seg.stop)
            out.append(seg)
    return out


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` near-equal runs."""
    return total * index // parts, total * (index + 1) // parts


@dataclass(frozen=True)
class WorkerPlan:
    segments: list[Segment]  # what this worker reads, in order
    batch_sizes: list[int]  # how its samples are cut into batches (exact mode; may end with a 0)
    first_batch: int  # index of its first batch within the rank's batches


def exact_rank_batches(total: int, world: int, batch: int, rank: int) -> tuple[int, list[int]]:
    """(first sample of the rank, its batch sizes). Ranks get total/world samples (+-1) and the same
    number of batches: full ones, then the rest. A rank one batch short splits its last full batch
    (B-1, 1) rather than step with nothing; only with fewer samples than ranks (or batch 1) does a
    rank get an empty final batch."""
    first, stop = even_split(total, world, rank)
    if total == 0:
        return first, []
    most = -(-total // world)  # the largest rank share
    steps = -(-most // batch)
    full, rest = divmod(stop - first, batch)
    sizes = [batch] * full + ([rest] if rest else [])
    if len(sizes) < steps and sizes and batch > 1:
        sizes[-1] -= 1
        sizes.append(1)
    sizes += [0] * (steps - len(sizes))
    return first, sizes


def worker_items(total: int, world: int, rank: int, workers: int, worker: int,
                 batch: int) -> tuple[int, list[int], int]:
    """(first item of the worker among `total`, its batch sizes, index of its first batch in the rank's)."""
    first, sizes = exact_rank_batches(total, world, batch, rank)
    b0, b1 = even_split(len(sizes), workers, worker)
    return first + sum(sizes[:b0]), sizes[b0:b1], b0


def exact_worker_plan(counts: list[int], seed: int, epoch: int, world: int, rank: int, workers: int,
                      worker: int, batch: int, pool: Pool | None = None) -> WorkerPlan:
    """What one worker reads; with a `pool`, only those samples of the epoch are split (see the docstring)."""
    order = shard_order(len(counts), seed, epoch)
    start, sizes, b0 = worker_items(sum(counts) if pool is None else pool_total(pool), world, rank, workers,
                                    worker, batch)
    stop = start + sum(sizes)
    if pool is None:
        return WorkerPlan(segments_for_range(counts, order, start, stop), sizes, b0)
    return WorkerPlan(segments_for_pool(counts, order, pool_slice(pool, start, stop)), sizes, b0)


def exact_delivery_order(num_batches: int, workers: int) -> list[tuple[int, int]]:
    """(worker, batch index within that worker) in the order the DataLoader hands them out."""
    runs = [even_split(num_batches, workers, k) for k in range(workers)]
    counts = [hi - lo for lo, hi in runs]
    order = []
    taken = [0] * workers
    while len(order) < num_batches:
        for k in range(workers):
            if taken[k] < counts[k]:
                order.append((k, taken[k]))
                taken[k] += 1
    return order


def resampled_worker_range(total: int, world: int, rank: int, workers: int, worker: int) -> tuple[int, int]:
    """[start, stop) of one (rank, worker) slot's samples within each epoch of the endless stream."""
    return even_split(total, world * workers, rank * workers + worker)
