"""Reference row of the quality benchmark: a plain class-conditional DCGAN in about a hundred lines of
PyTorch, trained on the same shards at the same CPU budget as gensynth's families.

    python bench/cdcgan.py --data data/fashion/train --out bench/results/quality/synth/cdcgan --budget 15

The recipe is the textbook one, kept plain on purpose (it is the bar gensynth's GAN must clear): a
label embedding concatenated to z; a generator of transposed convolutions with batch norm; a
spectral-norm discriminator with a projection head (Miyato & Koyama 2018); hinge loss; Adam 2e-4,
betas (0.5, 0.999); batch 128; a generator EMA with decay 0.999, warmed up as TensorFlow's
ExponentialMovingAverage does (min(0.999, (1 + t) / (10 + t)) at step t: without it the EMA of a
few-hundred-step run is mostly its random initial weights). It imports no gensynth model; from
gensynth it takes only reading shards (evaluate.sets) and writing them (data.ingest), so the samples
land in a shard set that `gensynth eval` / evaluate_synthetic scores exactly like a family's.

The budget is CPU time (user + system, of this process and any children, with psutil, from process
start: imports and reading the data count too), checked after every step, as bench/quality.py does for
the families; --steps caps the steps instead (or as well).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds() -> float:
    """CPU time of this process and its children, as bench/quality.py counts a family's."""
    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def network_resolution(height: int, width: int) -> int:
    """The smallest power of two >= the image size (and >= 8): 28x28 -> 32."""
    return max(8, 2 ** math.ceil(math.log2(max(height, width))))


class Generator(nn.Module):
    def __init__(self, num_classes: int, channels: int, resolution: int, z_dim: int = 128, width: int = 64,
                 embed_dim: int = 32):
        super().__init__()
        self.z_dim = z_dim
        ups = int(math.log2(resolution)) - 2  # 4x4 -> resolution
        chans = [width * 2 ** (ups - 1 - i) for i in range(ups)]  # e.g. 256, 128, 64
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Sequential(nn.Linear(z_dim + embed_dim, chans[0] * 16, bias=False),
                                     nn.BatchNorm1d(chans[0] * 16), nn.ReLU())
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        layers += [nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.c4 = chans[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(y)], dim=1))
        return self.net(h.view(len(z), self.c4, 4, 4))


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, resolution: int, width: int = 64):
        super().__init__()
        downs = int(math.log2(resolution)) - 2  # resolution -> 4x4
        chans = [channels] + [width * 2**i for i in range(downs)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.1)]
        self.features = nn.Sequential(*layers)
        self.score = spectral_norm(nn.Linear(chans[-1], 1))
        self.project = spectral_norm(nn.Embedding(num_classes, chans[-1]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))
        return self.score(h).squeeze(1) + (self.project(y) * h).sum(dim=1)


def to_network(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float in [-1, 1], padded (centred, black) to resolution x resolution."""
    x = images.float() / 127.5 - 1
    h, w = x.shape[2:]
    top, left = (resolution - h) // 2, (resolution - w) // 2
    return F.pad(x, (left, resolution - w - left, top, resolution - h - top), value=-1.0)


def to_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top, left = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def train(images: torch.Tensor, labels: torch.Tensor, num_classes: int, budget_s: float | None = None,
          steps: int | None = None, batch_size: int = 128, width: int = 64, seed: int = 0,
          log_every: int = 100) -> tuple[Generator, dict[str, Any]]:
    """Train on uint8 images [n, C, H, W] with labels [n] until `budget_s` CPU seconds or `steps` steps;
    returns the EMA generator (eval mode) and {steps, cpu_s, wall_s}."""
    if budget_s is None and steps is None:
        raise ValueError("give a CPU budget, a step count or both")
    torch.manual_seed(seed)
    n, c, h, w = images.shape
    res = network_resolution(h, w)
    data = to_network(images, res)
    G, D = Generator(num_classes, c, res, width=width), Discriminator(num_classes, c, res, width=width)
    G_ema = Generator(num_classes, c, res, width=width)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batch = min(batch_size, n)
    start, step, order = time.monotonic(), 0, torch.randperm(n)
    while (steps is None or step < steps) and (budget_s is None or cpu_seconds() < budget_s):
        if len(order) < batch:
            order = torch.randperm(n)
        idx, order = order[:batch], order[batch:]
        real, y = data[idx], labels[idx]
        fake = G(torch.randn(batch, G.z_dim), y)
        d_loss = F.relu(1 - D(real, y)).mean() + F.relu(1 + D(fake.detach(), y)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -D(fake, y).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - decay)
            for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                b_ema.copy_(b)
        step += 1
        if log_every and step % log_every == 0:
            print(f"step {step}: d {d_loss.item():.3f} g {g_loss.item():.3f} ({cpu_seconds():.0f} CPU-s)", flush=True)
    return G_ema.eval(), {"steps": step, "cpu_s": round(cpu_seconds(), 1), "wall_s": round(time.monotonic() - start, 1)}


@torch.no_grad()
def sample(G: Generator, num: int, num_classes: int, height: int, width: int, seed: int = 0,
           batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` uint8 samples balanced over the classes (the remainder to the first ones, as gensynth generate)."""
    labels = torch.arange(num) % num_classes
    labels = labels.sort().values
    gen = torch.Generator().manual_seed(seed)
    out = [to_uint8(G(torch.randn(len(y), G.z_dim, generator=gen), y), height, width) for y in labels.split(batch)]
    return torch.cat(out), labels


class ArraySource:
    """An in-memory ingest source (gensynth.data.sources.Source's interface): the samples become a shard
    set with a manifest whose provenance names the training data, like `gensynth generate`'s."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None, train_url: str,
                 training: dict[str, Any]):
        self.spec = "bench/cdcgan.py"
        self.images = images.permute(0, 2, 3, 1).numpy()  # H x W x C records
        self.labels = labels.numpy()
        self.classes = classes
        self.train_url, self.training = train_url, training

    def __len__(self) -> int:
        return len(self.labels)

    def record(self, i: int) -> Any:
        from gensynth.data.sources import Record

        return Record(i, np.ascontiguousarray(self.images[i]), int(self.labels[i]))

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def provenance(self) -> dict[str, Any]:
        return {"source": self.spec, "family": "cdcgan (reference)", "training_data": {"train": self.train_url},
                "training": self.training}


def write_synthetic(images: torch.Tensor, labels: torch.Tensor, out: str, classes: list[str] | None,
                    train_url: str, training: dict[str, Any]) -> str:
    """Write the samples as the shard set OUT/synthetic; returns its folder."""
    from gensynth.data.ingest import ingest

    ingest(ArraySource(images, labels, classes, train_url, training), out, split="synthetic", seed=None,  # type: ignore[arg-type]
           overwrite=True)
    return str(Path(out) / "synthetic")


def run(data: str, out: str, budget_s: float | None, steps: int | None = None, num: int = 10000, seed: int = 0,
        width: int = 64, batch_size: int = 128) -> dict[str, Any]:
    """Read the shard set `data`, train, sample `num` and write OUT/synthetic; returns the training record."""
    from gensynth.evaluate.sets import load_image_set

    real = load_image_set(data, desc=f"read {data}")
    num_classes = len(real.classes) if real.classes else int(real.labels.max()) + 1
    G, training = train(real.images, real.labels, num_classes, budget_s, steps, batch_size, width, seed)
    training.update(budget_s=budget_s, width=width, batch_size=batch_size)
    images, labels = sample(G, num, num_classes, *real.images.shape[2:], seed=seed)
    folder = write_synthetic(images, labels, out, real.classes, data, training)
    record = {**training, "synthetic": folder}
    (Path(out) / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/fashion/train", help="the real training shard set")
    ap.add_argument("--out", required=True, help="folder: the synthetic shard set goes to OUT/synthetic, the "
                    "training record to OUT/training.json")
    ap.add_argument("--budget", type=float, default=15.0, help="CPU-minutes of training (default 15; 0 = no budget, "
                    "--steps then)")
    ap.add_argument("--steps", type=int, help="at most this many steps")
    ap.add_argument("--num", type=int, default=10000, help="samples generated, balanced over the classes")
    ap.add_argument("--width", type=int, default=64, help="feature maps at full resolution (doubling per halving)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the budget counts work)")
    args = ap.parse_args()
    if args.budget <= 0 and not args.steps:
        ap.error("give --budget > 0 or --steps")
    if min(args.num, args.width, args.batch_size) < 1:
        ap.error("--num, --width and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)
    from gensynth.errors import GensynthError

    try:
        record = run(args.data, args.out, args.budget * 60 if args.budget > 0 else None, args.steps, args.num,
                     args.seed, args.width, args.batch_size)
    except GensynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
