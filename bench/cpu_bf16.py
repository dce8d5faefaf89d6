"""bf16 autocast on CPU against fp32: training steps per CPU-second of each family's step, in one process each.

    python bench/cpu_bf16.py --json bench/results/cpu_bf16.json      # make bench runs this

Each measurement is a fresh process that builds the family's own Trainer from configs/<family>_fashion.yaml (its
networks, batch size and torch threads) with the Accelerator that train.mixed_precision gives it, warms up,
then times `--steps` calls of its train_step on a batch of random images held in memory (no loader, no
logging: the step is what the precision changes). The prior, whose trainer needs a VQ-VAE export and its code
shards, is timed as its network (models/prior.py) with the trainer's loss and AdamW on random code grids.
fp32 and bf16 alternate, `--repeats` times; the best of each is kept. On a CPU without bf16 instructions
(avx512_bf16 or AMX) train.mixed_precision=bf16 is refused, and so is this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAMILIES = ("gan", "vqvae", "vae", "prior")


def prior_step(cfg, acc):  # noqa: ANN001, ANN201 - a benchmark helper
    """One prior step as its trainer takes it: next-code cross-entropy, AdamW, on random 7x7 code grids."""
    import torch
    import torch.nn.functional as F

    from gensynth.families.training import clip_and_step
    from gensynth.models.prior import CodePrior

    p, n = cfg.prior, cfg.train.batch_size
    model = CodePrior(num_codes=256, length=49, num_classes=10, width=p.width, layers=p.layers, heads=p.heads,
                      dropout=p.dropout)
    opt = torch.optim.AdamW(model.decay_groups(p.weight_decay), lr=p.lr, betas=(p.beta1, p.beta2))
    model, opt = acc.prepare(model, opt)
    codes, labels = torch.randint(0, 256, (n, 49)), torch.randint(0, 10, (n,))

    def step(_: int) -> None:
        with acc.autocast():
            logits = model(labels, codes[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        acc.backward(loss)
        clip_and_step(acc, model, opt, cfg.train.grad_clip)

    return step


def one(family: str, precision: str, steps: int, warmup: int) -> dict[str, float]:
    """Steps/s and steps per CPU-second of one family's step at one precision, in this process."""
    import torch

    from gensynth.families import get_family, load_run_config
    from gensynth.families.training import DataInfo
    from gensynth.train.loop import build_accelerator

    cfg = load_run_config(str(REPO / "configs" / f"{family}_fashion.yaml"),
                          [f"train.mixed_precision={precision}", f"run.root={tempfile.mkdtemp()}", "train.log_with=[]"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    acc = build_accelerator(cfg)
    torch.manual_seed(0)
    if family == "prior":
        step = prior_step(cfg, acc)
    else:
        data = DataInfo(height=28, width=28, channels=1, num_classes=10, classes=[str(i) for i in range(10)],
                        manifest_sha256=None)
        trainer = get_family(family).trainer(cfg, acc, data)
        size = cfg.model.resolution
        images = torch.rand(cfg.train.batch_size, 1, size, size) * 2 - 1
        labels = torch.randint(0, 10, (cfg.train.batch_size,))

        def step(i: int) -> None:
            trainer.train_step(images, labels, i)
    for i in range(warmup):
        step(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(warmup + i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"steps_per_s": steps / wall, "steps_per_cpu_s": steps / cpu, "threads": torch.get_num_threads(),
            "precision": acc.mixed_precision}


def measure(family: str, precision: str, steps: int, warmup: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--one", family, precision, "--steps", str(steps),
                          "--warmup", str(warmup)], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"{family} {precision}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.warmup)))
        return

    from bench.common import machine, report
    from gensynth.train.loop import cpu_has_bf16

    if not cpu_has_bf16():
        sys.exit("this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): bf16 training is refused here")
    families = [f for f in args.families.split(",") if f]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {f: {"no": [], "bf16": []} for f in families}
    start_load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for family in families:
            for precision in ("no", "bf16"):
                runs[family][precision].append(measure(family, precision, args.steps, args.warmup))
    rows, result = [], {"families": {}}
    for family in families:
        best = {p: max(r["steps_per_cpu_s"] for r in runs[family][p]) for p in ("no", "bf16")}
        wall = {p: max(r["steps_per_s"] for r in runs[family][p]) for p in ("no", "bf16")}
        result["families"][family] = {"fp32_steps_per_cpu_s": best["no"], "bf16_steps_per_cpu_s": best["bf16"],
                                      "ratio": best["bf16"] / best["no"], "fp32_steps_per_s": wall["no"],
                                      "bf16_steps_per_s": wall["bf16"], "threads": runs[family]["no"][0]["threads"],
                                      "all": runs[family]}
        rows.append((f"{family}: fp32 / bf16 steps per CPU-s", f"{best['no']:.2f} / {best['bf16']:.2f}"))
    result["protocol"] = {"configs": "configs/<family>_fashion.yaml (batch size, threads)", "timed_steps": args.steps,
                          "warmup": args.warmup, "repeats": args.repeats, "statistic": "best of repeats",
                          "load_average_at_start": start_load, **machine()}
    ratios = ", ".join(f"{f} {result['families'][f]['ratio']:.2f}x" for f in families)
    report(result, "", rows, f"bf16 / fp32 steps per CPU-second: {ratios}", args.json)


if __name__ == "__main__":
    main()
