"""Reconstruction metrics for autoencoder families (VQ-VAE, VAE): MSE, PSNR, SSIM, codebook usage.

All take uint8 image batches [n, C, H, W] (the data's own format) and measure in that 0..255 range.

- MSE: mean squared difference per pixel, in uint8 units^2.
- PSNR: 10 log10(255^2 / MSE) per image, averaged (inf for identical images is capped at 100 dB).
- SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, computed
  per channel on the valid region (no padding) and averaged; the reference implementation's
  constants (as in scikit-image with gaussian_weights=True, use_sample_covariance=False).
- Codebook usage (VQ-VAE): share of codes used at least once, and the perplexity exp(H) of the code
  histogram (= codebook size when all are used evenly, 1 when one code takes everything).

The hook: a family's Sampler (gensynth/families/) that defines
    reconstruct(images uint8 [n, C, H, W]) -> (reconstructions uint8 [n, C, H, W], code indices or None)
and, for a codebook, the attribute `codebook_size`, gets these metrics in `gensynth eval` on real
test images (reconstruction_metrics below); families without it are simply not asked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected image batches [n, C, H, W], got shape {tuple(a.shape)}")


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(mse_per_image(a, b).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0) -> float:
    err = mse_per_image(a, b)
    values = torch.where(err > 0, 10 * torch.log10(data_range ** 2 / err.clamp_min(1e-30)),
                         torch.full_like(err, PSNR_CAP_DB)).clamp(max=PSNR_CAP_DB)
    return float(values.mean())


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0, window: int = 11,
                   sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    _check(a, b)
    n, c, h, w = a.shape
    if h < window or w < window:
        raise ValueError(f"SSIM with an {window}x{window} window needs images at least that large, got {h}x{w}")
    kernel = gaussian_window(window, sigma)[None, None].repeat(c, 1, 1, 1)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, **kwargs: Any) -> float:
    return float(ssim_per_image(a, b, **kwargs).mean())


def codebook_usage(indices: torch.Tensor | np.ndarray, codebook_size: int) -> dict[str, float]:
    """{"used_fraction", "perplexity"} of a VQ-VAE's code indices (any shape)."""
    flat = torch.as_tensor(np.asarray(indices)).flatten().long()
    if len(flat) and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"code indices must lie in 0..{codebook_size - 1}")
    counts = torch.bincount(flat, minlength=codebook_size).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"used_fraction": float((counts > 0).double().mean()), "perplexity": float(math.exp(float(entropy))),
            "codebook_size": codebook_size}


def reconstruction_metrics(sampler: Any, images: torch.Tensor, batch_size: int = 500) -> dict[str, float] | None:
    """MSE/PSNR/SSIM (and codebook usage) of `sampler.reconstruct` on real images; None when the
    family has no reconstruct (a GAN)."""
    reconstruct = getattr(sampler, "reconstruct", None)
    if reconstruct is None:
        return None
    recons, codes = [], []
    for i in range(0, len(images), batch_size):
        r, c = reconstruct(images[i:i + batch_size])
        recons.append(r.cpu())
        if c is not None:
            codes.append(torch.as_tensor(c).cpu())
    recon = torch.cat(recons)
    out: dict[str, float] = {"mse": mse(images, recon), "psnr": psnr(images, recon), "ssim": ssim(images, recon),
                             "images": len(images)}
    if codes and getattr(sampler, "codebook_size", None):
        usage = codebook_usage(torch.cat([c.flatten() for c in codes]), int(sampler.codebook_size))
        out.update({f"codebook_{k}": v for k, v in usage.items()})
    return out
