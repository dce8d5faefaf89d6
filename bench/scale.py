"""Plans and searches at internet scale, simulated in memory (no big data needed).

    python bench/scale.py --json bench/results/scale.json
    python bench/scale.py --quick                         # smaller sizes, a minute

1. The exact-mode plan of one (rank, worker) of 4096 ranks x 8 workers over 10^5 shards of 10^4 samples
   (10^9 samples): time and peak memory per worker (goal: well under a second, O(shards), not O(samples)),
   for the first and the last worker; and exactness on a 10^7-sample analog (10^3 shards of 10^4, 64 ranks x
   8 workers): every worker's segments together cover every sample of every shard exactly once.
2. The loader's resume state per rank at that scale (JSON bytes): it counts batches, not samples.
3. Memorisation search (the nearest training image of every synthetic one): faiss exact (IndexFlatL2) and
   the approximate index gensynth uses above its exact limit (IndexIVFFlat, its k-means included), against
   torch brute force, at 10^5 and 10^6 training vectors of 784 dims (synthetic vectors: the timing does not
   depend on their content), 1000 queries, half of them noisy copies of training vectors: the share of
   copies each search finds is measured, and for fresh queries how often IVF returns the exact neighbour
   (uniform random vectors are IVF's worst case: every point is about equally far).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gensynth.data.plan import exact_rank_batches, exact_worker_plan  # noqa: E402


def plan_at_scale(shards: int, per_shard: int, world: int, workers: int, batch: int, repeats: int = 3) -> list[dict]:
    """Time (best of `repeats`, untraced: tracemalloc slows Python code several times) and peak memory (one
    traced call) of the plan of the first and the last (rank, worker)."""
    counts = [per_shard] * shards
    rows = []
    for rank, worker in ((0, 0), (world - 1, workers - 1)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            plan = exact_worker_plan(counts, 0, 3, world, rank, workers, worker, batch)
            times.append(time.perf_counter() - start)
        tracemalloc.start()
        exact_worker_plan(counts, 0, 3, world, rank, workers, worker, batch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append({"rank": rank, "worker": worker, "seconds": min(times), "peak_mib": peak / 2**20,
                     "segments": len(plan.segments), "batches": len(plan.batch_sizes),
                     "samples": sum(plan.batch_sizes)})
    return rows


def exactness(shards: int, per_shard: int, world: int, workers: int, batch: int) -> dict:
    """Every sample of every shard covered once by the union of all workers' segments (counted per shard)."""
    counts = [per_shard] * shards
    covered = np.zeros((shards, per_shard), dtype=np.uint8)
    steps = set()
    start = time.perf_counter()
    for rank in range(world):
        steps.add(len(exact_rank_batches(sum(counts), world, batch, rank)[1]))
        for worker in range(workers):
            for seg in exact_worker_plan(counts, 0, 3, world, rank, workers, worker, batch).segments:
                covered[seg.shard, seg.start:seg.stop] += 1
    return {"samples": shards * per_shard, "ranks": world, "workers": workers,
            "every_sample_once": bool((covered == 1).all()), "steps_per_rank": sorted(steps),
            "seconds": time.perf_counter() - start}


def resume_state_bytes(world: int, workers: int, batch: int, total: int) -> int:
    """JSON size of the last rank's ShardLoader.state_dict() near the end of an epoch of `total` samples: a
    real loader (over a 3-sample set: the state holds counts, not samples, so only their digits grow)."""
    import tempfile

    from gensynth.data.stream import ShardLoader
    from gensynth.data.writer import ShardSetWriter

    with tempfile.TemporaryDirectory() as folder:
        with ShardSetWriter(folder, "train") as w:
            for i in range(3):
                w.add(f"k{i}", np.zeros((2, 2, 1), dtype=np.uint8), label=0)
            w.finish(classes=["a"])
        loader = ShardLoader(folder, batch_size=batch, rank=world - 1, world_size=world, num_workers=workers)
        batches = len(exact_rank_batches(total, world, batch, world - 1)[1])
        loader._delivered = [batches // workers] * workers  # as if most of an epoch had been read
        state = loader.state_dict()
        state["num_samples"] = total
        return len(json.dumps(state).encode())


def search_times(sizes: list[int], dim: int, queries: int, brute_limit: int) -> list[dict]:
    from gensynth.evaluate import memorisation as mem

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        refs = torch.from_numpy(rng.integers(0, 256, (n, 1, 1, dim), dtype=np.uint8))
        # half the queries are copies of training vectors with +-3 grey levels of noise, half fresh draws
        sources = rng.choice(n, queries // 2, replace=False)
        noise = rng.integers(-3, 4, (queries // 2, 1, 1, dim))
        copies = np.clip(refs[sources].numpy().astype(np.int64) + noise, 0, 255).astype(np.uint8)
        fresh = rng.integers(0, 256, (queries - queries // 2, 1, 1, dim), dtype=np.uint8)
        q = torch.from_numpy(np.concatenate([copies, fresh]))
        row: dict = {"refs": n, "queries": queries, "dim": dim}
        start = time.perf_counter()
        exact_d, exact_i = mem.nearest(q, refs, exact_limit=n)
        row["faiss_exact_s"] = time.perf_counter() - start
        start = time.perf_counter()
        approx_d, approx_i = mem.nearest(q, refs, exact_limit=0)
        row["faiss_ivf_s"] = time.perf_counter() - start
        row["ivf"] = mem.search_method(n, exact_limit=0)
        half = queries // 2
        row["ivf_copies_found"] = float((approx_i[:half] == torch.from_numpy(sources)).float().mean())
        row["exact_copies_found"] = float((exact_i[:half] == torch.from_numpy(sources)).float().mean())
        row["ivf_same_neighbour_fresh"] = float((approx_i[half:] == exact_i[half:]).float().mean())
        row["ivf_distance_excess_max"] = float((approx_d - exact_d).max())
        if n <= brute_limit:
            start = time.perf_counter()
            brute_d, brute_i = mem.nearest_brute(q, refs)
            row["torch_brute_s"] = time.perf_counter() - start
            row["exact_equals_brute"] = bool(torch.equal(brute_i, exact_i))
        rows.append(row)
        print(f"  search over {n:,} x {dim}: faiss exact {row['faiss_exact_s']:.1f} s, IVF {row['faiss_ivf_s']:.1f} s "
              f"(copies found {100 * row['ivf_copies_found']:.1f}%, exact {100 * row['exact_copies_found']:.1f}%; "
              f"same neighbour for fresh queries {100 * row['ivf_same_neighbour_fresh']:.1f}%)"
              + (f", torch brute {row['torch_brute_s']:.1f} s" if "torch_brute_s" in row else ""), flush=True)
        del refs
    return rows


PARTS = ("plan", "state", "search")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10x smaller everything")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch / faiss threads")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default all: {','.join(PARTS)});"
                    " with --json, the others keep their figures from the file's earlier run")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts {args.parts}: give a comma-separated subset of {','.join(PARTS)}")
    torch.set_num_threads(args.threads)
    div = 10 if args.quick else 1
    protocol = (f"bench/scale.py{' --quick' if args.quick else ''}; load average {os.getloadavg()[0]:.1f} at start; "
                f"{args.threads} threads; torch {torch.__version__}")
    shards, per_shard, world, workers, batch = 100_000 // div, 10_000, 4096, 8, 256
    result: dict = {}
    if "plan" in parts:
        print(f"== plan: {shards:,} shards x {per_shard:,} samples, {world} ranks x {workers} workers, batch {batch}")
        plans = plan_at_scale(shards, per_shard, world, workers, batch)
        for r in plans:
            print(f"  rank {r['rank']} worker {r['worker']}: {1000 * r['seconds']:.0f} ms (best of 3), peak "
                  f"{r['peak_mib']:.1f} MiB, {r['segments']} segments, {r['batches']} batches, "
                  f"{r['samples']:,} samples")
        slowest = max(r["seconds"] for r in plans)
        print(f"  goal: well under a second per worker: {'met' if slowest < 0.5 else 'not met'} ({slowest:.2f} s)")
        exact = exactness(1000 // div, per_shard, 64, 8, batch)
        print(f"  exactness on {exact['samples']:,} samples, 64 ranks x 8 workers: every sample once = "
              f"{exact['every_sample_once']}, steps per rank {exact['steps_per_rank']}")
        result.update(plan=plans, exactness=exact)
    if "state" in parts:
        state = resume_state_bytes(world, workers, batch, shards * per_shard)
        print(f"== resume state per rank: {state} bytes of JSON (independent of the sample count)")
        result["resume_state_bytes"] = state
    if "search" in parts:
        sizes = [100_000 // div, 1_000_000 // div]
        print(f"== memorisation search, {args.threads} thread(s)")
        result["search"] = search_times(sizes, 784, 1000, brute_limit=100_000 // div)
    if args.json:
        path = Path(args.json)
        earlier = json.loads(path.read_text()) if path.is_file() and set(parts) != set(PARTS) else {}
        protocols = earlier.get("protocols", {})
        protocols.update({part: protocol for part in parts})
        earlier.pop("protocol", None)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**earlier, **result, "protocols": protocols}, indent=1))
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
