"""The GAN's sampler: the EMA generator of an export, with the truncation trick."""

from __future__ import annotations

from typing import Any

import torch

from gensynth.errors import UsageError
from gensynth.families.sampling import Sampler
from gensynth.models.dcgan import Generator


def truncated_normal(shape: tuple[int, ...], threshold: float, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise; with threshold > 0, entries beyond +-threshold are redrawn until inside
    (the truncation trick, Brock et al. 2019, BigGAN): fidelity up, variety down."""
    z = torch.randn(shape, generator=generator)
    if threshold > 0:
        outside = z.abs() > threshold
        while outside.any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator)
            outside = z.abs() > threshold
    return z


class GANSampler(Sampler):
    OPTIONS = {"truncation": (0.0, "redraw latent entries beyond +-t (BigGAN's truncation trick); 0 = off")}
    # bench/purpose.py --option filter_threshold (docs/results/purpose_filter.json, the full-data GAN): keeping the
    # samples the classifier gives their label >= 0.7 took CAS / real from 0.817 to 0.894 (3 seeds, spread 0.009;
    # 0.8 left too few pullovers and shirts); truncation served neither purpose (docs/results/purpose.json)
    PURPOSES = {"cas": {"filter_threshold": 0.7}}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.G = Generator(**config["architecture"])
        self.G.load_state_dict(tensors)
        self.G.to(self.device).eval()

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        if not float(options["truncation"]) >= 0:
            raise UsageError(f"truncation={options['truncation']}: must be >= 0 (0 = off)")
        options["truncation"] = float(options["truncation"])
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        z = truncated_normal((len(labels), self.G.z_dim), options["truncation"], generator)
        return self.to_images(self.G(z.to(self.device), labels.to(self.device)))
