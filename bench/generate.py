"""Generation throughput: pure sampling in memory vs the whole job writing shards, in one process.

    python bench/generate.py --json bench/results/generate.json          # make bench runs this
    python bench/generate.py --run runs/demo_prior --num 20000            # a trained export instead (make demo)

(a) sampling: the job's own plan (labels, per-shard generators, fixed chunks) drawn through the sampler
and thrown away; (b) job: `gensynth.generate.generate` into a fresh local folder (encode PNG, tar, hash,
atomic publish, receipts, verify, manifest). Both alternate `--repeats` times after a warm-up; the best
of each is kept. ratio = job / sampling; the goal is >= 0.9. Without --run, the export is the generator of
configs/gan_fashion.yaml with its initial weights (speed does not depend on training).

A sampler as fast as a GPU's (`--fast`): the family CachedFamily below serves images drawn once from that
generator, so drawing costs nothing and the job is bound by encoding and writing. Its limit (c) is encoding
the same images on every core, the better of threads (gensynth.data.codec.encode_images) and one process
per core; ratio = job / limit, goal >= 0.9. The
job runs with --writers = every core (its choice for a GPU's sampler: writer processes that each encode and
write whole shards), and again with one writer (this process, encoding on threads) for comparison. (d) splits
a sample's CPU: PNG encoding per core, and writing alone (keys, json, tar members, hash, file, receipt;
one thread, images encoded before): on C cores the job can reach at most encode / (encode + write) of the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, report  # noqa: E402
from gensynth.data.codec import encode_images  # noqa: E402
from gensynth.export import save_export  # noqa: E402
from gensynth.families import load_run_config, load_sampler  # noqa: E402
from gensynth.families.base import Family  # noqa: E402
from gensynth.families.sampling import Sampler  # noqa: E402
from gensynth.generate.job import generate  # noqa: E402
from gensynth.generate.options import GenerateOptions  # noqa: E402
from gensynth.generate.plan import build_job, interleaved_labels  # noqa: E402
from gensynth.generate.shards import SetInfo, ShardDraft, draw_shard  # noqa: E402
from gensynth.models.dcgan import Generator  # noqa: E402


def untrained_export(config: str, folder: Path) -> Path:
    """An export of the config's generator at initialisation: the same architecture, so the same speed."""
    cfg = load_run_config(config)
    g = cfg.gan
    arch = dict(z_dim=g.z_dim, num_classes=10, resolution=cfg.model.resolution, channels=1,
                base_channels=g.g_channels, max_channels=g.max_channels)
    torch.manual_seed(0)
    G = Generator(**arch).eval()
    save_export(folder, G.state_dict(), {"family": "gan", "architecture": arch, "classes": [str(i) for i in range(10)],
                                         "num_classes": 10, "image": {"height": 28, "width": 28, "channels": 1},
                                         "step": 0, "run": "bench", "data": {}})
    return folder


class CachedSampler(Sampler):
    """Hands out images drawn once (cycled), at no cost: a sampler far faster than the encoder."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, device: torch.device):
        super().__init__(tensors, config, device)
        self.images = tensors["images"]

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict) -> torch.Tensor:
        start = int(torch.randint(len(self.images), (1,), generator=generator))
        stop = start + len(labels)  # images start, start + 1, ... (cycled): slices, as a sampler costs nothing
        if stop <= len(self.images):  # (indexing them one by one cost this process ~3 us a sample)
            return self.images[start:stop]
        return torch.cat([self.images[start:], self.images[:stop - len(self.images)]])


class CachedFamily(Family):
    name = "cached"

    def sampler(self, tensors: dict[str, torch.Tensor], config: dict, device: torch.device) -> Sampler:
        return CachedSampler(tensors, config, device)


def cached_export(source: str, folder: Path, count: int = 4096) -> Path:
    """An export of CachedFamily holding `count` images of the sampler at `source`."""
    sampler = load_sampler(source)
    images = sampler.sample(torch.arange(count) % sampler.num_classes, torch.Generator().manual_seed(0))
    save_export(folder, {"images": images.contiguous()}, {
        "family": f"{__name__ if __name__ != '__main__' else 'bench.generate'}:CachedFamily",
        "classes": sampler.classes, "num_classes": sampler.num_classes,
        "image": {"height": sampler.height, "width": sampler.width, "channels": sampler.channels},
        "step": 0, "run": "bench", "data": {}})
    return folder


def encode_rate(source: str, num: int, processes: int = 0) -> float:
    """The limit of a job with a free sampler: encoding `num` of its images as PNG on every core, on
    threads (gensynth.data.codec.encode_images), or with `processes`, in that many forked processes (one
    thread each, no GIL between them)."""
    images = load_sampler(source).images
    batch = images[torch.arange(num) % len(images)].permute(0, 2, 3, 1).numpy()
    if not processes:
        start = time.perf_counter()
        encode_images(batch, "png")
        return num / (time.perf_counter() - start)
    parts = [batch[i:i + ENCODE_PART] for i in range(0, num, ENCODE_PART)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_encode_part, parts[:processes])  # the processes are up before the clock starts
        start = time.perf_counter()
        pool.map(_encode_part, parts, chunksize=1)
        return num / (time.perf_counter() - start)


ENCODE_PART = 2000  # images a process encodes per task: a shard's worth


def _encode_part(images: np.ndarray) -> int:
    return len(encode_images(images, "png", threads=1))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_cost_us(source: str, num: int, shard_size: int, out: Path) -> float:
    """Microseconds per sample of writing alone (one thread, PNGs encoded beforehand): the job's own shard
    drafts (keys, json, tar members in batches, hashing, the file, its publication and receipt), given the
    encoded images; what a free sampler's job adds to encoding."""
    sampler = load_sampler(source)
    job = build_job(sampler, source, GenerateOptions(num=num, shard_size=shard_size))
    labels = interleaved_labels(list(job.counts))
    batch = sampler.images[torch.arange(num) % len(sampler.images)].permute(0, 2, 3, 1).numpy()
    encoded = encode_images(batch, job.encoding)
    info, dropped = SetInfo.of(sampler), np.zeros(sampler.num_classes, dtype=np.int64)
    start = time.perf_counter()
    for k in range(job.num_shards):
        lo, hi = job.shard_range(k)
        ShardDraft(info, job, k, batch[lo:hi], labels[lo:hi], None, dropped, str(out)).write(encoded[lo:hi]).publish()
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)  # see job_rate
    return elapsed / num * 1e6


def sampling_rate(source: str, num: int, shard_size: int, device: str) -> float:
    sampler = load_sampler(source, device=device)
    job = build_job(sampler, source, GenerateOptions(num=num, shard_size=shard_size))
    labels = interleaved_labels(list(job.counts))
    start = time.perf_counter()
    for k in range(job.num_shards):
        draw_shard(sampler, job, labels, k)  # no filter: the sampler alone
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return num / (time.perf_counter() - start)


def job_rate(source: str, num: int, shard_size: int, device: str, out: Path, writers: int = 0) -> float:
    start = time.perf_counter()
    result = generate(source, str(out), num=num, shard_size=shard_size, device=device, writers=writers)
    elapsed = time.perf_counter() - start
    assert result.manifest is not None and result.manifest.num_samples == num
    # Removed at once: the next job then writes into memory the system has used before. With every job's
    # output kept, each wrote into pages it had never touched, and on this benchmark's VM that made writing
    # slower repeat after repeat (a job 28,900 -> 22,600 samples/s over five repeats, 26,100-29,500 removed).
    shutil.rmtree(out)
    return num / elapsed


def output_filesystem(folder: str | None) -> str:
    """Where the jobs write, and the file system type there (/proc/mounts; the longest mount point above it)."""
    path = os.path.realpath(folder or tempfile.gettempdir())
    kind = "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        mounts = [(line.split()[1], line.split()[2]) for line in f if len(line.split()) > 2]
        above = [m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")]
        kind = max(above, key=lambda m: len(m[0]))[1] if above else "?"
    return f"{path} ({kind})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run or export directory (default: the untrained gan_fashion generator)")
    parser.add_argument("--config", default=str(REPO / "configs" / "gan_fashion.yaml"))
    parser.add_argument("--num", type=int, help="samples per measurement (default 20000; --fast: 100000, so that "
                        "a job's fixed costs, about 0.1 s, weigh as little as in a real one)")
    parser.add_argument("--shard-size", type=int, help="default 2000; --fast: 5000, generate's own default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fast", action="store_true", help="a sampler that costs nothing (CachedFamily): the job "
                        "against the all-core encoding limit")
    parser.add_argument("--writers", type=int, default=0, help="generate --writers (default: the job's own choice; "
                        "with --fast, every core, as the job chooses for a GPU's sampler)")
    parser.add_argument("--out-dir", help="where the jobs write their shards (default: the system's temporary "
                        "folder). On a disk, its write-back speed can bound the job; a RAM folder (/dev/shm) leaves "
                        "the CPU's share alone")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.num = args.num or (100000 if args.fast else 20000)
    args.shard_size = args.shard_size or (5000 if args.fast else 2000)
    if args.fast:
        return fast_main(args)

    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        source = args.run or str(untrained_export(args.config, Path(tmp) / "export"))
        sampling_rate(source, min(args.num, 2 * args.shard_size), args.shard_size, args.device)  # warm-up
        sampling, job = [], []
        for i in range(args.repeats):
            sampling.append(sampling_rate(source, args.num, args.shard_size, args.device))
            job.append(job_rate(source, args.num, args.shard_size, args.device, Path(tmp) / f"out{i}", args.writers))
    result = {"sampling": max(sampling), "job": max(job), "ratio": max(job) / max(sampling),
              "protocol": {"output": output_filesystem(args.out_dir),
                           "export": args.run or f"untrained generator of {os.path.relpath(args.config, REPO)}",
                           "num": args.num, "shard_size": args.shard_size, "encoding": "png", "device": args.device,
                           "writers": args.writers or "the job's choice", "repeats": args.repeats,
                           "statistic": "best of repeats", **machine(), "all_sampling": sampling, "all_job": job}}
    report(result, "samples/s", [("(a) pure sampling, in memory", f"{result['sampling']:,.0f}"),
                                 ("(b) generation job, local shards", f"{result['job']:,.0f}")],
           f"ratio job / sampling {result['ratio']:.2f} (goal >= 0.9)", args.json)


def fast_main(args: argparse.Namespace) -> None:
    writers = args.writers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        real = args.run or str(untrained_export(args.config, Path(tmp) / "export"))
        source = str(cached_export(real, Path(tmp) / "cached"))
        job_rate(source, min(args.num, 2 * args.shard_size), args.shard_size, "cpu", Path(tmp) / "warm", writers)
        threads, processes, job, one, write = [], [], [], [], []
        cpus = os.cpu_count() or 1
        for i in range(args.repeats):
            threads.append(encode_rate(source, args.num))
            processes.append(encode_rate(source, args.num, cpus))
            write.append(write_cost_us(source, args.num, args.shard_size, Path(tmp) / f"write{i}"))
            # the free sampler stands for a GPU's: the job keeps a GPU sampler's process to the cores its
            # writers leave (writer_processes' spare_cores); a sampler on the CPU keeps its threads, so here
            # the benchmark does it
            with torch_threads(max(1, cpus - writers)):
                job.append(job_rate(source, args.num, args.shard_size, "cpu", Path(tmp) / f"out{i}", writers))
            one.append(job_rate(source, args.num, args.shard_size, "cpu", Path(tmp) / f"one{i}", 1))
    limit = [max(t, p) for t, p in zip(threads, processes)]
    result = {"encode_limit": max(limit), "encode_threads": max(threads), "encode_processes": max(processes),
              "job": max(job), "job_one_writer": max(one), "ratio": max(job) / max(limit),
              "encode_us_per_core": 1e6 * (os.cpu_count() or 1) / max(limit), "write_us": min(write),
              "protocol": {"output": output_filesystem(args.out_dir),
                           "sampler": "CachedFamily (free), images of the untrained gan_fashion generator",
                           "num": args.num, "shard_size": args.shard_size, "encoding": "png",
                           "encoder_threads": os.cpu_count(), "writers": writers, "repeats": args.repeats,
                           "statistic": "best of repeats", **machine(), "all_limit_threads": threads,
                           "all_limit_processes": processes, "all_job": job,
                           "all_job_one_writer": one, "all_write_us": write}}
    rows = [("(c) limit: PNG encoding on every core, the better of", f"{result['encode_limit']:,.0f}"),
            (f"    {cpus} threads", f"{result['encode_threads']:,.0f}"),
            (f"    {cpus} processes", f"{result['encode_processes']:,.0f}"),
            (f"(b) generation job with a free sampler, {writers} writers", f"{result['job']:,.0f}"),
            ("    the same with one writer (encoding threads)", f"{result['job_one_writer']:,.0f}"),
            ("(d) us per sample: PNG encoding, per core", f"{result['encode_us_per_core']:.1f}"),
            ("    us per sample: writing alone (one thread, encoded before)", f"{result['write_us']:.1f}")]
    report(result, "samples/s", rows,
           f"ratio job / encode limit {result['ratio']:.2f} (goal >= 0.9)", args.json)


if __name__ == "__main__":
    sys.modules.setdefault("bench.generate", sys.modules["__main__"])  # exports name the family by this path
    main()
