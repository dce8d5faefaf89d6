"""Data: ingest sources into shards, manifests, the streaming loader."""

from gensynth.data.manifest import Manifest, read_manifest
from gensynth.data.mix import MixLoader
from gensynth.data.shards import resolve_shards
from gensynth.data.stream import ShardLoader

__all__ = ["Manifest", "MixLoader", "ShardLoader", "read_manifest", "resolve_shards"]
