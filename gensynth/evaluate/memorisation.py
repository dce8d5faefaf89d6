"""Memorisation: does the synthetic set leak its generator's training images?

Distances are measured in PIXEL space, as the root-mean-square difference of the two images in
[0, 1] units (0 = identical, 1 = black vs white everywhere). Pixel space, not the extractor's
feature space, because a copy is a pixel-level event: the extractor is trained to map every image
of a class close together, so in its space a novel sample and a copied one look alike, while in
pixel space a copy (or a copy plus a little noise) sits at distance ~0 from its source and a
genuinely new image does not.

For each synthetic sample s: d_train(s), the distance to the nearest image of the generator's
training set T, and d_test(s), the distance to the nearest real test image (which the generator
never saw). The scale comes from real data: for every real test image r, d_train(r) is how close a
FRESH draw from the data distribution comes to T, by chance. The rule:

    s is a near-copy  iff  d_train(s) < copy_ratio x median_r d_train(r)      (copy_ratio = 1/3)

i.e. s is at most a third as far from its nearest training image as a typical unseen real image is
(the 1/3 of Carlini et al. 2023's extraction rule, which compares a generated image's nearest
training image with its typical neighbours). On Fashion-MNIST, whose splits hold near-duplicates of
each other, a ratio of 1/2 would flag 2.2% of the real TEST images as "copies"; 1/3 flags 0.2%.
Both sides are distances to the same set T, so the rule holds for any size of T (60000 images or
K = 10 per class). The same rule applied to the real test images themselves gives the floor: the
share a generator of perfectly fresh samples would get (reported next to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def flatten_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float32 [n, C*H*W] in [0, 1]."""
    return images.reshape(len(images), -1).float().div_(255.0)


# Reference images searched exactly; above, an inverted-file index (approximate). Exact search of 10^6
# 784-d images takes about a minute per 1000 queries on one core (bench/scale.py), and an index's k-means
# costs more than that below a few million, so the approximation pays only beyond this.
EXACT_LIMIT = 2_000_000
IVF_PROBES = 16  # lists an approximate search visits, of sqrt(n)


def search_method(refs: int, exact_limit: int = EXACT_LIMIT) -> dict[str, Any]:
    """How `nearest` searches `refs` reference images: exact (faiss IndexFlatL2) up to `exact_limit`, else
    faiss IndexIVFFlat with sqrt(n) lists (k-means on 40 points a list, faiss's advice) and IVF_PROBES of
    them probed: recorded in the results, since a neighbour may then be missed (a near-copy rarely is: it
    falls in its source's list)."""
    if refs <= exact_limit:
        return {"library": "faiss", "index": "IndexFlatL2", "exact": True}
    lists = max(1, int(refs ** 0.5))
    return {"library": "faiss", "index": "IndexIVFFlat", "exact": False, "lists": lists,
            "probes": min(IVF_PROBES, lists), "trained_on": min(refs, 40 * lists)}


def nearest_index(refs: torch.Tensor, exact_limit: int = EXACT_LIMIT) -> tuple[Any, dict[str, Any]]:
    """A faiss index over the uint8 reference images `refs`, and how it searches (search_method): built once,
    searched by `search_nearest` as often as needed (generation's copy filter searches it per shard)."""
    # faiss's loader logs, at INFO, each CPU-specific build it tries and does not find: noise in a user's log
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    r = flatten_unit(refs).numpy()
    dim = r.shape[1]
    method = search_method(len(r), exact_limit)
    faiss.omp_set_num_threads(torch.get_num_threads())
    if method["exact"]:
        index = faiss.IndexFlatL2(dim)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, method["lists"])
        sample = np.random.default_rng(0).choice(len(r), method["trained_on"], replace=False)
        index.train(r[np.sort(sample)])
        index.nprobe = method["probes"]
    index.add(r)
    return index, method


def search_nearest(index: Any, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS pixel distance to the nearest reference image of `index`, its index) for each uint8 query."""
    q = flatten_unit(queries).numpy()
    if q.shape[1] != index.d:
        raise ValueError(f"images of {q.shape[1]} values searched among reference images of {index.d}")
    d2, at = index.search(q, 1)
    dist = torch.from_numpy(np.sqrt(np.maximum(d2[:, 0], 0) / index.d)).float()
    return dist, torch.from_numpy(at[:, 0]).long()


def nearest(queries: torch.Tensor, refs: torch.Tensor,
            exact_limit: int = EXACT_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMS pixel distance to the nearest reference image, its index) for each query; uint8 inputs. Searched
    with faiss (search_method says how); exact results equal nearest_brute's."""
    return search_nearest(nearest_index(refs, exact_limit)[0], queries)


def nearest_brute(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest` by brute force in torch: the reference its results are checked against (tests, bench/scale.py)."""
    q, r = flatten_unit(queries), flatten_unit(refs)
    dim = q.shape[1]
    r_sq = (r * r).sum(1)
    dist = torch.empty(len(q))
    index = torch.empty(len(q), dtype=torch.int64)
    for i in range(0, len(q), chunk):
        qi = q[i:i + chunk]
        d2 = (qi * qi).sum(1, keepdim=True) + r_sq[None, :] - 2 * qi @ r.T
        best, at = d2.min(dim=1)
        dist[i:i + chunk] = best.clamp_min_(0).div_(dim).sqrt_()
        index[i:i + chunk] = at
    return dist, index


@dataclass
class MemorisationResult:
    d_train: np.ndarray  # per synthetic sample: RMS distance to the nearest training image
    train_index: np.ndarray  # ... and which one
    d_test: np.ndarray  # per synthetic sample: RMS distance to the nearest real test image
    real_d_train: np.ndarray  # per real test image: RMS distance to the nearest training image
    threshold: float  # copy_ratio x median(real_d_train)
    copy_ratio: float
    search: dict[str, Any] = field(default_factory=dict)  # how the training set was searched (search_method)

    @property
    def near_copy(self) -> np.ndarray:
        return self.d_train < self.threshold

    @property
    def near_copy_fraction(self) -> float:
        return float(self.near_copy.mean()) if len(self.d_train) else float("nan")

    @property
    def real_floor_fraction(self) -> float:
        """The same rule on real unseen images: what perfectly fresh samples would score."""
        return float((self.real_d_train < self.threshold).mean())

    def closest(self, count: int) -> np.ndarray:
        """Indices of the synthetic samples nearest to a training image, closest first."""
        return np.argsort(self.d_train, kind="stable")[:count]

    def summary(self) -> dict[str, Any]:
        return {
            "near_copy_fraction": self.near_copy_fraction,
            "near_copies": int(self.near_copy.sum()),
            "real_floor_fraction": self.real_floor_fraction,
            "threshold_rms": self.threshold,
            "copy_ratio": self.copy_ratio,
            "median_d_train": float(np.median(self.d_train)),
            "median_d_test": float(np.median(self.d_test)),
            "median_real_d_train": float(np.median(self.real_d_train)),
            "min_d_train": float(self.d_train.min()),
            "share_closer_to_train_than_test": float((self.d_train < self.d_test).mean()),
            "search": self.search,
        }


def memorisation(synthetic: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                 copy_ratio: float = 1 / 3, real: torch.Tensor | None = None) -> MemorisationResult:
    """Nearest-neighbour distances of `synthetic` to the generator's training images `train` and to
    real `test` images (all uint8 [n, C, H, W]), and the near-copy rule of the module docstring. The
    scale (median) and the floor come from `real`, unseen real images (default: all of `test`)."""
    d_train, train_index = nearest(synthetic, train)
    d_test, _ = nearest(synthetic, test)
    real_d_train, _ = nearest(test if real is None else real, train)
    threshold = copy_ratio * float(real_d_train.median())
    return MemorisationResult(d_train.numpy(), train_index.numpy(), d_test.numpy(), real_d_train.numpy(),
                              threshold, copy_ratio, search_method(len(train)))
