"""`gensynth generate RUN_OR_EXPORT OUT`: a trained model -> synthetic shards + manifest.json for other teams.

    gensynth generate runs/gan_fashion data/synth/v1 --num 10000 --seed 0
    gensynth generate runs/gan_fashion s3://bucket/synth/v1 --num 1000000 --shard-size 5000
    accelerate launch --config_file launch/cpu-2proc.yaml -m gensynth generate runs/x OUT --num 100000
    gensynth generate runs/x OUT --num 1000000 --task 3 --tasks 10      # one task of a job array: its shards
    gensynth generate runs/x OUT --num 1000000 --finalize               # then the manifest, once all are in

The plan is a pure function of the arguments: the label of every sample (classes interleaved evenly, so
every shard is balanced like the whole) and the shard boundaries. Shard k's samples are drawn from a
generator seeded by (seed, k) alone, so any shard can be regenerated bit for bit, on any machine of the
same device type, by any worker; shards are dealt round-robin to the workers (processes x array tasks)
with no other coordination.

What a reader can trust: every shard is published whole (temporary name + rename; on S3 an upload on
close), then its receipt (`receipts/<shard>.json`: sha256, bytes, class counts and the job's
fingerprint). A rerun skips shards whose file matches its receipt and redoes the rest, so a killed run is
finished by running the same command again. The manifest is written last, atomically, by one writer,
after every shard is there and verified: a reader that finds it may trust every shard it lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gensynth import __version__, storage
from gensynth.config import option
from gensynth.data.codec import encode_image
from gensynth.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, manifest_url, read_manifest, write_manifest
from gensynth.data.plan import derive_seed
from gensynth.data.writer import shard_name, write_tar
from gensynth.errors import GensynthError, UsageError
from gensynth.export import CONFIG, export_folder
from gensynth.families import load_sampler
from gensynth.families.sampling import Sampler
from gensynth.progress import progress
from gensynth.runtime.faults import crash_point
from gensynth.runtime.ranks import rank_world
from gensynth.runtime.signals import REQUEUE_EXIT_CODE, StopRequest

log = logging.getLogger("gensynth")
SPLIT = "synth"
RECEIPTS = "receipts"


class IncompleteGeneration(GensynthError):
    """--finalize found shards missing or not matching their receipts."""


class GenerationStopped(GensynthError):
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2) arrived: the shard in progress was finished, the rest
    is left for a rerun. Exits with the requeue code, like training."""

    exit_code = REQUEUE_EXIT_CODE


@dataclass
class GenerateOptions:
    """How to generate: the plan, the family's sampling options, the filter and how this worker runs.
    `gensynth generate` makes one --flag per field; `gensynth submit generate` all but task, tasks,
    finalize and overwrite (the array sets those); `generate(source, out, num=...)` takes them by name."""

    num: int | None = option(None, "number of samples (balanced over the classes unless --per-class)")
    per_class: str | list | None = option(None, "counts per class (1000,0,500,...) or proportions "
                                          "(0.5,0.1,...), index = label")
    seed: int = option(0, "shard k draws from (seed, k) alone", min=0)
    shard_size: int = option(5000, "samples per shard", min=1)
    encoding: str = option("png", "image encoding", choices=("png", "npy"))
    truncation: float | None = option(None, "GAN: truncation trick threshold (0 = off)")
    temperature: float | None = option(None, "VQ-VAE prior: logits temperature; VAE: latent noise scale")
    top_k: int | None = option(None, "VQ-VAE prior: sample among the k most likely codes")
    device: str = option("auto", "where to run the model", choices=("auto", "cpu", "cuda"))
    filter_threshold: float | None = option(
        None, "keep only samples that a classifier gives their label with probability >= FILTER_THRESHOLD (0.9 when "
        "given bare); the rest are redrawn and counted in the manifest", min=0.0, max=1.0, flag="--filter", const=0.9)
    filter_classifier: str = option("", "the classifier export for --filter (default: the cached feature "
                                    "extractor of the model's training data, trained on first use)")
    task: int = option(0, "this task's index in a job array (e.g. $SLURM_ARRAY_TASK_ID)", min=0)
    tasks: int = option(1, "number of array tasks; with more than 1, no manifest is written: run --finalize "
                        "when all are done", min=1)
    finalize: bool = option(False, "only verify every shard and write the manifest")
    overwrite: bool = option(False, "replace a set made with other settings in OUT")

    def sampling(self) -> dict[str, Any]:
        """The family's sampling options that were given (the sampler fills in its defaults)."""
        return {"truncation": self.truncation, "temperature": self.temperature, "top_k": self.top_k}


# ----------------------------------------------------------------------------------------------
# the plan: counts per class, the label of every sample, shard boundaries


def class_counts(num: int | None, num_classes: int, per_class: str | list[float] | None = None) -> list[int]:
    """How many samples of each class. Default: `num` balanced over the classes (the remainder goes to
    the first classes). `per_class` is a list (or comma-separated text) of counts, which must add up to
    `num` when both are given, or of proportions (with a '.', summing to 1), rounded by largest remainder."""
    if per_class is None or per_class == "":
        if num is None or num < 1:
            raise UsageError("--num must be >= 1 (or give --per-class counts)")
        base, extra = divmod(num, num_classes)
        return [base + (c < extra) for c in range(num_classes)]
    parts = [p.strip() for p in per_class.split(",")] if isinstance(per_class, str) else list(per_class)
    if len(parts) != num_classes:
        raise UsageError(f"--per-class has {len(parts)} values, the model has {num_classes} classes")
    if all(isinstance(p, int) or (isinstance(p, str) and p.isdigit()) for p in parts):
        counts = [int(p) for p in parts]
        if num is not None and sum(counts) != num:
            raise UsageError(f"--per-class counts add up to {sum(counts)}, --num is {num}; "
                             "drop --num or make them agree")
        if sum(counts) < 1:
            raise UsageError("--per-class counts add up to 0")
        return counts
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--per-class {per_class!r}: give counts (1000,1000,...) "
                         "or proportions (0.2,0.1,...)") from None
    if any(s < 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise UsageError(f"--per-class proportions must be >= 0 and sum to 1, they sum to {sum(shares):g}")
    if num is None or num < 1:
        raise UsageError("--per-class proportions need --num")
    exact = [s * num for s in shares]
    counts = [int(e) for e in exact]
    for c in sorted(range(num_classes), key=lambda c: (counts[c] - exact[c], c))[:num - sum(counts)]:
        counts[c] += 1
    return counts


def interleaved_labels(counts: list[int]) -> np.ndarray:
    """Labels of all samples, each class spread evenly over the sequence (sample j of class c sits at
    (j + 0.5) / n_c): every stretch, hence every shard, holds the classes in the overall proportions."""
    positions = np.concatenate([(np.arange(n) + 0.5) / n for n in counts]) if counts else np.zeros(0)
    classes = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    return classes[np.lexsort((classes, positions))]


@dataclass(frozen=True)
class Job:
    """Everything the output depends on. Its fingerprint ties receipts and the manifest to one job."""

    export_weights_sha256: str
    export_config_sha256: str
    seed: int
    counts: tuple[int, ...]
    shard_size: int
    encoding: str
    options: dict[str, Any] = field(hash=False)
    filter: dict[str, Any] | None = field(default=None, hash=False)  # {"classifier_sha256", "threshold"}

    @property
    def num(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num)

    def key(self, index: int) -> str:
        return f"{SPLIT}-{index:0{max(8, len(str(self.num - 1)))}d}"


def my_shards(num_shards: int, worker: int, workers: int) -> list[int]:
    """Shards dealt round-robin: worker w of n takes k = w, w + n, w + 2n, ..."""
    return list(range(worker, num_shards, workers))


# ----------------------------------------------------------------------------------------------
# one shard


def shard_generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("generate", seed, k) % (2**63))


def receipt_url(out: str, name: str) -> str:
    return storage.join(out, RECEIPTS, name.replace(".tar", ".json"))


class SampleFilter:
    """Keep a sample only when a classifier (the evaluation's feature extractor, gensynth/evaluate/)
    gives its intended label a probability of at least `threshold`."""

    MAX_ROUNDS = 50  # redraws of the rejected samples before a shard gives up

    def __init__(self, classifier: Any, threshold: float, describe: dict[str, Any]):
        if not 0 < threshold < 1:
            raise UsageError(f"--filter-threshold {threshold}: must be between 0 and 1")
        self.model = classifier.eval()
        self.threshold = threshold
        self.describe = describe

    @torch.no_grad()
    def scores(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Probability of each sample's own label, for uint8 [n, C, H, W] images (fixed chunks of 256)."""
        out = []
        for i in range(0, len(images), 256):
            logits = self.model(self.model.normalize(images[i:i + 256]))
            out.append(logits.softmax(1).gather(1, labels[i:i + 256, None]).squeeze(1))
        return torch.cat(out) if out else torch.empty(0)


def load_filter(classifier: str, train_url: str | None, threshold: float, cache: str = "") -> SampleFilter:
    """The classifier export named, or the cached feature extractor of the model's training data."""
    from gensynth.evaluate.extractor import load_extractor, resolve_extractor

    if classifier:
        extractor = load_extractor(classifier)
    else:
        if not train_url or not storage.exists(manifest_url(train_url)):
            raise UsageError(f"--filter needs a classifier: the export's training data {train_url!r} is not "
                             "reachable from here to find or train one; name one with --filter-classifier")
        extractor = resolve_extractor(train_url, cache=cache)
    describe = {"classifier_sha256": extractor.config.get("weights_sha256"), "threshold": threshold,
                "classifier_test_accuracy": extractor.test_accuracy,
                "classifier_trained_on": extractor.config.get("data", {}).get("manifest_sha256")}
    return SampleFilter(extractor.model, threshold, describe)


def draw_shard(sampler: Sampler, job: Job, labels: np.ndarray, k: int,
               keep: SampleFilter | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Shard k's images (uint8 n x H x W x C), labels, filter scores (or None) and drops per class: a
    function of (export, job, k) alone. With a filter, rejected samples are redrawn (for the same labels,
    from the same generator) until every place is filled."""
    lo, hi = job.shard_range(k)
    shard_labels = torch.from_numpy(labels[lo:hi])
    generator = shard_generator(job.seed, k)
    images = sampler.sample(shard_labels, generator, job.options)
    dropped = np.zeros(sampler.num_classes, dtype=np.int64)
    if keep is None:
        return images.permute(0, 2, 3, 1).numpy(), shard_labels.numpy(), None, dropped
    scores = keep.scores(images, shard_labels)
    for _ in range(keep.MAX_ROUNDS):
        rejected = (scores < keep.threshold).nonzero().squeeze(1)
        if len(rejected) == 0:
            break
        dropped += np.bincount(shard_labels[rejected].numpy(), minlength=sampler.num_classes)
        redrawn = sampler.sample(shard_labels[rejected], generator, job.options)
        images[rejected] = redrawn
        scores[rejected] = keep.scores(redrawn, shard_labels[rejected])
    else:
        short = sorted({sampler.classes[int(c)] for c in shard_labels[scores < keep.threshold]})
        raise GensynthError(f"shard {k}: after {keep.MAX_ROUNDS} redraws some samples of {', '.join(short)} still "
                            f"score below --filter-threshold {keep.threshold}; the model rarely makes that class "
                            "recognisably: lower the threshold or improve the model")
    return images.permute(0, 2, 3, 1).numpy(), shard_labels.numpy(), scores.numpy(), dropped


def write_shard(sampler: Sampler, job: Job, k: int, images: np.ndarray, labels: np.ndarray,
                scores: np.ndarray | None, dropped: np.ndarray, out: str) -> dict[str, Any]:
    """Encode shard k, publish it whole, then its receipt; return the receipt."""
    lo, _ = job.shard_range(k)
    meta_common = {"family": sampler.family, "export_sha256": job.export_weights_sha256, "seed": job.seed,
                   "shard": k, "options": job.options}

    def samples():
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            if i == len(labels) // 2:
                crash_point("generate.write")  # the shard's temporary file is half written
            meta = {**meta_common, "index": lo + i, "class": sampler.classes[label]}
            if scores is not None:
                meta["score"] = round(float(scores[i]), 6)  # the filter classifier's probability of the label
            yield job.key(lo + i), {job.encoding: encode_image(image, job.encoding),
                                    "cls": str(label).encode("ascii"),
                                    "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}

    name = shard_name(SPLIT, k)
    info = write_tar(storage.join(out, name), samples())
    counts = np.bincount(labels, minlength=sampler.num_classes)
    receipt = {**asdict(info), "shard": k, "class_counts": {str(c): int(n) for c, n in enumerate(counts) if n},
               "dropped": {str(c): int(n) for c, n in enumerate(dropped) if n}, "job": job.fingerprint()}
    storage.write_bytes(receipt_url(out, name), json.dumps(receipt, sort_keys=True).encode(), "write receipt")
    return receipt


def read_receipt(out: str, name: str) -> dict[str, Any] | None:
    url = receipt_url(out, name)
    if not storage.exists(url):
        return None
    try:
        return json.loads(storage.read_bytes(url))
    except ValueError:
        return None  # a receipt is written atomically; an unreadable one is treated as absent


def shard_is_done(out: str, name: str, job: Job, verify: bool = True) -> dict[str, Any] | None:
    """The shard's receipt when the shard is there and matches it (sha256 re-checked when `verify`)."""
    receipt = read_receipt(out, name)
    if receipt is None or receipt.get("job") != job.fingerprint():
        return None
    url = storage.join(out, name)
    if not storage.exists(url):
        return None
    if verify:
        digest, size = storage.sha256_of(url)
        if (digest, size) != (receipt["sha256"], receipt["bytes"]):
            log.warning("%s does not match its receipt (sha256 %s..., %d bytes): regenerating it",
                        url, digest[:12], size)
            return None
    return receipt


# ----------------------------------------------------------------------------------------------
# the job


@dataclass
class Result:
    out: str
    generated: int = 0  # shards drawn by this worker in this run
    skipped: int = 0  # shards of this worker already complete
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    manifest: Manifest | None = None
    finalized_only: bool = False  # --finalize: verified the shards and wrote the manifest, drew nothing

    def add(self, receipt: dict[str, Any]) -> None:
        self.generated += 1
        self.samples += receipt["samples"]
        self.bytes += receipt["bytes"]

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def training_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the model learnt from: {"train", "manifest_sha256"} of its training images. A prior trains on code
    shards: then the images behind them, with "codes" (the code shards) and "vqvae" (the VQ-VAE's own
    training set), so that memorisation and the K-shot check look at every image the model saw."""
    data = cfg.get("data", {})
    entry = {"train": data.get("train"), "manifest_sha256": data.get("manifest_sha256")}
    if data.get("images"):
        entry = {**data["images"], "codes": entry}
    vqvae_data = (cfg.get("vqvae") or {}).get("data")
    if vqvae_data:
        entry["vqvae"] = {"train": vqvae_data.get("train"), "manifest_sha256": vqvae_data.get("manifest_sha256")}
    return entry


def provenance(sampler: Sampler, job: Job, source: str, dropped: np.ndarray) -> dict[str, Any]:
    cfg = sampler.config
    kept = None if job.filter is None else {**job.filter, "dropped": int(dropped.sum()),
                                            "dropped_per_class": {str(c): int(n) for c, n in enumerate(dropped) if n}}
    return {"kind": "generate", "family": sampler.family,
            "export": {"path": str(source), "weights_sha256": job.export_weights_sha256,
                       "config_sha256": job.export_config_sha256, "run": cfg.get("run"), "step": cfg.get("step")},
            "training_data": training_data(cfg),
            "seed": job.seed, "num": job.num, "per_class": {str(c): n for c, n in enumerate(job.counts)},
            "shard_size": job.shard_size, "encoding": job.encoding, "options": job.options, "filter": kept,
            "fingerprint": job.fingerprint(), "gensynth_version": __version__}


def check_out(out: str, job: Job, overwrite: bool) -> None:
    """Refuse to mix two different jobs in one OUT; with overwrite, clear the old one (manifest first)."""
    fingerprint = job.fingerprint()
    if storage.exists(manifest_url(out)):
        same = read_manifest(out).provenance.get("fingerprint") == fingerprint
        what = "a finished shard set made with other settings"
    else:
        names = [n for n in storage.listdir(storage.join(out, RECEIPTS)) if n.endswith(".json")][:100]
        same = all((read_receipt(out, n.replace(".json", ".tar")) or {}).get("job", fingerprint) == fingerprint
                   for n in names)
        what = "an unfinished generation with other settings (rerun it with its own arguments to finish it)"
    if same:
        return
    if not overwrite:
        raise UsageError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another OUT")
    log.info("--overwrite: removing the previous set in %s", out)
    storage.remove(manifest_url(out))
    for name in storage.listdir(storage.join(out, RECEIPTS)):
        storage.remove(storage.join(out, RECEIPTS, name))
    for name in storage.listdir(out):
        if name.startswith(f"{SPLIT}-") and name.endswith(".tar"):
            storage.remove(storage.join(out, name))


def finalize(out: str, sampler: Sampler, job: Job, source: str) -> Manifest:
    """Verify every shard against its receipt, then write the manifest (atomically, last)."""
    shards, histogram, missing = [], np.zeros(sampler.num_classes, dtype=np.int64), []
    dropped = np.zeros(sampler.num_classes, dtype=np.int64)
    for k in progress(range(job.num_shards), total=job.num_shards, desc="verify", unit="shards"):
        name = shard_name(SPLIT, k)
        receipt = shard_is_done(out, name, job)
        if receipt is None:
            missing.append(name)
            continue
        shards.append(ShardInfo(name, receipt["samples"], receipt["bytes"], receipt["sha256"]))
        for c, n in receipt["class_counts"].items():
            histogram[int(c)] += n
        for c, n in receipt.get("dropped", {}).items():
            dropped[int(c)] += n
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IncompleteGeneration(f"{out}: {len(missing)} of {job.num_shards} shards are missing or do not match "
                                   f"their receipts ({shown}); run the generation (or the array tasks that own "
                                   "them) again with the same arguments, then --finalize")
    h, w, c = sampler.height, sampler.width, sampler.channels
    schema = {"key": "str", "image": {"field": job.encoding, "encoding": job.encoding, "height": h, "width": w,
                                      "channels": c, "dtype": "uint8"}, "cls": "int", "json": "object"}
    manifest = Manifest(split=SPLIT, shards=shards, schema=schema,
                        class_histogram={str(k): int(n) for k, n in enumerate(histogram) if n},
                        classes=list(sampler.classes), provenance=provenance(sampler, job, source, dropped))
    write_manifest(out, manifest)
    return manifest


def build_job(sampler: Sampler, source: str, opts: GenerateOptions, keep: SampleFilter | None = None) -> Job:
    shard_size, encoding, seed = opts.shard_size, opts.encoding, opts.seed
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be >= 1")
    if encoding not in ("png", "npy"):
        raise UsageError(f"--encoding {encoding!r}: use png or npy")
    if seed < 0:
        raise UsageError(f"--seed {seed}: must be >= 0")
    folder = export_folder(source)
    config_sha = hashlib.sha256((Path(folder) / CONFIG).read_bytes()).hexdigest()
    counts = class_counts(opts.num, sampler.num_classes, opts.per_class)
    return Job(sampler.config["weights_sha256"], config_sha, seed, tuple(counts), shard_size, encoding,
               sampler.resolve_options(opts.sampling()), keep.describe if keep else None)


def pick_device(device: str, local_rank: int) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is visible; use --device auto or cpu")
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def generate(source: str, out: str, opts: GenerateOptions | None = None, **fields: Any) -> Result:
    """Write this worker's shards of the job (and the manifest, when this worker is the only one, or rank 0
    of a process group with a single task). Returns what was done. `fields` are GenerateOptions fields by
    name, over `opts`. With `filter_threshold`, only samples that the classifier (`filter_classifier`, or
    the cached feature extractor of the model's training data) gives their label with at least that
    probability are kept; the rest are redrawn and counted."""
    opts = dataclasses.replace(opts or GenerateOptions(), **fields)
    task, tasks, overwrite = opts.task, opts.tasks, opts.overwrite
    if not 0 <= task < tasks:
        raise UsageError(f"--task {task} of --tasks {tasks}: need 0 <= task < tasks")
    rank, world = rank_world()
    out = str(out).rstrip("/")
    sampler = load_sampler(source, device=pick_device(opts.device, int(os.environ.get("LOCAL_RANK", rank))))
    keep = None
    if opts.filter_threshold is not None:
        keep = load_filter(opts.filter_classifier, sampler.config.get("data", {}).get("train"), opts.filter_threshold)
    job = build_job(sampler, source, opts, keep)
    result = Result(out)
    if opts.finalize:
        result.manifest = finalize(out, sampler, job, source)
        result.finalized_only = True
        return result
    if overwrite and tasks > 1:
        raise UsageError("--overwrite with --tasks > 1 would let one task clear what another is writing; "
                         "clear OUT first (or run once with --overwrite and --tasks 1)")
    if rank == 0:
        check_out(out, job, overwrite)
    for folder in (out, storage.join(out, RECEIPTS)):  # temporary files of killed runs (storage.is_debris)
        storage.remove_debris(folder)
    group = _process_group(world)
    if group:
        torch.distributed.barrier()  # rank 0 has cleared OUT (with --overwrite) before anyone writes
    if storage.exists(manifest_url(out)) and read_manifest(out).provenance.get("fingerprint") == job.fingerprint():
        log.info("%s is already complete (%s): nothing to do", out, MANIFEST_NAME)
        result.manifest = read_manifest(out)
        return result
    labels = interleaved_labels(list(job.counts))
    worker, workers = task * world + rank, tasks * world
    mine = my_shards(job.num_shards, worker, workers)
    log.info("generating %d of %d shards (%d samples each, worker %d of %d) from a %s export into %s",
             len(mine), job.num_shards, job.shard_size, worker, workers, sampler.family, out)
    start = time.perf_counter()
    # On a GPU, draw shard k+1 while a thread encodes and writes shard k. On the CPU the model's threads
    # already use every core, and a writer thread beside them stalls their parallel regions: write inline.
    overlap = sampler.device.type == "cuda"
    with StopRequest() as stop, ThreadPoolExecutor(max_workers=1, thread_name_prefix="gensynth-write") as writer:
        pending: Future | None = None
        for k in progress(mine, total=len(mine), desc="generate", unit="shards"):
            if stop.requested:
                break
            if shard_is_done(out, shard_name(SPLIT, k), job) is not None:
                result.skipped += 1
                continue
            images, shard_labels, scores, dropped = draw_shard(sampler, job, labels, k, keep)
            if pending is not None:
                result.add(pending.result())
                pending = None
            if overlap:
                pending = writer.submit(write_shard, sampler, job, k, images, shard_labels, scores, dropped, out)
            else:
                result.add(write_shard(sampler, job, k, images, shard_labels, scores, dropped, out))
        if pending is not None:
            result.add(pending.result())
    result.seconds = time.perf_counter() - start
    if stop.requested:
        raise GenerationStopped(f"stopped by {stop.name} after {result.generated} new shards ({result.skipped} "
                                "were already there); every finished shard is kept: rerun the same command to "
                                "finish the rest")
    if group:
        torch.distributed.barrier()
    if tasks == 1 and rank == 0:
        result.manifest = finalize(out, sampler, job, source)
    if group:
        torch.distributed.barrier()
    return result


def _process_group(world: int) -> bool:
    """Join the launcher's process group (gloo: it only carries barriers) when there are several processes."""
    if world <= 1:
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return True


def summary(result: Result) -> list[str]:
    """The closing lines: what was done, and how a consumer reads the set."""
    if result.finalized_only:
        lines = ["every shard is there and matches its receipt: manifest written"]
    elif result.generated:
        lines = [f"generated {result.samples} samples in {result.generated} shards "
                 f"({result.bytes / 1e6:.1f} MB) at {result.samples_per_s:,.0f} samples/s"
                 + (f"; {result.skipped} shards were already complete" if result.skipped else "")]
    else:
        lines = [f"nothing to generate: {result.skipped} shards were already complete" if result.skipped
                 else "nothing to generate: the set was already complete"]
    m = result.manifest
    if m is None:
        return [*lines, "no manifest yet: when every task is done, run the same command with --finalize"]
    pattern = storage.join(result.out, f"{SPLIT}-{{000000..{len(m.shards) - 1:06d}}}.tar")
    return [*lines,
            f"synthetic set: {m.num_samples} samples in {len(m.shards)} shards, {m.num_bytes / 1e6:.1f} MB, "
            f"manifest {manifest_url(result.out)}",
            "read it with:",
            f"  gensynth inspect {result.out} --verify",
            f"  webdataset.WebDataset('{pattern}').decode('pil')",
            f"  datasets.load_dataset('webdataset', data_files='{storage.join(result.out, '*.tar')}', split='train')",
            f"  gensynth.data.ShardLoader('{result.out}', batch_size=128)"]
