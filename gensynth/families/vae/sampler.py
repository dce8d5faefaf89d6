"""The VAE's sampler: decoder means of latent noise, with a temperature."""

from __future__ import annotations

from typing import Any

import torch

from gensynth.families.sampling import Reconstruction, Sampler, positive_float
from gensynth.imaging import to_network, to_uint8
from gensynth.models.vae import VAE

# The functions below are what the trainer draws its grids with, too, so an export reproduces its run's
# grids bit for bit (on the same device type).


@torch.no_grad()
def vae_images(vae: VAE, labels: torch.Tensor, generator: torch.Generator, temperature: float, height: int,
               width: int) -> torch.Tensor:
    """Decoder means of z ~ N(0, temperature^2 I) for `labels`: uint8 [n, C, height, width]."""
    device = vae.log_sigma.device
    z = torch.randn(len(labels), vae.latent_dim, generator=generator) * temperature
    was_training = vae.training
    vae.eval()
    images = to_uint8(vae.decode(z.to(device), labels.to(device)), height, width).cpu()
    vae.train(was_training)
    return images


@torch.no_grad()
def vae_reconstruct(vae: VAE, images: torch.Tensor, labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 images -> the decoder means of their posterior means (deterministic): uint8 [n, C, height, width]."""
    device = vae.log_sigma.device
    was_training = vae.training
    vae.eval()
    labels = labels.to(device)
    mean, _ = vae.encode(to_network(images.to(device), vae.resolution), labels)
    recon = to_uint8(vae.decode(mean, labels), height, width).cpu()
    vae.train(was_training)
    return recon


class VAESampler(Sampler):
    OPTIONS = {"temperature": (1.0, "scale of the latent noise, z ~ N(0, T^2 I): < 1 trades variety for "
                               "fidelity")}
    # bench/purpose.py (docs/results/purpose.json, one K = 10 set): T = 0.8 added 0.61 accuracy points to 10 real
    # images per class against 0.20 at T = 1 (3 seeds, spread 0.37), with fewer near-copies; CAS was best at T = 1
    PURPOSES = {"augment": {"temperature": 0.8}}

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.vae = VAE(**config["architecture"])
        self.vae.load_state_dict(tensors)
        self.vae.to(self.device).eval()

    def resolve_options(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        options = super().resolve_options(given)
        options["temperature"] = positive_float("temperature", options["temperature"])
        return options

    def draw(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any]) -> torch.Tensor:
        return vae_images(self.vae, labels, generator, options["temperature"], self.height, self.width)

    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor) -> Reconstruction:
        self.check_labels(labels)
        return Reconstruction(vae_reconstruct(self.vae, images, labels, self.height, self.width), None)
