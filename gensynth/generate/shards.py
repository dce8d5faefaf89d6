"""One shard: drawn from its own generator, published whole, then its receipt; a rerun trusts a shard
only when it matches its receipt."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from gensynth import storage
from gensynth.data.codec import SOFT_ARRAY, encode_chunks
from gensynth.data.writer import MetaTemplate, ShardSetWriter
from gensynth.errors import GensynthError
from gensynth.evaluate.filter import CopyFilter, SampleFilter
from gensynth.families.sampling import Sampler
from gensynth.generate.plan import SPLIT, Job, shard_generator
from gensynth.runtime.faults import crash_point

log = logging.getLogger("gensynth")
# hidden: `datasets.load_dataset(OUT)` skips dot-folders, and would read the JSON receipts as data
RECEIPTS = ".receipts"
OLD_RECEIPTS = "receipts"  # where runs before the move wrote them: an unfinished one still resumes
RECEIPT_FOLDERS = (RECEIPTS, OLD_RECEIPTS)


def receipt_url(out: str, name: str, folder: str = RECEIPTS) -> str:
    return storage.join(out, folder, name.replace(".tar", ".json"))


def receipt_names(out: str) -> list[str]:
    """The receipts' file names in OUT, in the new folder and the old one."""
    return sorted({n for f in RECEIPT_FOLDERS for n in storage.listdir(storage.join(out, f)) if n.endswith(".json")})


REDRAW_ROUNDS = 50  # redraws of the rejected samples before a shard gives up
REPORT_EVERY = 10  # rounds between progress lines while a shard redraws


class Drawn(NamedTuple):
    """A shard's samples as drawn: images (uint8 n x H x W x C), labels, the classifier filter's scores (or None),
    and per class the samples redrawn because that filter rejected them, and because they were near-copies
    (None without the copy filter)."""

    images: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None
    dropped: np.ndarray
    copied: np.ndarray | None


def draw_shard(sampler: Sampler, job: Job, labels: np.ndarray, k: int, keep: SampleFilter | None = None,
               novel: CopyFilter | None = None) -> Drawn:
    """Shard k's samples: a function of (export, job, k) alone. With a filter (the classifier's `keep`, the copy
    filter `novel`), rejected samples are redrawn (for the same labels, from the same generator) until every
    place is filled; a sample both filters reject counts as a copy."""
    lo, hi = job.shard_range(k)
    shard_labels = torch.from_numpy(labels[lo:hi])
    generator = shard_generator(job.seed, k)
    images = sampler.sample(shard_labels, generator, job.options)
    dropped = np.zeros(sampler.num_classes, dtype=np.int64)
    copied = None if novel is None else np.zeros(sampler.num_classes, dtype=np.int64)
    scores = None if keep is None else keep.scores(images, shard_labels)
    if keep is None and novel is None:
        return Drawn(images.permute(0, 2, 3, 1).numpy(), shard_labels.numpy(), None, dropped, None)
    copy = torch.zeros(len(shard_labels), dtype=torch.bool) if novel is None else novel.copies(images)
    for round_ in range(REDRAW_ROUNDS + 1):
        low = torch.zeros_like(copy) if keep is None else scores < keep.threshold
        rejected = (low | copy).nonzero().squeeze(1)
        if len(rejected) == 0:
            break
        if round_ == REDRAW_ROUNDS:
            raise GensynthError(f"shard {k}, after {REDRAW_ROUNDS} redraws: "
                                f"{why_rejected(shard_labels, low, copy, sampler.classes, keep)}")
        if round_ and round_ % REPORT_EVERY == 0:  # a model that rarely passes redraws for minutes
            reasons = ([f"{int((low & ~copy).sum())} below the filter's {keep.threshold:.2f}"] if keep else []) + \
                ([f"{int(copy.sum())} near-copies"] if novel else [])
            log.info("shard %d: redraw round %d of at most %d: %d samples (%s) still rejected (%s)", k, round_,
                     REDRAW_ROUNDS, len(rejected), named_counts(shard_labels[rejected], sampler.classes),
                     ", ".join(reasons))
        dropped += np.bincount(shard_labels[low & ~copy].numpy(), minlength=sampler.num_classes)
        if copied is not None:
            copied += np.bincount(shard_labels[copy].numpy(), minlength=sampler.num_classes)
        redrawn = sampler.sample(shard_labels[rejected], generator, job.options)
        images[rejected] = redrawn
        if keep is not None:
            scores[rejected] = keep.scores(redrawn, shard_labels[rejected])
        copy[rejected] = False if novel is None else novel.copies(redrawn)
    return Drawn(images.permute(0, 2, 3, 1).numpy(), shard_labels.numpy(),
                 None if scores is None else scores.numpy(), dropped, copied)


def why_rejected(labels: torch.Tensor, low: torch.Tensor, copy: torch.Tensor, classes: list[str] | tuple[str, ...],
                 keep: SampleFilter | None) -> str:
    """What a shard that gave up still rejects, and what would help."""
    parts = []
    if copy.any():
        parts.append(f"samples of {named_counts(labels[copy], classes)} were still near-copies of the model's "
                     "training images; the model copies them: generate from an export of fewer steps (its run's best/ "
                     "keeps evaluations below eval.max_copies) or train with more data")
    if (low & ~copy).any():
        short = sorted({classes[int(c)] for c in labels[low & ~copy]})
        parts.append(f"some samples of {', '.join(short)} still score below the filter's threshold {keep.threshold:g}; "
                     "the model rarely makes that class recognisably: lower the threshold (--filter T; --filter 0 for "
                     "none, also where --purpose sets one) or improve the model")
    return "; ".join(parts)


def named_counts(labels: torch.Tensor, classes: list[str] | tuple[str, ...]) -> str:
    """"Shirt 12, Coat 3": the classes among `labels`, most frequent first."""
    counts = np.bincount(labels.numpy(), minlength=len(classes))
    return ", ".join(f"{classes[c]} {counts[c]}" for c in np.argsort(-counts, kind="stable") if counts[c])


@dataclass(frozen=True)
class SetInfo:
    """What writing a shard needs to know of the model (not the model: a writer process gets this)."""

    family: str
    classes: tuple[str, ...]

    @classmethod
    def of(cls, sampler: Sampler) -> SetInfo:
        return cls(sampler.family, tuple(sampler.classes))


WRITE_BATCH = 512  # samples written at a time: a batch's fixed numpy cost is a few hundred microseconds


def _batched(chunks: Iterator[list[bytes]], size: int) -> Iterator[list[bytes]]:
    """Consecutive chunks joined into lists of at least `size` (the last may be shorter)."""
    batch: list[bytes] = []
    for chunk in chunks:
        batch += chunk
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class ShardDraft:
    """Shard k written into its temporary file (write), then published with its receipt (publish): a job
    publishes shard k, a wait on storage, while it draws and writes shard k+1. The shard's PNGs are encoded
    on threads ahead of the writing, so encoding and writing share the cores."""

    def __init__(self, info: SetInfo, job: Job, k: int, images: np.ndarray, labels: np.ndarray,
                 scores: np.ndarray | None, dropped: np.ndarray, out: str, soft: np.ndarray | None = None,
                 encode_threads: int | None = None, copied: np.ndarray | None = None):
        self.info, self.job, self.k, self.out = info, job, k, out
        self.images, self.labels, self.scores, self.dropped, self.soft = images, labels, scores, dropped, soft
        self.copied = copied  # near-copies redrawn, per class (None: no copy filter)
        self.encode_threads = encode_threads
        # one place more than the shard holds: the shard is published by publish(), not by its last sample
        self.writer = ShardSetWriter(out, SPLIT, shard_size=len(labels) + 1, encoding=job.encoding, first_index=k)

    def write(self, encoded: list[bytes] | None = None) -> ShardDraft:
        """Encode and write every sample into the shard's temporary file (removed if this fails).
        `encoded`: the samples' image bytes, encoded beforehand (bench/generate.py times writing alone)."""
        job, info, n = self.job, self.info, len(self.labels)
        lo, _ = job.shard_range(self.k)
        meta = MetaTemplate({"family": info.family, "export_sha256": job.export_weights_sha256, "seed": job.seed,
                             "shard": self.k, "options": job.options},
                            ("index", "class") if self.scores is None else ("index", "class", "score"))
        labels = self.labels.tolist()
        try:
            start = 0
            chunks = (encode_chunks(self.images, job.encoding, self.encode_threads) if encoded is None else
                      (encoded[i:i + WRITE_BATCH] for i in range(0, n, WRITE_BATCH)))
            for batch in _batched(chunks, WRITE_BATCH):
                end = start + len(batch)
                columns = {"index": list(range(lo + start, lo + end)), "class": [info.classes[c] for c in
                                                                                 labels[start:end]]}
                if self.scores is not None:  # the filter classifier's probability of the label
                    columns["score"] = [round(float(x), 6) for x in self.scores[start:end]]
                self.writer.add_many(job.keys(lo + start, lo + end), self.images[start:end], batch,
                                     labels[start:end], meta.many(columns),
                                     None if self.soft is None else {SOFT_ARRAY: self.soft[start:end]})
                if start < n // 2 <= end:
                    crash_point("generate.write")  # the shard's temporary file is half written
                start = end
        except BaseException as e:
            self.abort(e)
            raise
        return self

    def abort(self, exc: BaseException) -> None:
        """Drop the shard's temporary file (the draft will not be published)."""
        self.writer.abort(exc)

    def publish(self) -> dict[str, Any]:
        """Publish the shard whole, then its receipt (which carries the shard's schema, for the manifest);
        return the receipt."""
        try:
            self.writer.end_shard()
        except BaseException as e:
            self.abort(e)
            raise
        written = self.writer.shards[0]
        counts = np.bincount(self.labels, minlength=len(self.info.classes))
        receipt = {**asdict(written), "shard": self.k,
                   "class_counts": {str(c): int(n) for c, n in enumerate(counts) if n},
                   "dropped": {str(c): int(n) for c, n in enumerate(self.dropped) if n}, "job": self.job.fingerprint(),
                   "schema": self.writer.schema()}
        if self.copied is not None:  # (a job without the copy filter keeps the receipts it always had)
            receipt["copies_rejected"] = {str(c): int(n) for c, n in enumerate(self.copied) if n}
        storage.write_bytes(receipt_url(self.out, written.name), json.dumps(receipt, sort_keys=True).encode(),
                            "write receipt")
        return receipt


def write_shard(info: SetInfo, job: Job, k: int, images: np.ndarray, labels: np.ndarray,
                scores: np.ndarray | None, dropped: np.ndarray, out: str,
                soft: np.ndarray | None = None, encode_threads: int | None = None,
                copied: np.ndarray | None = None) -> dict[str, Any]:
    """Encode shard k, publish it whole, then its receipt; return the receipt. `soft`: the --relabel
    teacher's probabilities (float32 [n, classes]), stored as each sample's soft.npy; without it the shard is
    what it always was. `encode_threads`: PNG encoding threads (default every core; 1 in a writer process,
    where the processes share the cores). `copied`: the near-copies redrawn per class, with the copy filter."""
    return ShardDraft(info, job, k, images, labels, scores, dropped, out, soft, encode_threads,
                      copied).write().publish()


def move_old_receipts(out: str) -> int:
    """Move the receipts a run before the move left in `receipts/` into `.receipts/` (each copied, then
    removed: a reader finds it in one or the other), so the finished set holds no folder that
    `datasets.load_dataset(OUT)` would read as data. Returns how many moved."""
    old = storage.join(out, OLD_RECEIPTS)
    names = [n for n in storage.listdir(old) if n.endswith(".json")]
    if names:
        storage.makedirs(storage.join(out, RECEIPTS))
    for name in names:
        storage.copy(storage.join(old, name), storage.join(out, RECEIPTS, name))
        storage.remove(storage.join(old, name))
    storage.remove_folder(old)
    return len(names)


def read_receipt(out: str, name: str) -> dict[str, Any] | None:
    url = receipt_url(out, name)
    if not storage.exists(url):
        url = receipt_url(out, name, OLD_RECEIPTS)
        if not storage.exists(url):
            return None
    try:
        return json.loads(storage.read_bytes(url))
    except ValueError:
        return None  # a receipt is written atomically; an unreadable one is treated as absent


def shard_is_done(out: str, name: str, job: Job, verify: bool = True) -> dict[str, Any] | None:
    """The shard's receipt when the shard is there and matches it (sha256 re-checked when `verify`)."""
    receipt = read_receipt(out, name)
    if receipt is None or receipt.get("job") != job.fingerprint() or "schema" not in receipt:
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
