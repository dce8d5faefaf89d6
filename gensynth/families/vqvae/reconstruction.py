"""Reconstruction quality of uint8 images (what a user gets back), per image: MSE, PSNR, SSIM.

Small helpers for the VQ-VAE's held-out evaluation; pixels are scaled to [0, 1] first.
- PSNR = 10 log10(1 / MSE) in dB, capped at 100 dB for an exact copy.
- SSIM (Wang et al. 2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
  "valid" filtering (no padding, as in the paper's reference code), averaged over positions and channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _unit(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 [n, C, H, W] images, got {images.dtype} {tuple(images.shape)}")
    return images.double() / 255.0


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, pixels in [0, 1]: float64 [n]."""
    return (_unit(a) - _unit(b)).pow(2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB (peak 1): float64 [n], at most 100."""
    return (10 * torch.log10(1.0 / mse(a, b).clamp_min(1e-10))).clamp_max(100.0)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image: float64 [n] in [-1, 1], 1 for identical images."""
    x, y = _unit(a), _unit(b)
    n, c, h, w = x.shape
    size = min(SSIM_WINDOW, h, w)
    window = gaussian_window(size).to(x.device)[None, None].expand(c, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def summarize(originals: list[torch.Tensor], reconstructions: list[torch.Tensor]) -> dict[str, float]:
    """Mean MSE, PSNR and SSIM over all images of the given batches."""
    a, b = torch.cat(originals), torch.cat(reconstructions)
    return {"mse": float(mse(a, b).mean()), "psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean()),
            "psnr_of_mean_mse": float(10 * math.log10(1.0 / max(float(mse(a, b).mean()), 1e-10)))}
