"""Class-conditional DCGAN: networks only, no training logic.

Generator: z and a label embedding -> 4x4 -> upsampling blocks with conditional batch norm
(de Vries et al. 2017; as in SNGAN/BigGAN) -> tanh image at any 2^k resolution >= 8.
Discriminator: strided conv blocks with spectral norm (Miyato et al. 2018) -> global sum pool
-> linear score plus a projection of the label embedding (Miyato & Koyama 2018).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def channels_at(resolution: int, final: int, base: int, cap: int) -> int:
    """Feature maps at `resolution`: `base` at the output, doubling per halving, at most `cap`."""
    return min(cap, base * final // resolution)


def check_resolution(resolution: int) -> int:
    k = int(math.log2(resolution))
    if resolution < 8 or 2**k != resolution:
        raise ValueError(f"resolution {resolution} must be a power of two >= 8 (28x28 images are padded to 32)")
    return k


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a per-class gain and bias."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(num_classes, channels)
        self.bias = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        self.norm = ConditionalBatchNorm(cout, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x), y))


class Generator(nn.Module):
    def __init__(self, z_dim: int = 128, num_classes: int = 10, resolution: int = 32, channels: int = 1,
                 base_channels: int = 64, max_channels: int = 256):
        super().__init__()
        k = check_resolution(resolution)
        self.z_dim, self.num_classes, self.resolution, self.channels = z_dim, num_classes, resolution, channels
        self.embed = nn.Embedding(num_classes, z_dim)
        c4 = channels_at(4, resolution, base_channels, max_channels)
        self.project = nn.Linear(2 * z_dim, c4 * 16, bias=False)
        self.norm4 = ConditionalBatchNorm(c4, num_classes)
        blocks = []
        for i in range(2, k):
            r = 2**i
            blocks.append(UpBlock(channels_at(r, resolution, base_channels, max_channels),
                                  channels_at(2 * r, resolution, base_channels, max_channels), num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.to_image = nn.Conv2d(channels_at(resolution, resolution, base_channels, max_channels), channels, 3,
                                  padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], -1, 4, 4)
        h = torch.relu(self.norm4(h, y))
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.to_image(h))


class MinibatchStd(nn.Module):
    """Append the mean standard deviation over groups of samples as one more feature map, so the
    discriminator can see a batch that lacks variety (Karras et al. 2018, ProGAN).

    A group is `group` CONSECUTIVE samples (ProGAN strides them, which is the same when real and fake
    batches go through apart): the GAN trainer sends real and fake images in one forward, one half each,
    and a group that held both would give real and fake images one shared statistic, blind to the fakes'
    variety. With halves that are a multiple of the group size (every full batch) no group straddles."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = math.gcd(self.group, n)
        y = x.reshape(n // g, g, c, h, w)
        std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [n // g]
        std = std.repeat_interleave(g).reshape(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, std], dim=1)


class Discriminator(nn.Module):
    def __init__(self, num_classes: int = 10, resolution: int = 32, channels: int = 1, base_channels: int = 64,
                 max_channels: int = 256, spectral: bool = True, mbstd_group: int = 4):
        super().__init__()
        k = check_resolution(resolution)
        sn = spectral_norm if spectral else (lambda m: m)
        c = channels_at(resolution, resolution, base_channels, max_channels)
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, c, 3, padding=1)), nn.LeakyReLU(0.2)]
        for i in range(k, 2, -1):  # resolution 2^i -> 2^(i-1), down to 4x4
            r = 2**i
            cin = channels_at(r, resolution, base_channels, max_channels)
            cout = channels_at(r // 2, resolution, base_channels, max_channels)
            layers += [sn(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        c4 = channels_at(4, resolution, base_channels, max_channels)
        if mbstd_group > 1:
            layers += [MinibatchStd(mbstd_group), sn(nn.Conv2d(c4 + 1, c4, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.score = sn(nn.Linear(c4, 1))
        self.project = sn(nn.Embedding(num_classes, c4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))  # global sum pooling
        return self.score(h).squeeze(1) + (self.project(y) * h).sum(dim=1)
