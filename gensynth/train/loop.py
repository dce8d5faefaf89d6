"""The training loop every model family shares, on Hugging Face Accelerate.

    gensynth train configs/gan_fashion.yaml run.name=x train.steps=2000             # one process
    accelerate launch --config_file launch/cpu-2proc.yaml -m gensynth train configs/gan_fashion.yaml
    (more in launch/README.md)

Each step: the next batch from this rank's ShardLoader (never passed to accelerator.prepare, see
gensynth/data/stream.py), the family's train_step, then ONE tiny all-reduce on which the ranks
agree whether a stop signal arrived and whether the loss went non-finite. On a signal every rank
saves a checkpoint and the process exits with REQUEUE_EXIT_CODE (75); after `max_nonfinite`
non-finite steps in a row the run rolls back to the last checkpoint (weights, optimizer, RNG; the
data stream moves on past the batches that blew up) or, if that already happened there, stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from gensynth import __version__, storage
from gensynth.config import Config, dump_yaml, to_dict
from gensynth.data.manifest import manifest_sha256
from gensynth.data.stream import ShardLoader
from gensynth.errors import GensynthError, UsageError
from gensynth.evaluate.metrics import MetricContext, check_metrics, evaluate, needs_extractor
from gensynth.export import save_export
from gensynth.families import get_family
from gensynth.families.training import DataInfo, Trainer, params_digest, reading, sync_buffers
from gensynth.imaging import to_network
from gensynth.runtime.layout import RunLayout
from gensynth.runtime.ranks import all_agree
from gensynth.runtime.signals import REQUEUE_EXIT_CODE, StopRequest
from gensynth.train.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
from gensynth.train.tracking import RunLog, Tracker, accelerate_log_with, announce, check_trackers

log = logging.getLogger("gensynth")


class TrainingDiverged(GensynthError):
    """Non-finite losses that a roll-back did not cure."""


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (x86 avx512_bf16 or AMX, Arm bf16), from its flags. Where it
    would only emulate bf16 (precision lost for no speed-up), gensynth keeps fp32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(requested: str, cpu: bool) -> str:
    """train.mixed_precision as Accelerate takes it: `auto` becomes bf16 where the device computes it (a CUDA
    GPU that supports it, a CPU with bf16 instructions), else no; a precision the device lacks is refused."""
    if not cpu:
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return requested
    if requested == "fp16":
        raise UsageError("train.mixed_precision=fp16 needs CUDA; on CPU use train.mixed_precision=bf16 (on a CPU with "
                         "bf16 instructions), auto or no")
    if requested in ("bf16", "auto") and cpu_has_bf16():
        return "bf16"
    if requested == "bf16":
        raise UsageError("train.mixed_precision=bf16 on CPU needs bf16 instructions (avx512_bf16 or amx_bf16 in "
                         "/proc/cpuinfo), which this CPU lacks (it would only emulate bf16); use "
                         "train.mixed_precision=auto or no")
    return "no"


def build_accelerator(cfg: Config) -> Accelerator:
    """The Accelerator for this config; `cpu=` is always explicit (otherwise, under a multi-process
    launch on CPU, each process would silently train alone: docs/pitfalls.md); its trackers (train.log_with)
    keep their files in the run folder."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    if t.device == "cuda" and not cuda:
        raise UsageError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    cpu = t.device == "cpu" or not cuda
    precision = resolve_precision(t.mixed_precision, cpu)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # Accelerate keeps one precision per process and refuses another; a process that trains several runs
        # (gensynth demo's stages, a test session, a user's script) starts each afresh. The process group stays.
        AcceleratorState._reset_state(reset_partial_state=False)
    run = RunLayout.of(cfg)
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=t.grad_accum,
                       log_with=accelerate_log_with(check_trackers(t.log_with), run), project_dir=str(run.root))


def data_info(loader: ShardLoader, source: str) -> DataInfo:
    """The data as a family sees it: an image shard set, or a set of arrays (a VQ-VAE's code shards) whose
    manifest provenance records the images behind them."""
    manifest = loader.manifest
    schema = manifest.schema if manifest is not None else {}
    arrays = schema.get("arrays") or {}
    image = schema.get("image") or (manifest.provenance.get("image") if arrays else None)
    if manifest is None or image is None:
        raise UsageError(f"{source}: training needs a shard set with a manifest.json that describes its images "
                         "(or, for a prior, code shards that record the images they encode); for WebDataset tars "
                         f"you already have, write one with `gensynth index '{source}'` (the tars stay as they are)")
    num_classes = manifest.num_classes or max(len(manifest.classes or []), 1)  # the loader checks labels by it
    classes = manifest.classes or [str(i) for i in range(num_classes)]
    sha256 = manifest_sha256(source)
    if "image" in schema:
        inputs, images, images_sha256 = "image", source, sha256
    else:
        if len(arrays) != 1:
            raise UsageError(f"{source}: a shard set without images must hold exactly one array to train on, "
                             f"it holds {', '.join(arrays) or 'none'}")
        behind = manifest.provenance.get("images") or {}
        inputs, images, images_sha256 = next(iter(arrays)), behind.get("train"), behind.get("manifest_sha256")
    height, width, channels = loader.image_shape if "image" in schema else (image["height"], image["width"],
                                                                             image["channels"])
    return DataInfo(height, width, channels, num_classes, classes, sha256, inputs, images, images_sha256)


def first_images(url: str, n: int, seed: int, labels: bool = False, **reading: Any):
    """The first n images (uint8 [n, C, H, W]) of a shard set in one fixed order (and their labels)."""
    images, found = [], []
    for batch in ShardLoader(url, batch_size=min(n, 500), mode="exact", rank=0, world_size=1, seed=seed,
                             decode_meta=False, **reading):
        images.append(batch["image"])
        found.append(batch["label"])
        if sum(map(len, found)) >= n:
            break
    return (torch.cat(images)[:n], torch.cat(found)[:n]) if labels else torch.cat(images)[:n]


def endless(loader: ShardLoader):
    """Batches forever: resampled mode never ends; exact mode starts the next epoch."""
    while True:
        yield from loader


def pick_checkpoint(resume: str, folder: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(folder)
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        raise UsageError(f"train.resume={resume}: not a complete checkpoint (expected a checkpoints/step-*/ "
                         "folder with a COMPLETE marker), or use auto / never")
    return path


class Run:
    """State of one training process; `run()` returns the exit code."""

    def __init__(self, cfg: Config):
        self.log_file = RunLog()  # train.log gets these lines once every check passed (open_run)
        try:
            self.setup(cfg)
        except BaseException:
            self.log_file.close()
            raise

    def setup(self, cfg: Config) -> None:
        """Everything that can refuse the run before it touches the run folder (the checkpoint's checks follow
        in run())."""
        self.cfg = cfg
        check_metrics(cfg.eval.metrics)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.acc = build_accelerator(cfg)
        announce(self.acc, cfg.train.mixed_precision)
        self.run_dir = RunLayout.of(cfg)
        self.ckpt_dir = self.run_dir.checkpoints
        self.family = get_family(cfg.model.family)
        self.family.prepare(cfg, self.acc)  # e.g. the prior's code shards, extracted once by the main process
        self.loader = ShardLoader(cfg.data.train, batch_size=cfg.train.batch_size, mode=cfg.data.mode,
                                  seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                  num_workers=cfg.data.num_workers, rank=self.acc.process_index,
                                  world_size=self.acc.num_processes,
                                  max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                                  pin_memory=self.acc.device.type == "cuda", decode_meta=False, **reading(cfg))
        self.data = data_info(self.loader, cfg.data.train)
        if self.data.inputs != self.family.inputs:
            raise UsageError(f"{cfg.data.train}: model.family={cfg.model.family} trains on '{self.family.inputs}', "
                             f"this shard set holds '{self.data.inputs}'")
        set_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        self.trainer: Trainer = self.family.trainer(cfg, self.acc, self.data)
        set_seed(cfg.run.seed, device_specific=True)  # then different noise per rank
        self.state: dict[str, Any] = {"step": 0, "nonfinite_steps": 0, "rollbacks": 0, "stops": 0, "resumes": 0,
                                      "rolled_back_at": None, "data_manifest_sha256": self.data.manifest_sha256}
        self.streak = 0
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None  # real samples for eval metrics
        self.metric_context = MetricContext(self.resolve_extractor, self.copy_reference)
        if self.acc.is_main_process and cfg.train.eval_every and needs_extractor(cfg.eval.metrics):
            self.metric_context.extractor  # noqa: B018 - resolve (train and cache on first use) before step 1
        self.acc.wait_for_everyone()
        self.data_digest = ""  # hash chain over the sample keys this rank consumed: a fingerprint of its stream
        self.samples_seen = 0

    def note_data(self, keys: list[str]) -> None:
        self.data_digest = hashlib.sha256("\n".join([self.data_digest, *keys]).encode()).hexdigest()
        self.samples_seen += len(keys)

    # -- checkpoints

    def save(self) -> Path:
        # before the buffers are averaged: tells whether the ranks kept their buffers (e.g. a VQ-VAE's
        # codebook) in sync by themselves
        local_digest = params_digest(self.trainer.modules())
        sync_buffers(self.trainer.modules())
        rank_state = {"rank": self.acc.process_index, "loader": self.loader.state_dict(),
                      "data_digest": self.data_digest, "samples_seen": self.samples_seen,
                      "params_digest": params_digest(self.trainer.modules()),
                      "params_digest_before_sync": local_digest}
        return save_checkpoint(self.acc, self.ckpt_dir, self.state["step"], self.state, rank_state,
                               self.cfg.train.keep_checkpoints, to_dict(self.cfg))

    def restore(self, path: Path, with_data: bool = True) -> None:
        trainer_state, rank_state = load_checkpoint(self.acc, path, to_dict(self.cfg))
        self.state.update(trainer_state)
        self.trainer.after_restore()
        if with_data:
            self.loader.load_state_dict(rank_state["loader"])
            self.data_digest = rank_state["data_digest"]
            self.samples_seen = rank_state["samples_seen"]

    # -- the loop

    def run(self) -> int:
        cfg, acc = self.cfg, self.acc
        tracker: Tracker | None = None
        together = False  # every rank leaves the loop at once (done, or a stop they agreed on)
        try:
            resume = pick_checkpoint(cfg.train.resume, self.ckpt_dir)
            if resume is not None:
                self.restore(resume)
                self.state["resumes"] += 1
                log.info("resumed from %s (step %d, epoch %d)", resume, self.state["step"], self.loader.epoch)
            tracker = self.open_run()
            sums: dict[str, float] = defaultdict(float)
            counted = 0
            timing = {"data": 0.0, "total": 0.0, "images": 0}
            batches = endless(self.loader)
            with StopRequest() as stop:
                while self.state["step"] < cfg.train.steps:
                    t0 = time.perf_counter()
                    result = None
                    for _ in range(cfg.train.grad_accum):
                        t_wait = time.perf_counter()
                        batch = next(batches)
                        timing["data"] += time.perf_counter() - t_wait
                        self.note_data(batch["key"])
                        inputs = self.inputs(batch)
                        labels = batch["label"].to(acc.device, non_blocking=True)
                        result = self.trainer.train_step(inputs, labels, self.state["step"])
                        timing["images"] += inputs.shape[0]
                    stop_now, nonfinite = all_agree([stop.requested, result.nonfinite], acc.device)
                    self.state["step"] += 1
                    step = self.state["step"]
                    timing["total"] += time.perf_counter() - t0
                    if nonfinite:
                        self.on_nonfinite()
                    else:
                        self.streak = 0
                        for key, value in result.metrics.items():
                            sums[key] += float(value)
                        counted += 1
                    if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                        self.log_scalars(tracker, step, sums, counted, timing)
                        sums, counted = defaultdict(float), 0
                        timing = {"data": 0.0, "total": 0.0, "images": 0}
                    if acc.is_main_process and (step % cfg.train.sample_every == 0 or step == cfg.train.steps):
                        tracker.grid(step, self.trainer.grid_name, self.trainer.sample_grid())
                    if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
                        self.evaluate(tracker, step)
                    tracker.advance(step)
                    if stop_now:
                        self.state["stops"] += 1
                        path = self.save()
                        log.warning("stop requested (%s on some rank): saved %s on every rank; exiting with %d "
                                    "so the scheduler can requeue", stop.name if stop.requested else "signal",
                                    path, REQUEUE_EXIT_CODE)
                        together = True
                        return REQUEUE_EXIT_CODE
                    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                        self.save()
                        tracker.flush()
            self.write_export()
            together = True
            return 0
        finally:
            if tracker is not None:
                tracker.close(together)
            self.log_file.close()

    def open_run(self) -> Tracker:
        """Every check passed (the checkpoint's too): now the run folder gets config.yaml, train.log and the
        trackers' files, so a refused run leaves a finished run's files as they were."""
        main = self.acc.is_main_process
        if main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            storage.write_bytes(str(self.run_dir.config), dump_yaml(self.cfg).encode())
        self.log_file.open(self.run_dir.train_log if main else None)
        return Tracker(self.acc, self.run_dir, self.cfg, self.state["step"])

    def inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """Images as float [n, C, R, R] in [-1, 1]; arrays (codes) as int64 as they are."""
        if self.family.inputs == "image":
            return to_network(batch["image"].to(self.acc.device, non_blocking=True), self.cfg.model.resolution)
        return batch[self.data.inputs].to(self.acc.device, non_blocking=True).long()

    def on_nonfinite(self) -> None:
        self.streak += 1
        self.state["nonfinite_steps"] += 1
        log.warning("step %d: non-finite loss; step skipped (%d in a row)", self.state["step"], self.streak)
        if self.streak < self.cfg.train.max_nonfinite:
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None or self.state.get("rolled_back_at") == path.name:
            raise TrainingDiverged(
                f"loss was NaN/Inf for {self.streak} steps in a row at step {self.state['step']}"
                + (f", again after rolling back to {path.name}" if path else " with no checkpoint to roll back to")
                + "; lower the learning rates (gan.lr_g / gan.lr_d), enable train.grad_clip, or check the data")
        log.warning("rolling back to %s; the data stream moves on past the batches that failed", path)
        self.restore(path, with_data=False)
        self.state["rolled_back_at"] = path.name
        self.state["rollbacks"] += 1
        self.streak = 0

    def resolve_extractor(self):
        """The feature extractor of the fid / kid / class_consistency plug-ins: eval.extractor, or the cached one
        for the training images (data.train; for a prior, the VQ-VAE's images), trained now if there is none
        (gensynth/evaluate/extractor.py)."""
        from gensynth.evaluate.extractor import resolve_extractor

        e = self.cfg.eval
        extractor = resolve_extractor(self.data.images or self.cfg.data.train, e.real_test or None, e.extractor,
                                      e.cache, e.extractor_epochs, e.seed, resize=self.loader.dataset.decode.resize)
        log.info("eval metrics use the feature extractor %s (%.2f%% real test accuracy)", extractor.folder,
                 100 * extractor.test_accuracy)
        return extractor

    def copy_reference(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """For near_copies: the training images (at most eval.copy_train_images) and up to eval.num_samples unseen
        real ones (data.test, else the extractor's test set)."""
        from gensynth.evaluate.extractor import sibling_test_set

        train_url = self.data.images or self.cfg.data.train
        unseen = self.cfg.data.test or self.cfg.eval.real_test or sibling_test_set(train_url)
        if not unseen:
            raise UsageError("eval.metrics near_copies needs unseen real images: set data.test or eval.real_test")
        return (first_images(train_url, self.cfg.eval.copy_train_images, self.cfg.run.seed, **reading(self.cfg)),
                first_images(unseen, self.cfg.eval.num_samples, self.cfg.run.seed, **reading(self.cfg)),
                self.cfg.eval.copy_ratio)

    def evaluate(self, tracker: Tracker, step: int) -> None:
        """On the main process: the eval.metrics plug-ins on fixed noise and a fixed real sample (families
        that generate), and the family's held-out figures on data.test (families that have them). With fid
        among them, the best generator so far by eval.best_by is exported to runs/<name>/best/, named in best.json."""
        if self.acc.is_main_process:
            values: dict[str, float] = {}
            if self.cfg.eval.metrics and self.trainer.generates:
                values.update(self.generated_metrics())
            figures = self.trainer.heldout_metrics(self.heldout_batches()) if self.cfg.data.test else {}
            if figures:  # heldout_batches reads data.test only when a family asks for it
                log.info("step %d held-out (%s): %s", step, self.cfg.data.test,
                         " ".join(f"{k}={v:.4g}" for k, v in figures.items()))
                values.update(figures)
            tracker.scalars(step, {f"eval/{k}": v for k, v in values.items()})
            # an export records the last figures (generate warns when they say the model copies)
            self.state["last_eval"] = {"step": step, "max_copies": self.cfg.eval.max_copies, **values}
            by, copies = self.best_metric(), values.get("near_copies", 0.0)
            if copies >= self.cfg.eval.max_copies:
                log.warning("step %d: %.1f%% of the samples are near-copies of training images (eval.max_copies "
                            "%.1f%%): not a candidate for best/", step, 100 * copies, 100 * self.cfg.eval.max_copies)
            elif by in values:
                self.keep_best(step, values, by)
        self.acc.wait_for_everyone()

    def generated_metrics(self) -> dict[str, float]:
        n = self.cfg.eval.num_samples
        if self.reference is None:
            self.reference = first_images(self.data.images or self.cfg.data.train, n, self.cfg.run.seed, True,
                                          **reading(self.cfg))
        fake_labels = torch.arange(n) % self.data.num_classes
        fake = self.trainer.generate(fake_labels, seed=self.cfg.run.seed + 1)
        return evaluate(self.cfg.eval.metrics, fake, fake_labels, *self.reference, context=self.metric_context)

    def heldout_batches(self, batch_size: int = 500):
        """(network images, labels) of the first eval.heldout_samples of data.test, in a fixed order."""
        left = self.cfg.eval.heldout_samples
        loader = ShardLoader(self.cfg.data.test, batch_size=batch_size, mode="exact", rank=0, world_size=1,
                             **reading(self.cfg),
                             seed=self.cfg.run.seed, shuffle_buffer=0, decode_meta=False)
        for batch in loader:
            if left <= 0:
                break
            images = to_network(batch["image"][:left].to(self.acc.device), self.cfg.model.resolution)
            left -= images.shape[0]
            yield images, batch["label"][:images.shape[0]].to(self.acc.device)

    def best_metric(self) -> str:
        """The eval/ value that picks the best export (eval.best_by; auto: usefulness when it runs, else fid)."""
        by = self.cfg.eval.best_by
        if by == "auto":
            return "usefulness" if "usefulness" in self.cfg.eval.metrics else "fid"
        return by

    def keep_best(self, step: int, values: dict[str, float], by: str) -> None:
        """A new best eval/<by> (lowest fid, highest usefulness): export the generator to runs/<name>/best/ and
        point best.json at it."""
        best, value = self.state.get("best"), values[by]
        if best is not None and best.get("metric") == by:  # a checkpoint of another metric's best starts afresh
            if (value >= best["value"]) if by == "fid" else (value <= best["value"]):
                return
        checkpoint = self.ckpt_dir / checkpoint_name(step)
        self.state["best"] = {"step": step, "metric": by, "value": value}
        self.write_export(self.run_dir.best)
        pointer = {"metric": f"eval/{by}", "value": value, by: value, "step": step,
                   "export": self.run_dir.relative(self.run_dir.best), "values": values,
                   "num_samples": self.cfg.eval.num_samples,
                   "extractor": str(self.metric_context.extractor.folder),
                   # the full training state at that step exists only when a checkpoint falls on it (eval_every a
                   # multiple of checkpoint_every) and has not been pruned (train.keep_checkpoints)
                   "checkpoint": self.run_dir.relative(checkpoint) if step % self.cfg.train.checkpoint_every == 0
                   or step == self.cfg.train.steps else None}
        storage.write_bytes(str(self.run_dir.best_json), (json.dumps(pointer, indent=1) + "\n").encode())
        log.info("step %d: best eval/%s so far (%.4g): generator exported to %s", step, by, value,
                 self.run_dir.best)

    def log_scalars(self, tracker: Tracker, step: int, sums: dict[str, float], counted: int,
                    timing: dict[str, float]) -> None:
        values = {k: v / max(counted, 1) for k, v in sums.items()}
        values.update(self.trainer.learning_rates())
        total = max(timing["total"], 1e-9)
        values["perf/samples_per_s"] = timing["images"] * self.acc.num_processes / total
        values["perf/data_wait_fraction"] = timing["data"] / total
        values["health/nonfinite_steps"] = self.state["nonfinite_steps"]
        values["health/corrupt_samples"] = self.loader.corrupt
        if self.acc.device.type == "cuda":  # the most this process's tensors held so far (make gpu-check reads it)
            values["perf/gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        tracker.scalars(step, values)

    def export_data(self) -> dict[str, Any]:
        """The shard set this run read (for a prior: its code shards)."""
        return {"train": self.cfg.data.train, "manifest_sha256": self.data.manifest_sha256}

    def training_data(self, export_config: dict[str, Any]) -> list[dict[str, Any]]:
        """Every set the exported model saw (gensynth.data.manifest.training_sets reads it back): the images
        first; data that is not images (code shards) as "derived" after the images behind it; then the sets
        of models bundled in the export (the family says which)."""
        own = {"train": self.cfg.data.train, "manifest_sha256": self.data.manifest_sha256,
               "model": self.cfg.model.family}
        if self.data.inputs == "image":
            sets = [{**own, "kind": "images"}]
        else:
            sets = [{"train": self.data.images, "manifest_sha256": self.data.images_manifest_sha256,
                     "model": self.cfg.model.family, "kind": "images"}, {**own, "kind": "derived"}]
        return sets + self.family.bundled_training_data(export_config)

    def write_export(self, folder: Path | None = None) -> None:
        if not self.acc.is_main_process:
            return
        folder = folder or self.run_dir.export
        tensors, config = self.trainer.export()
        config.update({"family": self.cfg.model.family, "step": self.state["step"], "run": self.cfg.run.name,
                       "seed": self.cfg.run.seed,
                       "classes": self.data.classes, "num_classes": self.data.num_classes,
                       "image": {"height": self.data.height, "width": self.data.width,
                                 "channels": self.data.channels},
                       "data": self.export_data(),
                       "training_data": self.training_data(config),
                       "last_eval": self.state.get("last_eval"),  # in-training figures, e.g. near_copies
                       "trained_with": f"gensynth {__version__}"})
        save_export(folder, tensors, config)
        log.info("export written: %s", folder)


def train(cfg: Config) -> int:
    return Run(cfg).run()
