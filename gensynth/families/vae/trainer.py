"""The VAE family's step: a class-conditional convolutional VAE (gensynth/models/vae.py) trained on the
negative ELBO with a weighted KL term, per pixel so the learning rate does not depend on image size:

    loss = (recon_nll + w(step) * KL) / pixels,   w(step) = vae.beta * min(1, (step + 1) / vae.kl_warmup_steps)

beta > 1 is the beta-VAE (Higgins et al. 2017); the linear warm-up of the KL weight from 0 keeps the
decoder from ignoring z early on (Bowman et al. 2016; Sonderby et al. 2016). The likelihood is counted
on the data's own pixels only (the padding up to model.resolution is cropped away). With vae.sigma=0 the
decoder's sigma is the batch's RMS error, in the loss with its gradient (Rybkin et al. 2021, "optimal
sigma"); the model keeps a running average of it (all ranks' batches), which the held-out ELBO and the
export use.

Logged: elbo/recon_nll, elbo/kl (nats per image), elbo/elbo (= -(recon_nll + kl), with weight 1 whatever
the current weight), kl_weight, sigma. Held-out (data.test): the test ELBO (nats per image, of the density
on pixels scaled to [-1, 1]) and its terms, one posterior sample per image from a fixed seed, and the
same as bits per pixel of the 8-bit values (density x bin width). Samples: decoder means of z ~ N(0, I),
one row per class.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from accelerate import Accelerator

from gensynth.config import Config
from gensynth.errors import UsageError
from gensynth.families.training import DataInfo, SeededSampling, StepResult, clip_and_step, set_learning_rate
from gensynth.families.vae.sampler import vae_images
from gensynth.imaging import pad_amounts
from gensynth.models.vae import VAE, gaussian_nll, kl_to_standard_normal, optimal_log_sigma

SIGMA_DECAY = 0.99  # running average of the optimal sigma, about the last 100 steps


def kl_weight(cfg: Config, step: int) -> float:
    v = cfg.vae
    if v.kl_warmup_steps <= 0:
        return v.beta
    return v.beta * min(1.0, (step + 1) / v.kl_warmup_steps)


class VAETrainer(SeededSampling):
    def __init__(self, cfg: Config, accelerator: Accelerator, data: DataInfo):
        v = cfg.vae
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.arch = dict(resolution=cfg.model.resolution, channels=data.channels, num_classes=data.num_classes,
                         latent_dim=v.latent_dim, base_channels=v.base_channels, max_channels=v.max_channels,
                         downsamples=v.downsamples, sigma=v.sigma)
        try:
            model = VAE(**self.arch)
        except ValueError as e:
            raise UsageError(f"model.resolution / vae.downsamples: {e}") from None
        opt = torch.optim.Adam(model.parameters(), lr=v.lr, betas=(v.beta1, v.beta2))
        self.model, self.opt = accelerator.prepare(model, opt)
        self.raw: VAE = accelerator.unwrap_model(self.model)
        self.top, _ = pad_amounts(data.height, cfg.model.resolution)
        self.left, _ = pad_amounts(data.width, cfg.model.resolution)
        self.pixels = data.channels * data.height * data.width
        self.grid_cols = 10
        self.grid_labels = torch.arange(data.num_classes).repeat_interleave(self.grid_cols)
        self.heldout: dict[str, float] = {}

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The data's own pixels of a network-sized tensor."""
        return x[:, :, self.top:self.top + self.data.height, self.left:self.left + self.data.width]

    def terms(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
              log_sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(recon_nll, kl) per image in nats, and the log sigma used: `log_sigma`, else the model's fixed one,
        else the batch's optimal one."""
        with self.accelerator.autocast():
            mean, mu, logvar = model(images, labels, noise)
        x, mean = self.crop(images), self.crop(mean.float())
        if log_sigma is None:
            log_sigma = self.raw.log_sigma if self.raw.fixed_sigma else optimal_log_sigma(x, mean)
        return gaussian_nll(x, mean, log_sigma), kl_to_standard_normal(mu.float(), logvar.float()), log_sigma

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        acc = self.accelerator
        weight = kl_weight(self.cfg, step)
        with acc.accumulate(self.model):
            noise = torch.randn(len(images), self.raw.latent_dim, device=images.device)
            recon, kl, log_sigma = self.terms(self.model, images, labels, noise)
            recon, kl = recon.mean(), kl.mean()
            acc.backward((recon + weight * kl) / self.pixels)
            norm = clip_and_step(acc, self.model, self.opt, self.cfg.train.grad_clip)
        if not self.raw.fixed_sigma:
            self.track_sigma(log_sigma.detach())
        metrics = {"elbo/recon_nll": recon.detach(), "elbo/kl": kl.detach(), "elbo/elbo": -(recon + kl).detach(),
                   "loss/weighted": ((recon + weight * kl) / self.pixels).detach(),
                   "kl_weight": torch.tensor(weight), "sigma": log_sigma.detach().exp()}
        if acc.sync_gradients:
            metrics["grad_norm"] = norm
        return StepResult(metrics, not bool(torch.isfinite(recon.detach()) & torch.isfinite(kl.detach())))

    @torch.no_grad()
    def track_sigma(self, log_sigma: torch.Tensor) -> None:
        """Running average of the optimal sigma (its variance averaged over all ranks' batches)."""
        variance = self.accelerator.reduce(torch.exp(2 * log_sigma.float()).reshape(1), reduction="mean")[0]
        self.raw.log_sigma.lerp_(0.5 * torch.log(variance), 1 - SIGMA_DECAY)  # from log 1 = 0 at the start

    @torch.no_grad()
    def heldout_metrics(self, batches) -> dict[str, float]:
        """Test ELBO (nats per image; KL weight 1; the model's sigma) with one posterior sample per image from a
        fixed seed."""
        generator = torch.Generator().manual_seed(0)
        totals = {"recon_nll": 0.0, "kl": 0.0}
        count = 0
        self.raw.eval()
        try:
            for images, labels in batches:
                noise = torch.randn(len(images), self.raw.latent_dim, generator=generator).to(images.device)
                recon, kl, _ = self.terms(self.raw, images, labels, noise, self.raw.log_sigma)
                totals["recon_nll"] += float(recon.double().sum())
                totals["kl"] += float(kl.double().sum())
                count += len(images)
        finally:
            self.raw.train()
        if not count:
            return {}
        out = {f"test_{k}": v / count for k, v in totals.items()}
        out["test_elbo"] = -(out["test_recon_nll"] + out["test_kl"])
        out["test_elbo_per_pixel"] = out["test_elbo"] / self.pixels
        # the density as a probability of the 8-bit pixel values: times the bin width 2/255 per pixel
        # (approximate: training adds no dequantization noise), in bits per pixel
        out["test_bits_per_dim"] = -(out["test_elbo"] + self.pixels * math.log(2 / 255)) / (self.pixels * math.log(2))
        self.heldout = {**out, "samples": float(count)}
        return out

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.raw}

    def after_restore(self) -> None:
        set_learning_rate(self.opt, self.cfg.vae.lr)

    def learning_rates(self) -> dict[str, float]:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return vae_images(self.raw, labels, generator, 1.0, self.data.height, self.data.width)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.raw.state_dict()), {
            "architecture": dict(self.arch), "vae": asdict(self.cfg.vae),
            "heldout": dict(self.heldout), "sigma": math.exp(float(self.raw.log_sigma))}
