"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
the same random, differentiable transforms on real and fake images before the discriminator, so a
GAN trained on little data does not overfit. Policies: color, translation, cutout."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to `ratio` of the size, filling with zeros (as in the paper's reference code)."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + dy + 1, 0, h + 1)
    gx = torch.clamp(gx[None] + dx + 1, 0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, gy, gx].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + oy - ch // 2, 0, h - 1)
    gx = torch.clamp(gx[None] + ox - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, device=x.device, dtype=x.dtype)
    mask[torch.arange(n, device=x.device)[:, None, None], gy, gx] = 0
    return x * mask[:, None]


POLICIES = {"color": (brightness, saturation, contrast), "translation": (translation,), "cutout": (cutout,)}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(unknown)}: use {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy: list[str]) -> torch.Tensor:
    for name in policy:
        for fn in POLICIES[name]:
            x = fn(x)
    return x
