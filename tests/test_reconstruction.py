"""gensynth.reconstruction: MSE / PSNR / SSIM with pixels in [0, 1] against known values and a direct scipy
computation; codebook usage, and the quantizer's batch statistics computed with it. (On real exports, in
training and in `gensynth eval`: tests/test_families.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from gensynth.models.quantizer import VectorQuantizer
from gensynth.reconstruction import code_counts, codebook_usage, mse, psnr, reconstruction_figures, ssim


def test_mse_and_psnr_of_known_differences_in_unit_pixels():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] = 51  # 0.2 everywhere: MSE 0.04 (not 51^2 = 2601: pixels are in [0, 1]), PSNR 10 log10(25)
    assert mse(a, b).tolist() == pytest.approx([0.04, 0.0])
    assert psnr(a, b).tolist() == pytest.approx([10 * math.log10(25), 100.0])  # an exact copy: the cap
    figures = reconstruction_figures(a, b)
    assert figures["mse_01"] == pytest.approx(0.02) and figures["images"] == 2
    assert figures["psnr"] == pytest.approx((10 * math.log10(25) + 100) / 2)
    with pytest.raises(ValueError, match="uint8"):
        mse(a.float(), b.float())


def test_ssim_identity_constants_and_noise():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3)
    # constant images: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the structure term is C2 / C2)
    a, b = torch.full((1, 1, 16, 16), 51, dtype=torch.uint8), torch.full((1, 1, 16, 16), 153, dtype=torch.uint8)
    c1 = 0.01**2
    assert float(ssim(a, b)) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))
    noisy = (x.float() + 40 * torch.randn(x.shape)).clamp(0, 255).to(torch.uint8)
    noisier = (x.float() + 120 * torch.randn(x.shape)).clamp(0, 255).to(torch.uint8)
    assert (ssim(x, noisy) < 1).all() and (ssim(x, noisier) < ssim(x, noisy)).all()
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))


def test_ssim_matches_a_direct_scipy_gaussian_filter_computation():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(24, 20)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 25, size=x.shape), 0, 255).round()

    def blur(t):  # sigma 1.5 truncated at 3.5 sigma = the 11x11 window; keep the valid region only
        return scipy.ndimage.gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # on the 0..255 scale: SSIM does not depend on it
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    direct = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()
    tx = torch.from_numpy(x).to(torch.uint8)[None, None]
    ty = torch.from_numpy(y).to(torch.uint8)[None, None]
    assert float(ssim(tx, ty)) == pytest.approx(direct, rel=1e-9)


def test_codebook_usage_of_known_histograms():
    used, perplexity = codebook_usage(code_counts(torch.arange(8).repeat(5), 8))
    assert float(used) == 1.0 and float(perplexity) == pytest.approx(8.0)
    used, perplexity = codebook_usage(code_counts(torch.tensor([0, 1, 2, 3] * 5), 16))
    assert float(used) == 0.25 and float(perplexity) == pytest.approx(4.0)
    assert float(codebook_usage(code_counts(torch.zeros(40, dtype=torch.long), 8))[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0..7"):
        code_counts(torch.tensor([8]), 8)
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    figures = reconstruction_figures(images, images, torch.tensor([[0, 1], [0, 1], [0, 0]]), 4)
    assert figures["codebook_used_fraction"] == 0.5 and figures["codebook_size"] == 4
    assert figures["mse_01"] == 0.0 and figures["psnr"] == 100.0 and figures["ssim"] == pytest.approx(1.0)


def test_the_quantizers_batch_statistics_are_codebook_usage_of_its_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 16, kmeans_iters=2, restart_after=0).train()
    out = q(torch.randn(6, 4, 3, 3))
    used, perplexity = codebook_usage(code_counts(out.codes, 16))
    assert float(out.stats["batch_usage"]) == pytest.approx(float(used))
    assert float(out.stats["perplexity"]) == pytest.approx(float(perplexity), rel=1e-5)
    assert 1 <= float(perplexity) <= 16
