"""`gensynth shard SOURCE OUT`: a source's records -> OUT/<split>/<split>-000000.tar ... + manifest.json.

Records are written in a seeded order (so class-sorted sources such as image folders are mixed
across shards) and the bytes are repeatable: the same source, split, seed and shard size give the
same sha256s. A failure removes what this run wrote and leaves an existing set untouched; a manifest
appears only when all shards are in, and at every instant (a `kill -9` included) the manifest present
lists only shards that are there whole (see swap_in).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np

from gensynth import __version__, storage
from gensynth.data.card import publish
from gensynth.data.codec import DecodeError, as_hwc, check_label, resize_image
from gensynth.data.manifest import MANIFEST_NAME, Manifest, manifest_url, read_manifest, write_manifest
from gensynth.data.sources import Source
from gensynth.data.writer import ShardSetWriter, staged_name
from gensynth.errors import GensynthError, InputDataError, StorageError, UsageError
from gensynth.progress import progress
from gensynth.runtime.faults import crash_point

log = logging.getLogger("gensynth")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def split_folder(out: str, split: str) -> str:
    """Where a split lives: a subfolder (or sub-prefix) named after it, e.g. data/fashion/train."""
    return storage.join(out, split)


def shard_names(folder: str, split: str) -> list[str]:
    """The `<split>-NNNNNN.tar` files in a folder (staged and temporary files are not listed)."""
    return [n for n in storage.listdir(folder) if re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", n)]


def source_label(source: Source, index: int, label: int | None) -> int | None:
    """A record's label, refused (one line naming the source and record) unless it is one of the source's
    declared classes (any index below MAX_CLASSES when it declares none)."""
    if label is None:
        return None
    classes = source.classes
    try:
        return check_label(label, None if classes is None else len(classes), "the source's declared")
    except DecodeError as e:
        names = f": {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}" if classes else ""
        raise InputDataError(f"{source.spec}: record {index}: {e}{names}") from None


def per_class_subset(source: Source, k: int, seed: int | None) -> np.ndarray:
    """Indices of K records of every label, chosen at random (seeded), in source order."""
    labels = np.array([-1 if (lab := source_label(source, i, source.label(i))) is None else lab
                       for i in range(len(source))])
    if (labels < 0).any():
        raise UsageError(f"{source.spec}: --per-class needs a label on every record, "
                         f"{int((labels < 0).sum())} have none")
    rng = np.random.default_rng(0 if seed is None else seed)
    chosen = []
    for c in np.unique(labels):
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < k:
            raise UsageError(f"{source.spec}: class {c} has {len(candidates)} records, --per-class {k} needs {k}")
        chosen.append(rng.choice(candidates, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def ingest(source: Source, out: str, split: str = "train", shard_size: int = 5000, encoding: str = "png",
           seed: int | None = 0, overwrite: bool = False, per_class: int | None = None,
           resize: tuple[int, str] | None = None, license: str = "") -> Manifest:
    """Write `source` as OUT/<split>/ shards + manifest.json; see the module docstring.

    The shards are written under hidden staged names beside the set and swapped in only once all are
    written (swap_in), so a failure (bad input, full disk, lost connection) before the swap leaves an
    existing set as it was. Staged and temporary files of earlier runs that were killed are removed.
    """
    if not SPLIT_NAME.fullmatch(split):
        raise UsageError(f"--split {split!r}: use letters, digits, '-' or '_' (it names files and keys)")
    if encoding not in ("png", "npy"):
        raise UsageError(f"--encoding {encoding!r}: use png or npy")
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be >= 1")
    folder = split_folder(out, split)
    if storage.exists(manifest_url(folder)) and not overwrite:
        raise UsageError(f"{folder} already holds a complete shard set ({MANIFEST_NAME}); "
                         "pass --overwrite to replace it, or choose another OUT")
    if per_class is not None and per_class < 1:
        raise UsageError(f"--per-class {per_class}: must be >= 1")
    if len(source) == 0:
        raise InputDataError(f"{source.spec}: no records to write")
    chosen = per_class_subset(source, per_class, seed) if per_class else np.arange(len(source))
    n = len(chosen)
    order = chosen[np.random.default_rng(seed).permutation(n)] if seed is not None else chosen
    remove_set_debris(folder)
    stage = storage.owner_tag()
    log.info("sharding %d records of %s into %s (%d per shard, %s)", n, source.spec, folder, shard_size, encoding)
    with ShardSetWriter(folder, split, shard_size, encoding, stage=stage) as writer:
        for i in progress(order, total=n, desc=f"shard {split}", unit="samples"):
            record = source.record(int(i))
            source_label(source, record.index, record.label)
            try:
                image = record.image
                if resize is not None:  # images of varied sizes -> one square size (the first's shorter side at 0)
                    image = as_hwc(np.asarray(image))
                    resize = (resize[0] or min(image.shape[:2]), resize[1])
                    image = resize_image(image, *resize)
                writer.add(f"{split}-{record.index:08d}", image, record.label, record.meta)
            except ValueError as e:
                raise InputDataError(f"{source.spec}: record {record.index}: {e}") from None
        provenance = {"kind": "ingest", **source.provenance(), "split": split, "seed": seed,
                      "shard_size": shard_size, "gensynth_version": __version__}
        if resize is not None:
            provenance["resize"] = {"size": resize[0], "mode": resize[1]}
        if license:  # only when given: the manifest of a set made without one keeps its bytes
            provenance["license"] = license
        if per_class:  # a K-per-class subset: the seeded choice is part of what the set is
            provenance["per_class"] = {"k": per_class, "seed": 0 if seed is None else seed,
                                       "chosen_from": len(source)}
        manifest = writer.manifest(classes=source.classes, provenance=provenance)
    swap_in(folder, split, manifest, stage)
    log.info("wrote %d samples in %d shards (%.1f MB) and %s", manifest.num_samples, len(manifest.shards),
             manifest.num_bytes / 1e6, manifest_url(folder))
    return manifest


def remove_set_debris(folder: str) -> None:
    """Remove what killed ingests left in `folder` (storage.is_debris), but never a file the manifest
    present lists: a run killed in the middle of swap_in leaves a manifest naming staged shards."""
    try:
        keep = {s.name for s in read_manifest(folder).shards} if storage.exists(manifest_url(folder)) else set()
    except InputDataError:
        return  # an unreadable manifest: nothing can be proven unlisted
    storage.remove_debris(folder, keep=keep)


def swap_in(folder: str, split: str, manifest: Manifest, stage: str) -> None:
    """Replace whatever set is in `folder` by the one staged by `stage`, so that at every instant the
    manifest present lists only shards that are there whole (old or new: each manifest is put whole,
    by rename or by a single S3 put):

    1. manifest.json is replaced by one listing the new shards under their staged names: the new set
       is complete, the old one no longer listed;
    2. each staged shard is copied over its own name (a hard link renamed into place; an S3 copy);
    3. manifest.json is replaced by the final one, listing the shards by their own names;
    4. the staged copies, stale shards and earlier runs' debris go.

    A failure before 1 removes the staged shards and leaves the old set as it was; after 1 the new set
    is there (under staged names until 3), so nothing is removed that the manifest lists.
    """
    crash_point("ingest.staged")
    staged = [staged_name(s.name, stage) for s in manifest.shards]
    try:
        write_manifest(folder, dataclasses.replace(
            manifest, shards=[dataclasses.replace(s, name=n) for s, n in zip(manifest.shards, staged)]))
    except BaseException:
        for name in staged:
            storage.remove(storage.join(folder, name))
        raise
    try:
        for i, (shard, name) in enumerate(zip(manifest.shards, staged)):
            if i == len(staged) // 2:
                crash_point("ingest.swap")  # half the old names hold new shards, the manifest lists staged ones
            storage.copy(storage.join(folder, name), storage.join(folder, shard.name))
        publish(folder, manifest)
    except GensynthError as e:
        raise StorageError(f"{e}; the new set is complete in {folder} under temporary names (its "
                           f"{MANIFEST_NAME} lists them): run the same command with --overwrite to finish") from e
    crash_point("ingest.cleanup")
    for name in staged:
        storage.remove(storage.join(folder, name))
    new = {s.name for s in manifest.shards}
    for name in shard_names(folder, split):
        if name not in new:
            storage.remove(storage.join(folder, name))
    storage.remove_debris(folder, keep=new)
