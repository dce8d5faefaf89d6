"""The VQ-VAE family's step: reconstruction (MSE) + commitment loss through a vector quantizer whose
EMA codebook learns inside the forward pass (gensynth/models/quantizer.py); one Adam optimizer for the
encoder and decoder (and the factorized codebook's projections).

Logged: loss/recon, loss/commitment, vq/usage (share of codes used in the last vqvae.usage_window
batches), vq/perplexity, vq/restarted (dead codes re-seeded per step) and vq/restarts_total;
reconstruction grids (input row over output row); every train.eval_every steps, held-out mse_01 (pixels
in [0, 1]), psnr, ssim and the codes' usage there (codebook_used_fraction, codebook_perplexity), on
data.test, as gensynth.reconstruction defines them (what `gensynth eval` reports too). A warning is
logged when codebook usage falls below vqvae.usage_warn (the collapse guard).

A VQ-VAE alone does not generate: its export reconstructs; the prior (gensynth/families/prior/) makes
new images from its codes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gensynth.config import Config
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.families.training import (
    DataInfo,
    StepResult,
    Trainer,
    clip_and_step,
    reading,
    set_learning_rate,
)
from gensynth.families.vqvae.sampler import vqvae_reconstruct
from gensynth.imaging import image_grid, to_uint8
from gensynth.models.vqvae import VQVAE
from gensynth.reconstruction import reconstruction_figures

log = logging.getLogger("gensynth")


def vqvae_architecture(cfg: Config, data: DataInfo) -> dict[str, Any]:
    v = cfg.vqvae
    return dict(resolution=cfg.model.resolution, channels=data.channels, base_channels=v.base_channels,
                max_channels=v.max_channels, downsamples=v.downsamples, res_blocks=v.res_blocks,
                embed_dim=v.embed_dim, codebook_size=v.codebook_size, codebook_dim=v.codebook_dim, cosine=v.cosine,
                commitment=v.commitment, decay=v.ema_decay, eps=v.ema_eps, kmeans_iters=v.kmeans_iters,
                restart_after=v.restart_after, usage_window=v.usage_window)


def grid_images(source: str, per_class: int, num_classes: int, seed: int = 0, **reading: Any) -> torch.Tensor:
    """uint8 [per_class * num_classes, C, H, W]: the first `per_class` images of each class in a fixed pass
    over `source`, ordered round by round (class 0..K-1, then again). A class with too few images repeats."""
    found: dict[int, list[torch.Tensor]] = {c: [] for c in range(num_classes)}
    for batch in ShardLoader(source, batch_size=256, mode="exact", rank=0, world_size=1, seed=seed,
                             shuffle_buffer=0, decode_meta=False, **reading):
        for image, label in zip(batch["image"], batch["label"].tolist()):
            if 0 <= label < num_classes and len(found[label]) < per_class:
                found[label].append(image)
        if all(len(v) >= per_class for v in found.values()):
            break
    fallback = next((v[0] for v in found.values() if v), None)
    if fallback is None:
        raise UsageError(f"{source}: no labelled images for the reconstruction grid")
    rounds = [[(found[c][r] if r < len(found[c]) else (found[c] or [fallback])[0]) for c in range(num_classes)]
              for r in range(per_class)]
    return torch.stack([image for row in rounds for image in row])


class VQVAETrainer(Trainer):
    grid_name = "reconstructions"
    generates = False  # a prior over the codes generates; see gensynth/families/prior/

    def __init__(self, cfg: Config, accelerator: Accelerator, data: DataInfo):
        v = cfg.vqvae
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.arch = vqvae_architecture(cfg, data)
        try:
            model = VQVAE(**self.arch)
        except ValueError as e:
            raise UsageError(f"model.resolution / vqvae.downsamples: {e}") from None
        opt = torch.optim.Adam(model.parameters(), lr=v.lr, betas=(v.beta1, v.beta2))
        self.model, self.opt = accelerator.prepare(model, opt)
        self.raw: VQVAE = accelerator.unwrap_model(self.model)
        self.grid_inputs: torch.Tensor | None = None
        self.heldout: dict[str, float] = {}  # the latest held-out figures, recorded in the export
        self.warned_at = -1

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        acc = self.accelerator
        with acc.accumulate(self.model):
            with acc.autocast():
                recon, q = self.model(images)
            recon_loss = F.mse_loss(recon.float(), images)
            acc.backward(recon_loss + q.commitment)
            norm = clip_and_step(acc, self.model, self.opt, self.cfg.train.grad_clip)
        metrics = {"loss/recon": recon_loss.detach(), "loss/commitment": q.commitment.detach(),
                   **{f"vq/{k}": v for k, v in q.stats.items()}}
        if acc.sync_gradients:
            metrics["grad_norm"] = norm
        self.collapse_guard(step + 1)
        nonfinite = not bool(torch.isfinite(recon_loss.detach()) & torch.isfinite(q.commitment.detach()))
        return StepResult(metrics, nonfinite)

    def collapse_guard(self, step: int) -> None:
        """Warn (main process, every train.log_every steps) when codebook usage is below vqvae.usage_warn."""
        v, quantizer = self.cfg.vqvae, self.raw.quantizer
        if step % self.cfg.train.log_every or not self.accelerator.is_main_process:
            return
        if int(quantizer.batches) < v.usage_window:
            return  # the window is not full yet
        usage = float(quantizer.usage())
        if usage < v.usage_warn:
            used = round(usage * quantizer.codebook_size)
            log.warning("step %d: codebook collapse: usage %.1f%% (%d of %d codes used in the last %d batches) is "
                        "below vqvae.usage_warn=%g; try vqvae.restart_after (now %d), a smaller vqvae.codebook_size, "
                        "a factorized (vqvae.codebook_dim) or cosine (vqvae.cosine=true) codebook",
                        step, 100 * usage, used, quantizer.codebook_size, v.usage_window, v.usage_warn,
                        v.restart_after)
            self.warned_at = step

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"vqvae": self.raw}

    def after_restore(self) -> None:
        set_learning_rate(self.opt, self.cfg.vqvae.lr)

    def learning_rates(self) -> dict[str, float]:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def sample_grid(self) -> np.ndarray:
        """Reconstruction grid: pairs of rows, inputs (one per class) over their reconstructions."""
        if self.grid_inputs is None:
            self.grid_inputs = grid_images(self.cfg.data.test or self.cfg.data.train, self.cfg.vqvae.grid_per_class,
                                           self.data.num_classes, self.cfg.run.seed, **reading(self.cfg))
        outputs = vqvae_reconstruct(self.raw, self.grid_inputs, self.data.height, self.data.width).images
        return reconstruction_grid(self.grid_inputs, outputs, self.data.num_classes)

    def generate(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        raise UsageError("a VQ-VAE does not generate on its own: train the prior over its codes")

    @torch.no_grad()
    def heldout_metrics(self, batches) -> dict[str, float]:
        """gensynth.reconstruction's figures of the uint8 reconstructions of held-out images and their codes."""
        originals, recons, codes = [], [], []
        self.raw.eval()
        try:
            for images, _ in batches:
                recon, q = self.raw(images)
                originals.append(to_uint8(images, self.data.height, self.data.width).cpu())
                recons.append(to_uint8(recon, self.data.height, self.data.width).cpu())
                codes.append(q.codes.cpu())
        finally:
            self.raw.train()
        if not originals:
            return {}
        self.heldout = reconstruction_figures(torch.cat(originals), torch.cat(recons), torch.cat(codes),
                                              self.raw.codebook_size)
        return {k: v for k, v in self.heldout.items() if k not in ("images", "codebook_size")}  # constants

    def codebook_figures(self) -> dict[str, float]:
        q = self.raw.quantizer
        return {"usage": float(q.usage()), "restarts_total": int(q.restarts), "batches": int(q.batches),
                "dead_now": int(q.dead_codes().sum()) if q.restart_after > 0 else 0}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Encoder, codebook (with its EMA statistics) and decoder; reconstructs and encodes, does not sample."""
        return dict(self.raw.state_dict()), {
            "architecture": dict(self.arch), "vqvae": asdict(self.cfg.vqvae),
            "codebook": self.codebook_figures(), "heldout": dict(self.heldout),
            "grid": [self.raw.grid, self.raw.grid]}


def reconstruction_grid(inputs: torch.Tensor, outputs: torch.Tensor, per_row: int) -> np.ndarray:
    """Rows of `per_row` inputs, each followed by the row of their reconstructions."""
    rows = []
    for i in range(0, len(inputs), per_row):
        rows += [inputs[i:i + per_row], outputs[i:i + per_row]]
    images = torch.cat(rows).permute(0, 2, 3, 1).numpy()
    return image_grid(images, rows=len(rows))
