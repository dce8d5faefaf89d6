"""The one small CNN classifier of the evaluation, and its fixed training recipe.

It serves three jobs, always with the same architecture and recipe so that numbers compare:
- the feature extractor (gensynth/evaluate/extractor.py): trained on the real training shards; its
  penultimate 128-d activations are the feature space of FID, KID, precision/recall; its predictions
  give class consistency;
- Classification Accuracy Score (Ravuri & Vinyals 2019): trained on synthetic data only;
- augmentation gain: trained on K real samples per class, with or without synthetic ones.

Architecture: three conv-BN-ReLU stages (16, 32, 64 channels) with 2x2 max pooling, pooled to 3x3,
a 128-unit ReLU layer (the features), dropout, a linear head. About 0.1 M parameters, any image size
and channel count. Recipe: AdamW (Loshchilov & Hutter 2019), cosine learning-rate decay, random
translations of up to 2 pixels (the standard cheap augmentation of the MNIST family), a fixed
number of steps. All randomness comes from the `seed` argument; the global RNG is left untouched
(training may call this mid-run). A Pool may carry a classic augmentation (augment.py) applied to each
batch drawn from it: the usefulness classifiers use that (eval.real_augment) instead of the shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gensynth.evaluate.augment import ClassicAugment


@dataclass(frozen=True)
class Recipe:
    """How the classifier is trained: fixed, recorded with every number it produces."""

    steps: int = 500  # optimizer steps
    batch_size: int = 128
    lr: float = 2e-3  # AdamW peak learning rate, cosine-decayed to 0
    weight_decay: float = 5e-4
    shift: int = 2  # random translation of up to this many pixels (0 = off)
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 16, feature_dim: int = 128,
                 dropout: float = 0.3):
        super().__init__()

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *stage(channels, width), nn.MaxPool2d(2),
            *stage(width, 2 * width), nn.MaxPool2d(2),
            *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
            nn.Linear(4 * width * 9, feature_dim), nn.ReLU(inplace=True))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.architecture = {"channels": channels, "num_classes": num_classes, "width": width,
                             "feature_dim": feature_dim, "dropout": dropout}

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """uint8 [n, C, H, W] -> float in [-1, 1]."""
        return images.float().div(127.5).sub(1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift], edges replicated."""
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    offsets = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(images.device)
    ys = (torch.arange(h, device=images.device)[None, :] - offsets[:, :1]).clamp(0, h - 1)  # [n, h]
    xs = (torch.arange(w, device=images.device)[None, :] - offsets[:, 1:]).clamp(0, w - 1)  # [n, w]
    rows = images.gather(2, ys[:, None, :, None].expand(-1, images.shape[1], -1, w))
    return rows.gather(3, xs[:, None, None, :].expand(-1, images.shape[1], h, -1))


def cycling_indices(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless indices into n items: a fresh seeded permutation per pass (every item once per pass)."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def take(it: Iterator[int], k: int) -> list[int]:
    return [next(it) for _ in range(k)]


@dataclass
class Pool:
    """Labelled images to train on, with the weight of their loss (synthetic data may count less), and
    optionally soft targets (a teacher's class probabilities) that replace the labels in the loss."""

    images: torch.Tensor  # uint8 [n, C, H, W]
    labels: torch.Tensor  # int64 [n]
    weight: float = 1.0
    soft: torch.Tensor | None = None  # float32 [n, classes]: cross-entropy against these (distillation)
    augment: ClassicAugment | None = None  # classic augmentation of each batch drawn (None: as they are)


def batches_from_pools(pools: list[tuple[Pool, int]], steps: int,
                       generator: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images, labels, per-sample weights) for `steps` batches; each batch takes a fixed number of
    samples from each pool (so the mixing ratio holds in every batch, not just on average). When a pool
    has soft targets, a fourth tensor holds every sample's target: its soft one, or its label's one-hot."""
    cursors = [cycling_indices(len(pool.labels), generator) for pool, _ in pools]
    width = next((pool.soft.shape[1] for pool, _ in pools if pool.soft is not None), None)
    for _ in range(steps):
        images, labels, weights, targets = [], [], [], []
        for (pool, count), cursor in zip(pools, cursors):
            if count == 0:
                continue
            idx = torch.tensor(take(cursor, count))
            images.append(pool.augment(pool.images[idx], generator) if pool.augment else pool.images[idx])
            labels.append(pool.labels[idx])
            weights.append(torch.full((count,), float(pool.weight)))
            if width is not None:
                targets.append(pool.soft[idx].float() if pool.soft is not None
                               else F.one_hot(pool.labels[idx], width).float())
        batch = (torch.cat(images), torch.cat(labels), torch.cat(weights))
        yield batch if width is None else (*batch, torch.cat(targets))


def fit(model: SmallCNN, batches: Iterator[tuple[torch.Tensor, ...]], steps: int,
        recipe: Recipe, generator: torch.Generator, device: torch.device,
        on_step: Callable[[int, float], None] | None = None) -> SmallCNN:
    """Train `model` on `batches` (uint8 images, labels, loss weights[, soft targets]) for `steps` optimizer
    steps: cross-entropy against the labels, or against the soft targets when a batch has them."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    for step, (images, labels, weights, *soft) in enumerate(batches):
        if step >= steps:
            break
        x = random_shift(model.normalize(images.to(device)), recipe.shift, generator)
        target = soft[0] if soft else labels  # probabilities: the distillation loss (one-hot rows = plain CE)
        loss_each = F.cross_entropy(model(x), target.to(device), reduction="none")
        weights = weights.to(device)
        loss = (loss_each * weights).sum() / weights.sum().clamp_min(1e-8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    return model.eval()


def progress_log(what: str, steps: int, every_s: float = 10.0) -> Callable[[int, float], None]:
    """An on_step callback that logs step, loss, speed and time left every `every_s` seconds (and at the end)."""
    import logging
    import time

    log = logging.getLogger("gensynth")
    started = last = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every_s or step == steps:
            last = now
            rate = step / max(now - started, 1e-9)
            log.info("%s: step %d/%d, loss %.3f, %.1f steps/s, about %.0f s left", what, step, steps, loss, rate,
                     (steps - step) / max(rate, 1e-9))

    return on_step


def train_classifier(pools: list[tuple[Pool, int]], num_classes: int, recipe: Recipe, seed: int,
                     device: torch.device | str = "cpu",
                     on_step: Callable[[int, float], None] | None = None) -> SmallCNN:
    """A fresh SmallCNN trained by `recipe` on batches drawn from `pools` ((pool, samples per batch)).

    Deterministic for a given seed on CPU (same thread count); the global RNG is not disturbed.
    """
    first = pools[0][0]
    channels = first.images.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(channels, num_classes, dropout=recipe.dropout)
        generator = torch.Generator().manual_seed(seed)
        return fit(model, batches_from_pools(pools, recipe.steps, generator), recipe.steps, recipe, generator,
                   torch.device(device), on_step)


@torch.no_grad()
def embed(model: SmallCNN, images: torch.Tensor, batch_size: int = 500,
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, feature_dim] float32, logits [n, classes]) of uint8 images, in eval mode, on the CPU."""
    model.eval().to(device)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = model.normalize(images[i:i + batch_size].to(device))
        f = model.features(x)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    if not feats:
        dim = model.head.in_features
        return torch.empty(0, dim), torch.empty(0, model.head.out_features)
    return torch.cat(feats), torch.cat(logits)


def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu") -> float:
    _, logits = embed(model, images, device=device)
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
