"""The VQ-VAE's sampler: it reconstructs and encodes images; new images come from a prior over its codes."""

from __future__ import annotations

from typing import Any

import torch

from gensynth.errors import UsageError
from gensynth.families.sampling import Reconstruction, Sampler
from gensynth.imaging import to_network, to_uint8
from gensynth.models.vqvae import VQVAE

# The functions below are what the trainer draws its grids with, too, so an export reproduces its run's
# grids bit for bit (on the same device type).


@torch.no_grad()
def vqvae_reconstruct(model: VQVAE, images: torch.Tensor, height: int, width: int) -> Reconstruction:
    """uint8 images -> their uint8 reconstructions through the codebook and the codes they went through
    (eval mode: the codebook stays)."""
    was_training = model.training
    model.eval()
    device = model.quantizer.embed.device
    recon, q = model(to_network(images.to(device), model.resolution))
    model.train(was_training)
    return Reconstruction(to_uint8(recon, height, width).cpu(), q.codes.cpu())


@torch.no_grad()
def vqvae_encode(model: VQVAE, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> int64 code grids [n, grid, grid] on the CPU (eval mode)."""
    was_training = model.training
    model.eval()
    codes = model.encode(to_network(images.to(model.quantizer.embed.device), model.resolution))
    model.train(was_training)
    return codes.cpu()


class VQVAESampler(Sampler):
    """A VQ-VAE alone reconstructs (and encodes) images; new images come from a prior over its codes."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device):
        super().__init__(tensors, config, device)
        self.model = VQVAE(**config["architecture"])
        self.model.load_state_dict(tensors)
        self.model.to(self.device).eval()
        self.codebook_size = self.model.codebook_size

    def sample(self, labels: torch.Tensor, generator: torch.Generator, options: dict[str, Any] | None = None,
               chunk: int = 256) -> torch.Tensor:
        run = self.config.get("run", "the VQ-VAE run")
        raise UsageError(f"this is a VQ-VAE export ({run}): it reconstructs images but cannot draw new ones; "
                         f"train the prior over its codes (gensynth train configs/prior_fashion.yaml "
                         f"prior.vqvae=runs/{run}) and sample from the prior's run")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return vqvae_encode(self.model, images)

    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor) -> Reconstruction:
        return vqvae_reconstruct(self.model, images, self.height, self.width)  # unconditional: labels unused
