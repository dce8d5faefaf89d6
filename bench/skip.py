"""Starting a loader worker inside a shard: skipping the samples before its share, in bulk vs header by header.

    python bench/skip.py --json bench/results/skip.json      # make bench runs this

A worker whose share of an epoch starts inside a shard must find that sample's first header; nothing in a
tar says where it is but the headers before it. On one Fashion-MNIST train shard (PNG, and the npy copy
that bench/loader.py makes), the time to pass over all but its last 48 samples (the split bench/loader.py's
two workers get), best of --repeats alternating runs, for:
  bulk      skip_samples: the plain headers checked and followed with numpy, a chunk at a time
  exact     the header-by-header loop skip_samples hands over to at any other header (what it always did)
  read      reading the samples through with iter_samples, as a reader that cannot seek must
Each lands at the same sample (checked). ratio = exact / bulk: how many times faster the bulk path is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, report  # noqa: E402
from bench.loader import ensure_npy_copy, shard_paths  # noqa: E402
from gensynth.data import tario  # noqa: E402
from gensynth.demo import ensure_fashion_shards  # noqa: E402


def _read_through(f, count: int) -> int:
    n = 0
    for n, _ in enumerate(tario.iter_samples(f), 1):
        if n == count:
            break
    return n


SKIPPERS: dict[str, Callable] = {
    "bulk": tario.skip_samples,
    "exact": lambda f, count: tario._skip_exact(f, count, None, -1),
    "read": _read_through,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST PNG shards (made if missing)")
    ap.add_argument("--data-npy", default="data/fashion_npy", help="the npy copy (made if missing)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ensure_fashion_shards(args.data)
    ensure_npy_copy(args.data_npy)

    best: dict[str, dict[str, float]] = {}
    rows = []
    for encoding, folder in (("png", os.path.join(args.data, "train")), ("npy", os.path.join(args.data_npy, "train"))):
        path = shard_paths(folder)[0]
        with open(path, "rb") as f:
            count = tario.count_samples(f) - 48
        landed = set()
        times: dict[str, list[float]] = {name: [] for name in SKIPPERS}
        for _ in range(args.repeats):
            for name, skip in SKIPPERS.items():
                with open(path, "rb", buffering=1 << 20) as f:  # as storage.open_read opens a local shard
                    start = time.perf_counter()
                    assert skip(f, count) == count
                    times[name].append(time.perf_counter() - start)
                    landed.add(next(tario.iter_samples(f))[0])
        assert len(landed) == 1, f"the skippers landed on different samples: {landed}"
        best[encoding] = {name: min(values) * 1000 for name, values in times.items()}
        rows += [(f"{encoding}: {name}", f"{ms:.1f}") for name, ms in best[encoding].items()]
        print(f"{encoding}: skipped {count} samples of {Path(path).name}, landed on {landed.pop()}", flush=True)
    ratios = {encoding: round(b["exact"] / b["bulk"], 2) for encoding, b in best.items()}
    result = {"protocol": {**machine(), "shard_samples": count + 48, "skipped": count, "repeats": args.repeats,
                           "statistic": "best of alternating repeats, wall clock, file in the page cache"},
              "ms": best, "ratio_exact_over_bulk": ratios}
    report(result, "ms", rows, f"exact / bulk: {ratios}", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
