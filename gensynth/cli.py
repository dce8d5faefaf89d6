"""Command line: argument parsing only; every command calls into the modules below it.

    gensynth shard idx:/usr/share/datasets/fashion-mnist data/fashion --split train
    gensynth train configs/gan_fashion.yaml run.name=x train.steps=2000
    gensynth submit train configs/gan_fashion.yaml --nodes 2 --gpus-per-node 8 --partition p [--dry-run | --wait]
    gensynth generate runs/x data/synth/x --num 10000 --seed 0
    gensynth eval data/synth/x --real data/fashion/test --train data/fashion/train --report reports/x
    gensynth inspect data/fashion/train --verify
    gensynth inspect runs/x
    gensynth demo

Exit codes: 0 success, 2 usage or config error (one line, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing

from gensynth import __version__
from gensynth.errors import GensynthError, UsageError


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def add_dataclass_options(parser: argparse.ArgumentParser, schema: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of `schema` (SlurmOptions, GenerateOptions) but those in `skip`, its help,
    default, choices and bare value (`const`) from the field. Every flag defaults to None, so that
    config.from_values leaves the field's own default in place."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: the flag takes an int
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f" (default {default})" if default not in ("", 0, [], None) else ""
        if typing.get_origin(kind) is list:
            parser.add_argument(flag, action="append", default=None, metavar="FLAG", help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            choices = f.metadata.get("choices")
            const = f.metadata.get("const")
            parser.add_argument(flag, type=kind, default=None, choices=choices, dest=f.name,
                                nargs="?" if const is not None else None, const=const,
                                metavar=None if choices else "N" if kind is int else f.name.upper(),
                                help=f.metadata["help"] + shown)


def add_generation_arguments(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """What `gensynth generate` and `gensynth submit generate` share: the model, OUT and GenerateOptions."""
    from gensynth.generate.options import GenerateOptions

    p.add_argument("source", help="a run directory (runs/<name>) or an export directory")
    p.add_argument("out", help="output: a folder or s3://bucket/prefix (it holds the shards and manifest.json)")
    add_dataclass_options(p, GenerateOptions, skip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gensynth", description="Generative models -> synthetic training data.")
    parser.add_argument("--version", action="version", version=f"gensynth {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("shard", help="ingest a source into WebDataset shards + manifest.json",
                       description="Write SOURCE's records as OUT/<split>/<split>-000000.tar ... and manifest.json.")
    p.add_argument("source", help="idx:DIR | idx:IMAGES,LABELS | folder:DIR | hf:PATH | npz:FILE | shards:SHARD_SET")
    p.add_argument("out", help="output root: a folder or s3://bucket/prefix; the split goes in OUT/<split>/")
    p.add_argument("--split", default="train", help="split name; for idx: folders it picks train-* or t10k-* files")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--encoding", choices=("png", "npy"), default="png", help="image encoding (npy: raw, faster)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order records are written in")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete shard set")
    p.add_argument("--license", default="", help="the set's license for its manifest and README.md dataset card "
                   "(default there: unknown)")
    p.add_argument("--per-class", type=int, metavar="K", help="write only K records of every class, chosen at "
                   "random with --seed (a few-shot set: shards:data/fashion/train data/fashion-k10 --per-class 10)")
    p.add_argument("--class-names", type=_csv, help="comma-separated label names, index = label")
    p.add_argument("--image-column", default="image", help="hf: the image column")
    p.add_argument("--label-column", default="label", help="hf: the label column ('' for none)")
    p.add_argument("--image-key", help="npz: the images array (guessed when there is one N-d array)")
    p.add_argument("--label-key", help="npz: the labels array")
    p.add_argument("--resize", choices=("crop", "pad"), help="make images of varied sizes one square size: crop "
                   "(shorter side to --image-size, centre crop) or pad (longer side, black border)")
    p.add_argument("--image-size", type=int, default=0, help="the side --resize makes (default: the first image's "
                   "shorter side)")

    p = sub.add_parser("index", help="write manifest.json for WebDataset tars you already have (not rewritten)",
                       description="Read every shard of SHARDS once (count, bytes, sha256; each sample's image "
                       "header and label) and write the manifest beside them, so the set streams, trains, "
                       "generates and evaluates like one made by gensynth.")
    p.add_argument("shards", help="a brace pattern ('wds/mine-{000000..000009}.tar'), one .tar, or a folder of .tar")
    p.add_argument("--label-key", default="cls", help="where the label is: a field (default cls) or a path in "
                   "the json field (json.label); an index or a class name")
    p.add_argument("--image-key", help="the image field when it is not one of png, jpg, webp, ... (e.g. image)")
    p.add_argument("--class-names", type=_csv, help="comma-separated class names, index = label (text labels are "
                   "looked up here; default: their sorted names)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing manifest.json")
    p.add_argument("--license", default="", help="the set's license for its manifest and README.md dataset card "
                   "(default there: unknown)")

    p = sub.add_parser("train", help="train a model family from a YAML config (resumes automatically)",
                       description="Train from CONFIG with section.key=value overrides; also runs under "
                       "`accelerate launch -m gensynth train ...`. Exit 75 means: stopped by a signal after "
                       "saving a checkpoint, requeue me.")
    p.add_argument("config", help="experiment YAML, e.g. configs/gan_fashion.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=2000 run.name=x")

    p = sub.add_parser("generate", help="write synthetic shards + manifest.json from a trained model",
                       description="Draw labelled samples from RUN's export into OUT (a folder or s3://bucket/prefix) "
                       "as WebDataset shards, then manifest.json. Deterministic per shard; a rerun finishes a killed "
                       "run. Under `accelerate launch` the shards are split across the processes.")
    add_generation_arguments(p)

    p = sub.add_parser("eval", help="is a synthetic shard set any good? metrics.json + report.html",
                       description="Fidelity, diversity, memorisation and usefulness of the synthetic shard set SYNTH "
                       "against real data, with the protocol printed alongside (README, Evaluation). Options of the "
                       "protocol are the eval.* keys of gensynth/config.py; set them as eval.key=value.")
    p.add_argument("synthetic", help="the synthetic shard set (folder, s3:// prefix or manifest URL)")
    p.add_argument("overrides", nargs="*", help="eval.key=value, e.g. eval.classifier_steps=500 eval.seeds=5")
    p.add_argument("--real", required=True, help="the real TEST shard set (reference of every metric)")
    p.add_argument("--train", help="the real training shard set (feature extractor, CAS baseline, FID floor; its "
                   "images outside the K set: the recommended mix's validation split); default: the one the "
                   "generator was trained on (its manifest's provenance)")
    p.add_argument("--k-set", help="the K-per-class real set for augmentation gain (its generator must have been "
                   "trained on exactly it); default: the generator's training set when it is a --per-class subset")
    p.add_argument("--report", help="output folder for metrics.json and report.html (default reports/<SYNTH name>)")
    p.add_argument("--num", type=int, help="synthetic samples evaluated (eval.num, default 10000)")
    p.add_argument("--seed", type=int, help="seed of the evaluation (eval.seed, default 0)")
    p.add_argument("--seeds", type=int, help="seeds of the augmentation runs (eval.seeds, default 3)")
    p.add_argument("--no-cas", action="store_true", help="skip the Classification Accuracy Score (eval.cas=false)")
    p.add_argument("--inception", action="store_true", help="also the standard Inception-v3 FID/KID (needs a "
                   "locally installed TorchScript file; slow on CPU)")
    p.add_argument("--config", help="a YAML whose eval section sets the protocol (e.g. a training config)")

    p = sub.add_parser("submit", help="submit a job to SLURM through submitit (see README, SLURM)",
                       description="Submit to SLURM: one task per process, requeued on preemption and time limits.")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB")
    from gensynth.cluster import SlurmOptions

    p = jobs.add_parser("train", help="a training run over --nodes x --tasks-per-node processes",
                        description="Train CONFIG on SLURM. Each task runs the training loop with torch.distributed "
                        "set up from SLURM's environment; on SIGTERM/SIGUSR2 every rank checkpoints and the job "
                        "is requeued and resumes. Options may come before or after the overrides.")
    p.add_argument("config", help="experiment YAML, e.g. configs/gan_fashion.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=2000 run.name=x")
    add_dataclass_options(p, SlurmOptions)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and the command; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job is done (through requeues), then "
                   "print the result")

    p = jobs.add_parser("generate", help="generation as a job array: --array N tasks, then a finalizing job",
                        description="Generate on SLURM: array task i writes the shards k with k %% N == i (as "
                        "`gensynth generate ... --task i --tasks N`); a job after the array (afterany) verifies every "
                        "shard and writes manifest.json. A failed task is resubmitted alone with --task-ids.")
    add_generation_arguments(p, skip=("task", "tasks", "finalize", "overwrite"))  # the array sets them
    p.add_argument("--array", type=int, default=1, metavar="N", help="number of array tasks (default 1)")
    p.add_argument("--task-ids", type=_csv, help="submit only these tasks of the --array N (e.g. 1,3: to redo "
                   "failed ones), plus the finalizing job")
    add_dataclass_options(p, SlurmOptions)
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the array and the finalizing job are done")

    p = sub.add_parser("augment", help="one shard set of real + synthetic samples at a mix, for plain webdataset / "
                       "HF datasets readers",
                       description="Write OUT: every sample of REAL and enough of SYNTH to make the synthetic share, "
                       "interleaved; each sample's json says its source and loss weight; real samples copied byte "
                       "for byte; the manifest names both inputs by sha256.")
    p.add_argument("real", help="the real (training) shard set")
    p.add_argument("synthetic", help="the synthetic shard set (gensynth generate)")
    p.add_argument("out", help="folder or s3:// prefix of the augmented set")
    p.add_argument("--mix", help="a recommended_mix JSON written by gensynth eval (next to metrics.json): its "
                   "synthetic fraction and weight")
    p.add_argument("--synthetic-fraction", type=float, help="share of synthetic samples in OUT (default 0.5, or --mix)")
    p.add_argument("--synthetic-weight", type=float, help="loss weight recorded on synthetic samples (default 1.0, "
                   "or --mix)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in OUT")
    p.add_argument("--license", default="", help="the set's license for its manifest and README.md dataset card "
                   "(default there: unknown)")

    p = sub.add_parser("inspect", help="describe a shard set, shard, config or run directory; --verify re-hashes "
                       "every shard")
    p.add_argument("url", help="a shard set folder / s3 prefix, its manifest.json, one .tar shard, a YAML config, "
                   "or a run directory (runs/<name>)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, for a YAML config")
    p.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest: "
                   "sha256, size, tar structure, sample count, labels")

    p = sub.add_parser("demo", help="the main job end to end on Fashion-MNIST (Debian's dataset-fashion-mnist)")
    p.add_argument("--data", default="data/fashion", help="where the shards go (default data/fashion)")
    p.add_argument("--source-dir", default="/usr/share/datasets/fashion-mnist", help="the IDX files")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers for the streaming check")
    p.add_argument("--config", action="append", help="training config, e.g. configs/gan_fashion.yaml; give it "
                   "twice for stages trained in order, the last one generating: configs/vqvae_fashion.yaml then "
                   "configs/prior_fashion.yaml (make demo). Default: the built-in defaults of gensynth/config.py")
    p.add_argument("--synth", default="data/synth/demo", help="where the synthetic set goes (default data/synth/demo)")
    p.add_argument("--num-synthetic", type=int, default=10000, help="synthetic samples to generate (default 10000)")
    p.add_argument("overrides", nargs="*", help="section.key=value for the training config")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "shard":
        from gensynth.data.ingest import ingest
        from gensynth.data.sources import open_source

        source = open_source(args.source, split=args.split, image_column=args.image_column,
                             label_column=args.label_column or None, class_names=args.class_names,
                             image_key=args.image_key, label_key=args.label_key)
        ingest(source, args.out, split=args.split, shard_size=args.shard_size, encoding=args.encoding,
               seed=None if args.no_shuffle else args.seed, overwrite=args.overwrite, per_class=args.per_class,
               resize=(args.image_size, args.resize) if args.resize else None, license=args.license)
        return 0
    if args.command == "index":
        from gensynth.data.index import index_shards

        m, url = index_shards(args.shards, args.label_key, args.image_key, args.class_names, args.overwrite,
                              license=args.license)
        print(f"indexed {m.num_samples} samples in {len(m.shards)} shards, {len(m.class_histogram)} classes: {url}")
        return 0
    if args.command == "train":
        from gensynth.families import load_run_config
        from gensynth.train.loop import train

        return train(load_run_config(args.config, args.overrides))
    if args.command == "generate":
        from gensynth.config import from_values
        from gensynth.generate.job import generate, summary
        from gensynth.generate.options import GenerateOptions
        from gensynth.runtime.ranks import rank_world

        result = generate(args.source, args.out, from_values(GenerateOptions, vars(args)))
        if rank_world()[0] == 0:  # one summary under accelerate launch
            print("\n".join(summary(result)))
        return 0
    if args.command == "eval":
        from gensynth.evaluate.synthetic import default_report_dir, evaluate_synthetic, summary_lines
        from gensynth.families import load_run_config

        flags = {"eval.num": args.num, "eval.seed": args.seed, "eval.seeds": args.seeds,
                 "eval.cas": False if args.no_cas else None, "eval.inception": True if args.inception else None}
        overrides = [*args.overrides, *(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                        for k, v in flags.items() if v is not None)]
        cfg = load_run_config(args.config, overrides).eval
        report = args.report or default_report_dir(args.synthetic)
        metrics = evaluate_synthetic(args.synthetic, args.real, train=args.train, report=report, cfg=cfg,
                                     k_set=args.k_set)
        print("\n".join(summary_lines(metrics, report)))
        return 0
    if args.command == "submit" and args.job == "generate":
        from gensynth import cluster

        try:
            task_ids = [int(t) for t in args.task_ids] if args.task_ids else None
        except ValueError:
            raise UsageError(f"--task-ids {','.join(args.task_ids)}: expected task numbers, e.g. 1,3") from None
        from gensynth.config import from_values
        from gensynth.generate.options import GenerateOptions

        gen = from_values(GenerateOptions, vars(args))
        gsub = cluster.submit_generate(args.source, args.out, gen, args.array, task_ids,
                                       cluster.options_from(vars(args)), dry_run=args.dry_run)
        if args.dry_run:
            print("dry run: nothing submitted")
            print("\n".join(gsub.describe()))
            print("sbatch script of the array (written by submitit):")
            print(gsub.script, end="")
            if gsub.finalize_script:
                print("sbatch script of the finalizing job:")
                print(gsub.finalize_script, end="")
            return 0
        print("\n".join(gsub.describe()), flush=True)
        if args.wait:
            print("\n".join(cluster.wait_generation(gsub)))
        return 0
    if args.command == "submit":
        from gensynth import cluster

        opts = cluster.options_from(vars(args))
        sub = cluster.submit_train(args.config, args.overrides, opts, dry_run=args.dry_run)
        if args.dry_run:
            print("dry run: nothing submitted")
            print("\n".join(sub.describe()))
            print("sbatch script (written by submitit):")
            print(sub.script, end="")
            return 0
        print("\n".join(sub.describe()), flush=True)
        if args.wait:
            print("\n".join(cluster.result_lines(sub, cluster.wait(sub))))
        return 0
    if args.command == "augment":
        from gensynth.data.augment import augment, read_mix

        mix = read_mix(args.mix) if args.mix else {}
        given = {"synthetic_fraction": args.synthetic_fraction, "synthetic_weight": args.synthetic_weight}
        chosen = {"synthetic_fraction": 0.5, "synthetic_weight": 1.0} | mix | {k: v for k, v in given.items()
                                                                                if v is not None}
        fraction, weight = chosen["synthetic_fraction"], chosen["synthetic_weight"]
        m = augment(args.real, args.synthetic, args.out, float(fraction), float(weight), args.shard_size,
                    args.overwrite, mix_source=args.mix, license=args.license)
        print(f"augmented set: {m.provenance['real']['samples']} real + {m.provenance['synthetic']['samples']} "
              f"synthetic samples in {len(m.shards)} shards, {args.out}")
        return 0
    if args.command == "inspect":
        from gensynth.inspection import inspect

        lines, ok = inspect(args.url, verify=args.verify, overrides=args.overrides)
        print("\n".join(lines))
        return 0 if ok else 1
    if args.command == "demo":
        from gensynth.demo import run_demo

        return run_demo(args.data, args.source_dir, args.num_workers, args.config, args.overrides, args.synth,
                        args.num_synthetic)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options (`CONFIG --nodes 2 train.steps=10`); anything else is an error
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown ours
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at interpreter exit
        return code
    except BrokenPipeError:
        # `gensynth inspect ... | head`: the reader has gone. Exit quietly, with 141 (128 + SIGPIPE) as a
        # tool killed by SIGPIPE would, so `set -o pipefail` scripts see the output was cut short. stdout
        # goes to devnull so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except GensynthError as e:
        print(f"gensynth {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"gensynth {args.command}: interrupted", file=sys.stderr)
        return 130
