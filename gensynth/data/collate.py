"""Decoding a batch in a loader worker, and the message that carries batches to the main process.

    decode = BatchDecoder(image_shape=(28, 28, 1), arrays={}, num_classes=10)
    batch, bad = decode(raw)          # raw: [(shard name, key, {extension: bytes})]; bad: samples skipped
    for pos, worker, corrupt, batch in unpack_message(pack_message(chunk)): ...
    ring = SlotRing(workers=2, slots=5, slot_bytes=1 << 21)   # made before the workers fork
    for ... in unpack_message(pack_message(chunk, ring, worker), ring): ...   # images through reused memory
"""

from __future__ import annotations

import json
import logging
import mmap
import multiprocessing
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gensynth.data.codec import (
    IMAGE_EXTENSIONS,
    DecodeError,
    LabelSpec,
    batch_key,
    decode_array,
    decode_image,
    decode_label,
    npy_pixels,
    png_scanlines,
    resize_image,
)

log = logging.getLogger("gensynth")
# Measured on 28x28 images, 2 workers: a tensor in shared memory costs the main process about a millisecond to
# set up, copying bytes through the pickle about 5 us per kB; so only a large message's images go through it.
SHARED_MESSAGE_BYTES = 1 << 20  # a message with more image bytes sends them as one shared-memory tensor
# How long a worker waits for a free slot of its ring before sending a message's images the other way: short,
# so a worker never blocks (the DataLoader could not stop it) when the main process holds back for a while.
SLOT_WAIT_S = 0.01


class BatchDecoder:
    """Raw samples -> one batch: images uint8 [n, C, H, W] (numpy), labels, keys, arrays, metas.

    The first image fixes the shape when the manifest gives none. A sample that does not decode is skipped,
    logged with its shard and key, and counted."""

    def __init__(self, image_shape: tuple[int, ...] | None, arrays: dict[str, dict[str, Any]] | None = None,
                 num_classes: int | None = None, with_image: bool = True, decode_meta: bool = True,
                 label: LabelSpec | None = None, resize: tuple[int, str] | None = None, image_field: str | None = None,
                 transform: Callable[[np.ndarray, int], np.ndarray] | None = None):
        if resize is not None and image_shape is not None:
            image_shape = (resize[0], resize[0], image_shape[2])
        self.image_shape = image_shape  # (H, W, C)
        self.label = label  # where the label is, when not in cls (None: cls, the lean path)
        self.resize = resize  # (side, "crop" | "pad"): every image becomes a side x side square
        self.fields = (image_field, *IMAGE_EXTENSIONS) if image_field else IMAGE_EXTENSIONS  # search order
        self.transform = transform  # per sample, in the worker: (HxWxC uint8 image, label) -> image of that shape
        self.arrays = arrays or {}  # name -> {"field", "dtype", "shape"} from the manifest's schema
        self.num_classes = num_classes  # labels must be 0..num_classes-1 (None: the set has no labels)
        # the cls bytes of every valid label, as written: one dict look-up per sample instead of a parse and check
        self.known_labels = {b"%d" % i: i for i in range(num_classes if num_classes and num_classes <= 1 << 16 else 0)}
        self.with_image = with_image
        self.decode_meta = decode_meta

    def __call__(self, raw: list[tuple[str, str, dict[str, bytes]]]) -> tuple[dict[str, Any], int]:
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
        fields_order = self.fields
        ext = fields_order[0]
        resize, label_spec, transform = self.resize, self.label, self.transform
        shape = self.image_shape  # (H, W, C) from the manifest; without one, the first image sets it
        decode_meta = self.decode_meta
        num_classes, known_labels = self.num_classes, self.known_labels
        for shard, key, fields in raw:  # the loop runs per sample: kept lean on purpose
            try:
                item: Any = None
                kind = "none"
                if with_image:
                    data = fields.get(ext)
                    if data is None:  # another image field than the previous sample's
                        ext = next((e for e in fields_order if e in fields), fields_order[0])
                        data = fields.get(ext)
                        if data is None:
                            raise DecodeError(f"no image field (has {', '.join(sorted(fields)) or 'nothing'})")
                    # the schema's shape bounds the decode: a larger image is refused before it is inflated
                    fast = png_scanlines(data, shape) if ext == "png" else npy_pixels(data) if ext == "npy" else None
                    if resize is not None:  # any size in, one size out: decoded one by one
                        item = resize_image(decode_image(data, ext), *resize)
                        if shape is None:
                            shape = self.image_shape = item.shape
                        if item.shape != shape:
                            raise DecodeError(f"image has {item.shape[2]} channels, the set's images {shape[2]}")
                        kind = "array"
                    elif fast is not None:
                        if shape is None:
                            shape = self.image_shape = fast[1]
                        if fast[1] != shape:  # decode_image would give this very shape
                            raise DecodeError(f"image is {fast[1]} (H, W, C), the set's images are {shape}: "
                                              "data.resize trains images of varied sizes")
                        item = fast[0]
                        kind = ext
                    else:
                        item = decode_image(data, ext, shape)
                        if shape is None:
                            shape = self.image_shape = item.shape
                        if item.shape != shape:
                            raise DecodeError(f"image is {item.shape} (H, W, C), the set's images are {shape}: "
                                              "data.resize trains images of varied sizes")
                        kind = "array"
                decoded = {}
                for name, spec in self.arrays.items():
                    if spec["field"] not in fields:
                        raise DecodeError(f"no {spec['field']} field (has {', '.join(sorted(fields)) or 'nothing'})")
                    decoded[name] = decode_array(fields[spec["field"]], spec["dtype"], spec["shape"])
                if label_spec is None:
                    label = known_labels.get(fields.get("cls"))
                    if label is None:  # any other bytes: parsed, checked, refused with the reason
                        label = decode_label(fields.get("cls"), num_classes)
                else:
                    label = label_spec.read(fields, num_classes)
                meta = _json_decode(fields["json"].decode("utf-8")) if decode_meta and "json" in fields else None
                if transform is not None and kind != "none":
                    item = _transformed(transform, _as_image(kind, item, shape), label)
                    kind = "array"
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
            batch[batch_key(name)] = (np.stack(arrays[name]) if arrays[name] else
                                      np.empty((0, *spec["shape"]), dtype=spec["dtype"]))
        if decode_meta:
            batch["meta"] = metas
        return batch, bad


class SlotRing:
    """Shared memory that a loader's workers write their messages' images into, each slot reused message after
    message: a fresh shared-memory tensor per message costs the worker a segment's set-up and the main
    process a file-descriptor round trip to the worker (measured: a tenth of a 28x28 epoch's time). Made by
    the main process before the workers fork (the mapping is inherited). The main process hands out the
    images where they lie, without a copy; a slot returns to its worker when the last tensor viewing it is
    freed (the trainer's batch, one step later). Per worker a semaphore counts its free slots and a flag per
    slot says which: the semaphore also orders the memory between the processes."""

    def __init__(self, workers: int, slots: int, slot_bytes: int):
        self.slots, self.slot_bytes = slots, slot_bytes
        size = workers * slots * (slot_bytes + 1)
        # anonymous and shared (inherited by forked children); its pages come as they are first written: made here
        # (MAP_POPULATE) they held every worker's start back by ~10 ms an epoch, on 2 cores, for 16 MiB
        self.memory = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self.busy = np.frombuffer(self.memory, np.uint8, count=workers * slots)  # 1 from write to release
        context = multiprocessing.get_context("fork")
        self.free = [context.Semaphore(slots) for _ in range(workers)]  # per worker: its slots not busy

    @staticmethod
    def usable() -> bool:
        """Only forked workers share the mapping (spawn and forkserver would pickle a copy of nothing)."""
        return multiprocessing.get_start_method(allow_none=False) == "fork"

    def put(self, worker: int, images: list[np.ndarray]) -> tuple[int, tuple[int, ...]] | None:
        """Write a message's images (joined) into a free slot of the worker's: (slot, shape), or None when they do
        not fit or no slot came free within SLOT_WAIT_S (the caller sends them the other way)."""
        n = sum(len(image) for image in images)
        shape = (n, *images[0].shape[1:])
        if int(np.prod(shape)) > self.slot_bytes or not self.free[worker].acquire(timeout=SLOT_WAIT_S):
            return None
        first = worker * self.slots
        slot = first + int(np.argmin(self.busy[first:first + self.slots]))  # one is free: the semaphore said so
        self.busy[slot] = 1
        out = self._view(slot, shape)
        if len(images) == 1:
            out[...] = images[0]
        else:
            np.concatenate(images, out=out)
        return slot, shape

    def take(self, ref: tuple[int, tuple[int, ...]]) -> np.ndarray:
        """The images of a slot, in place; the slot is released when the array and every view of it are gone."""
        slot, shape = ref
        images = self._view(slot, shape)
        weakref.finalize(images, self._release, slot)
        return images

    def _release(self, slot: int) -> None:
        self.busy[slot] = 0
        self.free[slot // self.slots].release()

    def _view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        offset = len(self.busy) + slot * self.slot_bytes
        return np.frombuffer(self.memory, np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)


def pack_message(chunk: list[tuple[int, int, int, dict[str, Any]]], ring: SlotRing | None = None,
                 worker: int = 0) -> dict[str, Any]:
    """Consecutive batches of a worker -> one message: their images and labels joined into one array each
    (images in the worker's next slot of `ring`, else in one shared-memory tensor when large enough), the rest
    per batch."""
    images = [batch["image"] for *_, batch in chunk]
    filled = [image for image in images if len(image)]  # an empty batch may not know the image shape yet
    rest = [(pos, worker_, corrupt, {k: v for k, v in batch.items() if k not in ("image", "label")})
            for pos, worker_, corrupt, batch in chunk]
    message = {"labels": np.concatenate([batch["label"] for *_, batch in chunk]),
               "sizes": [len(image) for image in images], "batches": rest}
    slot = ring.put(worker, filled) if ring is not None and filled else None
    if slot is not None:
        message["slot"] = slot
        return message
    joined = np.ascontiguousarray(np.concatenate(filled) if len(filled) > 1 else (filled or images)[0])
    message["images"] = torch.from_numpy(joined) if joined.nbytes > SHARED_MESSAGE_BYTES else joined
    return message


def batch_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """A decoded batch (numpy) as the loader delivers it: contiguous tensors, no image for a set of arrays."""
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if out["image"].ndim == 4 and out["image"].shape[1] == 0:
        del out["image"]
    return out


def unpack_message(message: dict[str, Any], ring: SlotRing | None = None
                   ) -> Iterator[tuple[int, int, int, dict[str, Any]]]:
    """The batches of a message, images and labels as tensors (views of the joined ones). Images in a slot of
    `ring` are copied out at once, so the worker can reuse the slot."""
    labels = torch.from_numpy(message["labels"])
    images = ring.take(message["slot"]) if "slot" in message else message["images"]
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


def _transformed(transform: Callable[[np.ndarray, int], np.ndarray], image: np.ndarray, label: int) -> np.ndarray:
    out = transform(np.array(image), label)  # a copy: the transform may write into it
    if not isinstance(out, np.ndarray) or out.shape != image.shape or out.dtype != np.uint8:
        raise TypeError(f"the loader's transform must return a uint8 array of shape {image.shape}, it returned "
                        f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def _as_image(kind: str, item: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """One sample of a mixed batch -> HxWxC: PNG rows with their filter byte, bare npy pixels, or an array."""
    if kind == "array":
        return item
    h, w, c = shape
    flat = np.frombuffer(item, dtype=np.uint8)
    return flat.reshape(h, 1 + w * c)[:, 1:].reshape(h, w, c) if kind == "png" else flat.reshape(h, w, c)


