"""`manifest.json`: the list of a shard set's shards (samples, bytes, sha256), its class histogram,
schema and provenance. Written last and atomically: a reader that finds it may trust every shard
it lists. The file holds no timestamp, so the same input gives the same manifest bytes (and the
same manifest sha256, which training runs record as their data provenance).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from gensynth import storage
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

    def to_json(self) -> str:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            data.pop("num_samples", None)
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            return cls(**data)
        except (ValueError, KeyError, TypeError) as e:
            raise InputDataError(f"{where}: not a gensynth manifest: {e}") from None


def manifest_url(location: str) -> str:
    """A shard set's folder/prefix or the manifest's own URL -> the manifest's URL."""
    location = str(location).rstrip("/")
    return location if location.endswith(".json") else storage.join(location, MANIFEST_NAME)


def read_manifest(location: str) -> Manifest:
    url = manifest_url(location)
    if not storage.exists(url):
        raise UsageError(f"no {MANIFEST_NAME} at {storage.parent(url)}: not a complete shard set "
                         f"(make one with `gensynth shard`, or name the shards with a pattern)")
    return Manifest.from_json(storage.read_bytes(url).decode("utf-8"), where=url)


def manifest_sha256(location: str) -> str:
    return hashlib.sha256(storage.read_bytes(manifest_url(location))).hexdigest()


def write_manifest(folder: str, manifest: Manifest) -> str:
    url = storage.join(folder, MANIFEST_NAME)
    storage.write_bytes(url, manifest.to_json().encode("utf-8"))
    return url


def verify_shards(folder: str, manifest: Manifest) -> list[str]:
    """Problems found by re-hashing every shard the manifest lists (empty list: all good)."""
    problems = []
    for shard in manifest.shards:
        url = storage.join(folder, shard.name)
        if not storage.exists(url):
            problems.append(f"{shard.name}: missing")
            continue
        digest, size = storage.sha256_of(url)
        if size != shard.bytes:
            problems.append(f"{shard.name}: {size} bytes, manifest says {shard.bytes}")
        elif digest != shard.sha256:
            problems.append(f"{shard.name}: sha256 {digest[:12]}..., manifest says {shard.sha256[:12]}...")
    return problems
