"""The plan, a pure function of the options: counts per class, the label of every sample, the Job and its
shards, which worker draws which shard, and the seed of every shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gensynth.data.plan import derive_seed
from gensynth.errors import UsageError
from gensynth.evaluate.filter import CopyFilter, SampleFilter
from gensynth.evaluate.teacher import Teacher
from gensynth.export import CONFIG, export_folder
from gensynth.families.sampling import Sampler
from gensynth.generate.options import GenerateOptions

SPLIT = "synth"


def class_counts(num: int | None, num_classes: int, per_class: str | list[float] | None = None) -> list[int]:
    """How many samples of each class. Default: `num` balanced over the classes (the remainder goes to
    the first classes). `per_class` is a list (or comma-separated text) of counts, which must add up to
    `num` when both are given, or of proportions (with a '.', summing to 1), rounded by largest remainder."""
    if per_class is None or per_class == "":
        if num is None or num < 1:
            raise UsageError("--num must be >= 1 (or give --per-class counts)")
        base, extra = divmod(num, num_classes)
        return [base + (c < extra) for c in range(num_classes)]
    parts = [p.strip() for p in per_class.split(",")] if isinstance(per_class, str) else list(per_class)
    if len(parts) != num_classes:
        raise UsageError(f"--per-class has {len(parts)} values, the model has {num_classes} classes")
    if all(isinstance(p, int) or (isinstance(p, str) and p.isdigit()) for p in parts):
        counts = [int(p) for p in parts]
        if num is not None and sum(counts) != num:
            raise UsageError(f"--per-class counts add up to {sum(counts)}, --num is {num}; "
                             "drop --num or make them agree")
        if sum(counts) < 1:
            raise UsageError("--per-class counts add up to 0")
        return counts
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--per-class {per_class!r}: give counts (1000,1000,...) "
                         "or proportions (0.2,0.1,...)") from None
    if any(s < 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise UsageError(f"--per-class proportions must be >= 0 and sum to 1, they sum to {sum(shares):g}")
    if num is None or num < 1:
        raise UsageError("--per-class proportions need --num")
    exact = [s * num for s in shares]
    counts = [int(e) for e in exact]
    for c in sorted(range(num_classes), key=lambda c: (counts[c] - exact[c], c))[:num - sum(counts)]:
        counts[c] += 1
    return counts


def interleaved_labels(counts: list[int]) -> np.ndarray:
    """Labels of all samples, each class spread evenly over the sequence (sample j of class c sits at
    (j + 0.5) / n_c): every stretch, hence every shard, holds the classes in the overall proportions."""
    positions = np.concatenate([(np.arange(n) + 0.5) / n for n in counts]) if counts else np.zeros(0)
    classes = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    return classes[np.lexsort((classes, positions))]


@dataclass(frozen=True)
class Job:
    """Everything the output depends on. Its fingerprint ties receipts and the manifest to one job."""

    export_weights_sha256: str
    export_config_sha256: str
    seed: int
    counts: tuple[int, ...]
    shard_size: int
    encoding: str
    options: dict[str, Any] = field(hash=False)
    filter: dict[str, Any] | None = field(default=None, hash=False)  # {"classifier_sha256", "threshold"}
    relabel: dict[str, Any] | None = field(default=None, hash=False)  # {"teacher_tensors_sha256", "trained_on"}
    novelty: dict[str, Any] | None = field(default=None, hash=False)  # the copy filter's (CopyFilter.identity)

    @property
    def num(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def fingerprint(self) -> str:
        described = asdict(self)
        for extra in ("relabel", "novelty"):  # a job without soft labels or copy filter keeps its old fingerprint
            if described[extra] is None:
                del described[extra]
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num)

    def key(self, index: int) -> str:
        return self.keys(index, index + 1)[0]

    def keys(self, lo: int, hi: int) -> list[str]:
        """The keys of samples lo..hi-1: zero-padded to one width across the job (at least 8 digits)."""
        form = f"{SPLIT}-%0{max(8, len(str(self.num - 1)))}d"
        return [form % i for i in range(lo, hi)]


def my_shards(num_shards: int, worker: int, workers: int) -> list[int]:
    """Shards dealt round-robin: worker w of n takes k = w, w + n, w + 2n, ..."""
    return list(range(worker, num_shards, workers))


def shard_generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("generate", seed, k) % (2**63))


def build_job(sampler: Sampler, source: str, opts: GenerateOptions, keep: SampleFilter | None = None,
              teacher: Teacher | None = None, novel: CopyFilter | None = None) -> Job:
    shard_size, encoding, seed = opts.shard_size, opts.encoding, opts.seed
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be >= 1")
    if encoding not in ("png", "npy"):
        raise UsageError(f"--encoding {encoding!r}: use png or npy")
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be >= 0")
    folder = export_folder(source)
    config_sha = hashlib.sha256((Path(folder) / CONFIG).read_bytes()).hexdigest()
    counts = class_counts(opts.num, sampler.num_classes, opts.per_class)
    return Job(sampler.config["weights_sha256"], config_sha, seed, tuple(counts), shard_size, encoding,
               sampler.resolve_options({**sampler.purpose_options(opts.purpose),
                                        **{k: v for k, v in opts.sampling().items() if v is not None}}),
               keep.describe if keep else None, teacher.identity if teacher else None,
               novel.identity if novel else None)
