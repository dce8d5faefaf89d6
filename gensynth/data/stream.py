"""The streaming loader: batches from a shard set for one rank, exact or endless, resumable mid-epoch.

    loader = ShardLoader("data/fashion/train", batch_size=128, mode="exact", num_workers=2)
    for batch in loader:            # one epoch: batch["image"] uint8 [n,C,H,W], batch["label"] int64 [n]
        ...
    state = loader.state_dict()     # save with the checkpoint; load_state_dict() continues from there

A shard set whose manifest lists arrays (`schema["arrays"]`, e.g. a VQ-VAE's `codes`) yields them
as batch[name]: a tensor [n, *shape] of the schema's dtype, e.g. int16 [n, 8, 8]; a set of arrays
without images has no batch["image"].

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

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gensynth import storage
from gensynth.data.codec import (
    IMAGE_EXTENSIONS,
    DecodeError,
    decode_array,
    decode_image,
    decode_label,
    npy_pixels,
    png_scanlines,
)
from gensynth.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from gensynth.data.plan import (
    Segment,
    derive_seed,
    exact_delivery_order,
    exact_rank_batches,
    exact_worker_plan,
    resampled_worker_range,
    segments_for_range,
    shard_order,
)
from gensynth.data.tario import CorruptShard, TruncatedShard, count_samples, iter_samples
from gensynth.errors import GensynthError, UsageError
from gensynth.runtime.ranks import rank_world

log = logging.getLogger("gensynth")
MODES = ("exact", "resampled")
# How batches travel from DataLoader workers (measured on 28x28 images, 2 workers): each message costs the
# main process about a millisecond (queues, pickling) and a tensor in shared memory about another one to set
# up, while copying bytes through the pickle costs about 5 us per kB. So small batches travel several to a
# message, and a message's images go through shared memory only when there are enough of them.
GROUP_BYTES = 2 << 20  # batches per message: as many as fit in this many image bytes...
MAX_GROUP = 8  # ...but at most this many
SHARED_MESSAGE_BYTES = 1 << 20  # a message with more image bytes sends them as one shared-memory tensor


class CorruptDataError(GensynthError):
    """More corrupt samples than `max_corrupt_fraction` allows."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int

    @property
    def name(self) -> str:
        return storage.basename(self.url)


def resolve_shards(source: str | list[str]) -> tuple[list[Shard], Manifest | None]:
    """A shard set's folder/prefix or manifest URL, a brace pattern, or a list of shard URLs -> shards.

    Without a manifest, each shard is read once (headers only) to count its samples.
    """
    if isinstance(source, (list, tuple)):
        urls = [u for item in source for u in storage.expand_braces(str(item))]
    else:
        source = str(source)
        if source.endswith(".json") or (not source.endswith(".tar") and "{" not in source):
            manifest = read_manifest(source)
            folder = storage.parent(source) if source.endswith(".json") else source.rstrip("/")
            return [Shard(storage.join(folder, s.name), s.samples) for s in manifest.shards], manifest
        urls = storage.expand_braces(source)
    shards = []
    for url in urls:
        if not storage.exists(url):
            raise UsageError(f"shard not found: {url}")
        with storage.open_read(url) as f:
            try:
                shards.append(Shard(url, count_samples(f)))
            except (TruncatedShard, CorruptShard) as e:
                raise UsageError(f"{url}: cannot count samples without a {MANIFEST_NAME}: {e}") from None
    return shards, None


class _ShardReader:
    """Raw samples (shard name, key, fields) of a worker's segments, in order, logging damage."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        # samples the plan expected but a truncated or corrupt shard did not hold, and samples a shard holds
        # beyond its manifest entry (the plan has no place for them: they are skipped, not delivered)
        self.missing = 0

    def read(self, segments: list[Segment]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        for seg in segments:
            shard = self.shards[seg.shard]
            name = shard.name
            pos = 0  # samples of this shard passed so far
            extra = 0  # samples after the last one its manifest entry counts
            problem = "it holds fewer samples than its manifest entry"
            try:
                with storage.open_read(shard.url) as f:
                    samples = iter_samples(f)
                    for key, fields in samples:
                        if pos >= seg.start:
                            yield name, key, fields
                        pos += 1
                        if pos >= seg.stop:
                            break
                    if pos == seg.stop == shard.samples:  # this segment ends the shard: nothing may follow
                        extra = sum(1 for _ in samples)  # read, not decoded; usually just the end marker
            except (TruncatedShard, CorruptShard, OSError) as e:
                problem = str(e)
                if pos >= seg.stop:  # every planned sample was read: nothing lost, but say so
                    log.warning("shard %s is damaged after its %d listed samples (%s)", shard.url, pos, problem)
            lost = seg.stop - max(pos, seg.start)
            if lost > 0:
                log.warning("shard %s is damaged after %d samples (%s): %d planned samples skipped",
                            shard.url, pos, problem, lost)
                self.missing += lost
            if extra:
                log.warning("shard %s holds %d samples more than the %d its manifest entry lists: %d samples "
                            "skipped (run `gensynth inspect SET --verify`)", shard.url, extra, shard.samples, extra)
                self.missing += extra


def shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Fill a buffer of `size`, then emit a random element for each new one; drain shuffled at the end."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    uniform = rng.random  # int(random() * size), not randrange: a tenth of the cost, bias below 2**-40
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(uniform() * size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Worker side of ShardLoader: yields (delivery position, worker, corrupt so far, batch)."""

    def __init__(self, shards: list[Shard], batch_size: int, mode: str, seed: int, buffer: int, rank: int,
                 world: int, workers: int, max_corrupt_fraction: float, image_shape: tuple[int, ...] | None,
                 decode_meta: bool, arrays: dict[str, dict[str, Any]] | None = None, with_image: bool = True,
                 num_classes: int | None = None):
        self.shards = shards
        self.counts = [s.samples for s in shards]
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.buffer = buffer
        self.rank, self.world, self.workers = rank, world, workers
        self.max_corrupt_fraction = max_corrupt_fraction
        self.image_shape = image_shape
        self.decode_meta = decode_meta
        self.arrays = arrays or {}  # name -> {"field", "dtype", "shape"} from the manifest's schema
        self.with_image = with_image
        self.num_classes = num_classes  # labels must be 0..num_classes-1 (None: the set has no labels)
        self.epoch = 0
        self.skip = [0] * workers  # batches each worker already delivered (resume)
        self.group = 1  # batches per message from a worker (see __iter__); ShardLoader sets it

    # -- plumbing

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Messages of up to `group` consecutive batches of this worker (see GROUP_BYTES); unpack_message
        turns one back into its batches."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # decode is numpy/zlib; don't oversubscribe the cores
        batches = self._exact(worker) if self.mode == "exact" else self._resampled(worker)
        while chunk := list(islice(batches, self.group)):
            yield pack_message(chunk)

    def _samples(self, reader: _ShardReader, segments: list[Segment], epoch: int,
                 worker: int) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        rng = random.Random(derive_seed("samples", self.seed, epoch, self.rank, worker))
        return shuffle_buffer(reader.read(segments), self.buffer, rng)

    # -- exact: one epoch, planned batch sizes, same batch count on every rank

    def _exact(self, worker: int) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
        plan = exact_worker_plan(self.counts, self.seed, self.epoch, self.world, self.rank, self.workers,
                                 worker, self.batch_size)
        _, rank_sizes = exact_rank_batches(sum(self.counts), self.world, self.batch_size, self.rank)
        position = {wb: i for i, wb in enumerate(exact_delivery_order(len(rank_sizes), self.workers))}
        reader = _ShardReader(self.shards)
        stream = self._samples(reader, plan.segments, self.epoch, worker)
        skip = self.skip[worker]
        for _ in range(sum(plan.batch_sizes[:skip])):  # replay what was delivered before a resume
            if next(stream, None) is None:
                break
        planned = sum(plan.batch_sizes)
        corrupt = 0
        for j in range(skip, len(plan.batch_sizes)):
            raw = list(islice(stream, plan.batch_sizes[j]))
            batch, bad = self._collate(raw)
            corrupt += bad
            corrupt_total = corrupt + reader.missing
            self._check_corrupt(corrupt_total, planned, worker)
            yield position[(worker, j)], worker, corrupt_total, batch

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
        reader = _ShardReader(self.shards)

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
            batch, bad = self._collate(raw)
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

    def _collate(self, raw: list[tuple[str, str, dict[str, bytes]]]) -> tuple[dict[str, Any], int]:
        """Decode a batch. Our own PNGs (unfiltered rows) and npy images are not made into one array each:
        their pixel bytes are joined and shaped into the batch with one numpy call (a third of the
        per-image cost); any other image is decoded on its own and copied into place. The image array
        may be a strided view (pack_message makes it contiguous when it joins a message's batches)."""
        labels: list[int] = []
        keys: list[str] = []
        metas: list[Any] = []
        pixels: list[Any] = []  # per good sample: fast-path bytes (see `kinds`), or a decoded HxWxC array
        kinds: list[str] = []
        layout = None  # "png" (rows with a leading filter byte), "npy" (bare pixels) or "array" (mixed)
        arrays: dict[str, list[np.ndarray]] = {name: [] for name in self.arrays}  # non-image fields (codes)
        with_image = self.with_image
        bad = 0
        ext = IMAGE_EXTENSIONS[0]
        shape = self.image_shape  # (H, W, C) from the manifest; without one, the first image sets it
        decode_meta = self.decode_meta
        num_classes = self.num_classes
        for shard, key, fields in raw:  # the loop runs per sample: kept lean on purpose
            try:
                item: Any = None
                kind = "none"
                if with_image:
                    data = fields.get(ext)
                    if data is None:  # another image field than the previous sample's
                        ext = next((e for e in IMAGE_EXTENSIONS if e in fields), IMAGE_EXTENSIONS[0])
                        data = fields.get(ext)
                        if data is None:
                            raise DecodeError(f"no image field (has {', '.join(sorted(fields)) or 'nothing'})")
                    # the schema's shape bounds the decode: a larger image is refused before it is inflated
                    fast = png_scanlines(data, shape) if ext == "png" else npy_pixels(data) if ext == "npy" else None
                    if fast is not None:
                        if shape is None:
                            shape = self.image_shape = fast[1]
                        if fast[1] != shape:  # decode_image would give this very shape
                            raise DecodeError(f"image is {fast[1]}, the set's schema says {shape}")
                        item = fast[0]
                        kind = ext
                    else:
                        item = decode_image(data, ext, shape)
                        if shape is None:
                            shape = self.image_shape = item.shape
                        if item.shape != shape:
                            raise DecodeError(f"image is {item.shape}, the set's schema says {shape}")
                        kind = "array"
                decoded = {}
                for name, spec in self.arrays.items():
                    if spec["field"] not in fields:
                        raise DecodeError(f"no {spec['field']} field (has {', '.join(sorted(fields)) or 'nothing'})")
                    decoded[name] = decode_array(fields[spec["field"]], spec["dtype"], spec["shape"])
                label = decode_label(fields.get("cls"), num_classes)
                meta = _json_decode(fields["json"].decode("utf-8")) if decode_meta and "json" in fields else None
            except (DecodeError, ValueError, UnicodeDecodeError, RecursionError) as e:  # JSON nested too deep
                log.warning("corrupt sample skipped: shard %s key %s: %s", shard, key, e)
                bad += 1
                continue
            if kind != layout:
                layout = kind if layout is None else "array"
            kinds.append(kind)
            pixels.append(item)
            for name, array in decoded.items():
                arrays[name].append(array)
            labels.append(label)
            keys.append(key)
            if decode_meta:
                metas.append(meta)
        h, w, c = shape or (0, 0, 0)
        n = len(keys)
        if not with_image:
            images = np.empty((n, 0, 0, 0), dtype=np.uint8)  # dropped again in unpack_message
        elif layout == "png":  # bytearray: writable, so torch.from_numpy takes it without a warning
            images = np.frombuffer(bytearray().join(pixels), dtype=np.uint8).reshape(n, h, 1 + w * c)[:, :, 1:]
        elif layout == "npy":
            images = np.frombuffer(bytearray().join(pixels), dtype=np.uint8)
        else:
            images = np.empty((n, h, w, c), dtype=np.uint8)
            for i, (kind, item) in enumerate(zip(kinds, pixels)):
                images[i] = _as_image(kind, item, (h, w, c))
        batch = {"image": images.reshape(n, h, w, c).transpose(0, 3, 1, 2),
                 "label": np.array(labels, dtype=np.int64), "key": keys}
        for name, spec in self.arrays.items():  # numpy here; unpack_message makes them tensors
            batch[name] = (np.stack(arrays[name]) if arrays[name] else
                           np.empty((0, *spec["shape"]), dtype=spec["dtype"]))
        if decode_meta:
            batch["meta"] = metas
        return batch, bad



def pack_message(chunk: list[tuple[int, int, int, dict[str, Any]]]) -> dict[str, Any]:
    """Consecutive batches of a worker -> one message: their images and labels joined into one array each
    (images in one shared-memory tensor when large enough), the rest per batch."""
    images = [batch["image"] for *_, batch in chunk]
    filled = [image for image in images if len(image)]  # an empty batch may not know the image shape yet
    joined = np.ascontiguousarray(np.concatenate(filled) if len(filled) > 1 else (filled or images)[0])
    rest = [(pos, worker, corrupt, {k: v for k, v in batch.items() if k not in ("image", "label")})
            for pos, worker, corrupt, batch in chunk]
    return {"images": torch.from_numpy(joined) if joined.nbytes > SHARED_MESSAGE_BYTES else joined,
            "labels": np.concatenate([batch["label"] for *_, batch in chunk]),
            "sizes": [len(image) for image in images], "batches": rest}


def unpack_message(message: dict[str, Any]) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """The batches of a message, images and labels as tensors (views of the joined ones, no copy)."""
    images, labels = message["images"], torch.from_numpy(message["labels"])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    start = 0
    for size, (pos, worker, corrupt, batch) in zip(message["sizes"], message["batches"]):
        out = {"image": images[start:start + size], "label": labels[start:start + size]}
        out.update((k, torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items())
        if images.ndim == 4 and images.shape[1] == 0:  # a set of arrays only: no images
            del out["image"]
        yield pos, worker, corrupt, out
        start += size


_json_decode = json.JSONDecoder().decode  # json.loads on bytes first sniffs their encoding; ours are UTF-8


def _as_image(kind: str, item: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """One sample of a mixed batch -> HxWxC: PNG rows with their filter byte, bare npy pixels, or an array."""
    if kind == "array":
        return item
    h, w, c = shape
    flat = np.frombuffer(item, dtype=np.uint8)
    return flat.reshape(h, 1 + w * c)[:, 1:].reshape(h, w, c) if kind == "png" else flat.reshape(h, w, c)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _as_is(batch: Any) -> Any:
    """Our batches are already tensors; the DataLoader's default_convert would walk every key and meta dict."""
    return batch


class ShardLoader:
    """Batches of one rank's share of a shard set; see the module docstring."""

    def __init__(self, source: str | list[str], batch_size: int, mode: str = "exact", seed: int = 0,
                 shuffle_buffer: int = 2000, num_workers: int = 0, rank: int | None = None,
                 world_size: int | None = None, max_corrupt_fraction: float = 0.001, pin_memory: bool = False,
                 decode_meta: bool = True, prefetch_factor: int = 4):
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
        self.dataset = ShardDataset(self.shards, batch_size, mode, seed, shuffle_buffer, self.rank,
                                    self.world_size, max(1, num_workers), max_corrupt_fraction, shape, decode_meta,
                                    self.arrays, with_image, self.manifest.num_classes if self.manifest else None)
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
        """Batches per epoch on this rank (exact mode; the same on every rank)."""
        if self.mode != "exact":
            raise TypeError("a resampled loader is endless and has no length")
        return len(exact_rank_batches(self.num_samples, self.world_size, self.batch_size, self.rank)[1])

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self.dataset.epoch = epoch
        self._delivered = [0] * len(self._delivered)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.skip = list(self._delivered)
        # Our own generator: creating an iterator must not draw from the global torch RNG, or a resumed
        # run (RNG restored from a checkpoint) would sample different noise than an uninterrupted one.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, worker_init_fn=_worker_init if self.num_workers else None,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            generator=torch.Generator().manual_seed(self.dataset.seed))
        next_pos = sum(self._delivered) if self.mode == "exact" else None
        pending: dict[int, tuple[int, int, dict[str, Any]]] = {}
        if self.mode == "resampled":
            # Endless: delivery position j*K + k; resume continues at the smallest undelivered one.
            k_workers = len(self._delivered)
            next_pos = min(self._delivered[k] * k_workers + k for k in range(k_workers))
        for message in loader:
            for pos, worker, corrupt, batch in unpack_message(message):
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

    def _identity(self) -> dict[str, Any]:
        """What must not change for a saved position to mean the same samples."""
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "mode": self.mode, "seed": self.dataset.seed, "num_samples": self.num_samples}

    def state_dict(self) -> dict[str, Any]:
        """Position inside the epoch: enough to continue with no sample lost or repeated."""
        return {"epoch": self.dataset.epoch, "delivered": list(self._delivered), "corrupt": self.corrupt,
                "rank": self.rank, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise UsageError(f"cannot resume the data stream mid-epoch: it was saved with {key}={state.get(key)}, "
                                 f"this loader has {key}={mine}; keep {key} unchanged to resume "
                                 "(or start the epoch afresh with set_epoch)")
        self.dataset.epoch = state["epoch"]
        self._delivered = list(state["delivered"])
        self.corrupt = state.get("corrupt", 0)
        self._corrupt_by_worker = [0] * len(self._delivered)
