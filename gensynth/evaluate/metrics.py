"""Metrics as plug-ins: a name -> a function of generated and real samples (uint8 [n, C, H, W] with
labels) returning named floats. Training's `train.eval_every` runs the ones listed in `eval.metrics`
and logs them under `eval/`. Register more with `@metric("name")`.

- variety: per class, the pixel standard deviation across generated samples over the same for real
  samples, averaged over classes. 1.0 = as varied as the data; a generator that ignores its noise
  (mode collapse within a class) scores near 0. Needs no weights.
- mean_gap: per class, the mean absolute difference between the average generated and the average
  real image, in [0, 1] units, averaged over classes. Needs no weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]
METRICS: dict[str, Metric] = {}


def metric(name: str) -> Callable[[Metric], Metric]:
    def register(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return register


def _per_class(images: torch.Tensor, labels: torch.Tensor) -> dict[int, torch.Tensor]:
    x = images.float() / 255.0
    return {int(c): x[labels == c] for c in labels.unique()}


@metric("variety")
def variety(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
            real_labels: torch.Tensor) -> dict[str, float]:
    f, r = _per_class(fake, fake_labels), _per_class(real, real_labels)
    ratios = [f[c].std(dim=0).mean() / r[c].std(dim=0).mean().clamp_min(1e-8)
              for c in f if c in r and len(f[c]) > 1 and len(r[c]) > 1]
    return {"variety": float(torch.stack(ratios).mean())} if ratios else {}


@metric("mean_gap")
def mean_gap(fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
             real_labels: torch.Tensor) -> dict[str, float]:
    f, r = _per_class(fake, fake_labels), _per_class(real, real_labels)
    gaps = [(f[c].mean(dim=0) - r[c].mean(dim=0)).abs().mean() for c in f if c in r]
    return {"mean_gap": float(torch.stack(gaps).mean())} if gaps else {}


def check_metrics(names: list[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        from gensynth.errors import ConfigError

        raise ConfigError(f"eval.metrics: unknown {', '.join(unknown)}; available: {', '.join(sorted(METRICS))}")


def evaluate(names: list[str], fake: torch.Tensor, fake_labels: torch.Tensor, real: torch.Tensor,
             real_labels: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        out.update(METRICS[name](fake, fake_labels, real, real_labels))
    return out
