"""The job: this worker's shards, the check of OUT, the verification and the manifest (finalize)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gensynth import __version__, storage
from gensynth.data.card import publish
from gensynth.data.codec import SOFT_ARRAY
from gensynth.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, manifest_url, read_manifest
from gensynth.data.writer import set_manifest, shard_name
from gensynth.errors import GensynthError, UsageError
from gensynth.evaluate.filter import CopyFilter, SampleFilter, load_copy_filter, load_filter
from gensynth.evaluate.teacher import Teacher, load_teacher
from gensynth.families import load_sampler
from gensynth.families.sampling import Sampler
from gensynth.generate.options import GenerateOptions
from gensynth.generate.plan import SPLIT, Job, build_job, interleaved_labels, my_shards
from gensynth.generate.shards import (
    RECEIPT_FOLDERS,
    RECEIPTS,
    SetInfo,
    ShardDraft,
    draw_shard,
    move_old_receipts,
    read_receipt,
    receipt_names,
    shard_is_done,
    write_shard,
)
from gensynth.progress import progress
from gensynth.runtime.ranks import leave_together, rank_world
from gensynth.runtime.signals import REQUEUE_EXIT_CODE, STOP_SIGNALS, StopRequest

log = logging.getLogger("gensynth")

# equal in most receipts of one job
SHARED_RECEIPT_PARTS = ("schema", "class_counts", "dropped", "copies_rejected", "job")


class IncompleteGeneration(GensynthError):
    """--finalize found shards missing or not matching their receipts."""


class GenerationStopped(GensynthError):
    """A stop signal (SIGTERM, SIGUSR1, SIGUSR2) arrived: the shard in progress was finished, the rest
    is left for a rerun. Exits with the requeue code, like training."""

    exit_code = REQUEUE_EXIT_CODE


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
    # receipts of the shards this run wrote (hashed as written) or found complete (re-hashed): finalize
    # trusts them instead of reading those shards back
    receipts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # the parts that most receipts of a job share (schema, class counts, job fingerprint), one object each:
    # a receipt then costs about 1 KB in memory instead of 3 (10^5 shards in one process: 100 MB, not 300)
    _shared: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict, repr=False)

    def add(self, receipt: dict[str, Any]) -> None:
        self.generated += 1
        self.samples += receipt["samples"]
        self.bytes += receipt["bytes"]
        self.keep(receipt)

    def keep(self, receipt: dict[str, Any]) -> None:
        """Remember a shard's receipt for the manifest, its shared parts stored once."""
        for part in SHARED_RECEIPT_PARTS:
            if part in receipt:
                value = receipt[part]
                key = (part, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
                receipt[part] = self._shared.setdefault(key, value)
        self.receipts[receipt["name"]] = receipt

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def provenance(sampler: Sampler, job: Job, source: str, dropped: np.ndarray, purpose: str = "general",
               teacher: Teacher | None = None, license: str = "", copied: np.ndarray | None = None,
               novel: CopyFilter | None = None) -> dict[str, Any]:
    cfg = sampler.config
    kept = None if job.filter is None else {**job.filter, "dropped": int(dropped.sum()),
                                            "dropped_per_class": {str(c): int(n) for c, n in enumerate(dropped) if n}}
    # only a relabelled set names its teacher: a set without soft labels keeps the manifest bytes it always had
    extra = {} if teacher is None else {"relabel": teacher.describe()}
    extra.update({"license": license} if license else {})  # likewise a set without a --license
    if novel is not None:  # ... or without --reject-copies
        copied = np.zeros_like(dropped) if copied is None else copied
        extra["reject_copies"] = {**novel.describe, "rejected": int(copied.sum()),
                                  "rejected_per_class": {str(c): int(n) for c, n in enumerate(copied) if n}}
    return {**extra, "kind": "generate", "family": sampler.family,
            "export": {"path": str(source), "weights_sha256": job.export_weights_sha256,
                       "config_sha256": job.export_config_sha256, "run": cfg.get("run"), "step": cfg.get("step")},
            "training_data": cfg.get("training_data") or [],  # every set the model saw
            "seed": job.seed, "num": job.num, "per_class": {str(c): n for c, n in enumerate(job.counts)},
            "shard_size": job.shard_size, "encoding": job.encoding, "options": job.options, "filter": kept,
            "purpose": purpose,
            "fingerprint": job.fingerprint(), "gensynth_version": __version__}


def warn_if_copying(sampler: Sampler, source: str, rejecting: bool = False) -> None:
    """Say so when the export's own in-training evaluation found its samples copying training images."""
    last = sampler.config.get("last_eval") or {}
    copies, limit = last.get("near_copies"), last.get("max_copies", 0.01)
    if isinstance(copies, (int, float)) and copies >= limit:
        log.warning("this model copies its training images: at step %s, %.1f%% of its samples were near-copies "
                    "(the limit is %.1f%%); %s", last.get("step"), 100 * copies, 100 * limit,
                    "--reject-copies redraws each of them" if rejecting else
                    "the synthetic set may publish them. Pass --reject-copies to redraw them, generate from the "
                    "run's best/ export (chosen among evaluations below the limit) or train with fewer steps")


def check_out(out: str, job: Job, overwrite: bool) -> None:
    """Refuse to mix two different jobs in one OUT; with overwrite, clear the old one (manifest first)."""
    fingerprint = job.fingerprint()
    if storage.exists(manifest_url(out)):
        same = read_manifest(out).provenance.get("fingerprint") == fingerprint
        what = "a finished shard set made with other settings"
    else:
        names = receipt_names(out)[:100]
        same = all((read_receipt(out, n.replace(".json", ".tar")) or {}).get("job", fingerprint) == fingerprint
                   for n in names)
        what = "an unfinished generation with other settings (rerun it with its own arguments to finish it)"
    if same:
        return
    if not overwrite:
        raise UsageError(f"{out} already holds {what}; pass --overwrite to replace it, or choose another OUT")
    log.info("--overwrite: removing the previous set in %s", out)
    storage.remove(manifest_url(out))
    for folder in RECEIPT_FOLDERS:
        for name in storage.listdir(storage.join(out, folder)):
            storage.remove(storage.join(out, folder, name))
    for name in storage.listdir(out):
        if name.startswith(f"{SPLIT}-") and name.endswith(".tar"):
            storage.remove(storage.join(out, name))


FINALIZE_THREADS = 16  # shards verified at once by --finalize (storage round trips, hashing releases the GIL)


def finalize(out: str, sampler: Sampler, job: Job, source: str, purpose: str = "general",
             teacher: Teacher | None = None, license: str = "",
             known: dict[str, dict[str, Any]] | None = None, novel: CopyFilter | None = None) -> Manifest:
    """Verify every shard against its receipt, then write the manifest (atomically, last). `known`: the
    receipts of shards this process wrote or verified itself in this run, by name, taken as they are (reading
    them back would cost a second pass over the whole set: on S3, a download of it)."""
    shards, histogram, missing, schemas = [], np.zeros(sampler.num_classes, dtype=np.int64), [], []
    dropped = np.zeros(sampler.num_classes, dtype=np.int64)
    copied = np.zeros(sampler.num_classes, dtype=np.int64)
    names = [shard_name(SPLIT, k) for k in range(job.num_shards)]
    # on S3 each check is round trips (receipt, shard): a bounded pool keeps FINALIZE_THREADS in flight
    with ThreadPoolExecutor(max_workers=FINALIZE_THREADS, thread_name_prefix="gensynth-verify") as pool:
        known = known or {}
        receipts = pool.map(lambda name: known.get(name) or shard_is_done(out, name, job), names)
        checked = list(progress(zip(names, receipts), total=len(names), desc="verify", unit="shards"))
    for name, receipt in checked:
        if receipt is None:
            missing.append(name)
            continue
        shards.append(ShardInfo(name, receipt["samples"], receipt["bytes"], receipt["sha256"]))
        schemas.append(receipt["schema"])
        for c, n in receipt["class_counts"].items():
            histogram[int(c)] += n
        for c, n in receipt.get("dropped", {}).items():
            dropped[int(c)] += n
        for c, n in receipt.get("copies_rejected", {}).items():
            copied[int(c)] += n
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise IncompleteGeneration(f"{out}: {len(missing)} of {job.num_shards} shards are missing or do not match "
                                   f"their receipts ({shown}); run the generation (or the array tasks that own "
                                   "them) again with the same arguments, then --finalize")
    if any(schema != schemas[0] for schema in schemas):  # one job, one kind of sample: never expected
        raise IncompleteGeneration(f"{out}: its shards' receipts disagree on the samples' schema; rerun the "
                                   "generation with --overwrite")
    manifest = set_manifest(SPLIT, shards, schemas[0], dict(enumerate(histogram.tolist())), list(sampler.classes),
                            provenance(sampler, job, source, dropped, purpose, teacher, license, copied, novel))
    publish(out, manifest)
    return manifest


def pick_device(device: str, local_rank: int) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is visible; use --device auto or cpu")
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def job_filter(sampler: Sampler, opts: GenerateOptions) -> SampleFilter | None:
    """The classifier filter of --filter, or else the one --purpose sets for this family (its measured
    threshold); --filter 0 draws without one."""
    given = opts.filter_threshold is not None
    threshold = opts.filter_threshold if given else sampler.purpose_filter(opts.purpose)
    if not threshold:  # None: no filter measured for the purpose; 0: --filter 0
        return None
    try:
        return load_filter(opts.filter_classifier, sampler.config, threshold)
    except UsageError as e:
        if given:
            raise
        raise UsageError(f"--purpose {opts.purpose} keeps only the samples that a classifier recognises (threshold "
                         f"{threshold:g}, measured best for a {sampler.family} set): {e}; or draw without it: "
                         "--filter 0") from None


def generate(source: str, out: str, opts: GenerateOptions | None = None, **fields: Any) -> Result:
    """Write this worker's shards of the job (and the manifest, when this worker is the only one, or rank 0
    of a process group with a single task). Returns what was done. `fields` are GenerateOptions fields by
    name, over `opts`. With `filter_threshold`, only samples that the classifier (`filter_classifier`, or
    the cached feature extractor of the model's training data) gives their label with at least that
    probability are kept; the rest are redrawn and counted. With `relabel`, every sample also stores the
    class probabilities of a teacher trained only on the generator's training set (evaluate/teacher.py)."""
    opts = dataclasses.replace(opts or GenerateOptions(), **fields)
    task, tasks, overwrite = opts.task, opts.tasks, opts.overwrite
    if not 0 <= task < tasks:
        raise UsageError(f"--task {task} of --tasks {tasks}: need 0 <= task < tasks")
    rank, world = rank_world()
    out = str(out).rstrip("/")
    sampler = load_sampler(source, device=pick_device(opts.device, int(os.environ.get("LOCAL_RANK", rank))))
    keep = job_filter(sampler, opts)
    if not opts.relabel and (opts.relabel_teacher or opts.relabel_test):
        raise UsageError("--relabel-teacher and --relabel-test only apply with --relabel")
    teacher = load_teacher(opts.relabel_teacher, sampler.config, opts.relabel_test) if opts.relabel else None
    if opts.copy_reference and not opts.reject_copies:
        raise UsageError("--copy-reference only applies with --reject-copies")
    novel = load_copy_filter(sampler.config, opts.copy_reference) if opts.reject_copies else None
    job = build_job(sampler, source, opts, keep, teacher, novel)
    result = Result(out)
    warn_if_copying(sampler, source, opts.reject_copies)
    if opts.finalize:
        result.manifest = finalize(out, sampler, job, source, opts.purpose, teacher, opts.license, novel=novel)
        result.finalized_only = True
        return result
    if overwrite and tasks > 1:
        raise UsageError("--overwrite with --tasks > 1 would let one task clear what another is writing; "
                         "clear OUT first (or run once with --overwrite and --tasks 1)")
    if rank == 0:
        check_out(out, job, overwrite)
        if move_old_receipts(out):
            log.info("moved the receipts of the unfinished run in %s to %s/", out, RECEIPTS)
    # temporary files of killed runs (storage.is_debris)
    for folder in (out, *(storage.join(out, f) for f in RECEIPT_FOLDERS)):
        storage.remove_debris(folder)
    group = _process_group(world)
    if group:
        torch.distributed.barrier()  # rank 0 has cleared OUT (with --overwrite) before anyone writes
    if storage.exists(manifest_url(out)) and read_manifest(out).provenance.get("fingerprint") == job.fingerprint():
        log.info("%s is already complete (%s): nothing to do", out, MANIFEST_NAME)
        result.manifest = read_manifest(out)
        _leave(group)
        return result
    labels = interleaved_labels(list(job.counts))
    worker, workers = task * world + rank, tasks * world
    mine = my_shards(job.num_shards, worker, workers)
    log.info("generating %d of %d shards (%d samples each, worker %d of %d) from a %s export into %s",
             len(mine), job.num_shards, job.shard_size, worker, workers, sampler.family, out)
    start = time.perf_counter()
    info = SetInfo.of(sampler)
    on_gpu = sampler.device.type == "cuda"
    writers = opts.writers or ((os.cpu_count() or 1) if on_gpu else 1)
    # With writer processes, each encodes and writes whole shards on its own core while the model draws the
    # next. With one writer on a GPU, a thread encodes and writes shard k while shard k+1 is drawn. On the CPU
    # the model's threads already use every core, and a writer beside them stalls their parallel regions: the
    # shard is written after it is drawn (encoding on every core ahead of the writing), and only its
    # publication (fsync, rename, receipt: waits on storage) overlaps the drawing of the next.
    overlap = on_gpu
    with StopRequest() as stop, ThreadPoolExecutor(max_workers=1, thread_name_prefix="gensynth-write") as writer, \
            writer_processes(writers, on_gpu) as pool:
        pending: deque[Future] = deque()
        for k in progress(mine, total=len(mine), desc="generate", unit="shards"):
            if stop.requested:
                break
            done = shard_is_done(out, shard_name(SPLIT, k), job)
            if done is not None:
                result.skipped += 1
                result.keep(done)
                continue
            images, shard_labels, scores, dropped, copied = draw_shard(sampler, job, labels, k, keep, novel)
            soft = None if teacher is None else teacher.probabilities(torch.from_numpy(images).permute(0, 3, 1, 2))
            if pool is not None:  # each writer holds one shard; one more waits, drawn
                pending.append(pool.submit(write_shard, info, job, k, images, shard_labels, scores, dropped, out,
                                           soft, 1, copied))
                while len(pending) > writers:
                    result.add(pending.popleft().result())
                continue
            if overlap:
                while pending:
                    result.add(pending.popleft().result())
                pending.append(writer.submit(write_shard, info, job, k, images, shard_labels, scores, dropped, out,
                                             soft, None, copied))
                continue
            draft = ShardDraft(info, job, k, images, shard_labels, scores, dropped, out, soft, copied=copied).write()
            try:
                while pending:  # shard k-1 was published (a wait on storage) while shard k was written
                    result.add(pending.popleft().result())
            except BaseException as e:  # shard k-1 failed (a full disk): shard k is not left half done
                draft.abort(e)
                raise
            pending.append(writer.submit(draft.publish))
        while pending:
            result.add(pending.popleft().result())
    result.seconds = time.perf_counter() - start
    if stop.requested:
        raise GenerationStopped(f"stopped by {stop.name} after {result.generated} new shards ({result.skipped} "
                                "were already there); every finished shard is kept: rerun the same command to "
                                "finish the rest")
    if group:
        torch.distributed.barrier()
    if tasks == 1 and rank == 0:
        result.manifest = finalize(out, sampler, job, source, opts.purpose, teacher, opts.license, result.receipts,
                                   novel)
    _leave(group)  # the others wait for rank 0's manifest
    return result


def _writer_process_init() -> None:
    torch.set_num_threads(1)
    for sig in (*STOP_SIGNALS, signal.SIGINT):  # the job decides when to stop; a writer finishes its shard
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def writer_processes(writers: int, spare_cores: bool = False) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `writers` forked processes that encode and write shards (None for one writer: this process).
    `spare_cores`: this process's torch threads keep to the cores the writers leave (a GPU sampler's process
    draws little on the CPU)."""
    if writers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=writers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_writer_process_init)
    # the writers take a core each: torch's threads here would wait on the cores they hold (and spin while
    # waiting), costing more than the little drawing they speed up (bench/generate.py --fast: 0.70 -> 0.83).
    # A CPU sampler keeps its threads: there the drawing is the work.
    threads = torch.get_num_threads()
    if spare_cores:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - writers))
    try:
        yield pool
    except BrokenProcessPool:
        raise GensynthError("a shard writer process died (killed, or out of memory); every finished shard is "
                            "kept: rerun the same command to finish the rest (or use --writers 1)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _process_group(world: int) -> str:
    """Join the launcher's process group (gloo: it only carries barriers) when there are several processes:
    "ours" when this job started it (and takes it down at the end), "caller's" when it was running, "" alone."""
    if world <= 1:
        return ""
    if torch.distributed.is_initialized():
        return "caller's"
    torch.distributed.init_process_group("gloo")
    return "ours"


def _leave(group: str) -> None:
    """The job's last collective: take down a group this job started; only wait at the caller's."""
    if group == "ours":
        leave_together()
    elif group:
        torch.distributed.barrier()


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
            f"  webdataset.WebDataset('{pattern}', shardshuffle=False).decode('pil')  # or shardshuffle=100",
            f"  datasets.load_dataset('{result.out}', split='{SPLIT}')  # its README.md dataset card names the tars",
            f"  gensynth.data.ShardLoader('{result.out}', batch_size=128)"
            + ("  # soft labels: batch['soft_label']" if SOFT_ARRAY in m.schema.get("arrays", {}) else "")]
