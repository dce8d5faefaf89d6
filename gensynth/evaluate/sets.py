"""Shard sets as in-memory image sets for evaluation (streamed with ShardLoader), and seeded subsets.

Evaluation sets are small enough to hold (Fashion-MNIST train: 60000 x 784 bytes = 47 MB), and the
metrics need random access (k-NN, mixing pools), so they are read once, in one exact epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gensynth.data.codec import SOFT_LABEL_KEY
from gensynth.data.manifest import Manifest, manifest_sha256
from gensynth.data.shards import resolve_shards
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.progress import progress


@dataclass
class ImageSet:
    url: str
    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n]; -1 where a sample has no label
    manifest: Manifest | None = None
    manifest_sha256: str | None = None
    keys: list[str] = field(default_factory=list)
    soft: torch.Tensor | None = None  # float32 [n, classes]: soft labels (generate --relabel), None without

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.classes if self.manifest is not None else None

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.provenance if self.manifest is not None else {}

    def histogram(self) -> dict[int, int]:
        values, counts = torch.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def select(self, index: torch.Tensor | np.ndarray | list[int]) -> ImageSet:
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        keys = [self.keys[i] for i in index.tolist()] if self.keys else []
        soft = None if self.soft is None else self.soft[index]
        return ImageSet(self.url, self.images[index], self.labels[index], self.manifest, self.manifest_sha256, keys,
                        soft)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "samples": len(self), "manifest_sha256": self.manifest_sha256}


SMALL_SET = 10000  # below this many samples a loader worker process costs more than it saves


def load_image_set(url: str, num_workers: int = 1, desc: str | None = None,
                   resize: tuple[int, str] | None = None) -> ImageSet:
    """Every sample of a shard set (folder, s3:// prefix or manifest URL), in the loader's seeded order; with
    `resize` (side, "crop" | "pad"), its images made side x side squares (ShardLoader's resize)."""
    shards, _ = resolve_shards(url)
    workers = num_workers if sum(s.samples for s in shards) > SMALL_SET else 0
    loader = ShardLoader(url, batch_size=500, mode="exact", seed=0, shuffle_buffer=0, num_workers=workers,
                         rank=0, world_size=1, decode_meta=False, resize=resize)
    images, labels, keys, soft = [], [], [], []
    for batch in progress(loader, total=len(loader), desc=desc or f"read {url}", unit="batches"):
        images.append(batch["image"])
        labels.append(batch["label"])
        keys.extend(batch["key"])
        if SOFT_LABEL_KEY in batch:
            soft.append(batch[SOFT_LABEL_KEY])
    if not images:
        raise UsageError(f"{url}: the shard set holds no samples")
    sha = manifest_sha256(url) if loader.manifest is not None else None
    return ImageSet(url, torch.cat(images), torch.cat(labels), loader.manifest, sha, keys,
                    torch.cat(soft).float() if soft else None)


def matching_subset(pool: torch.Tensor, histogram: dict[int, int], seed: int, what: str = "set") -> np.ndarray:
    """Indices into `pool` (labels) with exactly histogram[c] samples of each class c, chosen at random."""
    rng = np.random.default_rng(seed)
    labels = pool.numpy()
    chosen = []
    for c, count in sorted(histogram.items()):
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < count:
            raise UsageError(f"the {what} has {len(candidates)} samples of class {c}, {count} are needed "
                             "(evaluate fewer samples with --num)")
        chosen.append(rng.choice(candidates, size=count, replace=False))
    out = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return np.sort(out)


def scaled_histogram(histogram: dict[int, int], total: int) -> dict[int, int]:
    """The same class proportions, `total` samples in all (largest remainders get the rounding)."""
    whole = sum(histogram.values())
    if total >= whole:
        return dict(histogram)
    exact = {c: n * total / whole for c, n in histogram.items()}
    out = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: exact[c] - out[c], reverse=True)[:total - sum(out.values())]:
        out[c] += 1
    return out
