"""Loader throughput: gensynth's ShardLoader vs HF `datasets` streaming vs the limit, on Fashion-MNIST.

    python bench/loader.py --json bench/results/loader.json         # make bench runs this

One run measures, on the same Fashion-MNIST train shards (60000 28x28 PNGs, data/fashion/train),
samples per second over one full pass, each with the same number of worker processes:

  gensynth      ShardLoader as the trainer uses it: exact mode, one epoch, shuffled shard order, a
                2000-sample shuffle buffer, batches of uint8 [n, C, H, W] tensors with labels and keys
  gensynth_meta the same, also decoding each sample's JSON metadata (the constructor's default)
  hf_streaming  load_dataset("webdataset", streaming=True) through a torch DataLoader, images decoded
                to arrays and stacked into the same uint8 tensors, with labels, keys and metadata (HF
                always parses the JSON); the fastest HF set-up we found: its Image feature's PIL objects
                + np.asarray in the collate (`with_format("torch")` was 2x slower); no shuffling
  limit         no framework: the shards are split across the same number of processes, each reads
                its tars and decodes every PNG to an array, one sample at a time, with the fastest
                primitives we have (gensynth.data.tario's header parser and codec's PNG decoder), and
                nothing else: no plan, no shuffle, no batches, no transfer between processes
  limit_stdlib  the same loop with Python's tarfile and Pillow, for reference
  npy           ShardLoader on an npy-encoded copy of the same samples (`gensynth shard --encoding npy`)

The measurements alternate (one of each, `--repeats` times) so that load from other processes on a
shared machine falls on all of them alike; the best of the repeats is kept (the least disturbed).
Each pass is also timed in CPU-seconds of all its processes (main + workers, from getrusage):
samples per CPU-second are less sensitive to other load than wall clock, and are reported beside
it. Every pass checks that it saw all samples. Goals, on wall clock: gensynth >= 0.9 x
limit, >= 2 x hf_streaming, and npy faster than gensynth.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gensynth import __version__  # noqa: E402
from gensynth.cli import main as gensynth_cli  # noqa: E402
from gensynth.data.codec import decode_png  # noqa: E402
from gensynth.data.manifest import manifest_url, read_manifest, verify_shards  # noqa: E402
from gensynth.data.stream import ShardLoader  # noqa: E402
from gensynth.data.tario import iter_samples  # noqa: E402
from gensynth.demo import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ensure_fashion_shards  # noqa: E402

GOALS = {"gensynth/limit": 0.9, "gensynth/hf_streaming": 2.0, "npy/gensynth": 1.0}


# ------------------------------------------------------------------------------------------ set-up


def ensure_npy_copy(data_npy: str, shard_size: int = 5000) -> None:
    """The same Fashion-MNIST train samples, same seed and order, with raw npy images."""
    folder = os.path.join(data_npy, "train")
    if os.path.exists(manifest_url(folder)) and not verify_shards(folder, read_manifest(folder)):
        return
    code = gensynth_cli(["-q", "shard", f"idx:{FASHION_MNIST_DIR}", data_npy, "--split", "train",
                         "--encoding", "npy", "--shard-size", str(shard_size),
                         "--class-names", ",".join(FASHION_MNIST_CLASSES), "--overwrite"])
    if code != 0:
        raise SystemExit(f"gensynth shard --encoding npy failed with exit code {code}")


def shard_paths(folder: str) -> list[str]:
    return [os.path.join(folder, s.name) for s in read_manifest(folder).shards]


# ---------------------------------------------------------------------------------------- measures


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, pool processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(count: Callable[[], int], expect: int, what: str) -> tuple[float, float]:
    """(samples per second of wall time, samples per CPU-second of all processes) of one pass."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = count()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    assert n == expect, f"{what} delivered {n} of {expect} samples"
    return n / wall, n / cpu


def measure_gensynth(folder: str, batch: int, workers: int, expect: int, meta: bool = False) -> tuple[float, float]:
    loader = ShardLoader(folder, batch_size=batch, mode="exact", num_workers=workers, decode_meta=meta)
    return timed(lambda: sum(b["image"].shape[0] for b in loader), expect, "gensynth")


def _hf_collate(rows: list[dict]) -> dict:
    return {"image": torch.from_numpy(np.stack([np.asarray(r["png"]) for r in rows])[:, None]),
            "label": torch.tensor([r["cls"] for r in rows], dtype=torch.int64),
            "key": [r["__key__"] for r in rows], "meta": [r["json"] for r in rows]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def measure_hf(shards: list[str], batch: int, workers: int, expect: int) -> tuple[float, float]:
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": shards}, streaming=True, split="train")
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_hf_collate,
                                         worker_init_fn=_worker_init if workers else None)
    return timed(lambda: sum(b["image"].shape[0] for b in loader), expect, "hf streaming")


def _limit_worker(paths: list[str]) -> int:
    n = 0
    for path in paths:
        with open(path, "rb", buffering=1 << 20) as f:
            for _, fields in iter_samples(f):
                decode_png(fields["png"])
                int(fields["cls"])
                n += 1
    return n


def _limit_stdlib_worker(paths: list[str]) -> int:
    from PIL import Image

    n = 0
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                        np.asarray(img)
                    n += 1
    return n


def measure_limit(shards: list[str], workers: int, expect: int, worker=_limit_worker) -> tuple[float, float]:
    """The shards dealt round-robin to `workers` processes (forked, like DataLoader workers)."""
    procs = max(1, workers)
    parts = [shards[i::procs] for i in range(procs)]

    def count() -> int:
        if procs == 1:
            return worker(parts[0])
        with mp.get_context("fork").Pool(procs) as pool:
            return sum(pool.map(worker, parts, chunksize=1))

    return timed(count, expect, "limit")


# ----------------------------------------------------------------------------------------- report


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict[str, str]:
    import datasets
    import PIL
    import webdataset

    return {"python": platform.python_version(), "torch": torch.__version__, "datasets": datasets.__version__,
            "webdataset": getattr(webdataset, "__version__", "?"), "numpy": np.__version__,
            "pillow": PIL.__version__, "gensynth": __version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST PNG shards (made if missing)")
    ap.add_argument("--data-npy", default="data/fashion_npy", help="the npy copy (made if missing)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for every contender")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best of each is kept")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    ensure_fashion_shards(args.data)
    ensure_npy_copy(args.data_npy)
    folder, folder_npy = os.path.join(args.data, "train"), os.path.join(args.data_npy, "train")
    manifest = read_manifest(folder)
    shards, expect = shard_paths(folder), manifest.num_samples
    W, B = args.workers, args.batch_size

    measures = {
        "gensynth": lambda: measure_gensynth(folder, B, W, expect),
        "gensynth_meta": lambda: measure_gensynth(folder, B, W, expect, meta=True),
        "hf_streaming": lambda: measure_hf(shards, B, W, expect),
        "limit": lambda: measure_limit(shards, W, expect),
        "limit_stdlib": lambda: measure_limit(shards, W, expect, _limit_stdlib_worker),
        "npy": lambda: measure_gensynth(folder_npy, B, W, expect),
    }
    protocol = {
        "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "workers": W, "batch_size": B,
        "torch_threads_main": torch.get_num_threads(), "torch_threads_workers": 1, "repeats": args.repeats,
        "statistic": f"best of {args.repeats} alternating passes, wall clock (and, apart, per CPU-second of all "
                     "processes: less sensitive to other load on the machine)", "samples": expect,
        "shards": len(manifest.shards), "shard_set_mb": round(manifest.num_bytes / 1e6, 1),
        "image": "28x28x1 uint8, png (npy for the npy row)", "loader_mode": "exact, shuffle_buffer 2000",
        "platform": platform.platform(), "versions": versions(), "load_average_before": load_average(),
    }
    print(f"loader benchmark: {expect} Fashion-MNIST train samples in {len(manifest.shards)} shards "
          f"({protocol['shard_set_mb']} MB), one full pass per measure")
    print(f"protocol: {protocol['cores_usable']} cores, {W} worker processes each, batch {B}, torch threads "
          f"{protocol['torch_threads_main']} main / 1 per worker, best of {args.repeats} alternating passes; "
          f"load average before {protocol['load_average_before']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in protocol["versions"].items()))

    wall: dict[str, list[float]] = {name: [] for name in measures}
    cpu: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(args.repeats):
        for name, fn in measures.items():
            per_wall_s, per_cpu_s = fn()
            wall[name].append(per_wall_s)
            cpu[name].append(per_cpu_s)
            print(f"  round {r + 1}/{args.repeats} {name:14s} {per_wall_s:10,.0f} samples/s "
                  f"{per_cpu_s:10,.0f} samples/CPU-s", flush=True)
    protocol["load_average_after"] = load_average()
    best = {name: max(values) for name, values in wall.items()}
    best_cpu = {name: max(values) for name, values in cpu.items()}

    print(f"\nload average after {protocol['load_average_after']}\n")
    print(f"| {'loader':14s} | {'samples/s':>10s} | {'samples/CPU-s':>13s} |")
    print(f"|{'-' * 16}|{'-' * 12}|{'-' * 15}|")
    for name in measures:
        print(f"| {name:14s} | {best[name]:10,.0f} | {best_cpu[name]:13,.0f} |")
    print()
    ratios, ratios_cpu = ratio_table(best), ratio_table(best_cpu)
    print(f"| {'ratio':26s} | {'wall':>6s} | {'CPU':>6s} | {'goal':>7s} | met (wall) |")
    print(f"|{'-' * 28}|{'-' * 8}|{'-' * 8}|{'-' * 9}|------------|")
    for name, value in ratios.items():
        goal = GOALS.get(name)
        ok = goal is not None and (value > goal if name == "npy/gensynth" else value >= goal)
        met = "" if goal is None else ("yes" if ok else "NO")
        goal_text = "" if goal is None else (f">= {goal:g}" if name != "npy/gensynth" else "> 1")
        print(f"| {name:26s} | {value:6.2f} | {ratios_cpu[name]:6.2f} | {goal_text:>7s} | {met:10s} |")

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = {**{k: round(v, 1) for k, v in best.items()}, "ratios": {k: round(v, 3) for k, v in ratios.items()},
                  "goals": GOALS, "per_cpu_second": {k: round(v, 1) for k, v in best_cpu.items()},
                  "ratios_per_cpu_second": {k: round(v, 3) for k, v in ratios_cpu.items()},
                  "runs": {k: [round(x, 1) for x in v] for k, v in wall.items()},
                  "runs_per_cpu_second": {k: [round(x, 1) for x in v] for k, v in cpu.items()},
                  "protocol": protocol}
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {out}")
    return 0


def ratio_table(rate: dict[str, float]) -> dict[str, float]:
    return {"gensynth/limit": rate["gensynth"] / rate["limit"],
            "gensynth/hf_streaming": rate["gensynth"] / rate["hf_streaming"],
            "npy/gensynth": rate["npy"] / rate["gensynth"],
            "gensynth_meta/limit": rate["gensynth_meta"] / rate["limit"],
            "gensynth_meta/hf_streaming": rate["gensynth_meta"] / rate["hf_streaming"],
            "gensynth/limit_stdlib": rate["gensynth"] / rate["limit_stdlib"]}


if __name__ == "__main__":
    sys.exit(main())
