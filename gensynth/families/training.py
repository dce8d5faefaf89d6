"""What the training loop drives (a family's Trainer), and the small helpers every family's step shares."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from gensynth.imaging import image_grid


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


def reading(cfg: Any) -> dict[str, Any]:
    """How a run reads its image sets (ShardLoader keywords): where the labels are, and data.resize."""
    return {"label_key": cfg.data.label_key or None,
            "resize": None if cfg.data.resize == "none" else (cfg.data.image_size, cfg.data.resize)}


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The config's rate wins over the one stored with the optimizer state (after a resume)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class Trainer:
    """The object the training loop drives, one per process; a family's `trainer(cfg, accelerator, data)` builds
    it. Models and optimizers go through `accelerator.prepare` and any other state through
    `accelerator.register_for_checkpointing`, so checkpoints and exact resumes work for every family.

    Optional features have defaults here:
    - `grid_name`: the tag and file name of `sample_grid()`'s image;
    - `generates`: False for a family that cannot sample (a VQ-VAE alone), whose in-training eval.metrics on
      generated samples are skipped;
    - `heldout_metrics(batches)`: figures on held-out data (data.test), batches of (network images, labels);
      none by default.
    """

    grid_name: str = "samples"
    generates: bool = True

    def train_step(self, inputs: torch.Tensor, labels: torch.Tensor, step: int) -> StepResult:
        """One micro-batch: `inputs` is the batch field the family trains on (network images in [-1, 1])."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """The unwrapped modules by name: checkpoint digests and buffer averaging go over them."""
        raise NotImplementedError

    def after_restore(self) -> None:
        """Called after a checkpoint is loaded (e.g. the config's learning rates win over the stored ones)."""

    def learning_rates(self) -> dict[str, float]:
        return {}

    def sample_grid(self) -> np.ndarray:
        raise NotImplementedError

    def generate(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """uint8 [n, C, H, W] samples of `labels`, noise drawn from `seed` (not the global RNG)."""
        raise NotImplementedError

    def heldout_metrics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        return {}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, config) of the export; the loop adds the family, data, classes and step to the config."""
        raise NotImplementedError


class SeededSampling(Trainer):
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
