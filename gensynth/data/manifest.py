"""`manifest.json`: the list of a shard set's shards (samples, bytes, sha256), its class histogram,
schema and provenance. Written last and atomically: a reader that finds it may trust every shard
it lists. The file holds no timestamp, so the same input gives the same manifest bytes (and the
same manifest sha256, which training runs record as their data provenance).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from gensynth import storage
from gensynth.data.codec import ARRAY_DTYPES, DecodeError, decode_label
from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples
from gensynth.errors import InputDataError, UsageError

MANIFEST_NAME = "manifest.json"
FORMAT = "gensynth-shards/1"


@dataclass
class ShardInfo:
    name: str  # file name, relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    schema: dict[str, Any]  # e.g. {"image": {"encoding": "png", "height": 28, "width": 28, "channels": 1}}
    class_histogram: dict[str, int]  # label (as a string, JSON keys are strings) -> count
    classes: list[str] | None = None  # label names, index = label
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_classes(self) -> int | None:
        """How many classes a label may name (0..num_classes-1), or None for a set without labels: as many
        as the class names, or as the largest label in the histogram says, whichever is more."""
        if not self.class_histogram:
            return None
        return max(len(self.classes or []), max(int(k) for k in self.class_histogram) + 1)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) of the set's images per its schema; None for a set of arrays only."""
        image = self.schema.get("image")
        return (image["height"], image["width"], image["channels"]) if image else None

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        """Parse and check a manifest: anything of the wrong shape is one InputDataError naming `where`
        and the field, so no reader of a Manifest has to distrust its fields."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested beyond reason
            raise InputDataError(f"{where}: not a gensynth manifest: not JSON: {e}") from None
        _check_manifest(data, where)
        data.pop("num_samples", None)  # derived from the shards
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


def _shown(value: Any) -> str:
    """A JSON value for a message: short, with its JSON type."""
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list",
             dict: "an object", type(None): "null"}
    text = json.dumps(value)
    return f"{text[:40] + '...' if len(text) > 40 else text} ({kinds.get(type(value), type(value).__name__)})"


def _whole(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


_SHARD_FIELDS = ("name", "samples", "bytes", "sha256")
_MANIFEST_FIELDS = {"format", "split", "shards", "schema", "class_histogram", "classes", "provenance",
                    "num_samples"}
_REQUIRED = ("split", "shards", "schema", "class_histogram")


def plain_file_name(name: Any) -> bool:
    """A name that stays inside its folder: no path separator, not `.` or `..`, not empty."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _check_manifest(data: Any, where: str) -> None:
    def bad(field: str, value: Any, expected: str) -> InputDataError:
        return InputDataError(f"{where}: not a gensynth manifest: {field} is {_shown(value)}, expected {expected}")

    if not isinstance(data, dict):
        raise InputDataError(f"{where}: not a gensynth manifest: it holds {_shown(data)}, expected an object "
                             f"with format {FORMAT!r}")
    if data.get("format") != FORMAT:
        raise InputDataError(f"{where}: not a gensynth manifest: format is {data.get('format')!r}, "
                             f"expected {FORMAT!r}")
    for name in _REQUIRED:
        if name not in data:
            raise InputDataError(f"{where}: not a gensynth manifest: no field {name!r}")
    unknown = sorted(set(data) - _MANIFEST_FIELDS)
    if unknown:
        raise InputDataError(f"{where}: not a gensynth manifest: unknown field {unknown[0]!r} (fields are "
                             f"{', '.join(sorted(_MANIFEST_FIELDS))})")
    if not isinstance(data["split"], str):
        raise bad("split", data["split"], "text")
    shards = data["shards"]
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list of {name, samples, bytes, sha256}")
    seen: set[str] = set()
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise bad(f"shards[{i}]", shard, "an object {name, samples, bytes, sha256}")
        for name in _SHARD_FIELDS:
            if name not in shard:
                raise InputDataError(f"{where}: not a gensynth manifest: shards[{i}] has no field {name!r}")
        extra = sorted(set(shard) - set(_SHARD_FIELDS))
        if extra:
            raise InputDataError(f"{where}: not a gensynth manifest: shards[{i}] has an unknown field {extra[0]!r}")
        if not plain_file_name(shard["name"]):
            raise bad(f"shards[{i}].name", shard["name"], "a plain file name inside the set's folder (no '/', "
                      "'\\', '.' or '..')")
        if shard["name"] in seen:
            raise bad(f"shards[{i}].name", shard["name"], "each shard listed once")
        seen.add(shard["name"])
        for name in ("samples", "bytes"):
            if not _whole(shard[name]):
                raise bad(f"shards[{i}].{name}", shard[name], "a whole number >= 0")
        sha = shard["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise bad(f"shards[{i}].sha256", sha, "64 lower-case hex digits")
    if "num_samples" in data and not _whole(data["num_samples"]):
        raise bad("num_samples", data["num_samples"], "a whole number >= 0")
    _check_schema(data["schema"], bad)
    histogram = data["class_histogram"]
    if not isinstance(histogram, dict):
        raise bad("class_histogram", histogram, "an object label -> count")
    for label, count in histogram.items():
        if not (label.isascii() and label.isdigit()) or len(label) > 9:
            raise bad("a class_histogram label", label, "a class index 0, 1, ... (as text)")
        if not _whole(count):
            raise bad(f"class_histogram[{label!r}]", count, "a whole number >= 0")
    classes = data.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise bad("classes", classes, "a list of class names (text) or null")
    if not isinstance(data.get("provenance", {}), dict):
        raise bad("provenance", data["provenance"], "an object")


def _check_schema(schema: Any, bad: Any) -> None:
    """The parts of the schema that readers use: the image size and encoding, each array's field, dtype, shape."""
    if not isinstance(schema, dict):
        raise bad("schema", schema, "an object")
    image = schema.get("image")
    if image is not None:
        if not isinstance(image, dict):
            raise bad("schema.image", image, "an object {field, encoding, height, width, channels, dtype}")
        for name in ("height", "width"):
            if not _whole(image.get(name), 1):
                raise bad(f"schema.image.{name}", image.get(name), "a whole number >= 1")
        if image.get("channels") not in (1, 2, 3, 4):
            raise bad("schema.image.channels", image.get("channels"), "1, 2, 3 or 4")
        for name in ("field", "encoding", "dtype"):
            if not isinstance(image.get(name), str):
                raise bad(f"schema.image.{name}", image.get(name), "text")
    arrays = schema.get("arrays")
    if arrays is not None:
        if not isinstance(arrays, dict):
            raise bad("schema.arrays", arrays, "an object name -> {field, dtype, shape}")
        for name, spec in arrays.items():
            if not isinstance(spec, dict):
                raise bad(f"schema.arrays.{name}", spec, "an object {field, dtype, shape}")
            if not isinstance(spec.get("field"), str):
                raise bad(f"schema.arrays.{name}.field", spec.get("field"), "text")
            if spec.get("dtype") not in ARRAY_DTYPES:
                raise bad(f"schema.arrays.{name}.dtype", spec.get("dtype"), f"one of {', '.join(ARRAY_DTYPES)}")
            shape = spec.get("shape")
            if not (isinstance(shape, list) and all(_whole(n) for n in shape)):
                raise bad(f"schema.arrays.{name}.shape", shape, "a list of whole numbers >= 0")


def manifest_url(location: str) -> str:
    """A shard set's folder/prefix or the manifest's own URL -> the manifest's URL."""
    location = str(location).rstrip("/")
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def read_manifest(location: str) -> Manifest:
    url = manifest_url(location)
    if not storage.exists(url):
        shown = str(location).rstrip("/")
        raise UsageError(f"no {MANIFEST_NAME} at {storage.parent(url)}: not a complete shard set; for WebDataset "
                         f"tars you already have, write one with `gensynth index '{shown}'` (the tars stay as they "
                         "are), or make a new set with `gensynth shard`")
    return Manifest.from_json(storage.read_bytes(url), where=url)


def manifest_sha256(location: str) -> str:
    return hashlib.sha256(storage.read_bytes(manifest_url(location))).hexdigest()


def write_manifest(folder: str, manifest: Manifest) -> str:
    """Write the manifest alone (atomically); a finished set's writer calls card.publish, which adds its card."""
    url = storage.join(folder, MANIFEST_NAME)
    storage.write_bytes(url, manifest.to_json().encode("utf-8"))
    return url


class HashingReader:
    """Hashes and counts what is read through it, so one pass both parses a shard and checks its sha256."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def read_rest(self) -> None:
        while self.read(1 << 20):
            pass


def verify_shards(folder: str, manifest: Manifest) -> list[str]:
    """Problems found by reading every shard the manifest lists (empty list: all good): its size and sha256,
    its tar structure, its sample count, and (for a labelled set) every sample's label."""
    problems = []
    for shard in manifest.shards:
        url = storage.join(folder, shard.name)
        if not storage.exists(url):
            problems.append(f"{shard.name}: missing")
            continue
        problems.extend(f"{shard.name}: {p}" for p in _verify_shard(url, shard, manifest.num_classes))
    return problems


def _verify_shard(url: str, shard: ShardInfo, num_classes: int | None) -> list[str]:
    count = 0
    damage = None
    bad_labels: list[str] = []
    with storage.open_read(url) as f, storage.storage_errors(url, "read"):
        reader = HashingReader(f)
        try:
            for key, fields in iter_samples(reader):
                count += 1
                if num_classes is not None:
                    try:
                        decode_label(fields.get("cls"), num_classes)
                    except DecodeError as e:
                        bad_labels.append(f"sample {key}: {e}")
        except (TruncatedShard, CorruptShard) as e:
            damage = f"damaged after {count} samples: {e}"
        reader.read_rest()
    problems = []
    digest = reader.sha.hexdigest()
    if reader.size != shard.bytes:
        problems.append(f"{reader.size} bytes, manifest says {shard.bytes}")
    elif digest != shard.sha256:
        problems.append(f"sha256 {digest[:12]}..., manifest says {shard.sha256[:12]}...")
    if damage:
        problems.append(damage)
    elif count != shard.samples:
        problems.append(f"holds {count} samples, manifest says {shard.samples}")
    if bad_labels:
        more = len(bad_labels) - 1
        problems.append(bad_labels[0] + (f" (and {more} more samples with a bad label)" if more else ""))
    return problems


def training_sets(provenance: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every shard set the model behind a generated set saw, from its provenance.training_data: a list of
    {"train", "manifest_sha256", "model", "kind"}, kind "images" (a set of real images it learnt from; the
    first is the one its samples imitate) or "derived" (a set computed from one listed too, e.g. a prior's
    code shards). Sets generated before the list existed recorded one dict; it is read as that list."""
    recorded = (provenance or {}).get("training_data")
    if isinstance(recorded, list):
        return [s for s in recorded if isinstance(s, dict)]
    if not isinstance(recorded, dict):
        return []
    old = dict(recorded)
    sets = [{"train": old.get("train"), "manifest_sha256": old.get("manifest_sha256"), "model": None,
             "kind": "images"}]
    if isinstance(old.get("codes"), dict):
        sets.append({**old["codes"], "model": "prior", "kind": "derived"})
    if isinstance(old.get("vqvae"), dict):
        sets.append({**old["vqvae"], "model": "vqvae", "kind": "images"})
    return sets


def imitated_set(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The real image set a generated set's samples imitate (the first "images" entry), or {}."""
    return next((s for s in training_sets(provenance) if s.get("kind") == "images"), {})
