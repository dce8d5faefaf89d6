"""Class-conditional convolutional VAE (Kingma & Welling 2014; conditional as in Sohn et al. 2015, CVAE).
Networks only, no training logic.

Encoder q(z | x, y): a label embedding added to the first feature map, `downsamples` strided convs
(SiLU), a linear layer to the mean and log-variance of a diagonal Gaussian. Decoder p(x | z, y): z and
a label embedding -> linear -> the low-resolution feature map -> transposed convs -> the pixel means,
with a per-class bias added before every decoder stage.
The decoder's likelihood is Gaussian with one standard deviation for all pixels: fixed, or (sigma=0) the
"optimal sigma" of Rybkin et al. 2021 (sigma-VAE), the RMS reconstruction error, whose running value the
module keeps in `log_sigma` (set by the training step); the prior p(z) is a standard normal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gensynth.models.vqvae import widths


class VAE(nn.Module):
    def __init__(self, resolution: int = 28, channels: int = 1, num_classes: int = 10, latent_dim: int = 32,
                 base_channels: int = 32, max_channels: int = 128, downsamples: int = 2, sigma: float = 0.0):
        super().__init__()
        if resolution % 2**downsamples:
            raise ValueError(f"resolution {resolution} is not divisible by 2^downsamples = {2**downsamples}")
        self.resolution, self.channels, self.latent_dim = resolution, channels, latent_dim
        c = widths(base_channels, max_channels, downsamples)
        self.low = resolution // 2**downsamples
        self.low_channels = c[-1]
        # encoder
        self.enc_in = nn.Conv2d(channels, c[0], 3, padding=1)
        self.enc_label = nn.Embedding(num_classes, c[0])
        enc: list[nn.Module] = []
        for i in range(downsamples):
            enc += [nn.SiLU(), nn.Conv2d(c[i], c[i + 1], 4, stride=2, padding=1),
                    nn.SiLU(), nn.Conv2d(c[i + 1], c[i + 1], 3, padding=1)]
        self.enc = nn.Sequential(*enc, nn.SiLU(), nn.Flatten())
        self.to_posterior = nn.Linear(c[-1] * self.low**2, 2 * latent_dim)
        # decoder: the label enters with z, and again as a per-class bias before every stage, so the decoder
        # has the class at every scale rather than reading it out of z
        self.dec_label = nn.Embedding(num_classes, latent_dim)
        self.from_latent = nn.Linear(2 * latent_dim, c[-1] * self.low**2)
        self.dec_stages = nn.ModuleList()
        self.dec_biases = nn.ModuleList()
        for i in range(downsamples, 0, -1):
            self.dec_biases.append(nn.Embedding(num_classes, c[i]))
            self.dec_stages.append(nn.Sequential(nn.SiLU(), nn.Conv2d(c[i], c[i], 3, padding=1), nn.SiLU(),
                                                 nn.ConvTranspose2d(c[i], c[i - 1], 4, stride=2, padding=1)))
        for bias in self.dec_biases:
            nn.init.zeros_(bias.weight)
        self.to_pixels = nn.Sequential(nn.SiLU(), nn.Conv2d(c[0], channels, 3, padding=1))
        self.fixed_sigma = sigma > 0
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma) if sigma > 0 else 0.0))

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | x, y), each [n, latent_dim]."""
        h = self.enc_in(x) + self.enc_label(y)[:, :, None, None]
        mean, logvar = self.to_posterior(self.enc(h)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pixel means [n, C, R, R] on the [-1, 1] scale."""
        h = self.from_latent(torch.cat([z, self.dec_label(y)], 1)).view(-1, self.low_channels, self.low, self.low)
        for stage, bias in zip(self.dec_stages, self.dec_biases):
            h = stage(h + bias(y)[:, :, None, None])
        return self.to_pixels(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(pixel means, posterior mean, posterior log-variance) with z = mean + std * noise."""
        mean, logvar = self.encode(x, y)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z, y), mean, logvar


def optimal_log_sigma(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """log of the sigma that maximises the Gaussian likelihood of the batch: the RMS error (differentiable)."""
    return 0.5 * torch.log((x - mean).pow(2).mean().clamp_min(1e-8))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, sigma^2) summed over all but the batch dimension: nats per sample."""
    d = x[0].numel()
    sq = (x - mean).pow(2).flatten(1).sum(1)
    return 0.5 * sq * torch.exp(-2 * log_sigma) + d * (log_sigma + 0.5 * math.log(2 * math.pi))


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, nats."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1)
