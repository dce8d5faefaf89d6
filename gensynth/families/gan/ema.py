"""Exponential moving average of a model's weights (generator EMA, Karras et al. 2020).

The half-life is given in images (`half_life_kimg` thousands), and ramps up with training: it is
at most `rampup` x the images seen so far (StyleGAN2-ADA), so early samples are not averages of
noise. Buffers (batch-norm statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy
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
