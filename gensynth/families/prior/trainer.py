"""The prior family's step: a class-conditional transformer (gensynth/models/prior.py) learns the code
grids of a trained VQ-VAE by next-code cross-entropy, from code shards (codes.py).

Before the loader opens, `ensure_code_shards` has the main process extract the codes of prior.images
(default: the VQ-VAE's own training set) into data.train, once: a later run reuses them while their
manifest records the same VQ-VAE export sha256. AdamW with decoupled weight decay on matrices, a linear
warm-up then cosine decay of the learning rate (computed from the step, so a resumed run follows the
same schedule). Grids and samples decode the drawn codes with the VQ-VAE's decoder, which the export
bundles, so `load_sampler(runs/<prior run>)` makes images on its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from gensynth.config import Config
from gensynth.data.manifest import read_manifest
from gensynth.errors import ConfigError, UsageError
from gensynth.export import load_export
from gensynth.families.prior.codes import codes_match, ensure_codes, export_identity
from gensynth.families.prior.sampler import prior_images
from gensynth.families.training import DataInfo, SeededSampling, StepResult, clip_and_step
from gensynth.models.prior import CodePrior
from gensynth.models.vqvae import VQVAE

log = logging.getLogger("gensynth")


def ensure_code_shards(cfg: Config, accelerator: Accelerator) -> None:
    """Collective: the main process extracts (or checks) the code shards at data.train; the others wait."""
    if not cfg.prior.vqvae:
        raise ConfigError("model.family=prior needs prior.vqvae: the VQ-VAE run directory (or its export/) whose "
                          "codes the prior learns, e.g. prior.vqvae=runs/vqvae_fashion")
    if accelerator.is_main_process:
        ensure_codes(cfg.prior.vqvae, cfg.prior.images or None, cfg.data.train, cfg.prior.extract_batch_size,
                     accelerator.device)
    accelerator.wait_for_everyone()


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up to prior.lr, then cosine decay to prior.min_lr at train.steps."""
    p, total = cfg.prior, cfg.train.steps
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = min(1.0, (step - p.warmup_steps) / max(1, total - p.warmup_steps))
    return p.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (p.lr - p.min_lr)


def load_code_decoder(export: str) -> tuple[VQVAE, dict[str, Any], dict[str, torch.Tensor]]:
    """The VQ-VAE's codebook and decoder (no encoder) from its export: (module, architecture, tensors)."""
    tensors, config = load_export(export)
    arch = {**config["architecture"], "with_encoder": False}
    decoder_tensors = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
    decoder = VQVAE(**arch)
    decoder.load_state_dict(decoder_tensors)
    return decoder.eval().requires_grad_(False), arch, decoder_tensors


class PriorTrainer(SeededSampling):
    def __init__(self, cfg: Config, accelerator: Accelerator, data: DataInfo):
        p = cfg.prior
        self.cfg, self.accelerator, self.data = cfg, accelerator, data
        self.vqvae = export_identity(p.vqvae)
        manifest = read_manifest(cfg.data.train)
        if not codes_match(manifest, self.vqvae):
            raise UsageError(f"{cfg.data.train}: its codes are not those of {p.vqvae} (weights sha256 "
                             f"{self.vqvae['weights_sha256'][:16]}...)")
        self.decoder, self.decoder_arch, self.decoder_tensors = load_code_decoder(p.vqvae)
        self.decoder.to(accelerator.device)
        grid = manifest.provenance["grid"]
        self.arch = dict(num_codes=int(manifest.provenance["num_codes"]), length=grid[0] * grid[1],
                         num_classes=data.num_classes, width=p.width, layers=p.layers, heads=p.heads,
                         dropout=p.dropout, null_class=p.label_dropout > 0)
        model = CodePrior(**self.arch)
        opt = torch.optim.AdamW(model.decay_groups(p.weight_decay), lr=learning_rate(cfg, 0), betas=(p.beta1, p.beta2))
        self.model, self.opt = accelerator.prepare(model, opt)
        self.raw: CodePrior = accelerator.unwrap_model(self.model)
        self.grid_cols = 10
        self.grid_labels = torch.arange(data.num_classes).repeat_interleave(self.grid_cols)

    def train_step(self, codes: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        acc = self.accelerator
        lr = learning_rate(self.cfg, step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        target = codes.reshape(len(codes), -1)
        if self.cfg.prior.label_dropout > 0:  # the 'no class' token that classifier-free guidance contrasts with
            dropped = torch.rand(len(labels), device=labels.device) < self.cfg.prior.label_dropout
            labels = labels.masked_fill(dropped, self.data.num_classes)
        with acc.accumulate(self.model):
            with acc.autocast():
                logits = self.model(labels, target[:, :-1])
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
            acc.backward(nll)
            norm = clip_and_step(acc, self.model, self.opt, self.cfg.train.grad_clip)
        metrics = {"loss/nll": nll.detach(), "loss/bits_per_code": nll.detach() / math.log(2)}
        if acc.sync_gradients:
            metrics["grad_norm"] = norm
        return StepResult(metrics, not bool(torch.isfinite(nll.detach())))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"prior": self.raw}

    def after_restore(self) -> None:
        """Nothing to do: the learning rate comes from the schedule at every step."""

    def learning_rates(self) -> dict[str, float]:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 images at the sampler's default options (temperature 1, all codes, prior.guidance)."""
        return prior_images(self.raw, self.decoder, labels, generator, 1.0, 0, self.data.height, self.data.width,
                            self.cfg.prior.guidance)

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Prior weights under prior.*, the VQ-VAE's codebook and decoder under vqvae.*: self-contained."""
        tensors = {f"prior.{k}": v for k, v in self.raw.state_dict().items()}
        tensors.update({f"vqvae.{k}": v for k, v in self.decoder_tensors.items()})
        return tensors, {"architecture": dict(self.arch), "prior": asdict(self.cfg.prior),
                         "vqvae": {"architecture": dict(self.decoder_arch), **self.vqvae},
                         "sampling_defaults": {"temperature": 1.0, "top_k": 0, "guidance": self.cfg.prior.guidance}}
