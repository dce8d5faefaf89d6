"""`gensynth inspect URL`: a shard set, a single shard, in a few readable lines; `--verify` re-hashes."""

from __future__ import annotations

from gensynth import storage
from gensynth.config import dump_yaml, load_config
from gensynth.data.manifest import Manifest, manifest_url, read_manifest, verify_shards
from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples
from gensynth.errors import InputDataError, UsageError


def describe_manifest(location: str, manifest: Manifest) -> list[str]:
    lines = [f"shard set  {location}",
             f"split      {manifest.split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
             f"{manifest.num_bytes / 1e6:.1f} MB"]
    image = manifest.schema.get("image")
    if image:
        lines.append(f"images     {image['height']}x{image['width']}x{image['channels']} {image['dtype']}, "
                     f"{image['encoding']}")
    for name, spec in (manifest.schema.get("arrays") or {}).items():
        lines.append(f"array      {name}: {spec['dtype']} {list(spec['shape'])} ({spec['field']})")
    if manifest.class_histogram:
        names = manifest.classes or []
        parts = []
        for label, count in manifest.class_histogram.items():
            i = int(label)
            named = i < len(names) and names[i] != label
            parts.append(f"{label}{'=' + names[i] if named else ''}: {count}")
        lines.append(f"classes    {len(manifest.class_histogram)}: " + ", ".join(parts))
    prov = manifest.provenance
    if prov.get("kind") == "codes":
        vq = prov.get("vqvae", {})
        lines.append(f"provenance codes of {prov.get('images', {}).get('train', '?')} by the VQ-VAE export "
                     f"{vq.get('export', '?')} (weights sha256 {str(vq.get('weights_sha256'))[:12]}...), "
                     f"{prov.get('num_codes', '?')} codes")
    elif prov:
        lines.append(f"provenance {prov.get('kind', '?')} from {prov.get('source', '?')}"
                     + (f", gensynth {prov['gensynth_version']}" if "gensynth_version" in prov else ""))
    sizes = [s.samples for s in manifest.shards]
    lines.append(f"shards     {manifest.shards[0].name} .. {manifest.shards[-1].name}, "
                 f"{min(sizes)}..{max(sizes)} samples each" if sizes else "shards     none")
    return lines


def describe_shard(url: str, show: int = 3) -> list[str]:
    lines = [f"shard      {url}"]
    count = 0
    fields_seen: set[str] = set()
    examples = []
    try:
        with storage.open_read(url) as f:
            for key, fields in iter_samples(f):
                count += 1
                fields_seen.update(fields)
                if len(examples) < show:
                    examples.append(f"  {key}: " + ", ".join(f"{k} ({len(v)} B)" for k, v in sorted(fields.items())))
    except (TruncatedShard, CorruptShard) as e:
        raise InputDataError(f"{url}: damaged after {count} samples: {e}") from None
    lines.append(f"samples    {count}, fields {', '.join(sorted(fields_seen))}")
    return lines + examples


def inspect(url: str, verify: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """(lines to print, ok). ok is False when --verify found a problem.

    A YAML config (with optional key=value overrides) is printed resolved, as a run would save it.
    """
    url = str(url).rstrip("/")
    if url.endswith((".yaml", ".yml")):
        return dump_yaml(load_config(url, overrides)).splitlines(), True
    if overrides:
        raise UsageError(f"key=value overrides apply to a YAML config, not to {url}")
    if url.endswith(".tar"):
        if not storage.exists(url):
            raise UsageError(f"shard not found: {url}")
        return describe_shard(url), True
    if not storage.exists(manifest_url(url)):
        raise UsageError(f"nothing to inspect at {url}: expected a shard set (a folder or prefix with "
                         "manifest.json) or a .tar shard")
    manifest = read_manifest(url)
    lines = describe_manifest(url, manifest)
    ok = True
    if verify:
        folder = storage.parent(manifest_url(url))
        problems = verify_shards(folder, manifest)
        if problems:
            ok = False
            lines.append(f"verify     FAILED: {len(problems)} of {len(manifest.shards)} shards")
            lines.extend(f"  {p}" for p in problems)
        else:
            lines.append(f"verify     ok: {len(manifest.shards)} shards match their sha256 and size")
    return lines, ok
