"""Training-loop overhead: gensynth's GAN trainer vs a plain PyTorch loop, in one process.

    python bench/train_overhead.py --json bench/results/train_overhead.json      # make bench runs this

The plain loop is written here: the same networks (gensynth.models.dcgan), the same batch size,
optimizers, hinge loss, D-then-G step and generator EMA, on a batch held in memory; no
Accelerate, no loader, no logging, no checkpoints. gensynth runs its real loop from
configs/gan_fashion.yaml on the Fashion-MNIST shards (real loader, one all-reduce per step,
TensorBoard). Both are timed after a warm-up, alternately, `--repeats` times; the best of each is
kept. overhead = 1 - gensynth/plain. data_wait_fraction is the share of gensynth's step time spent
waiting for the loader.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, report  # noqa: E402
from gensynth.demo import ensure_fashion_shards  # noqa: E402
from gensynth.families import load_run_config  # noqa: E402
from gensynth.families.gan.ema import EMA  # noqa: E402
from gensynth.models.dcgan import Discriminator, Generator  # noqa: E402
from gensynth.train.loop import Run  # noqa: E402


def plain_steps_per_s(cfg, steps: int, warmup: int) -> float:
    """The same GAN step with nothing around it."""
    g = cfg.gan
    torch.manual_seed(0)
    G = Generator(g.z_dim, 10, cfg.model.resolution, 1, g.g_channels, g.max_channels)
    D = Discriminator(10, cfg.model.resolution, 1, g.d_channels, g.max_channels, g.spectral_norm)
    opt_g = torch.optim.Adam(G.parameters(), g.lr_g, betas=(g.beta1, g.beta2))
    opt_d = torch.optim.Adam(D.parameters(), g.lr_d, betas=(g.beta1, g.beta2))
    ema = EMA(G, g.ema_kimg, g.ema_rampup)
    n = cfg.train.batch_size
    real = torch.rand(n, 1, cfg.model.resolution, cfg.model.resolution) * 2 - 1
    labels = torch.randint(0, 10, (n,))
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        with torch.no_grad():
            fake = G(torch.randn(n, g.z_dim), labels)
        logits = D(torch.cat([real, fake]), torch.cat([labels, labels]))
        d_loss = F.relu(1 - logits[:n]).mean() + F.relu(1 + logits[n:]).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        g_loss = -D(G(torch.randn(n, g.z_dim), labels), labels).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        D.requires_grad_(True)
        opt_g.step()
        ema.update(G, n)
    return steps / (time.perf_counter() - start)


def gensynth_steps_per_s(cfg, steps: int, warmup: int, workdir: Path) -> tuple[float, float]:
    """(steps/s, data-wait fraction) of the real loop, read from its own TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"bench-{time.time_ns()}"
    cfg.run.root, cfg.run.name = str(workdir), name
    cfg.train.steps = warmup + steps
    cfg.train.log_every = warmup  # first interval = warm-up, dropped below
    cfg.train.sample_every = cfg.train.checkpoint_every = 10**9  # only the final ones
    cfg.train.resume = "never"
    Run(cfg).run()
    events = EventAccumulator(str(workdir / name / "tb"))
    events.Reload()
    rates = [e.value for e in events.Scalars("perf/samples_per_s")][1:]
    waits = [e.value for e in events.Scalars("perf/data_wait_fraction")][1:]
    return sum(rates) / len(rates) / cfg.train.batch_size, sum(waits) / len(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "gan_fashion.yaml"))
    parser.add_argument("--data", default=str(REPO / "data" / "fashion"))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    ensure_fashion_shards(args.data)
    overrides = [f"data.train={args.data}/train"]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    plain, ours, wait = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            cfg = load_run_config(args.config, overrides)
            plain.append(plain_steps_per_s(cfg, args.steps, args.warmup))
            rate, w = gensynth_steps_per_s(load_run_config(args.config, overrides), args.steps, args.warmup, Path(tmp))
            ours.append(rate)
            wait.append(w)
    cfg = load_run_config(args.config, overrides)
    best = ours.index(max(ours))
    result = {"gensynth_steps_per_s": max(ours), "plain_steps_per_s": max(plain),
              "overhead": 1 - max(ours) / max(plain), "data_wait_fraction": wait[best],
              "protocol": {"config": os.path.relpath(args.config, REPO), "batch_size": cfg.train.batch_size,
                           "num_workers": cfg.data.num_workers, "timed_steps": args.steps, "warmup": args.warmup,
                           "repeats": args.repeats, "statistic": "best of repeats", **machine(),
                           "all_gensynth": ours, "all_plain": plain}}
    report(result, "steps/s", [("plain PyTorch loop", f"{result['plain_steps_per_s']:.3f}"),
                               ("gensynth trainer", f"{result['gensynth_steps_per_s']:.3f}")],
           f"overhead {result['overhead']:+.1%} (goal <= 3%)   data-wait fraction {result['data_wait_fraction']:.1%} "
           "(goal < 5%)", args.json)


if __name__ == "__main__":
    main()
