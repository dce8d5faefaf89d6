"""Mix real and synthetic shard sets at a fixed ratio per batch, with the loader's exactness and resume.

    from gensynth.data import MixLoader

    loader = MixLoader({"real": "data/fashion/train", "synth": "data/synth/v1"}, ratio={"real": 1, "synth": 1},
                       batch_size=128, weights={"synth": 0.5})
    for batch in loader:                      # one exact epoch of the FIRST source (here: real)
        images, labels = batch["image"], batch["label"]
        source = batch["source"]              # int64 [n]: index of the source each sample came from
        weight = batch["weight"]              # float32 [n]: per-sample loss weight (here 1.0 real, 0.5 synth)
        soft = batch.get("soft_label")        # float32 [n, classes] when a source has soft labels, else absent

Every batch holds the same number of samples from each source, in the ratio given (largest remainder:
64 + 64 here). The first source is the primary: in `mode="exact"` one iteration is exactly one of its
epochs, every sample once across ranks and workers, equal steps on every rank; the other sources stream
endlessly (`resampled`: every sample once per pass of its own, a fresh order each pass), so they never
run dry and never end an epoch early. In `mode="resampled"` every source is endless. Each source is a
`ShardLoader` with its own seed, sharded across ranks the same way; `state_dict()` holds all their
positions, so a resumed run sees the very same batches as an uninterrupted one.

Soft labels (`gensynth generate --relabel`): when any source has them, every batch has
batch["soft_label"], float32 [n, classes], so the whole batch trains with one loss. A source without
them contributes the one-hot of its labels (the same target its hard label gives cross-entropy); a
sample without a label (-1) gets a row of zeros, i.e. no target.

At the mix `gensynth eval` recommends for a synthetic set (recommended_mix.json beside metrics.json:
the synthetic share and loss weight chosen on a validation split; with the agree filter, the filtered
set it wrote beside it):

    loader = MixLoader.from_recommendation("data/fashion/k10/train", None, "reports/synth_k10", batch_size=128)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import torch

from gensynth import storage
from gensynth.data.codec import SOFT_ARRAY, SOFT_LABEL_KEY
from gensynth.data.manifest import manifest_sha256
from gensynth.data.plan import derive_seed
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError

log = logging.getLogger("gensynth")
RECOMMENDATION_FILE = "recommended_mix.json"
RECOMMENDATION_FORMAT = "gensynth-recommended-mix/1"
FILTERS = ("none", "agree")


def read_recommendation(location: str) -> dict[str, Any]:
    """The recommendation `gensynth eval` wrote (recommended_mix.json, or the report folder holding it), checked;
    its "url" is where it was read, its synthetic set's "url" resolved (a "file" beside it, or as written)."""
    url = location if str(location).endswith(".json") else storage.join(location, RECOMMENDATION_FILE)
    if not storage.exists(url):
        raise UsageError(f"{url}: no recommended mix there; `gensynth eval` writes {RECOMMENDATION_FILE} beside "
                         "metrics.json when it measures the augmentation gain")
    try:
        rec = json.loads(storage.read_bytes(url))
    except ValueError as e:
        raise UsageError(f"{url}: not a recommended mix ({e})") from None
    mix = rec.get("recommended_mix") if isinstance(rec, dict) else None
    target = rec.get("synthetic") if isinstance(rec, dict) else None
    if rec.get("format") != RECOMMENDATION_FORMAT or not isinstance(mix, dict) or not isinstance(target, dict):
        raise UsageError(f"{url}: not a recommended mix of this gensynth (format {RECOMMENDATION_FORMAT})")
    fraction, weight = mix.get("synthetic_fraction"), mix.get("synthetic_weight")
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1 and isinstance(weight, (int, float))
            and weight > 0 and mix.get("filter") in FILTERS):
        raise UsageError(f"{url}: its recommended_mix {mix} needs 0 < synthetic_fraction < 1, synthetic_weight > 0 "
                         f"and a filter of {', '.join(FILTERS)}")
    beside = target.get("file")
    target = {**target, "url": storage.join(storage.parent(url), beside) if beside else target.get("url")}
    return {**rec, "url": url, "synthetic": target}


def split_batch(batch_size: int, ratio: list[float]) -> list[int]:
    """Per-source counts of one batch, in proportion to `ratio` (largest remainder; ties to the first)."""
    if any(r < 0 for r in ratio) or sum(ratio) <= 0:
        raise UsageError(f"mix ratio {ratio}: parts must be >= 0 and not all 0")
    exact = [batch_size * r / sum(ratio) for r in ratio]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(ratio)), key=lambda i: (counts[i] - exact[i], i))[:batch_size - sum(counts)]:
        counts[i] += 1
    if counts[0] == 0:
        raise UsageError(f"mix ratio {ratio} with batch_size {batch_size} gives the primary source no sample per "
                         "batch; raise its share or the batch size")
    return counts


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """float32 [n, classes] one-hot rows of `labels`; a row of zeros for a sample without a label (-1)."""
    out = torch.zeros(len(labels), classes)
    known = labels >= 0
    out[known.nonzero().squeeze(1), labels[known]] = 1.0
    return out


class MixLoader:
    """Batches that combine several shard sets in a fixed per-batch ratio; see the module docstring."""

    def __init__(self, sources: dict[str, str | list[str]], batch_size: int, ratio: dict[str, float] | None = None,
                 weights: dict[str, float] | None = None, mode: str = "exact", seed: int = 0, **loader_options: Any):
        if len(sources) < 2:
            raise UsageError("MixLoader needs at least two sources (use ShardLoader for one)")
        self.names = list(sources)
        ratio = ratio or {name: 1.0 for name in self.names}
        unknown = sorted((set(ratio) | set(weights or {})) - set(self.names))
        if unknown:
            raise UsageError(f"mix ratio/weights name {', '.join(unknown)}, not among the sources "
                             f"({', '.join(self.names)})")
        self.counts = split_batch(batch_size, [float(ratio.get(n, 0.0)) for n in self.names])
        self.weights = [float((weights or {}).get(n, 1.0)) for n in self.names]
        self.mode = mode
        self.loaders = []
        for i, (name, url) in enumerate(sources.items()):
            if self.counts[i] == 0:
                raise UsageError(f"mix source {name!r} gets 0 samples per batch of {batch_size}; "
                                 "give it a larger ratio or drop it")
            # a seed per source, derived from the mix seed, so two sources never share an order
            self.loaders.append(ShardLoader(url, batch_size=self.counts[i], seed=derive_seed("mix", seed, i) % 2**31,
                                            mode=mode if i == 0 else "resampled", **loader_options))
        self._streams: list[Iterator[dict[str, Any]] | None] = [None] * len(self.loaders)
        self._check_compatible()
        self.soft_width = self._soft_width()

    def _check_compatible(self) -> None:
        """Sources must hold the same image format and, where named, the same classes."""
        described = [(n, loader.manifest) for n, loader in zip(self.names, self.loaders) if loader.manifest]
        for name, manifest in described[1:]:
            first_name, first = described[0]
            a, b = first.schema.get("image", {}), manifest.schema.get("image", {})
            shape = ("height", "width", "channels")
            if a and b and [a[k] for k in shape] != [b[k] for k in shape]:
                raise UsageError(f"cannot mix {first_name} ({'x'.join(str(a[k]) for k in shape)} images) with "
                                 f"{name} ({'x'.join(str(b[k]) for k in shape)}): one image format per batch")
            if first.classes and manifest.classes and first.classes != manifest.classes:
                raise UsageError(f"cannot mix {first_name} and {name}: their class lists differ "
                                 f"({first.classes} vs {manifest.classes}), so the same label would mean two things")

    def _soft_width(self) -> int | None:
        """Classes per soft label when a source has soft labels (they must agree), else None."""
        widths = {name: loader.arrays[SOFT_ARRAY]["shape"][0] for name, loader in zip(self.names, self.loaders)
                  if SOFT_ARRAY in loader.arrays}
        if not widths:
            return None
        width = max(widths.values())
        for name, loader in zip(self.names, self.loaders):
            classes = widths.get(name) or (loader.manifest.num_classes if loader.manifest else None) or 0
            if classes != width and (name in widths or classes > width):
                raise UsageError(f"cannot mix {name} ({classes} classes) into soft labels of {width} classes "
                                 f"({', '.join(widths)}): one class list per batch")
        return width

    @classmethod
    def from_recommendation(cls, real: str | list[str], synthetic: str | None, recommendation: str,
                            batch_size: int, **options: Any) -> MixLoader:
        """`real` and `synthetic` at the recommended mix: synthetic_fraction of every batch synthetic (largest
        remainder), their loss weighted synthetic_weight. `synthetic` None: the set the recommendation names
        (with the agree filter, the filtered set written beside it). It must be the set the recommendation was
        measured on (manifest sha256): a mix chosen for one set says nothing about another."""
        rec = read_recommendation(recommendation)
        mix, target = rec["recommended_mix"], rec["synthetic"]
        synthetic = synthetic or target["url"]
        if manifest_sha256(synthetic) != target.get("manifest_sha256"):
            raise UsageError(f"{synthetic} is not the synthetic set {rec['url']} was measured on ({target['url']}, "
                             f"manifest sha256 {str(target.get('manifest_sha256'))[:12]}...); evaluate it with "
                             "`gensynth eval`, or pass ratio= and weights= to MixLoader yourself")
        if rec.get("verdict") in ("hurts", "neutral"):
            log.warning("%s: %s", rec["url"], rec.get("line", f"the synthetic set {rec['verdict']}"))
        f = float(mix["synthetic_fraction"])
        return cls({"real": real, "synthetic": synthetic}, batch_size, ratio={"real": 1 - f, "synthetic": f},
                   weights={"synthetic": float(mix["synthetic_weight"])}, **options)

    @property
    def primary(self) -> ShardLoader:
        return self.loaders[0]

    def __len__(self) -> int:
        """Steps per epoch of the primary source (exact mode)."""
        return len(self.primary)

    @property
    def epoch(self) -> int:
        return self.primary.epoch

    def _next(self, i: int) -> dict[str, Any]:
        if self._streams[i] is None:
            self._streams[i] = iter(self.loaders[i])
        return next(self._streams[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._streams[0] = None  # the primary starts its (next, or resumed) epoch
        for first in self.primary:
            parts = [first] + [self._next(i) for i in range(1, len(self.loaders))]
            yield self._combine(parts)
        self._streams[0] = None

    def _combine(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        n = [len(p["key"]) for p in parts]
        batch = {"image": torch.cat([p["image"] for p in parts]), "label": torch.cat([p["label"] for p in parts]),
                 "key": [k for p in parts for k in p["key"]],
                 "source": torch.cat([torch.full((m,), i, dtype=torch.int64) for i, m in enumerate(n)]),
                 "weight": torch.cat([torch.full((m,), self.weights[i]) for i, m in enumerate(n)])}
        if all("meta" in p for p in parts):
            batch["meta"] = [m for p in parts for m in p["meta"]]
        if self.soft_width is not None:
            batch[SOFT_LABEL_KEY] = torch.cat([p[SOFT_LABEL_KEY] if SOFT_LABEL_KEY in p else
                                               one_hot(p["label"], self.soft_width) for p in parts])
        return batch

    @property
    def corrupt(self) -> int:
        return sum(loader.corrupt for loader in self.loaders)

    def state_dict(self) -> dict[str, Any]:
        return {"sources": self.names, "counts": self.counts,
                "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """This rank's saved state, or the list of every saved rank's (needed on another world size or worker
        count: see ShardLoader.load_state_dict)."""
        for one in state if isinstance(state, list) else [state]:
            if one.get("sources") != self.names or one.get("counts") != self.counts:
                raise UsageError(f"cannot resume the mix: it was saved with sources {one.get('sources')} and "
                                 f"per-batch counts {one.get('counts')}, this loader has {self.names} and "
                                 f"{self.counts}")
        for i, loader in enumerate(self.loaders):
            loader.load_state_dict([one["loaders"][i] for one in state] if isinstance(state, list)
                                   else state["loaders"][i])
        self._streams = [None] * len(self.loaders)
