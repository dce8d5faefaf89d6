"""Exponential moving average of a model's weights (generator EMA, Karras et al. 2020).

The half-life is given in images (`half_life_kimg` thousands), and ramps up with training: it is
at most `rampup` x the images seen so far (StyleGAN2-ADA), so early samples are not averages of
noise. Buffers (batch-norm statistics) are copied, not averaged: they belong to the raw weights, so before
the averaged weights are used `standing_statistics` recomputes them for those weights (BigGAN's "standing
statistics", Brock et al. 2019).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, half_life_kimg: float, rampup: float | None = 0.05):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.half_life_kimg = half_life_kimg
        self.rampup = rampup
        self.images_seen = 0

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int) -> float:
        """Blend `model` in after a step of `batch_images` images (all ranks); returns the decay used."""
        self.images_seen += batch_images
        half_life = self.half_life_kimg * 1000
        if self.rampup:
            half_life = min(half_life, self.images_seen * self.rampup)
        beta = 0.5 ** (batch_images / max(half_life, 1e-8))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "images_seen": self.images_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.images_seen = int(state["images_seen"])


@torch.no_grad()
def standing_statistics(model: nn.Module, draw_inputs: Callable[[int], tuple[torch.Tensor, ...]],
                        batches: int) -> nn.Module:
    """A copy of `model` whose batch-norm statistics are the plain average over `batches` train-mode forwards
    of `draw_inputs(i)`; `model` is left untouched. Deterministic when `draw_inputs` is."""
    calibrated = copy.deepcopy(model)
    norms = [m for m in calibrated.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None = cumulative average over the forwards since the reset
    calibrated.train()
    for i in range(batches):
        calibrated(*draw_inputs(i))
    for m, original in zip(norms, [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]):
        m.momentum = original.momentum
    return calibrated.eval()
