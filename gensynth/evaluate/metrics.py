"""Metrics as plug-ins: a name -> a function of generated and real samples (uint8 [n, C, H, W] with
labels) and a MetricContext, returning named floats. Training's `train.eval_every` runs the ones
listed in `eval.metrics` and logs them under `eval/`. Register more with `@metric("name")`.

Weight-free:
- variety: per class, the pixel standard deviation across generated samples over the same for real
  samples, averaged over classes. 1.0 = as varied as the data; a generator that ignores its noise
  (mode collapse within a class) scores near 0.
- mean_gap: per class, the mean absolute difference between the average generated and the average
  real image, in [0, 1] units, averaged over classes.

With the feature extractor (gensynth/evaluate/extractor.py; the context resolves it once, lazily:
the cached one for the run's training data, trained on first use, or the export named by
eval.extractor):
- fid: Frechet distance between extractor features of the generated and the real samples
  (gensynth/evaluate/fidelity.py). Lower is better.
- kid: unbiased KID (x 1000) in the same features, 10 subsets.
- class_consistency: share of generated samples the extractor assigns to their requested class.
- recall: precision and recall (Kynkaanniemi et al. 2019, k = 3) of the generated against the real samples.
- usefulness: class_consistency x recall, the proxy `eval.best_by` picks the best export by (below).

With the training images (all of them up to eval.copy_train_images) and unseen real ones (data.test, else
the extractor's test set):
- near_copies: share of generated samples closer to a training image than the near-copy rule allows
  (gensynth/evaluate/memorisation.py). An evaluation at or above eval.max_copies is never the best export.

Training keeps the best export by `eval.best_by`: usefulness (highest) when that plug-in runs, else fid
(lowest); best.json names the metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Metric = Callable[..., dict[str, float]]
METRICS: dict[str, Metric] = {}
NEEDS_EXTRACTOR = {"fid", "kid", "class_consistency", "recall", "usefulness"}


def metric(name: str) -> Callable[[Metric], Metric]:
    def register(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return register


@dataclass
class MetricContext:
    """What feature metrics need beyond the samples: an extractor (built on first use) and memoised
    features of the real reference samples (the same tensor every evaluation of a run)."""

    extractor_factory: Callable[[], Any] | None = None
    # () -> (the generator's training images, unseen real images, copy_ratio), for near_copies; built once
    copy_reference_factory: Callable[[], tuple[torch.Tensor, torch.Tensor, float]] | None = None
    _copy_reference: tuple[torch.Tensor, torch.Tensor, float] | None = None
    _extractor: Any = None
    _real: tuple[int, np.ndarray, np.ndarray] | None = None
    _fake: tuple[int, np.ndarray, np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def extractor(self) -> Any:
        if self._extractor is None:
            if self.extractor_factory is None:
                from gensynth.errors import ConfigError

                raise ConfigError("eval.metrics fid / kid / class_consistency need a feature extractor; none is "
                                  "configured here")
            self._extractor = self.extractor_factory()
        return self._extractor

    @property
    def copy_reference(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self._copy_reference is None:
            if self.copy_reference_factory is None:
                from gensynth.errors import ConfigError

                raise ConfigError("eval.metrics near_copies needs the training images and unseen real images; none "
                                  "are configured here")
            self._copy_reference = self.copy_reference_factory()
        return self._copy_reference

    def real_features(self, real: torch.Tensor) -> np.ndarray:
        if self._real is None or self._real[0] != id(real):
            feats, pred = self.extractor.embed(real)
            self._real = (id(real), feats, pred)
        return self._real[1]

    def fake_embedding(self, fake: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(features, predicted classes) of this evaluation's generated samples, computed once for all metrics."""
        if self._fake is None or self._fake[0] != id(fake):
            feats, pred = self.extractor.embed(fake)
            self._fake = (id(fake), feats, pred)
        return self._fake[1], self._fake[2]


def _per_class(images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    x = images.float() / 255.0
    return {int(c): x[labels == c] for c in labels.unique()}


@metric("variety")
def variety(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
            context: MetricContext | None = None) -> dict[str, float]:
    f, r = _per_class(fake, fake_labels), _per_class(real, real_labels)
    ratios = [f[c].std(dim=0).mean() / r[c].std(dim=0).mean().clamp_min(1e-8)
              for c in f if c in r and len(f[c]) > 1 and len(r[c]) > 1]
    return {"variety": float(torch.stack(ratios).mean())} if ratios else {}


@metric("mean_gap")
def mean_gap(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
             context: MetricContext | None = None) -> dict[str, float]:
    f, r = _per_class(fake, fake_labels), _per_class(real, real_labels)
    gaps = [(f[c].mean(dim=0) - r[c].mean(dim=0)).abs().mean() for c in f if c in r]
    return {"mean_gap": float(torch.stack(gaps).mean())} if gaps else {}


def _context(context: MetricContext | None) -> MetricContext:
    return context if context is not None else MetricContext()


@metric("fid")
def fid_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
               context: MetricContext | None = None) -> dict[str, float]:
    from gensynth.evaluate.fidelity import fid

    ctx = _context(context)
    return {"fid": fid(ctx.fake_embedding(fake)[0], ctx.real_features(real))}


@metric("kid")
def kid_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
               context: MetricContext | None = None) -> dict[str, float]:
    from gensynth.evaluate.fidelity import kid

    ctx = _context(context)
    mean, _ = kid(ctx.fake_embedding(fake)[0], ctx.real_features(real), subset_size=min(1000, len(real)), subsets=10)
    return {"kid_x1000": 1000 * mean}


@metric("class_consistency")
def class_consistency_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
                             real_labels: torch.Tensor, context: MetricContext | None = None) -> dict[str, float]:
    _, predicted = _context(context).fake_embedding(fake)
    return {"class_consistency": float((predicted == fake_labels.numpy()).mean())}


@metric("recall")
def recall_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
                  context: MetricContext | None = None) -> dict[str, float]:
    from gensynth.evaluate.fidelity import precision_recall

    ctx = _context(context)
    precision, recall = precision_recall(ctx.real_features(real), ctx.fake_embedding(fake)[0])
    return {"precision": precision, "recall": recall}


@metric("usefulness")
def usefulness_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
                      context: MetricContext | None = None) -> dict[str, float]:
    """class_consistency x recall: high only when samples are both of their class and cover the real data's
    variety, the two things a classifier trained on them needs (FID does not predict that: Ravuri & Vinyals
    2019). A cheap proxy of CAS, to pick the best export by."""
    parts = {**class_consistency_metric(fake, fake_labels, real, real_labels, context),
             **recall_metric(fake, fake_labels, real, real_labels, context)}
    return {**parts, "usefulness": parts["class_consistency"] * parts["recall"]}


@metric("near_copies")
def near_copies_metric(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
                       context: MetricContext | None = None) -> dict[str, float]:
    """Share of generated samples that are near-copies of a training image, by `gensynth eval`'s rule
    (gensynth/evaluate/memorisation.py), with its real floor."""
    from gensynth.evaluate.memorisation import memorisation

    train, unseen, copy_ratio = _context(context).copy_reference
    result = memorisation(fake, train, unseen, copy_ratio)
    return {"near_copies": result.near_copy_fraction, "near_copies_floor": result.real_floor_fraction}


def check_metrics(names: list[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        from gensynth.errors import ConfigError

        raise ConfigError(f"eval.metrics: unknown {', '.join(unknown)}; available: {', '.join(sorted(METRICS))}")


def needs_extractor(names: list[str]) -> bool:
    return bool(NEEDS_EXTRACTOR & set(names))


def evaluate(names: list[str], fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
             real_labels: torch.Tensor, context: MetricContext | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        out.update(METRICS[name](fake, fake_labels, real, real_labels, context=context))
    return out
