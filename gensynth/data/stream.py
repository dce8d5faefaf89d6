"""The streaming loader: batches from a shard set for one rank, exact or endless, resumable mid-epoch.

    loader = ShardLoader("data/fashion/train", batch_size=128, mode="exact", num_workers=2)
    for batch in loader:            # one epoch: batch["image"] uint8 [n,C,H,W], batch["label"] int64 [n]
        ...
    state = loader.state_dict()     # save with the checkpoint; load_state_dict() continues from there
    loader.load_state_dict([state_rank0, state_rank1])  # every rank's: also on another world size (elastic.py)

A shard set whose manifest lists arrays (`schema["arrays"]`, e.g. a VQ-VAE's `codes`) yields them
as batch[name]: a tensor [n, *shape] of the schema's dtype, e.g. int16 [n, 8, 8]; a set of arrays
without images has no batch["image"]. The soft labels of `gensynth generate --relabel` (the array `soft`)
arrive as batch["soft_label"], float32 [n, num_classes].

Under torch.distributed the rank and world size are read from the process group (or RANK /
WORLD_SIZE); each rank builds its own ShardLoader over the same shard set.

Never hand a ShardLoader (or its DataLoader) to `accelerator.prepare()`: Accelerate would wrap it
in a dispatcher where only rank 0 reads, losing half the data each epoch (docs/pitfalls.md).
The loader splits the data across ranks itself; move batches to the device with `.to(device)`.

Modes
- exact: every sample exactly once per epoch across all ranks and workers; every rank yields the
  same number of batches (see plan.py), so no rank waits on another at the end of an epoch. A
  rank's final batch can be short, and is empty only when fewer samples remain than ranks.
- resampled: endless; epoch after epoch, each with a fresh shard order, always full batches.

A corrupt sample (undecodable image, bad label) or a truncated shard is skipped, logged with its
shard and key, and counted in `loader.corrupt`; past `max_corrupt_fraction` of a worker's samples
the worker raises `CorruptDataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import numpy.random  # noqa: F401  DataLoader workers seed it: imported here once, not per worker and epoch
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gensynth.data.codec import LabelSpec
from gensynth.data.collate import BatchDecoder, SlotRing, batch_tensors, pack_message, unpack_message
from gensynth.data.elastic import check_group, decode_pool, encode_pool, remaining_pool, resampled_next_epoch
from gensynth.data.plan import (
    Pool,
    Segment,
    exact_delivery_order,
    exact_rank_batches,
    exact_worker_plan,
    pool_total,
    resampled_worker_range,
    sample_rng,
    segments_for_range,
    shard_order,
    shuffle_buffer,
)
from gensynth.data.shards import Shard, ShardReader, resolve_shards
from gensynth.errors import GensynthError, UsageError
from gensynth.runtime.ranks import rank_world

log = logging.getLogger("gensynth")
MODES = ("exact", "resampled")
# Each message from a DataLoader worker costs the main process about a millisecond (queues, pickling; measured
# on 28x28 images, 2 workers), so small batches travel several to a message (collate.pack_message).
GROUP_BYTES = 2 << 20  # batches per message: as many as fit in this many image bytes...
MAX_GROUP = 8  # ...but at most this many


class CorruptDataError(GensynthError):
    """More corrupt samples than `max_corrupt_fraction` allows."""


class ShardDataset(IterableDataset):
    """Worker side of ShardLoader: yields (delivery position, worker, corrupt so far, batch)."""

    def __init__(self, shards: list[Shard], batch_size: int, mode: str, seed: int, buffer: int, rank: int,
                 world: int, workers: int, max_corrupt_fraction: float, image_shape: tuple[int, ...] | None,
                 decode_meta: bool, arrays: dict[str, dict[str, Any]] | None = None, with_image: bool = True,
                 num_classes: int | None = None, label: LabelSpec | None = None,
                 resize: tuple[int, str] | None = None, image_field: str | None = None,
                 transform: Callable[[np.ndarray, int], np.ndarray] | None = None):
        self.shards = shards
        self.counts = [s.samples for s in shards]
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.buffer = buffer
        self.rank, self.world, self.workers = rank, world, workers
        self.max_corrupt_fraction = max_corrupt_fraction
        self.decode = BatchDecoder(image_shape, arrays, num_classes, with_image, decode_meta, label, resize,
                                   image_field, transform)
        self.epoch = 0
        self.skip = [0] * workers  # batches each worker already delivered (resume)
        self.pool: Pool | None = None  # the part of this epoch left to split (elastic resume); None: all of it
        self.group = 1  # batches per message from a worker (see __iter__); ShardLoader sets it
        self.ring: SlotRing | None = None  # shared memory for the messages' images; ShardLoader makes it per epoch

    # -- plumbing

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Messages of up to `group` consecutive batches of this worker (see GROUP_BYTES); unpack_message
        turns one back into its batches."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # decode is numpy/zlib; don't oversubscribe the cores
        batches = self.batches(worker)
        ring = self.ring if info is not None else None
        while chunk := list(islice(batches, self.group)):
            yield pack_message(chunk, ring, worker)

    def batches(self, worker: int) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """(delivery position, worker, corrupt so far, batch of numpy arrays) of one worker, in its order."""
        return self._exact(worker) if self.mode == "exact" else self._resampled(worker)

    def _samples(self, reader: ShardReader, segments: list[Segment], epoch: int,
                 worker: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        return shuffle_buffer(reader.read(segments), self.buffer, sample_rng(self.seed, epoch, self.rank, worker))

    # -- exact: one epoch, planned batch sizes, same batch count on every rank

    def _exact(self, worker: int) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        plan = exact_worker_plan(self.counts, self.seed, self.epoch, self.world, self.rank, self.workers,
                                 worker, self.batch_size, self.pool)
        _, rank_sizes = exact_rank_batches(self.epoch_samples, self.world, self.batch_size, self.rank)
        position = {wb: i for i, wb in enumerate(exact_delivery_order(len(rank_sizes), self.workers))}
        reader = ShardReader(self.shards)
        stream = self._samples(reader, plan.segments, self.epoch, worker)
        skip = self.skip[worker]
        for _ in range(sum(plan.batch_sizes[:skip])):  # replay what was delivered before a resume
            if next(stream, None) is None:
                break
        planned = sum(plan.batch_sizes)
        corrupt = 0
        for j in range(skip, len(plan.batch_sizes)):
            raw = list(islice(stream, plan.batch_sizes[j]))
            batch, bad = self.decode(raw)
            corrupt += bad
            corrupt_total = corrupt + reader.missing
            self._check_corrupt(corrupt_total, planned, worker)
            yield position[(worker, j)], worker, corrupt_total, batch

    @property
    def epoch_samples(self) -> int:
        """Samples of this epoch still to split over the ranks (all of them, but after an elastic resume)."""
        return sum(self.counts) if self.pool is None else pool_total(self.pool)

    # -- resampled: endless, full batches, epochs chained

    def _resampled(self, worker: int) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        total = sum(self.counts)
        lo, hi = resampled_worker_range(total, self.world, self.rank, self.workers, worker)
        per_epoch = hi - lo
        if per_epoch == 0:
            raise UsageError(f"resampled mode needs at least world_size x num_workers = "
                             f"{self.world * self.workers} samples, the shard set has {total}")
        done = self.skip[worker] * self.batch_size  # samples this worker delivered since `self.epoch`
        epoch = self.epoch + done // per_epoch
        offset = done % per_epoch
        reader = ShardReader(self.shards)

        def endless() -> Iterator[tuple[str, str, dict[str, bytes]]]:
            nonlocal epoch
            first = True
            while True:
                order = shard_order(len(self.counts), self.seed, epoch)
                stream = self._samples(reader, segments_for_range(self.counts, order, lo, hi), epoch, worker)
                if first:
                    for _ in range(offset):
                        next(stream, None)
                    first = False
                yield from stream
                epoch += 1

        stream = endless()
        corrupt = 0
        j = self.skip[worker]
        while True:
            raw = list(islice(stream, self.batch_size))
            batch, bad = self.decode(raw)
            corrupt += bad
            corrupt_total = corrupt + reader.missing
            self._check_corrupt(corrupt_total, max(per_epoch, (j + 1) * self.batch_size), worker)
            yield j * self.workers + worker, worker, corrupt_total, batch
            j += 1

    # -- decode and collate

    def _check_corrupt(self, corrupt: int, planned: int, worker: int) -> None:
        if corrupt > self.max_corrupt_fraction * planned:
            raise CorruptDataError(
                f"rank {self.rank} worker {worker}: {corrupt} corrupt or missing samples of {planned} planned "
                f"exceeds max_corrupt_fraction={self.max_corrupt_fraction}; the warnings above name the shards "
                "and keys (run `gensynth inspect SHARDS --verify`)")

def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _as_is(batch: Any) -> Any:
    """Our batches are already tensors; the DataLoader's default_convert would walk every key and meta dict."""
    return batch


def label_spec(schema: dict[str, Any], manifest: Any, label_key: str | None) -> LabelSpec | None:
    """Where the labels are: `label_key`, else the manifest's schema (gensynth index records it); None = cls."""
    recorded = schema.get("label") or {}
    key = label_key or (".".join([recorded["field"], *recorded.get("path", [])]) if recorded else None)
    if not key or (key == "cls" and not recorded.get("names")):
        return None
    try:
        return LabelSpec(key, manifest.classes if manifest is not None else None)
    except ValueError as e:
        raise UsageError(f"data.label_key: {e}") from None


class ShardLoader(IterableDataset):
    """Batches of one rank's share of a shard set; see the module docstring. An IterableDataset, so it is the
    first stage of a webdataset pipeline as it is: `wds.DataPipeline(loader, wds.map(f))` (stages after it get
    whole batches)."""

    def __init__(self, source: str | list[str], batch_size: int, mode: str = "exact", seed: int = 0,
                 shuffle_buffer: int = 2000, num_workers: int = 0, rank: int | None = None,
                 world_size: int | None = None, max_corrupt_fraction: float = 0.001, pin_memory: bool = False,
                 decode_meta: bool = True, prefetch_factor: int = 4, label_key: str | None = None,
                 resize: tuple[int, str] | None = None,
                 transform: Callable[[np.ndarray, int], np.ndarray] | None = None):
        if mode not in MODES:
            raise UsageError(f"loader mode {mode!r}: use one of {', '.join(MODES)}")
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size}: must be >= 1")
        default_rank, default_world = rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.shards, self.manifest = resolve_shards(source)
        if not self.shards:
            raise UsageError(f"{source}: no shards")
        schema = self.manifest.schema if self.manifest else {}
        shape = self.manifest.image_shape if self.manifest else None
        self.arrays: dict[str, dict[str, Any]] = dict(schema.get("arrays") or {})
        # images unless the manifest describes a set of arrays only (without a manifest: images, as always)
        with_image = shape is not None or not self.arrays
        self.num_workers = num_workers
        self.mode = mode
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        image = schema.get("image") or {}
        if image.get("sizes") and resize is None:
            sizes = ", ".join(f"{k}: {v}" for k, v in list(image["sizes"].items())[:4])
            raise UsageError(f"{source}: its images have {len(image['sizes'])} sizes ({sizes}); make them one size "
                             "with data.resize=crop or pad (and data.image_size) to train, eval.resize to evaluate")
        if resize is not None:
            side = resize[0] or (min(shape[:2]) if shape else 0)
            if side < 1:
                raise UsageError(f"{source}: resize needs a size (data.image_size) for a set without a manifest")
            resize = (side, resize[1])
            shape = (side, side, shape[2]) if shape else None
        self.image_shape = shape  # (H, W, C) of the batches' images
        self.dataset = ShardDataset(self.shards, batch_size, mode, seed, shuffle_buffer, self.rank,
                                    self.world_size, max(1, num_workers), max_corrupt_fraction, shape, decode_meta,
                                    self.arrays, with_image, self.manifest.num_classes if self.manifest else None,
                                    label_spec(schema, self.manifest, label_key), resize, image.get("field"),
                                    transform)
        if num_workers and shape is not None:  # several small batches per message (see GROUP_BYTES)
            batch_bytes = batch_size * shape[0] * shape[1] * shape[2]
            self.dataset.group = max(1, min(MAX_GROUP, GROUP_BYTES // batch_bytes))
        self.corrupt = 0  # corrupt or missing samples seen by this rank so far (all epochs)
        self._corrupt_by_worker = [0] * max(1, num_workers)
        self._delivered = [0] * max(1, num_workers)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def num_samples(self) -> int:
        """Samples in the whole shard set (all ranks)."""
        return sum(s.samples for s in self.shards)

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (exact mode; the same on every rank; fewer in the rest of
        an epoch resumed on another world size)."""
        if self.mode != "exact":
            raise TypeError("a resampled loader is endless and has no length")
        return len(exact_rank_batches(self.dataset.epoch_samples, self.world_size, self.batch_size, self.rank)[1])

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self.dataset.epoch = epoch
        self.dataset.pool = None
        self._delivered = [0] * len(self._delivered)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.skip = list(self._delivered)
        next_pos = sum(self._delivered) if self.mode == "exact" else None
        pending: dict[int, tuple[int, int, dict[str, Any]]] = {}
        if self.mode == "resampled":
            # Endless: delivery position j*K + k; resume continues at the smallest undelivered one.
            k_workers = len(self._delivered)
            next_pos = min(self._delivered[k] * k_workers + k for k in range(k_workers))
        for pos, worker, corrupt, batch in self._batches():
            pending[pos] = (worker, corrupt, batch)
            while next_pos in pending:
                worker, corrupt, batch = pending.pop(next_pos)
                self._delivered[worker] += 1
                if self.pin_memory:
                    batch["image"], batch["label"] = batch["image"].pin_memory(), batch["label"].pin_memory()
                self.corrupt += corrupt - self._corrupt_by_worker[worker]
                self._corrupt_by_worker[worker] = corrupt
                next_pos += 1
                yield batch
        if pending:
            raise RuntimeError(f"loader ended with {len(pending)} batches out of order (a bug in gensynth)")
        # exact mode: the epoch is complete; the next iteration starts the next epoch
        self.set_epoch(self.dataset.epoch + 1)
        self._corrupt_by_worker = [0] * len(self._corrupt_by_worker)

    def _batches(self) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        """Every worker's batches (tensors) as they arrive: (delivery position, worker, corrupt so far, batch)."""
        if not self.num_workers:  # in this process: no DataLoader, no messages
            for pos, worker, corrupt, batch in self.dataset.batches(0):
                yield pos, worker, corrupt, batch_tensors(batch)
            return
        ring = None
        if self.image_shape is not None and self.dataset.decode.with_image and SlotRing.usable():
            slot_bytes = self.dataset.group * self.batch_size * int(np.prod(self.image_shape))
            ring = SlotRing(self.num_workers, self.prefetch_factor + 1, slot_bytes)  # the most a worker has in flight
        self.dataset.ring = ring  # the workers fork with it
        # Our own generator: creating an iterator must not draw from the global torch RNG, or a resumed
        # run (RNG restored from a checkpoint) would sample different noise than an uninterrupted one.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, worker_init_fn=_worker_init,
                            prefetch_factor=self.prefetch_factor,
                            generator=torch.Generator().manual_seed(self.dataset.seed))
        try:
            for message in loader:
                yield from unpack_message(message, ring)
        finally:
            self.dataset.ring = None

    def _identity(self) -> dict[str, Any]:
        """What must not change for a saved position to mean the same samples."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "mode": self.mode, "seed": self.dataset.seed, "num_samples": self.num_samples}

    def state_dict(self) -> dict[str, Any]:
        """Position inside the epoch: enough to continue with no sample lost or repeated (every rank's, on
        another world size or worker count)."""
        return {"epoch": self.dataset.epoch, "delivered": list(self._delivered), "corrupt": self.corrupt,
                "rank": self.rank, "pool": encode_pool(self.dataset.pool), "shuffle_buffer": self.dataset.buffer,
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continue from a saved position: this rank's state, or the list of every saved rank's. With the same
        world size, workers and batch size it continues bitwise; otherwise (all ranks' states needed) the
        epoch's samples no rank delivered are split over this world (see gensynth/data/elastic.py)."""
        states = state if isinstance(state, list) else [state]
        fixed = {k: v for k, v in self._identity().items() if k not in ("world_size", "num_workers", "batch_size")}
        for key, mine in fixed.items():
            saved = states[0].get(key) if states and isinstance(states[0], dict) else None
            if saved != mine:
                raise UsageError(f"cannot resume the data stream mid-epoch: it was saved with {key}={saved}, "
                                 f"this loader has {key}={mine}; keep {key} unchanged to resume "
                                 "(or start the epoch afresh with set_epoch)")
        same = {k: states[0].get(k) for k in ("world_size", "num_workers", "batch_size")} == \
            {k: v for k, v in self._identity().items() if k in ("world_size", "num_workers", "batch_size")}
        own = [s for s in states if s.get("rank") == self.rank]
        if same and (own or not isinstance(state, list)):  # the same plan: continue bitwise
            self._load_own(own[0] if own else states[0])
            return
        if not isinstance(state, list):
            changed = ", ".join(f"{k}={states[0].get(k)} -> {v}" for k, v in self._identity().items()
                                if states[0].get(k) != v)
            raise UsageError(f"cannot resume the data stream with {changed} from one rank's state: pass every "
                             "saved rank's state (a list) to load_state_dict")
        check_group(states)
        self._delivered = [0] * len(self._delivered)
        self._corrupt_by_worker = [0] * len(self._delivered)
        # the totals live on rank 0, so the sum over ranks still counts the whole run
        self.corrupt = sum(s.get("corrupt", 0) for s in states) if self.rank == 0 else 0
        if self.mode == "resampled":
            self.dataset.epoch, self.dataset.pool = resampled_next_epoch(states), None
            return
        pool = remaining_pool(states, self.dataset.buffer)
        if pool:
            self.dataset.epoch, self.dataset.pool = states[0]["epoch"], pool
        else:  # the saved epoch was delivered in full
            self.dataset.epoch, self.dataset.pool = states[0]["epoch"] + 1, None

    def _load_own(self, state: dict[str, Any]) -> None:
        self.dataset.epoch = state["epoch"]
        self.dataset.pool = decode_pool(state.get("pool"), self.num_samples)
        self._delivered = list(state["delivered"])
        self.corrupt = state.get("corrupt", 0)
        self._corrupt_by_worker = [0] * len(self._delivered)
