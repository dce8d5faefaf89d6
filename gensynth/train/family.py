"""What the loop needs from a model family, and the small helpers every family's step shares."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from gensynth.train.tracking import image_grid


@dataclass(frozen=True)
class DataInfo:
    """The training data as the model sees it (from the shard set's manifest)."""

    height: int
    width: int
    channels: int
    num_classes: int
    classes: list[str]
    manifest_sha256: str | None
    inputs: str = "image"  # the batch field a step trains on: "image", or an array such as a VQ-VAE's "codes"
    images: str | None = None  # the image shard set behind the data (for a code set: the one it encodes)
    images_manifest_sha256: str | None = None  # ...and its manifest's sha256


@dataclass
class StepResult:
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars, averaged per log interval
    nonfinite: bool = False  # a loss was NaN or Inf on this rank


class Family(Protocol):
    """What the loop calls. Optional, read with getattr by the loop:
    - `grid_name` (default "samples"): the tag and file name of `sample_grid()`'s image;
    - `generates` (default True): False for a family that cannot sample (a VQ-VAE alone), whose
      in-training eval.metrics on generated samples are skipped;
    - `heldout_metrics(batches)`: figures on held-out data (data.test), batches of (network images, labels).
    """

    family: str

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult: ...
    def modules(self) -> dict[str, nn.Module]: ...
    def after_restore(self) -> None: ...
    def learning_rates(self) -> dict[str, float]: ...
    def sample_grid(self) -> np.ndarray: ...
    def generate(self, labels: torch.Tensor, seed: int) -> torch.Tensor: ...
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


class SeededSampling:
    """`generate` and `sample_grid` for a family whose `sample(labels, generator)` returns uint8 images:
    every call draws from one generator seeded for it; the grid's seed is run.seed, so a sampler loaded from
    the export reproduces the run's last grid. Needs `cfg`, `data` and `grid_labels` (one row per class)."""

    chunk = 256  # labels per forward pass: bounded memory for any eval.num_samples

    def generate(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([self.sample(labels[i:i + self.chunk], generator) for i in range(0, len(labels), self.chunk)])

    def sample_grid(self) -> np.ndarray:
        images = self.sample(self.grid_labels, torch.Generator().manual_seed(self.cfg.run.seed))
        return image_grid(images.permute(0, 2, 3, 1).numpy(), rows=self.data.num_classes)


def clip_and_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                  max_norm: float) -> torch.Tensor:
    """Clip (or just measure) the gradient norm, step unless it is non-finite, zero the gradients.

    fp16 with two optimizers and Accelerate's one GradScaler: unscale only THIS optimizer's
    gradients (accelerator.clip_grad_norm_ would unscale every optimizer), then step; the scaler
    skips an overflowing update itself, lowers its scale and resets, ready for the other optimizer's
    backward. Off the last micro-batch of an accumulation, Accelerate makes step a no-op.
    """
    norm = torch.tensor(0.0)
    if accelerator.sync_gradients:
        if accelerator.scaler is not None:
            accelerator.unscale_gradients(optimizer=optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
        norm = norm.detach().float()
        if torch.isfinite(norm) or accelerator.scaler is not None:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def sync_buffers(modules: dict[str, nn.Module]) -> None:
    """Average floating buffers (batch-norm statistics) across ranks. DDP keeps parameters in sync but
    each rank updates its own running statistics; a checkpoint should hold one state for all ranks."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for module in modules.values():
        for buffer in module.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                buffer.div_(world)


def params_digest(modules: dict[str, nn.Module]) -> str:
    """sha256 over every parameter and buffer, in name order: equal on every rank iff they are in sync."""
    h = hashlib.sha256()
    for name, module in sorted(modules.items()):
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prepare_data(cfg: Any, accelerator: Accelerator) -> None:
    """Work a family needs done before its data can be read: the prior's code shards (extracted once)."""
    if cfg.model.family == "prior":
        from gensynth.train.prior import ensure_code_shards

        ensure_code_shards(cfg, accelerator)


def build_family(cfg: Any, accelerator: Accelerator, data: DataInfo) -> Family:
    if cfg.model.family == "gan":
        from gensynth.train.gan import GANTrainer

        return GANTrainer(cfg, accelerator, data)
    if cfg.model.family == "vqvae":
        from gensynth.train.vqvae import VQVAETrainer

        return VQVAETrainer(cfg, accelerator, data)
    if cfg.model.family == "prior":
        from gensynth.train.prior import PriorTrainer

        return PriorTrainer(cfg, accelerator, data)
    if cfg.model.family == "vae":
        from gensynth.train.vae import VAETrainer

        return VAETrainer(cfg, accelerator, data)
    raise ValueError(f"unknown model family {cfg.model.family!r}")
