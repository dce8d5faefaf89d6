"""Per-purpose sampling: which truncation / temperature serves CAS and which serves augmentation?

    python bench/purpose.py --work bench/results/quality --json bench/results/purpose.json
    python bench/purpose.py --work bench/results/quality --families gan --k 10 --num 2000   # quicker

Runs on the generators that bench/quality.py trained (its --work folder): for every family, the full-data
model `<family>_full` is sampled at each candidate value of its sampling option and scored by CAS / real
(a classifier trained on the samples alone: the purpose "cas"), and the K-shot model `<family>_k<K>` by the
augmentation gain at K (the purpose "augment"), both with `gensynth eval`'s protocol (the same seeds,
steps and test set at every value, so the values compare). The best value per purpose is printed, with
every measurement; gensynth's samplers take theirs as `PURPOSES` defaults (`gensynth generate
--purpose cas|augment`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gensynth.evaluate.synthetic import evaluate_synthetic  # noqa: E402
from gensynth.generate.job import generate  # noqa: E402

# family -> (sampling option, candidate values, the family's plain default first)
CANDIDATES = {
    "gan": ("truncation", [0.0, 2.0, 1.5, 1.0, 0.7]),
    "vae": ("temperature", [1.0, 0.9, 0.8, 0.7, 0.6]),
    "prior": ("temperature", [1.0, 0.95, 0.9, 0.8]),
}


def measure(run: Path, out: Path, option: str, value: float, num: int, test: str, train: str, cfg, k_set: str | None,
            report: Path) -> dict:
    synth = out / f"{run.name}-{option}-{value:g}"
    generate(str(run), str(synth), num=num, seed=0, overwrite=True, **{option: value})
    metrics = evaluate_synthetic(str(synth), test, train=train, report=str(report / synth.name), cfg=cfg,
                                 k_set=k_set)
    u, f = metrics["usefulness"], metrics["fidelity"]
    return {option: value, "cas_ratio": (u.get("cas") or {}).get("ratio"),
            "aug_gain": ((u.get("augmentation") or {}).get("gain") or {}).get("mean"),
            "aug_gain_std": ((u.get("augmentation") or {}).get("gain") or {}).get("std"),
            "fid": f["fid"], "precision": f["precision"], "recall": f["recall"],
            "class_consistency": f["class_consistency"],
            "near_copies": metrics["memorisation"]["near_copy_fraction"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/results/quality", help="bench/quality.py's --work folder")
    ap.add_argument("--families", default="gan,vae,prior", help="families to sweep (their runs must exist)")
    ap.add_argument("--k", type=int, default=10, help="the K-shot model whose augmentation gain is measured")
    ap.add_argument("--num", type=int, default=5000, help="synthetic samples per value")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds of the augmentation gain")
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST shards")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="eval.key=value for the evaluation protocol")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from gensynth.families import load_run_config

    base = load_run_config(None, [*args.overrides, f"eval.num={args.num}", f"eval.seeds={args.seeds}"]).eval
    work = Path(args.work)
    train, test = f"{args.data}/train", f"{args.data}/test"
    k_set = str(work / "data" / f"fashion-k{args.k}" / "train")
    out, report = work / "purpose" / "synth", work / "purpose" / "reports"
    started, load = time.monotonic(), os.getloadavg()[0]
    results: dict[str, dict] = {}
    for family in args.families.split(","):
        option, values = CANDIDATES[family]
        full, fewshot = work / "runs" / f"{family}_full", work / "runs" / f"{family}_k{args.k}"
        missing = [str(r) for r in (full, fewshot) if not (r / "export" / "config.json").is_file()]
        if missing:
            print(f"{family}: skipped, no export in {', '.join(missing)} (run bench/quality.py --work {work})")
            continue
        cas = [measure(full, out, option, v, args.num, test, train, dataclasses.replace(base, cas=True), None, report)
               for v in values]
        aug = [measure(fewshot, out, option, v, args.num, test, train, dataclasses.replace(base, cas=False), k_set,
                       report) for v in values]
        best_cas = max(cas, key=lambda r: r["cas_ratio"])
        best_aug = max(aug, key=lambda r: r["aug_gain"])
        results[family] = {"option": option, "cas": cas, "augment": aug,
                           "best": {"cas": best_cas[option], "augment": best_aug[option]}}
        print(f"{family}: {option} for cas {best_cas[option]:g} (CAS/real {best_cas['cas_ratio']:.3f}; plain default "
              f"{cas[0]['cas_ratio']:.3f}), for augment {best_aug[option]:g} (gain {100 * best_aug['aug_gain']:+.2f} "
              f"points at K = {args.k}; plain default {100 * aug[0]['aug_gain']:+.2f})", flush=True)
        for r in cas:
            print(f"  cas     {option}={r[option]:<5g} CAS/real {r['cas_ratio']:.3f}  FID {r['fid']:.2f}  recall "
                  f"{r['recall']:.3f}  precision {r['precision']:.3f}")
        for r in aug:
            print(f"  augment {option}={r[option]:<5g} gain {100 * r['aug_gain']:+.2f} (std "
                  f"{100 * r['aug_gain_std']:.2f})  near-copies {100 * r['near_copies']:.2f}%")
    protocol = (f"sampling sweep on {work}'s runs: {args.num} samples per value, seed 0; CAS: classifier on the "
                f"samples alone vs the real test set ({base.classifier_steps} steps, 1 seed); augmentation: K = "
                f"{args.k} real per class + samples, {args.seeds} seeds paired, share {base.synthetic_fraction}, "
                f"weight {base.synthetic_weight}; load average {load:.1f} at start; "
                f"{(time.monotonic() - started) / 60:.0f} min wall")
    print(protocol)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"protocol": protocol, "families": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
