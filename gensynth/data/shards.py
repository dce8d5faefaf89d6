"""Which shards a source names, and the raw samples of a worker's segments of them.

    shards, manifest = resolve_shards("data/fashion/train")   # a folder, prefix or manifest URL
    shards, _ = resolve_shards("s3://bucket/set/train-{000000..000009}.tar")  # no manifest: samples counted
    for shard_name, key, fields in ShardReader(shards).read(segments): ...   # fields: {extension: bytes}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from gensynth import storage
from gensynth.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from gensynth.data.plan import Segment
from gensynth.data.tario import CorruptShard, TruncatedShard, count_samples, iter_samples, skip_samples
from gensynth.errors import UsageError

log = logging.getLogger("gensynth")


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


class ShardReader:
    """Raw samples (shard name, key, fields) of a worker's segments, in order, logging damage."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        # samples the plan expected but a truncated or corrupt shard did not hold, and samples a shard holds
        # beyond its manifest entry (the plan has no place for them: they are skipped, not delivered)
        self.missing = 0

    def read(self, segments: list[Segment]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        i = 0
        while i < len(segments):  # consecutive segments further on in one shard: one pass over it
            j = i + 1
            while j < len(segments) and segments[j].shard == segments[i].shard and \
                    segments[j].start >= segments[j - 1].stop:
                j += 1
            yield from self._read_shard(segments[i:j])
            i = j

    def _read_shard(self, segs: list[Segment]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        shard = self.shards[segs[0].shard]
        name = shard.name
        last = segs[-1]
        pos = 0  # samples of this shard passed so far
        k = 0  # the segment being read
        extra = 0  # samples after the last one its manifest entry counts
        problem = "it holds fewer samples than its manifest entry"
        try:
            with storage.open_read(shard.url) as f:
                pos = skip_samples(f, segs[0].start)  # headers only, up to the first planned sample
                samples = iter_samples(f)
                for key, fields in samples:
                    if pos >= segs[k].start:
                        yield name, key, fields
                    pos += 1
                    if pos >= segs[k].stop:
                        k += 1
                        if k == len(segs):
                            break
                if pos == last.stop == shard.samples:  # this segment ends the shard: nothing may follow
                    extra = sum(1 for _ in samples)  # read, not decoded; usually just the end marker
        except (TruncatedShard, CorruptShard, OSError) as e:
            problem = str(e)
            if pos >= last.stop:  # every planned sample was read: nothing lost, but say so
                log.warning("shard %s is damaged after its %d listed samples (%s)", shard.url, pos, problem)
        lost = sum(max(0, seg.stop - max(pos, seg.start)) for seg in segs)
        if lost > 0:
            log.warning("shard %s is damaged after %d samples (%s): %d planned samples skipped",
                        shard.url, pos, problem, lost)
            self.missing += lost
        if extra:
            log.warning("shard %s holds %d samples more than the %d its manifest entry lists: %d samples "
                        "skipped (run `gensynth inspect SET --verify`)", shard.url, extra, shard.samples, extra)
            self.missing += extra
