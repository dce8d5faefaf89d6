"""GPU check: does every family train, checkpoint, resume, export and generate on CUDA, and how fast?

    make gpu-check                                   # sets up its own venv (CUDA torch), then runs this
    python bench/gpu.py --json bench/results/gpu.json
    python bench/gpu.py --families gan --steps 100 --num 5000            # a quicker look

For each family (gan, vqvae, vae, and the prior over that VQ-VAE's codes) and each precision (bf16, and
fp16 with its GradScaler; the GAN steps two optimizers through the one scaler), with configs/<family>_
fashion_gpu.yaml on Fashion-MNIST: train --steps/2 steps on one GPU, stop (a checkpoint), resume to --steps
(must continue from that checkpoint, not restart), export; then generate --num samples from the export on
the GPU. With more than one GPU visible, the same again on all of them through `accelerate launch` (NCCL).
It prints training images/s, the data-wait fraction, peak GPU memory and generation samples/s per run, and
fails (exit 1) on a non-finite loss, a resume that did not continue, or a data wait above --max-data-wait.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("gan", "vqvae", "vae", "prior")
PRECISIONS = ("bf16", "fp16")


@dataclass
class Check:
    family: str
    precision: str
    processes: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.precision}-{self.processes}gpu"


@dataclass
class Outcome:
    check: Check
    train_images_per_s: float | None = None
    data_wait: float | None = None
    peak_gib: float | None = None
    generate_per_s: float | None = None
    nonfinite_steps: int = 0
    resumed: bool = False
    error: str | None = None
    failures: list[str] = field(default_factory=list)


def plan(families: list[str], precisions: list[str], gpus: int) -> list[Check]:
    """Every (family, precision) on 1 GPU, then on all of them when there are several. A prior needs its
    VQ-VAE, so it runs after the VQ-VAE of the same precision and process count."""
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise SystemExit(f"bench/gpu.py: unknown {', '.join(unknown)}: families are {', '.join(FAMILIES)}, "
                         f"precisions {', '.join(PRECISIONS)}")
    if "prior" in families and "vqvae" not in families:
        families = [*families, "vqvae"]
    ordered = [f for f in FAMILIES if f in families]
    counts = [1] + ([gpus] if gpus > 1 else [])
    return [Check(f, p, n) for n in counts for p in precisions for f in ordered]


def read_metrics(path: Path, after_step: int = 0) -> list[dict]:
    """metrics.jsonl records of steps past `after_step` (the training loop writes one per logged step)."""
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) > after_step]


def judge(outcome: Outcome, max_data_wait: float) -> list[str]:
    """The reasons a run failed the check (empty: it passed)."""
    failures = []
    if outcome.error:
        failures.append(outcome.error)
    if outcome.nonfinite_steps:
        failures.append(f"{outcome.nonfinite_steps} steps with a non-finite loss")
    if not outcome.resumed and not outcome.error:
        failures.append("the second half did not resume from the first half's checkpoint")
    if outcome.data_wait is not None and outcome.data_wait > max_data_wait:
        failures.append(f"data wait {100 * outcome.data_wait:.1f}% > {100 * max_data_wait:.0f}%")
    return failures


def summarise(outcome: Outcome, records: list[dict]) -> None:
    """Fill the figures in from the second half's metrics (the warm part of the run)."""
    def mean(key: str) -> float | None:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    outcome.train_images_per_s = mean("perf/samples_per_s")
    outcome.data_wait = mean("perf/data_wait_fraction")
    peaks = [r["perf/gpu_peak_gib"] for r in records if isinstance(r.get("perf/gpu_peak_gib"), (int, float))]
    outcome.peak_gib = max(peaks) if peaks else None
    outcome.nonfinite_steps = int(max((r.get("health/nonfinite_steps") or 0 for r in records), default=0))


def table(outcomes: list[Outcome]) -> list[str]:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = ["| run | train images/s | data wait | peak GPU GiB | generate samples/s | result |",
             "|---|---|---|---|---|---|"]
    for o in outcomes:
        wait = "-" if o.data_wait is None else f"{100 * o.data_wait:.1f}%"
        lines.append(f"| {o.check.name} | {fmt(o.train_images_per_s, ',.0f')} | {wait} | {fmt(o.peak_gib, '.2f')} | "
                     f"{fmt(o.generate_per_s, ',.0f')} | {'ok' if not o.failures else '; '.join(o.failures)} |")
    return lines


def train_command(check: Check, work: Path, steps: int, extra: list[str]) -> list[str]:
    config = REPO / "configs" / f"{check.family}_fashion_gpu.yaml"
    gensynth = ["-m", "gensynth", "train", str(config), f"run.root={work / 'runs'}", f"run.name={check.name}",
                f"train.steps={steps}", f"train.mixed_precision={check.precision}", "train.device=cuda",
                "train.log_every=10", "train.eval_every=0", *extra]
    if check.processes == 1:
        return [sys.executable, *gensynth]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/gpu-multi.yaml"),
            "--num_processes", str(check.processes), "--mixed_precision", check.precision, *gensynth]


def run(cmd: list[str], log: Path) -> int:
    with open(log, "a") as out:
        return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=str(REPO))).returncode


def run_check(check: Check, work: Path, steps: int, num: int, data: str) -> Outcome:
    outcome = Outcome(check)
    log = work / "logs" / f"{check.name}.log"
    extra = [f"data.train={data}/train"]
    if check.family == "prior":
        vq = work / "runs" / Check("vqvae", check.precision, check.processes).name
        extra = [f"data.train={work / 'data' / ('codes-' + check.name)}", f"prior.vqvae={vq}",
                 f"prior.images={data}/train"]
    half = steps // 2
    run_dir = work / "runs" / check.name
    first = run(train_command(check, work, half, [*extra, f"train.checkpoint_every={half}"]), log)
    if first != 0:
        outcome.error = f"training to step {half} exited {first} (see {log})"
        return outcome
    second = run(train_command(check, work, steps, [*extra, f"train.checkpoint_every={half}"]), log)
    if second != 0:
        outcome.error = f"resuming to step {steps} exited {second} (see {log})"
        return outcome
    final = run_dir / "checkpoints" / f"step-{steps:08d}" / "trainer.json"
    state = json.loads(final.read_text()) if final.is_file() else {}
    outcome.resumed = state.get("step") == steps and state.get("resumes", 0) >= 1
    summarise(outcome, read_metrics(run_dir / "metrics.jsonl", after_step=half))
    out = work / "synth" / check.name
    start = time.monotonic()
    code = run([sys.executable, "-m", "gensynth", "generate", str(run_dir), str(out), "--num", str(num),
                "--device", "cuda", "--overwrite"], log)
    if code != 0:
        outcome.error = f"generation exited {code} (see {log})"
    else:
        outcome.generate_per_s = num / (time.monotonic() - start)  # the whole command: load, draw, encode, write
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated (default bf16,fp16)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run, resumed at half (default 200)")
    ap.add_argument("--num", type=int, default=20000, help="samples generated per run (default 20000)")
    ap.add_argument("--max-data-wait", type=float, default=0.05, help="fail above this data-wait fraction")
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST shards (made if missing)")
    ap.add_argument("--work", default="bench/results/gpu", help="runs, logs and synthetic sets go here")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the run stops and resumes at half)")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    checks = plan(args.families.split(","), args.precisions.split(","), gpus)
    if gpus == 0:
        print("bench/gpu.py: no CUDA device is visible (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); this check needs one. Planned runs: "
              + ", ".join(c.name for c in checks), file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from gensynth.demo import ensure_fashion_shards

    ensure_fashion_shards(args.data)
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outcomes = []
    for check in checks:
        print(f"== {check.name}", flush=True)
        outcome = run_check(check, work, args.steps, args.num, args.data)
        outcome.failures = judge(outcome, args.max_data_wait)
        outcomes.append(outcome)
    device = torch.cuda.get_device_name(0)
    protocol = (f"{gpus} x {device}, torch {torch.__version__} (CUDA {torch.version.cuda}); configs/<family>_fashion_"
                f"gpu.yaml, {args.steps} steps resumed at {args.steps // 2}, figures from the second half's "
                f"metrics.jsonl; generation of {args.num} samples (the whole command); total "
                f"{(time.monotonic() - started) / 60:.0f} min")
    print("\n".join(["", protocol, "", *table(outcomes)]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"protocol": protocol, "runs": [
            {**asdict(o), "check": asdict(o.check)} for o in outcomes]}, indent=1))
    return 1 if any(o.failures for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
