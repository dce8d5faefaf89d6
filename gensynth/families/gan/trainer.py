"""The GAN family's step: a class-conditional DCGAN (gensynth/models/dcgan.py) trained with hinge or
non-saturating loss, optional lazy R1, DiffAugment and mode seeking, TTUR learning rates and a generator EMA.

One call of `train_step` is one micro-batch: ONE generator forward, whose fakes serve both updates; a
discriminator update on real + fake (detached) images in ONE forward (so DDP sees one forward per
backward), then the generator update through the raw discriminator with its gradients off (so D's DDP
reducer is not involved in the G phase). Under gradient accumulation both models accumulate and step
together on the last micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gensynth.config import Config
from gensynth.families.gan.augment import diff_augment, parse_policy
from gensynth.families.gan.ema import EMA, standing_statistics
from gensynth.families.training import DataInfo, StepResult, Trainer, clip_and_step, set_learning_rate
from gensynth.imaging import image_grid, to_uint8
from gensynth.models.dcgan import Discriminator, Generator


def d_loss_fn(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_fn(kind: str, fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def calibrated(generator: torch.nn.Module, cfg: Config, num_classes: int,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """A copy of `generator` with standing batch-norm statistics: gan.standing_batches forwards of
    train.batch_size samples, every class in turn, noise from run.seed (the same on every rank and resume)."""
    n, z_dim = cfg.train.batch_size, cfg.gan.z_dim
    gen = torch.Generator().manual_seed(cfg.run.seed + 2)
    labels = (torch.arange(n) % num_classes).to(device)
    return standing_statistics(generator, lambda _: (torch.randn(n, z_dim, generator=gen).to(device), labels),
                               cfg.gan.standing_batches)


class GANTrainer(Trainer):
    def __init__(self, cfg: Config, accelerator: Accelerator, data: DataInfo):
        g = cfg.gan
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.policy = parse_policy(g.diffaugment)
        self.arch = dict(z_dim=g.z_dim, num_classes=data.num_classes, resolution=cfg.model.resolution,
                         channels=data.channels, base_channels=g.g_channels, max_channels=g.max_channels)
        G = Generator(**self.arch)
        D = Discriminator(num_classes=data.num_classes, resolution=cfg.model.resolution, channels=data.channels,
                          base_channels=g.d_channels, max_channels=g.max_channels, spectral=g.spectral_norm,
                          mbstd_group=g.mbstd_group)
        opt_g = torch.optim.Adam(G.parameters(), lr=g.lr_g, betas=(g.beta1, g.beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=g.lr_d, betas=(g.beta1, g.beta2))
        self.G, self.D, self.opt_g, self.opt_d = accelerator.prepare(G, D, opt_g, opt_d)
        self.D_raw = accelerator.unwrap_model(self.D)
        self.ema = EMA(accelerator.unwrap_model(self.G), g.ema_kimg, g.ema_rampup or None)
        self.ema.model.to(accelerator.device)
        accelerator.register_for_checkpointing(self.ema)
        # fixed noise for sample grids: one row per class, the same in every grid of the run
        gen = torch.Generator().manual_seed(cfg.run.seed)
        self.grid_cols = 10
        self.grid_labels = torch.arange(data.num_classes).repeat_interleave(self.grid_cols)
        self.grid_z = torch.randn(len(self.grid_labels), g.z_dim, generator=gen)
        self._calibrated: tuple[int, torch.nn.Module] | None = None  # (images_seen, the EMA with standing stats)

    def train_step(self, real: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        acc, g = self.accelerator, self.cfg.gan
        n = real.shape[0]
        pairs = n // 2 if g.mode_seeking > 0 else 0
        # mode seeking compares fakes i and pairs + i: one label, two noises (the labels' mix stays the data's)
        fake_labels = torch.cat([labels[:pairs], labels[:pairs], labels[2 * pairs:]]) if pairs else labels
        with acc.accumulate(self.G, self.D):
            # one generator forward per step: its fakes, detached, train D; then, through D, G itself
            z = torch.randn(n, g.z_dim, device=real.device)
            with acc.autocast():
                fake = self.G(z, fake_labels)
            # -- discriminator: real and fake in one forward (MinibatchStd groups stay inside each half)
            r1_now = g.r1_gamma > 0 and step % g.r1_interval == 0
            real_in = real.detach().requires_grad_(r1_now)
            x = torch.cat([real_in, fake.detach().to(real.dtype)])
            if self.policy:
                x = diff_augment(x, self.policy)
            with acc.autocast():
                logits = self.D(x, torch.cat([labels, fake_labels])).float()
            d_loss = d_loss_fn(g.loss, logits[:n], logits[n:])
            total = d_loss
            r1 = None
            if r1_now:
                (grad,) = torch.autograd.grad(logits[:n].sum(), real_in, create_graph=True)
                r1 = grad.square().sum(dim=(1, 2, 3)).mean()
                total = d_loss + (g.r1_gamma / 2) * r1 * g.r1_interval
            acc.backward(total)
            d_norm = clip_and_step(acc, self.D, self.opt_d, self.cfg.train.grad_clip)
            # -- generator: through the raw discriminator, whose gradients are off
            self.D_raw.requires_grad_(False)
            with acc.autocast():
                x = diff_augment(fake, self.policy) if self.policy else fake
                g_loss = g_loss_fn(g.loss, self.D_raw(x, fake_labels).float())
            g_total, seeking = g_loss, None
            if pairs:  # MSGAN's term: the inverse of image distance over noise distance, batch means
                apart = (fake[:pairs] - fake[pairs:2 * pairs]).float().abs().mean()
                seeking = 1 / (apart / (z[:pairs] - z[pairs:2 * pairs]).abs().mean() + 1e-5)
                g_total = g_loss + g.mode_seeking * seeking
            acc.backward(g_total)
            self.D_raw.requires_grad_(True)
            g_norm = clip_and_step(acc, self.G, self.opt_g, self.cfg.train.grad_clip)
        metrics = {"loss/d": d_loss.detach(), "loss/g": g_loss.detach(),
                   "logits/real": logits[:n].detach().mean(), "logits/fake": logits[n:].detach().mean()}
        if r1 is not None:
            metrics["loss/r1"] = r1.detach()
        if seeking is not None:
            metrics["loss/mode_seeking"] = seeking.detach()
        if acc.sync_gradients:
            # every rank's images (their batches can differ: exact mode's last one), so all ranks' EMAs agree
            images = acc.reduce(torch.tensor(n, device=real.device), "sum") if acc.num_processes > 1 else n
            global_batch = int(images) * acc.gradient_accumulation_steps
            metrics["ema/beta"] = torch.tensor(self.ema.update(acc.unwrap_model(self.G), global_batch))
            metrics["grad_norm/d"], metrics["grad_norm/g"] = d_norm, g_norm
        nonfinite = not bool(torch.isfinite(d_loss.detach()) & torch.isfinite(g_loss.detach()))
        return StepResult(metrics, nonfinite)

    def modules(self) -> dict[str, torch.nn.Module]:
        unwrap = self.accelerator.unwrap_model
        return {"G": unwrap(self.G), "D": unwrap(self.D), "G_ema": self.ema.model}

    def after_restore(self) -> None:
        set_learning_rate(self.opt_g, self.cfg.gan.lr_g)
        set_learning_rate(self.opt_d, self.cfg.gan.lr_d)

    def learning_rates(self) -> dict[str, float]:
        return {"lr/g": self.opt_g.param_groups[0]["lr"], "lr/d": self.opt_d.param_groups[0]["lr"]}

    def ema_generator(self) -> torch.nn.Module:
        """The EMA generator with batch-norm statistics of its own weights (gan.standing_batches), recomputed
        once per EMA update it is asked for; a copy, so checkpoints and the ranks' buffers are not touched.
        Its noise comes from run.seed alone, so every rank, and a resumed run, computes the same statistics."""
        seen = self.ema.images_seen
        if self._calibrated is None or self._calibrated[0] != seen:
            model = self.ema.model
            if self.cfg.gan.standing_batches:
                model = calibrated(model, self.cfg, self.data.num_classes, self.accelerator.device)
            self._calibrated = (seen, model)
        return self._calibrated[1]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] at the data's size, from the EMA generator."""
        device = self.accelerator.device
        x = self.ema_generator()(z.to(device), labels.to(device))
        return to_uint8(x, self.data.height, self.data.width).cpu()

    def generate(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 samples of the given labels, with noise drawn from `seed` (not the global RNG)."""
        z = torch.randn(len(labels), self.cfg.gan.z_dim, generator=torch.Generator().manual_seed(seed))
        return self.sample(z, labels)

    def sample_grid(self) -> np.ndarray:
        images = self.sample(self.grid_z, self.grid_labels)
        return image_grid(images.permute(0, 2, 3, 1).numpy(), rows=self.data.num_classes)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """EMA generator weights (with its standing batch-norm statistics) and what it takes to rebuild it."""
        return dict(self.ema_generator().state_dict()), {
            "architecture": dict(self.arch), "gan": asdict(self.cfg.gan)}
