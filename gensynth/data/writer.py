"""Write samples into a shard set: `<split>-000000.tar ...` (each shard atomic) and, last, the manifest.

    with ShardSetWriter("data/fashion/train", split="train", shard_size=5000) as w:
        w.add("train-00000000", image, label=9, meta={"source_index": 0})
        manifest = w.finish(classes=names, provenance={...})

A sample may carry arrays besides (or instead of) its image: `w.add(key, None, label=3,
arrays={"codes": grid})` stores `codes.npy`; every sample of a set has the same arrays, each of one
dtype and shape, recorded in the manifest's `schema["arrays"]`.

Leaving the `with` block on an exception removes every shard this writer published, so a failed
ingest leaves no shard set that looks complete (and no manifest is ever written for it). With `stage`
(an owner tag, storage.owner_tag()) each shard is published under a hidden staged name
(`staged_name`) beside the set instead of its own, for the caller to swap in; the manifest entries
still carry the shards' own names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from gensynth import storage
from gensynth.data.card import publish
from gensynth.data.codec import array_field, as_hwc, check_array_name, encode_array, encode_image
from gensynth.data.manifest import Manifest, ShardInfo
from gensynth.data.tario import TarShardWriter


def meta_json(meta: dict[str, Any]) -> bytes:
    """A sample's `json` field: sorted keys, no spaces, ASCII (the bytes every writer of ours produces)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


class MetaTemplate:
    """meta_json for many samples that share most of their fields: the shared ones are encoded once, the
    `varying` ones per sample; the bytes are meta_json's (tested). Generation writes a shard's samples through
    it (json.dumps of the whole dict was a quarter of writing a sample)."""

    def __init__(self, shared: dict[str, Any], varying: tuple[str, ...]):
        self.parts: list[tuple[str, str]] = []  # (the literal text before a varying value, its key)
        literal = "{"
        for i, key in enumerate(sorted({*shared, *varying})):
            literal += ("," if i else "") + json.encoder.encode_basestring_ascii(key) + ":"
            if key in varying:
                self.parts.append((literal, key))
                literal = ""
            else:
                literal += json.dumps(shared[key], sort_keys=True, separators=(",", ":"))
        self.tail = literal + "}"

    def __call__(self, values: dict[str, Any]) -> bytes:
        return ("".join([text + _json_value(values[key]) for text, key in self.parts]) + self.tail).encode("ascii")

    def many(self, columns: dict[str, list[Any]]) -> list[bytes]:
        """meta_json of many samples: columns[key][i] is sample i's value of each varying key."""
        form = "".join(text.replace("%", "%%") + "%s" for text, _ in self.parts) + self.tail.replace("%", "%%")
        values = [_json_column(columns[key]) for _, key in self.parts]
        return [(form % row).encode("ascii") for row in zip(*values)]


def _json_column(values: list[Any]) -> list[str]:
    """_json_value of each value; a column of strings (a class name per sample) encodes each distinct one once."""
    if values and all(type(v) is str for v in values):
        encoded = {v: json.encoder.encode_basestring_ascii(v) for v in set(values)}
        return [encoded[v] for v in values]
    return list(map(_json_value, values))


def _json_value(value: Any) -> str:
    """json.dumps(value) with its fast cases first (what json itself calls for them)."""
    kind = type(value)
    if kind is int:
        return int.__repr__(value)
    if kind is str:
        return json.encoder.encode_basestring_ascii(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _HashingFile:
    """Counts and hashes what passes through to the real file (tarfile only needs write/tell)."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def staged_name(name: str, stage: str) -> str:
    """`.train-000000.tar.tmp-<pid>-<rand>-<host>`: a shard staged by the writer `stage` names."""
    return f".{name}{storage.TMP_MARK}{stage}"


def set_manifest(split: str, shards: list[ShardInfo], schema: dict[str, Any], histogram: Mapping[int, int],
                 classes: list[str] | None, provenance: dict | None) -> Manifest:
    """The manifest of shards written by ShardSetWriter (in one go, or by many tasks, then assembled)."""
    return Manifest(split=split, shards=list(shards), schema=schema,
                    class_histogram={str(k): int(v) for k, v in sorted(histogram.items()) if v},
                    classes=classes, provenance=provenance or {})


class ShardSetWriter:
    def __init__(self, folder: str, split: str, shard_size: int = 5000, encoding: str = "png",
                 stage: str | None = None, first_index: int = 0):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.folder = str(folder)
        self.split = split
        self.shard_size = shard_size
        self.encoding = encoding
        self.stage = stage
        self.first_index = first_index  # the number of its first shard: a generation task writes shard k alone
        self.shards: list[ShardInfo] = []
        self.histogram: Counter[int] = Counter()
        self.image_shape: tuple[int, ...] | None = None
        self.labelled: bool | None = None
        self.arrays: dict[str, tuple[str, tuple[int, ...]]] | None = None  # name -> (dtype, shape)
        self._stack: contextlib.ExitStack | None = None
        self._tar: TarShardWriter | None = None
        self._hashing: _HashingFile | None = None
        self._published: list[str] = []

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort(exc)

    def add(self, key: str, image: np.ndarray | None, label: int | None = None, meta: dict | bytes | None = None,
            arrays: dict[str, np.ndarray] | None = None, encoded: bytes | None = None) -> None:
        """One sample; `encoded`: the image already in the writer's encoding (codec.encode_images encodes
        many on every core), else the writer encodes it; `meta` as a dict, or as meta_json's bytes."""
        fields: dict[str, bytes] = {}
        if image is not None or (self.image_shape is not None):
            if image is None:
                raise ValueError(f"sample {key}: no image, the samples before it have one")
            image = as_hwc(image)
            self._check_image_shape(key, image.shape)
            fields[self.encoding] = encode_image(image, self.encoding) if encoded is None else encoded
        if arrays or self.arrays != {}:  # (a set known to have no arrays and a sample without: nothing to check)
            fields.update(self._array_fields(key, arrays or {}))
        if not fields:
            raise ValueError(f"sample {key}: needs an image or at least one array")
        self._check_labelled(key, label is not None)
        if label is not None:
            fields["cls"] = str(int(label)).encode("ascii")
            self.histogram[int(label)] += 1
        if meta is not None:
            fields["json"] = meta if isinstance(meta, bytes) else meta_json(meta)
        if self._tar is None:
            self._open_shard()
        self._tar.write(key, fields)
        if self._tar.count >= self.shard_size:
            self.end_shard()

    def add_many(self, keys: list[str], images: np.ndarray, encoded: list[bytes], labels: list[int],
                 metas: list[bytes], arrays: dict[str, np.ndarray] | None = None) -> None:
        """add(keys[i], images[i], labels[i], metas[i], {name: arrays[name][i]}, encoded[i]) for every i, in
        one go (the same bytes): the checks are made once for the batch and the tar members written
        together. `images` uint8 [n, H, W, C] (its shape is checked; `encoded` holds its encoding)."""
        n = len(keys)
        if not n == len(images) == len(encoded) == len(labels) == len(metas):
            raise ValueError("add_many: keys, images, encoded, labels and metas must be as long as each other")
        room = self.shard_size - (self._tar.count if self._tar is not None else 0)
        if n > room:  # the batch crosses a shard boundary: the part that fits, then the rest
            head, rest = (None, None) if arrays is None else ({k: a[:room] for k, a in arrays.items()},
                                                              {k: a[room:] for k, a in arrays.items()})
            self.add_many(keys[:room], images[:room], encoded[:room], labels[:room], metas[:room], head)
            return self.add_many(keys[room:], images[room:], encoded[room:], labels[room:], metas[room:], rest)
        if n == 0:
            return
        self._check_image_shape(keys[0], tuple(images.shape[1:]))
        self._check_labelled(keys[0], True)
        # a class's cls bytes formatted once, not per sample (labels are class indices, few of them)
        digits = [b"%d" % c for c in range(max(labels) + 1)] if 0 <= min(labels) and max(labels) < 4096 else None
        fields: dict[str, list[bytes]] = {self.encoding: encoded, "json": metas,
                                          "cls": [b"%d" % c for c in labels] if digits is None else
                                          [digits[c] for c in labels]}
        if self.arrays is None and not arrays:  # what _array_fields records for a sample without arrays
            self.arrays = {}
        if arrays or self.arrays:
            per_sample = [self._array_fields(key, {name: a[i] for name, a in (arrays or {}).items()})
                          for i, key in enumerate(keys)]
            for name in per_sample[0]:
                fields[name] = [f[name] for f in per_sample]
        self.histogram.update(labels)
        if self._tar is None:
            self._open_shard()
        self._tar.write_many(keys, fields)
        if self._tar.count >= self.shard_size:
            self.end_shard()

    def add_encoded(self, key: str, fields: dict[str, bytes], label: int | None, image_shape: tuple[int, ...],
                    arrays: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """A sample whose fields are already encoded (copied byte for byte from another set): the caller
        says what they hold, the image's (H, W, C) in the writer's encoding and the arrays' dtypes and shapes,
        which must be those of every other sample."""
        if self.image_shape is None and self.labelled is None:
            self.image_shape, self.arrays = tuple(image_shape), dict(arrays)
        if (tuple(image_shape), dict(arrays)) != (self.image_shape, self.arrays or {}):
            raise ValueError(f"sample {key}: image {tuple(image_shape)} and arrays {self._describe(arrays)}, the set "
                             f"so far has {self.image_shape} and {self._describe(self.arrays or {})}")
        self._check_labelled(key, label is not None)
        if label is not None:
            self.histogram[int(label)] += 1
        if self._tar is None:
            self._open_shard()
        self._tar.write(key, fields)
        if self._tar.count >= self.shard_size:
            self.end_shard()

    def _check_image_shape(self, key: str, shape: tuple[int, ...]) -> None:
        """The first image fixes the set's (H, W, C); every later one must have it."""
        if self.image_shape is None:
            if self.labelled is not None:  # samples were added before, without an image
                raise ValueError(f"sample {key}: has an image, the samples before it have none")
            self.image_shape = tuple(shape)
        elif tuple(shape) != tuple(self.image_shape):
            raise ValueError(f"sample {key}: image is {shape[1]}x{shape[0]}x{shape[2]}, the set so far is "
                             f"{self.image_shape[1]}x{self.image_shape[0]}x{self.image_shape[2]} (one size per "
                             "shard set)")

    def _check_labelled(self, key: str, labelled: bool) -> None:
        """The first sample says whether the set is labelled; every later one must agree."""
        if self.labelled is None:
            self.labelled = labelled
        elif self.labelled != labelled:
            raise ValueError(f"sample {key}: some samples have a label and some do not")

    def _array_fields(self, key: str, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
        """npy fields for the sample's arrays; the first sample fixes each array's name, dtype and shape."""
        described = {name: (np.asarray(a).dtype.name, tuple(np.shape(a))) for name, a in arrays.items()}
        if self.arrays is None:
            for name in described:
                check_array_name(name)
            self.arrays = described
        elif described != self.arrays:
            raise ValueError(f"sample {key}: arrays {self._describe(described)}, the set so far has "
                             f"{self._describe(self.arrays)} (the same arrays in every sample)")
        return {array_field(name): encode_array(a) for name, a in arrays.items()}

    @staticmethod
    def _describe(arrays: dict[str, tuple[str, tuple[int, ...]]]) -> str:
        return ", ".join(f"{n} {d}{list(s)}" for n, (d, s) in sorted(arrays.items())) or "none"

    def _open_shard(self) -> None:
        name = shard_name(self.split, self.first_index + len(self.shards))
        self._stack = contextlib.ExitStack()
        stored = staged_name(name, self.stage) if self.stage else name
        f = self._stack.enter_context(storage.atomic_write(storage.join(self.folder, stored),
                                                           f"write shard {name} into", shown=self.folder))
        self._hashing = _HashingFile(f)
        self._tar = TarShardWriter(self._hashing)
        self._name = name

    def end_shard(self) -> None:
        """Publish the shard in progress now (the next sample starts a new one); no-op when none is open."""
        if self._tar is None:
            return
        self._tar.close()
        count = self._tar.count
        stack, self._stack = self._stack, None
        stack.close()  # publishes the shard (rename, or upload); on a failure its temporary file is gone
        self._published.append(staged_name(self._name, self.stage) if self.stage else self._name)
        self.shards.append(ShardInfo(self._name, count, self._hashing.size, self._hashing.sha.hexdigest()))
        self._tar = self._stack = self._hashing = None

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"key": "str"}
        if self.image_shape is not None:
            h, w, c = self.image_shape
            schema["image"] = {"field": self.encoding, "encoding": self.encoding, "height": h, "width": w,
                               "channels": c, "dtype": "uint8"}
        if self.arrays:
            schema["arrays"] = {name: {"field": array_field(name), "dtype": dtype, "shape": list(shape)}
                                for name, (dtype, shape) in sorted(self.arrays.items())}
        if self.labelled:
            schema["cls"] = "int"
        schema["json"] = "object"
        return schema

    def manifest(self, classes: list[str] | None = None, provenance: dict | None = None) -> Manifest:
        """Close the last shard; the set's manifest (not written)."""
        self.end_shard()
        return set_manifest(self.split, self.shards, self.schema(), self.histogram, classes, provenance)

    def finish(self, classes: list[str] | None = None, provenance: dict | None = None) -> Manifest:
        """Close the last shard and write the manifest (atomically, last of the data), then the dataset card."""
        manifest = self.manifest(classes, provenance)
        publish(self.folder, manifest)
        return manifest

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the shard in progress and remove the ones already published by this writer. Raises the
        shard's StorageError when the failure was writing it (a full disk: one line, not an OSError)."""
        stack, self._stack, self._tar, self._hashing = self._stack, None, None, None
        try:
            if stack is not None:
                stack.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)
        finally:
            for name in self._published:
                storage.remove(storage.join(self.folder, name))
            self._published.clear()
