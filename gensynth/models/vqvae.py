"""VQ-VAE: a convolutional encoder, a vector quantizer (gensynth/models/quantizer.py) and a decoder.
Networks only, no training logic.

Encoder: 3x3 conv, `downsamples` strided 4x4 convs (each halves the size and doubles the feature
maps, up to `max_channels`), residual blocks (ReLU, 3x3 conv, ReLU, 1x1 conv; van den Oord et al.
2017), a 1x1 conv to `embed_dim`. The decoder mirrors it with transposed convs. No batch norm, so
ranks hold no per-rank statistics. A 32x32 image with 2 downsamples becomes an 8x8 grid of codes.
"""

from __future__ import annotations

import torch
from torch import nn

from gensynth.models.quantizer import Quantized, VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels // 2, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(channels // 2, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def widths(base: int, cap: int, downsamples: int) -> list[int]:
    """Feature maps at full resolution, then after each halving."""
    return [min(cap, base * 2**i) for i in range(downsamples + 1)]


class Encoder(nn.Module):
    def __init__(self, channels: int, base_channels: int, max_channels: int, downsamples: int, res_blocks: int,
                 embed_dim: int):
        super().__init__()
        c = widths(base_channels, max_channels, downsamples)
        layers: list[nn.Module] = [nn.Conv2d(channels, c[0], 3, padding=1)]
        for i in range(downsamples):
            layers += [nn.ReLU(), nn.Conv2d(c[i], c[i + 1], 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(c[-1], c[-1], 3, padding=1)]
        layers += [ResBlock(c[-1]) for _ in range(res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(c[-1], embed_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, channels: int, base_channels: int, max_channels: int, downsamples: int, res_blocks: int,
                 embed_dim: int):
        super().__init__()
        c = widths(base_channels, max_channels, downsamples)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(embed_dim, c[0], 3, padding=1)]
        layers += [ResBlock(c[0]) for _ in range(res_blocks)]
        for i in range(downsamples):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c[i], c[i + 1], 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(c[-1], channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    def __init__(self, resolution: int = 32, channels: int = 1, base_channels: int = 32, max_channels: int = 128,
                 downsamples: int = 2, res_blocks: int = 2, embed_dim: int = 64, codebook_size: int = 512,
                 codebook_dim: int = 0, cosine: bool = False, commitment: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, kmeans_iters: int = 10, restart_after: int = 100, usage_window: int = 100,
                 with_encoder: bool = True):
        super().__init__()
        if resolution % 2**downsamples:
            raise ValueError(f"resolution {resolution} is not divisible by 2^downsamples = {2**downsamples}")
        self.resolution, self.channels = resolution, channels
        self.grid = resolution // 2**downsamples
        net = dict(channels=channels, base_channels=base_channels, max_channels=max_channels,
                   downsamples=downsamples, res_blocks=res_blocks, embed_dim=embed_dim)
        # without the encoder: a code decoder only (what a prior's export bundles)
        self.encoder = Encoder(**net) if with_encoder else None
        self.quantizer = VectorQuantizer(embed_dim, codebook_size, codebook_dim, cosine, commitment, decay, eps,
                                         kmeans_iters, restart_after, usage_window)
        self.decoder = Decoder(**net)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Images in [-1, 1] -> (reconstruction, quantizer output); in training mode the codebook learns."""
        q = self.quantizer(self.encoder(x))
        return self.decoder(q.quantized), q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> int64 code grids [n, grid, grid] (no codebook update outside training mode)."""
        return self.quantizer(self.encoder(x)).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids -> images in about [-1, 1]."""
        return self.decoder(self.quantizer.lookup(codes))
