"""`gensynth index SHARDS`: a manifest.json for WebDataset tars that exist already, without rewriting them.

    gensynth index 'wds/mine-{000000..000009}.tar'                 # labels in cls (an index or a class name)
    gensynth index wds/ --label-key json.label --class-names cat,dog # labels inside each sample's json

Tars written by webdataset's ShardWriter, img2dataset or a team's own pipeline work as they are: every
shard is read once, whole, for its sample count, bytes and sha256; every sample's image header (field,
size, channels) and label are read and checked; the manifest records the schema inferred (the image
sizes seen, when there are several: train them with data.resize), the class histogram and names, and
provenance "indexed". After it, the set streams, trains, generates and evaluates like one of ours.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any

from gensynth import __version__, storage
from gensynth.data.card import publish
from gensynth.data.codec import IMAGE_EXTENSIONS, DecodeError, LabelSpec, image_header
from gensynth.data.manifest import MANIFEST_NAME, HashingReader, Manifest, ShardInfo, manifest_url
from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples
from gensynth.errors import InputDataError, UsageError
from gensynth.progress import progress

log = logging.getLogger("gensynth")


def shard_urls(source: str) -> list[str]:
    """A brace pattern or one .tar, or a folder / prefix (its *.tar files, sorted) -> shard URLs."""
    if "{" in source or source.endswith(".tar"):
        urls = storage.expand_braces(source)
    else:
        folder = source.rstrip("/")
        urls = [storage.join(folder, n) for n in sorted(storage.listdir(folder)) if n.endswith(".tar")]
        if not urls:
            raise UsageError(f"{source}: no .tar files there; name the shards with a pattern, e.g. "
                             "'wds/mine-{000000..000009}.tar'")
    missing = [u for u in urls if not storage.exists(u)]
    if missing:
        raise UsageError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                             else ""))
    if len({storage.parent(u) for u in urls}) > 1:
        raise UsageError(f"{source}: the shards lie in several folders; a manifest lists the shards of one folder")
    return urls


class _Survey:
    """What the samples hold, tallied while the shards are read."""

    def __init__(self, image_key: str | None, label: LabelSpec):
        self.image_key, self.label = image_key, label
        self.sizes: Counter[tuple[int, int]] = Counter()
        self.channels: Counter[int] = Counter()
        self.fields: Counter[str] = Counter()
        self.labels: Counter[int | str] = Counter()
        self.unlabelled = 0
        self.has_json = False
        self.first_size: tuple[str, str, tuple[int, int]] | None = None  # (shard, key, (H, W))
        self.seen_fields: set[str] = set()

    def add(self, shard: str, key: str, fields: dict[str, bytes]) -> None:
        self.seen_fields.update(fields)
        ext = self.image_key if self.image_key in fields else next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        if ext is None:
            wanted = self.image_key or ", ".join(IMAGE_EXTENSIONS)
            raise InputDataError(f"{shard}: sample {key} has no image field ({wanted}); it has "
                                 f"{', '.join(sorted(fields)) or 'nothing'} (name the field with --image-key)")
        try:
            h, w, c = image_header(fields[ext], ext)
            value = self.label.raw(fields)
        except DecodeError as e:
            raise InputDataError(f"{shard}: sample {key}: {e}") from None
        self.sizes[(h, w)] += 1
        self.channels[c] += 1
        self.fields[ext] += 1
        self.has_json = self.has_json or "json" in fields
        if self.first_size is None:
            self.first_size = (shard, key, (h, w))
        if value is None or value == "":
            self.unlabelled += 1
        else:
            self.labels[value] += 1


def _classes(labels: Counter[int | str], class_names: list[str] | None, key: str) -> tuple[dict[int, int], list | None,
                                                                                            bool]:
    """(histogram by class index, class names, whether labels are names) from the raw labels seen."""
    numbers = {v for v in labels if isinstance(v, int) or (isinstance(v, str) and v.isascii() and v.isdigit())}
    names = set(labels) - numbers
    if numbers and names:
        raise InputDataError(f"labels at {key} mix class indices ({sorted(map(str, numbers))[:3]}) and names "
                             f"({sorted(names)[:3]}); one kind per set")
    if names:
        classes = list(class_names) if class_names else sorted(names)
        unknown = sorted(names - set(classes))
        if unknown:
            raise UsageError(f"labels at {key} include {', '.join(unknown[:5])}, not in --class-names")
        index = {n: i for i, n in enumerate(classes)}
        return {index[n]: c for n, c in labels.items()}, classes, True
    histogram: Counter[int] = Counter()
    for v, c in labels.items():
        histogram[int(v)] += c
    if class_names and histogram and max(histogram) >= len(class_names):
        raise UsageError(f"labels at {key} go up to {max(histogram)}, --class-names names {len(class_names)} classes")
    return dict(histogram), list(class_names) if class_names else None, False


def index_shards(source: str, label_key: str = "cls", image_key: str | None = None,
                 class_names: list[str] | None = None, overwrite: bool = False,
                 license: str = "") -> tuple[Manifest, str]:
    """Write the manifest of the existing shards `source` (see the module docstring); return it and its URL."""
    urls = shard_urls(source)
    folder = storage.parent(urls[0])
    if storage.exists(manifest_url(folder)) and not overwrite:
        raise UsageError(f"{folder} already has a {MANIFEST_NAME}; pass --overwrite to index it again")
    try:
        spec = LabelSpec(label_key)
    except ValueError as e:
        raise UsageError(f"--label-key: {e}") from None
    survey = _Survey(image_key, spec)
    shards = []
    for url in progress(urls, total=len(urls), desc="index", unit="shards"):
        name = storage.basename(url)
        with storage.open_read(url) as f, storage.storage_errors(url, "read"):
            reader = HashingReader(f)
            count = 0
            try:
                for key, fields in iter_samples(reader):
                    survey.add(name, key, fields)
                    count += 1
            except (TruncatedShard, CorruptShard) as e:
                raise InputDataError(f"{url}: {e} (after {count} samples); repair or drop the shard") from None
            reader.read_rest()
        shards.append(ShardInfo(name, count, reader.size, reader.sha.hexdigest()))
    total = sum(s.samples for s in shards)
    if total == 0:
        raise InputDataError(f"{source}: the shards hold no samples")
    if len(survey.channels) > 1:
        raise InputDataError(f"{source}: images with different channel counts ({dict(survey.channels)}); convert "
                             "them to one (e.g. all RGB) before indexing")
    histogram, classes, named = _classes(survey.labels, class_names, label_key)
    if not histogram:
        fields = ", ".join(sorted(survey.seen_fields))
        log.warning("no sample has a label at %s (fields seen: %s): the set is indexed as unlabelled; name the "
                    "label with --label-key (e.g. --label-key json.label)", label_key, fields)
    elif survey.unlabelled:
        log.warning("%d of %d samples have no label at %s: they are counted in the manifest's provenance, and "
                    "training skips them as corrupt samples (data.max_corrupt_fraction)", survey.unlabelled, total,
                    label_key)
    field = survey.fields.most_common(1)[0][0]
    (h, w), c = survey.first_size[2], next(iter(survey.channels))
    image: dict[str, Any] = {"field": field, "encoding": field, "height": h, "width": w, "channels": c,
                             "dtype": "uint8"}
    if len(survey.sizes) > 1:  # the size given is the first sample's; data.resize makes them one
        image["sizes"] = {f"{hh}x{ww}": n for (hh, ww), n in sorted(survey.sizes.items())}
    if len(survey.fields) > 1:
        image["fields"] = dict(sorted(survey.fields.items()))
    schema: dict[str, Any] = {"key": "str", "image": image}
    if histogram:
        schema["cls"] = "int"
        if label_key != "cls" or named:
            schema["label"] = {**spec.describe(), "names": named}
    if survey.has_json:
        schema["json"] = "object"
    provenance = {"kind": "indexed", "source": source, "label_key": label_key, "unlabelled": survey.unlabelled,
                  "gensynth_version": __version__, **({"license": license} if license else {})}
    split = re.sub(r"[-_]?\d+$", "", storage.basename(urls[0]).removesuffix(".tar")) or "train"
    manifest = Manifest(split=split, shards=shards, schema=schema,
                        class_histogram={str(k): v for k, v in sorted(histogram.items())}, classes=classes,
                        provenance=provenance)
    url = publish(folder, manifest)
    sizes = ", ".join(f"{k} ({v})" for k, v in image.get("sizes", {f"{h}x{w}": total}).items())
    log.info("indexed %d samples in %d shards: %s images %s, %d channel(s); %d classes%s; %s", total, len(shards),
             field, sizes, c, len(histogram), f", {survey.unlabelled} unlabelled" if survey.unlabelled else "",
             url)
    return manifest, url
