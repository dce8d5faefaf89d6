"""Which classic augmentation makes the honest real-only baseline of augmentation gain? Measured on
Fashion-MNIST with K real images per class and the usefulness classifier's own recipe (eval defaults).

    OMP_NUM_THREADS=1 python bench/classic_aug.py --json bench/results/classic_aug.json   # about 30 min

For each K in --ks and each seed: a K-per-class subset of the first 50000 training images (seeded, the
same subset for every candidate, so candidates compare paired), one classifier per candidate. Every
classifier is scored on the 10000 training images held out of that pool (the choice is made on these)
and on the real test set (reported, not used to choose). The candidates: the settings of gensynth's
eval.real_augment (none, and combinations of the edge-replicated pad-and-crop shift, horizontal flip and
cutout), and for reference the previous recipe (the same 2-pixel translation, applied by the classifier's
fit to the normalised batch). The chosen default is the eval.real_augment setting with the highest
held-out accuracy averaged over the Ks. A rerun skips the runs already in --json whose candidate
definition and protocol are the same.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from gensynth.demo import ensure_fashion_shards  # noqa: E402
from gensynth.evaluate.augment import ClassicAugment  # noqa: E402
from gensynth.evaluate.classifier import Pool, Recipe, accuracy, train_classifier  # noqa: E402
from gensynth.evaluate.sets import load_image_set, matching_subset  # noqa: E402

POOL = 50000  # K subsets come from the first POOL training images; the rest is the held-out choice set
SHIFT = "edge-replicated"  # how eval.real_augment's shift pads (part of a candidate's definition)
# name -> (the recipe's edge-replicating shift, eval.real_augment spec)
CANDIDATES = {
    "none": (0, "none"),
    "previous (edge-replicated shift 2)": (2, "none"),
    "shift": (0, "shift"),
    "flip": (0, "flip"),
    "shift,flip": (0, "shift,flip"),
    "shift,flip,cutout": (0, "shift,flip,cutout"),
}


def stats(values: list[float]) -> dict:
    a = np.asarray(values)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": list(map(float, a))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST shard sets (made if missing)")
    ap.add_argument("--ks", default="10,50,100")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=500, help="classifier steps (eval.classifier_steps)")
    ap.add_argument("--shift", type=int, default=2, help="pad-and-crop pixels (eval.augment_shift)")
    ap.add_argument("--cutout", type=int, default=8, help="cutout side (eval.augment_cutout)")
    ap.add_argument("--json", default="bench/results/classic_aug.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ensure_fashion_shards(args.data)
    train, test = load_image_set(f"{args.data}/train"), load_image_set(f"{args.data}/test")
    pool, held = train.select(np.arange(POOL)), train.select(np.arange(POOL, len(train)))
    ks = [int(k) for k in args.ks.split(",")]
    recipe = Recipe(steps=args.steps)
    protocol = {"dataset": "Fashion-MNIST", "ks": ks, "seeds": args.seeds, "k_pool": POOL,
                "held_out": len(held), "test": len(test), "recipe": {**recipe.to_dict(), "shift": "per candidate"},
                "augment_shift": args.shift, "augment_cutout": args.cutout}
    definitions = {n: {"recipe_shift": s, "real_augment": a, **({"shift_padding": SHIFT} if "shift" in a else {})}
                   for n, (s, a) in CANDIDATES.items()}
    out_path = Path(args.json)
    done = json.loads(out_path.read_text()) if out_path.is_file() else {}
    runs = [r for r in done.get("runs", []) if done.get("protocol") == protocol
            and r.get("definition") == definitions.get(r["candidate"])]
    have = {(r["candidate"], r["k"], r["seed"]) for r in runs}
    result = {"command": "OMP_NUM_THREADS=1 python bench/classic_aug.py " + shlex.join(sys.argv[1:]),
              "protocol": protocol, "candidates": definitions, "machine": machine(), "runs": runs}
    for k in ks:
        for seed in range(args.seeds):
            subset = pool.select(matching_subset(pool.labels, {c: k for c in range(10)}, seed, "training pool"))
            for name, (shift, spec) in CANDIDATES.items():
                if (name, k, seed) in have:
                    continue
                augment = ClassicAugment.parse(spec, args.shift, args.cutout)
                started = time.monotonic()
                model = train_classifier([(Pool(subset.images, subset.labels, augment=augment or None),
                                           recipe.batch_size)], 10, Recipe(steps=args.steps, shift=shift), seed)
                run = {"candidate": name, "definition": definitions[name], "k": k, "seed": seed,
                       "held_out": accuracy(model, held.images, held.labels),
                       "test": accuracy(model, test.images, test.labels),
                       "seconds": round(time.monotonic() - started, 1)}
                runs.append(run)
                print(f"K={k:3d} seed {seed} {name:36s} held-out {100 * run['held_out']:.2f}% "
                      f"test {100 * run['test']:.2f}% ({run['seconds']} s)", flush=True)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(result, indent=1) + "\n")
    summary: dict = {}
    for name in CANDIDATES:
        summary[name] = {}
        for k in ks:
            mine = sorted((r for r in runs if r["candidate"] == name and r["k"] == k), key=lambda r: r["seed"])
            base = sorted((r for r in runs if r["candidate"] == "none" and r["k"] == k), key=lambda r: r["seed"])
            summary[name][str(k)] = {
                "held_out": stats([r["held_out"] for r in mine]), "test": stats([r["test"] for r in mine]),
                "held_out_gain_over_none": stats([a["held_out"] - b["held_out"] for a, b in zip(mine, base)]),
                "test_gain_over_none": stats([a["test"] - b["test"] for a, b in zip(mine, base)])}
    options = [n for n, (recipe_shift, _) in CANDIDATES.items() if recipe_shift == 0]  # eval.real_augment settings
    chosen = max(options, key=lambda n: np.mean([summary[n][str(k)]["held_out"]["mean"] for k in ks]))
    result.update(summary=summary, chosen=chosen, chosen_real_augment=CANDIDATES[chosen][1],
                  rule="the eval.real_augment setting with the highest held-out accuracy averaged over the Ks (the "
                       "test set is reported, not used; the previous recipe is a reference)")
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'candidate':36s}" + "".join(f"{'K=' + str(k) + ' held-out / test':>28s}" for k in ks))
    for name in CANDIDATES:
        cells = [f"{100 * summary[name][str(k)]['held_out']['mean']:6.2f} / "
                 f"{100 * summary[name][str(k)]['test']['mean']:6.2f} "
                 f"(+-{100 * summary[name][str(k)]['test']['std']:.2f})" for k in ks]
        print(f"{name:36s}" + "".join(f"{c:>28s}" for c in cells))
    print(f"chosen: {chosen} (eval.real_augment={CANDIDATES[chosen][1]})")


if __name__ == "__main__":
    main()
