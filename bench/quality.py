"""Quality benchmark: is each model family's synthetic Fashion-MNIST any good, and does it help?

    python bench/quality.py --json bench/results/quality.json              # make bench runs this
    python bench/quality.py --budget 3 --ks 10 --num 2000                 # a short run

For every model family with a config here (configs/<family>_fashion.yaml; the few-shot runs use
configs/<family>_fashion_fewshot.yaml when it exists; "prior" is the VQ-VAE for half the budget, then
its prior for the other half), at a fixed CPU budget per generator:
1. train it on all of Fashion-MNIST train, generate --num samples (--purpose cas: the family's measured
   defaults for a set trained on alone, e.g. the GAN's classifier filter; --general: plain defaults), and
   evaluate them (gensynth eval: FID / KID / precision / recall in the cached extractor's features with
   their real-vs-real floors, class consistency, near-copies, CAS next to as many real samples);
2. for each K in --ks: cut a K-per-class real set (gensynth shard shards:... --per-class K), train the
   same family on it alone, generate --num-k samples (--purpose augment), and measure the augmentation gain
   at K (the provenance check guarantees the generator saw only those K x 10 labelled images).
The budget is CPU time, not steps: each training process (with its loader workers) is measured with
psutil and stopped by SIGTERM once it has used --budget CPU-minutes; the loop saves a checkpoint and
exits 75, and a rerun with train.steps=<the step reached> writes the export. So families compare at
equal compute, whatever their step cost. CPU time is steadier than wall time on a busy machine but
not immune to it: with 3 generators training at a time on 2 cores the full-data GAN reached 699 steps in
15 CPU-minutes, against 1044 with 2 at a time, so --parallel defaults to one per core and is printed. Each
generator is generated from and evaluated (in a process of its own) as soon as it is trained, beside the
training of the next ones; a rerun reuses finished trainings and evaluations. The protocol is printed
above the table, with a verdict per goal, and everything lands in --json.

A reference row, "cdcgan (reference)", is a plain class-conditional DCGAN (bench/cdcgan.py: no gensynth
model) trained on all of train at the same CPU budget, sampled (--num) and scored by the same
evaluate_synthetic: the bar the GAN family must clear (--no-reference skips it). --set KEY=VALUE passes
training overrides to every family (e.g. --families gan --set gan.lr_g=2e-4 for an ablation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gensynth.config import EvalConfig  # noqa: E402
from gensynth.data.ingest import ingest  # noqa: E402
from gensynth.data.manifest import manifest_url  # noqa: E402
from gensynth.data.sources import open_source  # noqa: E402
from gensynth.demo import ensure_fashion_shards  # noqa: E402
from gensynth.evaluate.extractor import cache_root, resolve_extractor  # noqa: E402
from gensynth.evaluate.synthetic import evaluate_synthetic  # noqa: E402
from gensynth.generate.job import generate  # noqa: E402
from gensynth.train.checkpoint import latest_checkpoint  # noqa: E402

REQUEUE = 75
REFERENCE = "cdcgan (reference)"
BUDGET_RECORD = "budget.json"  # train_on_budget's record in a run folder: what a rerun reuses
REFERENCE_RECORD = "training.json"  # bench/cdcgan.py's record in its output folder
CACHE_NAME = "<gensynth cache>"  # stands for the extractor cache folder in a result file


def families(configs: Path) -> list[tuple[str, Path, Path]]:
    """(family, full-data config, few-shot config) for every configs/<x>_fashion.yaml present."""
    found = []
    for path in sorted(configs.glob("*_fashion.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        family = (cfg.get("model") or {}).get("family")
        if not family:
            continue
        if family == "vqvae":
            continue  # reconstructs only: it is the first stage of the "prior" family below
        fewshot = path.with_name(path.stem + "_fewshot.yaml")
        found.append((family, path, fewshot if fewshot.is_file() else path))
    return found


def training_record(work: Path, family: str, name: str) -> Path:
    """Where row `name`'s training is recorded under --work (a rerun reuses the training it names)."""
    if family == REFERENCE:
        return work / "synth" / name / REFERENCE_RECORD
    return work / "runs" / name / BUDGET_RECORD


def train_generator(family: str, config: Path, data: str, run_dir: Path, budget_s: float, common: list[str],
                    logs: Path, configs: Path) -> dict:
    """One generator on its budget. The prior family is two stages on the same data: the VQ-VAE for half the
    budget, then the prior over its codes (extracted into a code shard set) for the other half."""
    if family != "prior":
        return train_on_budget(config, [f"data.train={data}", *common], run_dir, budget_s,
                               logs / f"{run_dir.name}.log")
    vq_dir = run_dir.with_name(run_dir.name + "_vqvae")
    vq = train_on_budget(configs / "vqvae_fashion.yaml", [f"data.train={data}", "data.test=", *common], vq_dir,
                         budget_s / 2, logs / f"{vq_dir.name}.log")
    # the code shards are extracted first, outside the training process (a budget's SIGTERM must reach the
    # loop, not the extraction), and their CPU time is taken out of the prior's half (at least 30 CPU-s are left:
    # a process stopped before its loop starts would leave no checkpoint)
    codes = run_dir.parent.parent / "data" / f"codes-{run_dir.name}"
    extract_wall = 0.0  # reused codes cost no time
    extracted = codes.with_name(codes.name + ".json")  # {VQ-VAE weights sha256, extraction CPU s}: reruns reuse
    weights = json.loads((vq_dir / "export" / "config.json").read_text())["weights_sha256"]
    before = json.loads(extracted.read_text()) if extracted.is_file() else {}
    if before.get("weights_sha256") == weights and codes.is_dir():
        extract_s = before["cpu_s"]  # the codes of this VQ-VAE are there: charge what extracting them cost
    else:
        shutil.rmtree(codes, ignore_errors=True)  # codes of an earlier VQ-VAE run would be refused
        start = time.monotonic()
        code, extract_s = run_watched([sys.executable, "-c", "import sys; from gensynth.families.prior.codes import "
                                       "ensure_codes; ensure_codes(*sys.argv[1:])", str(vq_dir / "export"), data,
                                       str(codes)], logs / f"{run_dir.name}.log")
        if code != 0:
            raise RuntimeError(f"extracting the codes for {run_dir.name} failed; see {logs / run_dir.name}.log")
        extract_s, extract_wall = round(extract_s, 1), time.monotonic() - start
        extracted.write_text(json.dumps({"weights_sha256": weights, "cpu_s": extract_s}))
    prior = train_on_budget(config, [f"data.train={codes}", f"prior.vqvae={vq_dir}", f"prior.images={data}",
                                     *common], run_dir, max(budget_s / 2 - extract_s, 30.0),
                            logs / f"{run_dir.name}-prior.log")
    return {"budget_s": budget_s, "steps": f"{vq['steps']}+{prior['steps']}",
            "cpu_s": vq["cpu_s"] + extract_s + prior["cpu_s"],
            "wall_s": round(vq["wall_s"] + extract_wall + prior["wall_s"], 1),
            **({"commit": prior["commit"]} if "commit" in prior else {})}


def train_reference(data: str, out: Path, budget_s: float, num: int, threads: int, log: Path) -> dict:
    """bench/cdcgan.py on `data` for `budget_s` CPU seconds (it stops itself, counting as train_on_budget does),
    writing `num` samples to OUT/synthetic. Reruns with the same budget and count reuse it."""
    record = out / REFERENCE_RECORD
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("budget_s") == budget_s and done.get("num") == num:
            return done
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    code, _ = run_watched([sys.executable, str(REPO / "bench" / "cdcgan.py"), "--data", data, "--out", str(out),
                           "--budget", str(budget_s / 60), "--num", str(num), "--threads", str(threads)], log)
    if code != 0:
        raise RuntimeError(f"the reference cDCGAN ended with exit code {code}; see {log}")
    done = {**json.loads(record.read_text()), "num": num, "commit": commit()}
    record.write_text(json.dumps(done, indent=1) + "\n")
    return done


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time (user + system) of a process and all its children (loader workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_watched(cmd: list[str], log: Path, budget_s: float | None = None, mode: str = "w") -> tuple[int, float]:
    """Run `cmd` (output to `log`), polling its CPU time with its children's; with `budget_s`, SIGTERM it once it
    has used that much. Returns (exit code, CPU seconds seen)."""
    with open(log, mode) as out:
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=out,
                                stderr=subprocess.STDOUT)
        watch, used = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            used = max(used, cpu_seconds(watch))
            if budget_s is not None and used >= budget_s:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.5)
        return proc.wait(), used


def train_on_budget(config: Path, overrides: list[str], run_dir: Path, budget_s: float, log: Path) -> dict:
    """Train until the process has used `budget_s` CPU seconds, then stop it (SIGTERM -> checkpoint, exit 75)
    and write the export from that checkpoint. Returns steps, CPU and wall seconds."""
    done_marker = run_dir / BUDGET_RECORD
    if done_marker.is_file():
        done = json.loads(done_marker.read_text())
        if done.get("budget_s") == budget_s and done.get("overrides", overrides) == overrides:
            return done
    shutil.rmtree(run_dir, ignore_errors=True)
    base = [sys.executable, "-m", "gensynth", "train", str(config), *overrides,
            f"run.root={run_dir.parent}", f"run.name={run_dir.name}"]
    start = time.monotonic()
    code, used = run_watched([*base, "train.steps=100000000"], log, budget_s)
    if code != REQUEUE:
        raise RuntimeError(f"training {run_dir.name} ended with exit code {code} before its budget; see {log}")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    steps = json.loads((checkpoint / "trainer.json").read_text())["step"]
    if run_watched([*base, f"train.steps={steps}"], log, mode="a")[0] != 0:
        raise RuntimeError(f"writing the export of {run_dir.name} failed; see {log}")
    result = {"budget_s": budget_s, "steps": steps, "cpu_s": round(used, 1),
              "wall_s": round(time.monotonic() - start, 1), "overrides": overrides,
              "commit": commit()}  # the code that trained it (a later rerun may reuse it on other code)
    done_marker.write_text(json.dumps(result))
    return result


def generate_and_evaluate(run: Path | None, synth: Path, num: int, test: str, train: str, report: Path,
                          cfg: EvalConfig, training: dict, threads: int, reject_copies: bool = True,
                          purpose: str = "general") -> dict:
    """Sample `num` images from the export of `run` into `synth` (run None: `synth` is already written) and
    evaluate them; in a process of its own (the classifiers seed torch's global generator). With
    `reject_copies`, near-copies of the generator's training images are redrawn (generate --reject-copies, the
    real test set as the unseen reference: the evaluation's rule) and the metrics say how many. `purpose` is
    generate's --purpose (its measured sampling defaults and classifier filter); the metrics say how many draws
    that filter threw away. A rerun with the same training, count and protocol reuses the metrics it wrote."""
    torch.set_num_threads(threads)
    record = report / "quality_row.json"
    key = {"training": training, "num": num, "cfg": dataclasses.asdict(cfg),
           **({"reject_copies": True} if reject_copies and run is not None else {}),
           **({"purpose": purpose} if purpose != "general" and run is not None else {})}

    def what(k: dict) -> dict:  # the model, count and protocol; not how long training took
        return {**k, "training": {n: v for n, v in (k.get("training") or {}).items() if n != "wall_s"}}

    if record.is_file():
        earlier = json.loads(record.read_text())
        if what(earlier.get("key") or {}) == what(json.loads(json.dumps(key))):
            return earlier["metrics"]
    copies = None
    if run is not None:
        rejecting = {"reject_copies": True, "copy_reference": test} if reject_copies else {}
        made = generate(str(run), str(synth), num=num, seed=0, overwrite=True, purpose=purpose,
                        **rejecting).manifest
        copies = made.provenance.get("reject_copies", {}).get("rejected")
        filtered = (made.provenance.get("filter") or {}).get("dropped")
    metrics = evaluate_synthetic(str(synth), test, train=train, report=str(report), cfg=cfg)
    metrics["copies_redrawn"] = copies
    if run is not None:
        metrics.update(purpose=purpose, filtered_out=filtered)
    record.write_text(json.dumps({"key": key, "metrics": metrics}))
    return metrics


def k_set(train: str, out: Path, k: int) -> str:
    folder = out / f"fashion-k{k}"
    split = folder / "train"
    if not Path(manifest_url(str(split))).is_file():
        ingest(open_source(f"shards:{train}"), str(folder), split="train", per_class=k, seed=0, overwrite=True)
    return str(split)


def fmt(v: float | None, pct: bool = False, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def row(family: str, data: str, training: dict, m: dict) -> dict:
    f, mem, u = m["fidelity"], m["memorisation"], m["usefulness"]
    cas, aug = u.get("cas", {}), u.get("augmentation", {})
    return {
        "family": family, "data": data, "steps": training["steps"], "cpu_min": training["cpu_s"] / 60,
        "fid": f["fid"], "fid_floor": f["fid_floor"], "kid_x1000": f["kid_x1000"],
        "kid_floor_x1000": f["kid_floor_x1000"], "precision": f["precision"], "recall": f["recall"],
        "precision_floor": f["precision_floor"], "recall_floor": f["recall_floor"],
        "class_consistency": f["class_consistency"], "near_copy_fraction": mem["near_copy_fraction"],
        "near_copy_floor": mem["real_floor_fraction"], "copies_redrawn": m.get("copies_redrawn"),
        "purpose": m.get("purpose", "general"), "filtered_out": m.get("filtered_out"),
        "cas": cas.get("cas"), "cas_real": cas.get("real_accuracy"), "cas_ratio": cas.get("ratio"),
        "aug_real": (aug.get("real_only") or {}).get("mean"),
        "aug_mixed": (aug.get("real_plus_synthetic") or {}).get("mean"),
        "aug_gain": (aug.get("gain") or {}).get("mean"), "aug_gain_std": (aug.get("gain") or {}).get("std"),
        "mix": {k: v for k, v in (u.get("recommended_mix") or {}).items() if k != "search"},
        "verdict": (m.get("verdict") or {}).get("verdict"),
    }


def table(rows: list[dict]) -> list[str]:
    head = ("| family | trained on | steps (CPU min) | FID (floor) | KID x1000 (floor) | precision / recall (floor) "
            "| class consistency | near-copies (floor) | CAS / real = ratio | K-shot: real only -> + synthetic "
            "(gain, std) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cas = (f"{fmt(r['cas'], True)}% / {fmt(r['cas_real'], True)}% = {r['cas_ratio']:.3f}"
               if r["cas"] is not None else "-")
        aug = (f"{fmt(r['aug_real'], True)}% -> {fmt(r['aug_mixed'], True)}% ({100 * r['aug_gain']:+.2f}, "
               f"{100 * r['aug_gain_std']:.2f})" if r["aug_gain"] is not None else "-")
        lines.append(
            f"| {r['family']} | {r['data']} | {r['steps']} ({r['cpu_min']:.1f}) | {fmt(r['fid'])} "
            f"({fmt(r['fid_floor'])}) | {fmt(r['kid_x1000'])} ({fmt(r['kid_floor_x1000'])}) | "
            f"{fmt(r['precision'], digits=3)} / "
            f"{fmt(r['recall'], digits=3)} ({fmt(r['precision_floor'], digits=3)} / {fmt(r['recall_floor'], digits=3)})"
            f" | {fmt(r['class_consistency'], True, 1)}%{filtered(r)} | {fmt(r['near_copy_fraction'], True)}% "
            f"({fmt(r['near_copy_floor'], True)}%){redrawn(r)} | {cas} | {aug} |")
    return lines


def filtered(r: dict) -> str:
    """" (filter: 1234 redrawn)": draws the classifier filter of the row's --purpose threw away. The filter's
    classifier is the extractor that measures class consistency, so a filtered set's consistency is high by
    construction."""
    n = r.get("filtered_out")
    return "" if n is None else f" (filter: {n} redrawn)"


def redrawn(r: dict) -> str:
    """", 1234 redrawn": the near-copies generate --reject-copies redrew for the row's set (none: not on)."""
    n = r.get("copies_redrawn")
    return "" if n is None else f", {n} redrawn"


def goals(rows: list[dict]) -> list[dict]:
    """Each goal of the benchmark with its measured figure and whether it is met (None: nothing measured)."""
    def judged(name: str, figure: float | None, ok: bool | None) -> dict:
        return {"goal": name, "measured": figure, "met": None if figure is None else bool(ok)}

    full = [r for r in rows if r["cas_ratio"] is not None and r["family"] != REFERENCE]
    gan = next((r for r in full if r["family"] == "gan"), None)
    ref = next((r for r in rows if r["family"] == REFERENCE), None)
    best = max((r["cas_ratio"] for r in full), default=None)
    out = [judged("CAS / real, best family >= 0.95", best, best is not None and best >= 0.95)]
    if gan is not None:
        above = ref is None or ref["cas_ratio"] is None or gan["cas_ratio"] > ref["cas_ratio"]
        out.append(judged("CAS / real, GAN >= 0.90 and above the reference", gan["cas_ratio"],
                          gan["cas_ratio"] >= 0.90 and above))
        out.append(judged("GAN recall >= 0.5", gan["recall"], gan["recall"] is not None and gan["recall"] >= 0.5))
    for k, bar in ((10, 0.02), (50, 0.01), (100, 0.0)):
        gains = [r["aug_gain"] for r in rows if r["data"] == f"K = {k} per class" and r["aug_gain"] is not None]
        top = max(gains, default=None)
        out.append(judged(f"augmentation gain, best family, K = {k} >= {100 * bar:+.1f} points",
                          None if top is None else 100 * top, top is not None and top >= bar))
    gains = [r["aug_gain"] for r in rows if r["aug_gain"] is not None]
    low = min(gains, default=None)
    out.append(judged("augmentation gain, every family and K >= -0.3 points", None if low is None else 100 * low,
                      low is not None and low >= -0.003))
    copies = [r["near_copy_fraction"] for r in rows if r["near_copy_fraction"] is not None
              and r["family"] != REFERENCE]
    worst = max(copies, default=None)
    out.append(judged("near-copies, every family and K < 1%", None if worst is None else 100 * worst,
                      worst is not None and worst < 0.01))
    return out


def goal_lines(judged: list[dict]) -> list[str]:
    lines = ["| goal | measured | met |", "|---|---|---|"]
    for g in judged:
        figure = "-" if g["measured"] is None else f"{g['measured']:.3f}"
        met = "not measured" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['goal']} | {figure} | {met} |")
    return lines


def result_text(result: dict, cache: Path) -> str:
    """The result file's JSON, the extractor cache's folder written as CACHE_NAME: the file is committed
    beside the README, so it holds no path of the machine that measured it."""
    return json.dumps(result, indent=1).replace(json.dumps(str(cache))[1:-1], CACHE_NAME)


def commit() -> str:
    """The commit measured, with "+changes" when the work tree differs from it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=15.0, help="CPU-minutes of training per generator (default 15)")
    ap.add_argument("--ks", default="10,50,100", help="K real samples per class for augmentation gain (default "
                    "10,50,100; empty = none)")
    ap.add_argument("--num", type=int, default=10000, help="synthetic samples evaluated per full-data model")
    ap.add_argument("--num-k", type=int, default=5000, help="synthetic samples generated per K-shot model")
    ap.add_argument("--seeds", type=int, default=3, help="classifier seeds per augmentation configuration")
    ap.add_argument("--classifier-steps", type=int, default=EvalConfig.classifier_steps,
                    help="steps of every CAS / augmentation classifier")
    ap.add_argument("--families", help="comma-separated families (default: every configs/<family>_fashion.yaml)")
    ap.add_argument("--rows", help="comma-separated rows to run, by run name (gan_full, gan_k10, prior_k50, "
                    "cdcgan_full, ...; default all that --families, --ks and --no-reference give)")
    ap.add_argument("--no-reference", action="store_true", help=f"skip the {REFERENCE} row (bench/cdcgan.py)")
    ap.add_argument("--general", action="store_true", help="draw every set with generate's plain defaults (by "
                    "default a full-data set is drawn with --purpose cas and a K-shot set with --purpose augment: "
                    "each with the sampling and filter measured best for what its row measures, as a team would)")
    ap.add_argument("--keep-copies", action="store_true", help="generate without --reject-copies (by default each "
                    "near-copy of a generator's training images is redrawn, as a team publishing a set would)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                    help="training override for every family, e.g. gan.lr_g=2e-4 (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every process (1: the budget "
                    "counts work, not spinning threads on a shared machine)")
    ap.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                    help="generators trained (or evaluated) at the same time; default one per core: with more, each "
                    "step costs more CPU time (cache and scheduling), so a CPU budget buys fewer steps")
    ap.add_argument("--work", default="bench/results/quality", help="runs, synthetic sets and reports go here")
    ap.add_argument("--data", default="data/fashion", help="Fashion-MNIST shards (made if missing)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--render", metavar="JSON", help="print the protocol, table and goals of a result file written "
                    "by --json (nothing runs)")
    ap.add_argument("overrides", nargs="*", help="eval.key=value for the evaluation protocol")
    args = ap.parse_args()
    if args.render:
        try:
            saved = json.loads(Path(args.render).read_text())
            print("\n".join([*saved["protocol"], "", *table(saved["rows"]), "", *goal_lines(goals(saved["rows"]))]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--render {args.render}: not a result file of this benchmark ({type(e).__name__}: {e})")
        return 0
    bad = [kv for kv in args.sets if "=" not in kv or (kv.startswith(("run.", "eval.")) and
                                                         not kv.startswith("run.seed="))]
    if bad:
        ap.error(f"--set {bad[0]}: give SECTION.KEY=VALUE of the training config (run.* and eval.* are the "
                 "benchmark's own, but for run.seed: a seed repeat)")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from gensynth.families import load_run_config

    cfg = load_run_config(None, [*args.overrides, f"eval.classifier_steps={args.classifier_steps}",
                             f"eval.seeds={args.seeds}", f"eval.num={args.num}"]).eval
    work = Path(args.work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ensure_fashion_shards(args.data)
    train, test = f"{args.data}/train", f"{args.data}/test"
    load_start = os.getloadavg()
    measured_on = commit()  # at the start: the code that trained the generators
    started = time.monotonic()
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    chosen = families(REPO / "configs")
    if args.families:
        wanted = set(args.families.split(","))
        chosen = [f for f in chosen if f[0] in wanted]
    budget_s = args.budget * 60
    common = [f"train.threads={args.threads}", "train.eval_every=0", *args.sets]
    planned = []  # (family, label, config, K or None for all of train, run name)
    for family, config, fewshot in chosen:
        planned.append((family, "all 60000", config, None, f"{family}_full"))
        planned += [(family, f"K = {k} per class", fewshot, k, f"{family}_k{k}") for k in ks]
    if not args.no_reference:
        planned.append((REFERENCE, "all 60000", None, None, "cdcgan_full"))
    if args.rows:
        wanted = [r for r in args.rows.split(",") if r]
        unknown = sorted(set(wanted) - {job[4] for job in planned})
        if unknown:
            ap.error(f"--rows: no row {', '.join(unknown)}; the rows are {', '.join(job[4] for job in planned)}")
        planned = [job for job in planned if job[4] in wanted]
    extractor = resolve_extractor(train, test, cfg.extractor, cfg.cache, cfg.extractor_epochs, cfg.seed)
    jobs = [(family, label, config, train if k is None else k_set(train, work / "data", k), name)
            for family, label, config, k, name in planned]
    reused = sum(training_record(work, job[0], job[4]).is_file() for job in jobs)
    # 1. every generator on its CPU budget; concurrently (--parallel): CPU time, not wall time, is the budget
    print(f"== training {len(jobs)} generators, {args.budget:g} CPU-min each, {args.parallel} at a time", flush=True)

    def train_job(job: tuple) -> dict:
        family, _, config, data, name = job
        if family == REFERENCE:
            return train_reference(data, work / "synth" / name, budget_s, args.num, args.threads,
                                   work / "logs" / f"{name}.log")
        return train_generator(family, config, data, work / "runs" / name, budget_s, common, work / "logs",
                               REPO / "configs")

    # 2. as each generator is trained: generate and evaluate it in a process of its own (CAS on the full-data
    # model; augmentation gain on the K-shot ones), so evaluation overlaps the training of the others
    def train_and_evaluate(job: tuple) -> tuple[dict, dict]:
        family, _, _, data, name = job
        training = train_job(job)
        print(f"== {name}: {training['steps']} steps in {training['cpu_s'] / 60:.1f} CPU-min; generate, evaluate",
              flush=True)
        full = data == train
        synth = Path(training["synthetic"]) if family == REFERENCE else work / "synth" / name
        run = None if family == REFERENCE else work / "runs" / name
        row_cfg = cfg if full else dataclasses.replace(cfg, cas=False)
        purpose = "general" if args.general else "cas" if full else "augment"
        metrics = evaluators.submit(generate_and_evaluate, run, synth, args.num if full else args.num_k, test, train,
                                    work / "reports" / name, row_cfg, training, args.threads,
                                    not args.keep_copies, purpose).result()
        print(f"== {name}: evaluated", flush=True)
        return training, metrics

    spawn = multiprocessing.get_context("spawn")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool, \
            ProcessPoolExecutor(max_workers=args.parallel, mp_context=spawn) as evaluators:
        futures: list[Future] = [pool.submit(train_and_evaluate, job) for job in jobs]
        wait(futures)  # a row that fails must not cut the others short (their evaluations are still running)
    rows, details, failed = [], [], {}
    for (family, label, _, data, name), future in zip(jobs, futures):
        if future.exception() is not None:
            failed[name] = str(future.exception())
            print(f"== {name}: FAILED: {failed[name]}", flush=True)
            continue
        training, m = future.result()
        rows.append(row(family, label, training, m))
        details.append({"family": family, "data": data, "training": training, "metrics": m})
    load_end = os.getloadavg()
    protocol = [
        f"Fashion-MNIST ({train}: 60000, {test}: 10000); machine {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end; {args.threads} torch thread(s) per "
        f"process, {args.parallel} generators at a time; torch {torch.__version__}; total wall "
        f"{(time.monotonic() - started) / 60:.0f} min"
        + (f" ({reused} of {len(jobs)} generators trained by an earlier run in {work}: not counted)" if reused else ""),
        f"generators: {args.budget:g} CPU-minutes of training each (process + loader workers, psutil), "
        f"{args.num} samples generated (full data) / {args.num_k} (K-shot), seed 0"
        + (f"; training overrides {' '.join(args.sets)}" if args.sets else ""),
        f"{REFERENCE}: bench/cdcgan.py, plain PyTorch (hinge, Adam 2e-4 (0.5, 0.999), batch 128, EMA 0.999 with "
        "warm-up), same budget counted the same way" if not args.no_reference
        else f"{REFERENCE}: skipped (--no-reference)",
        f"extractor: SmallCNN, {extractor.config['protocol']['epochs']:g} epochs on {train}, "
        f"{100 * extractor.test_accuracy:.2f}% test accuracy (cached as {Path(extractor.folder).name})",
        f"FID / KID / precision-recall (k={cfg.pr_k}): {cfg.num} synthetic vs {cfg.num} real test images (same "
        "class histogram); floor: as many real training images vs the same test images",
        f"near-copies: nearest-training-image RMS pixel distance < {cfg.copy_ratio:.3g} x the median for real test "
        "images (training set = the generator's own); "
        + ("kept (--keep-copies)" if args.keep_copies else "generated with --reject-copies (the same rule, the real "
           "test set as reference): each near-copy redrawn, the count shown as 'N redrawn'"),
        "sampling: generate's plain defaults (--general)" if args.general else "sampling: generate --purpose cas "
        "(full data) / augment (K-shot), each family's measured defaults for it; where that includes the classifier "
        "filter (its classifier is the extractor above, so class consistency is high by construction), the draws "
        "it threw away shown as 'filter: N redrawn'; the reference is sampled plainly",
        f"classifier (CAS, augmentation): SmallCNN, {cfg.classifier_steps} steps, batch {cfg.classifier_batch_size}, "
        f"AdamW {cfg.classifier_lr:g} cosine, classic augmentation {cfg.real_augment} of every real (and synthetic: "
        f"{cfg.augment_synthetic}) image; CAS: {args.num} synthetic vs {args.num} real, 1 seed; "
        f"augmentation: {args.seeds} seeds at the recommended mix (grid {cfg.mix_fractions} x {cfg.mix_weights} x "
        f"{cfg.mix_filters}, chosen on {cfg.validation_per_class} real labels per class outside the K set; "
        f"fallback {cfg.synthetic_fraction} / {cfg.synthetic_weight} / {cfg.synthetic_filter}), {args.num_k} "
        "synthetic samples",
        f"measured on commit {measured_on}",
        *([f"failed rows (left out): {', '.join(failed)}"] if failed else []),
    ]
    judged = goals(rows)
    print("\n".join(["", *protocol, "", *table(rows), "", *goal_lines(judged)]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(result_text({"protocol": protocol, "commit": measured_on, "goals": judged,
                                                "rows": rows, "details": details, "failed": failed},
                                               cache_root(cfg.cache)))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
