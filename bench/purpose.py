"""Per-purpose sampling: which truncation / temperature serves CAS and which serves augmentation?

    python bench/purpose.py --work bench/results/quality --json bench/results/purpose.json
    python bench/purpose.py --work bench/results/quality --families gan --k 10 --num 2000   # quicker

Runs on the generators that bench/quality.py trained (its --work folder): for every family, the full-data
model `<family>_full` is sampled at each candidate value of its sampling option and scored by CAS / real
(a classifier trained on the samples alone: the purpose "cas"; --cas-seeds classifier seeds, each against
the real baseline of its own seed), and the K-shot model `<family>_k<K>` by the augmentation gain at K (the
purpose "augment"), both with `gensynth eval`'s protocol. The augmentation is measured at one fixed mix
(eval.synthetic_fraction / synthetic_weight / synthetic_filter; the recommended-mix search is off) so that
the sampling value is the only thing that changes between measurements; the same seeds, steps and test set
serve every value. Each (family, purpose, value) is one process, --parallel at a time.

--option sweeps another generate option instead of the family's sampling option: `--option
filter_threshold --values 0,0.5,0.9` draws at each classifier-filter threshold (`gensynth generate
--filter T`; 0 = no filter), with the family's plain sampling defaults.

The best value per purpose is printed beside the family's plain default, with the difference and its
spread over seeds; gensynth's samplers take a value as their `PURPOSES` default (`gensynth generate
--purpose cas|augment`) only where it beat the plain default by more than that spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gensynth.config import EvalConfig  # noqa: E402
from gensynth.errors import GensynthError  # noqa: E402
from gensynth.evaluate.sets import load_image_set  # noqa: E402
from gensynth.evaluate.synthetic import evaluate_synthetic, usefulness_protocol  # noqa: E402
from gensynth.evaluate.usefulness import classification_accuracy_score  # noqa: E402
from gensynth.generate.job import generate  # noqa: E402

# family -> (sampling option, candidate values, the family's plain default first). The GAN's span
# BigGAN's range (Brock et al. 2019; Ravuri & Vinyals 2019 found CAS best at truncation 1.5-2.0); the
# VAE's and the prior's go below 1 (fidelity) and, for the prior, above (variety).
CANDIDATES = {
    "gan": ("truncation", [0.0, 1.5, 1.0, 0.7]),
    "vae": ("temperature", [1.0, 0.8, 0.6]),
    "prior": ("temperature", [1.0, 1.2, 0.9]),
}
# generate options other than a family's sampling option that --option may sweep; value 0 means "off"
OFF_AT_ZERO = {"filter_threshold"}


@dataclasses.dataclass(frozen=True)
class Task:
    family: str
    purpose: str  # "cas" (the full-data model) or "augment" (the K-shot model)
    run: str
    option: str
    value: float
    num: int
    train: str
    test: str
    k_set: str | None
    out: str
    report: str
    cfg: EvalConfig
    cas_seeds: int


def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def _name(task: Task) -> str:
    return f"{Path(task.run).name}-{task.option}-{task.value:g}"


def measure(task: Task) -> dict:
    """_measure, kept beside the value's report: a rerun of the same task on the same export reuses it. A value
    the generator cannot meet (a filter threshold some class never reaches) gives a row that says so, not the
    end of the sweep."""
    saved = _saved(task)
    if saved is not None:
        return saved
    try:
        row = _measure(task)
    except GensynthError as e:  # deterministic (the draws are seeded): kept like a measured row
        print(f"{_name(task)}: failed: {e}", flush=True)
        row = {"family": task.family, "purpose": task.purpose, task.option: task.value, "failed": str(e)}
    record, key = _record(task)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"key": key, "row": row}))
    return row


def _record(task: Task) -> tuple[Path, dict]:
    """Where a measured row is kept, and what it was measured on (the task and the export)."""
    export = Path(task.run) / "export" / "config.json"
    return (Path(task.report) / _name(task) / "sweep_row.json",
            {"task": json.loads(json.dumps(dataclasses.asdict(task))),
             "export_config_sha256": hashlib.sha256(export.read_bytes()).hexdigest()})


def _saved(task: Task) -> dict | None:
    record, key = _record(task)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            return saved["row"]
    return None


def _measure(task: Task) -> dict:
    """Generate task.num samples at task.value and score them for task.purpose."""
    started = time.monotonic()
    name = _name(task)
    synth = str(Path(task.out) / name)
    value = None if task.option in OFF_AT_ZERO and task.value == 0 else task.value
    result = generate(task.run, synth, num=task.num, seed=0, overwrite=True, **{task.option: value})
    metrics = evaluate_synthetic(synth, task.test, train=task.train, report=str(Path(task.report) / name),
                                 cfg=task.cfg, k_set=task.k_set)
    u, f = metrics["usefulness"], metrics["fidelity"]
    row = {"family": task.family, "purpose": task.purpose, task.option: task.value, "fid": f["fid"],
           "precision": f["precision"], "recall": f["recall"], "class_consistency": f["class_consistency"],
           "near_copies": metrics["memorisation"]["near_copy_fraction"]}
    if value is not None and task.option == "filter_threshold":  # what the filter cost: draws thrown away
        row["filtered_out"] = result.manifest.provenance["filter"]["dropped"]
    if task.purpose == "cas":
        ratios = [u["cas"]["ratio"]]
        if task.cas_seeds > 1:  # more classifier seeds: one seed's CAS moves by about a point
            protocol = usefulness_protocol(task.cfg)
            images = load_image_set(synth)
            train, test = load_image_set(task.train), load_image_set(task.test)
            for s in range(1, task.cas_seeds):
                r = classification_accuracy_score(images, train, test, len(images.classes or []) or 10,
                                                  dataclasses.replace(protocol, seed=task.cfg.seed + s))
                ratios.append(r["ratio"])
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        row.update(value=statistics.mean(ratios), spread=spread, cas_ratios=ratios)
    else:
        gain = u["augmentation"]["gain"]
        row.update(value=gain["mean"], spread=gain["std"], gains=gain.get("runs"))
    row["minutes"] = round((time.monotonic() - started) / 60, 1)
    return row


def judge(rows: list[dict], option: str) -> dict:
    """The best value against the plain default (rows[0]): adopted only past the spread of both. A value that
    failed is never adopted; without the default nothing is."""
    if not rows or "failed" in rows[0]:
        return {"best": None, "default": rows[0][option] if rows else None, "margin": None, "noise": None,
                "adopt": False}
    rows = [r for r in rows if "failed" not in r]
    default, best = rows[0], max(rows, key=lambda r: r["value"])
    margin = best["value"] - default["value"]
    noise = max(best["spread"], default["spread"])
    return {"best": best[option], "default": default[option], "margin": margin, "noise": noise,
            "adopt": best is not default and margin > noise}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench/results/quality", help="bench/quality.py's --work folder")
    ap.add_argument("--families", default="gan,vae,prior", help="families to sweep (their runs must exist)")
    ap.add_argument("--values", help="comma-separated values to try instead of each family's candidates (the "
                    "first is compared against as the default)")
    ap.add_argument("--option", choices=sorted(OFF_AT_ZERO), help="sweep this generate option instead of each "
                    "family's sampling option (needs --values; 0 = off)")
    ap.add_argument("--purposes", default="cas,augment", help="which to measure: cas (the full-data model), "
                    "augment (the K-shot model), or both")
    ap.add_argument("--k", type=int, default=10, help="the K-shot model whose augmentation gain is measured")
    ap.add_argument("--num", type=int, default=5000, help="synthetic samples per value")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds of the augmentation gain")
    ap.add_argument("--cas-seeds", type=int, default=3, help="classifier seeds of CAS")
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST shards")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="measurements at a time")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("overrides", nargs="*", help="eval.key=value for the evaluation protocol")
    args = ap.parse_args(argv)
    if args.option and not args.values:
        ap.error("--option needs --values")
    purposes = args.purposes.split(",")
    if not purposes or set(purposes) - {"cas", "augment"}:
        ap.error(f"--purposes {args.purposes!r}: use cas, augment or cas,augment")
    from gensynth.families import load_run_config

    base = load_run_config(None, ["eval.recommend_mix=false", *args.overrides, f"eval.num={args.num}",
                                  f"eval.seeds={args.seeds}"]).eval
    work = Path(args.work)
    train, test = f"{args.data}/train", f"{args.data}/test"
    k_set = str(work / "data" / f"fashion-k{args.k}" / "train")
    out, report = str(work / "purpose" / "synth"), str(work / "purpose" / "reports")
    started, load = time.monotonic(), os.getloadavg()[0]
    tasks: list[Task] = []
    for family in args.families.split(","):
        option, values = CANDIDATES[family]
        option = args.option or option
        if args.values:
            values = [float(v) for v in args.values.split(",")]
        full, fewshot = work / "runs" / f"{family}_full", work / "runs" / f"{family}_k{args.k}"
        needed = [r for r, p in ((full, "cas"), (fewshot, "augment")) if p in purposes]
        missing = [str(r) for r in needed if not (r / "export" / "config.json").is_file()]
        if missing:
            print(f"{family}: skipped, no export in {', '.join(missing)} (run bench/quality.py --work {work})")
            continue
        for v in values:
            if "cas" in purposes:
                tasks.append(Task(family, "cas", str(full), option, v, args.num, train, test, None, out, report,
                                  dataclasses.replace(base, cas=True), args.cas_seeds))
            if "augment" in purposes:
                tasks.append(Task(family, "augment", str(fewshot), option, v, args.num, train, test, k_set, out, report,
                                  dataclasses.replace(base, cas=False), 1))
    reused = sum(_saved(t) is not None for t in tasks)
    print(f"== {len(tasks)} measurements ({reused} kept from an earlier run), {args.parallel} at a time", flush=True)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=spawn, initializer=_init,
                             initargs=(args.threads,)) as pool:
        rows = list(pool.map(measure, tasks))
    results: dict[str, dict] = {}
    for family in dict.fromkeys(t.family for t in tasks):
        option = args.option or CANDIDATES[family][0]
        entry: dict = {"option": option}
        for purpose in purposes:
            mine = [r for r in rows if r["family"] == family and r["purpose"] == purpose]
            entry[purpose] = mine
            entry.setdefault("judged", {})[purpose] = j = judge(mine, option)
            # CAS / real as a ratio, the augmentation gain in accuracy points
            what, scale = ("CAS / real", 1.0) if purpose == "cas" else (f"gain (points) at K = {args.k}", 100.0)
            if j["best"] is None:
                print(f"{family} {purpose}: the default {option}={j['default']:g} failed: nothing to compare with")
            else:
                print(f"{family} {purpose}: best {option}={j['best']:g}, {what} {scale * j['margin']:+.3f} over the "
                      f"plain default {option}={j['default']:g} (spread {scale * j['noise']:.3f}): "
                      f"{'adopt' if j['adopt'] else 'keep the default'}", flush=True)
            for r in mine:
                if "failed" in r:
                    print(f"  {option}={r[option]:<5g} failed: {r['failed']}")
                    continue
                print(f"  {option}={r[option]:<5g} {what} {scale * r['value']:.3f} (spread {scale * r['spread']:.3f})  "
                      f"FID {r['fid']:.2f}  "
                      f"precision / recall {r['precision']:.3f} / {r['recall']:.3f}  class consistency "
                      f"{100 * r['class_consistency']:.1f}%  near-copies {100 * r['near_copies']:.2f}%"
                      + (f"  filtered out {r['filtered_out']}" if "filtered_out" in r else ""))
        results[family] = entry
    swept = args.option or "each family's sampling option"
    protocol = (f"sampling sweep ({swept}; {args.purposes}) on {work}'s runs: {args.num} samples per value, "
                f"seed 0; CAS: classifier on the samples alone vs as many real ({base.classifier_steps} steps, "
                f"{args.cas_seeds} seeds, each against "
                f"its own real baseline); augmentation: K = {args.k} real per class + samples, {args.seeds} seeds "
                f"paired, fixed mix: share {base.synthetic_fraction}, weight {base.synthetic_weight}, filter "
                f"{base.synthetic_filter}; {args.parallel} at a time, {args.threads} thread(s) each; load average "
                f"{load:.1f} at start; {(time.monotonic() - started) / 60:.0f} min wall"
                + (f" ({reused} of {len(tasks)} values measured by an earlier run, reused)" if reused else ""))
    print(protocol)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"protocol": protocol, "families": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
