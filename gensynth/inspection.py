"""`gensynth inspect URL`: a shard set, a single shard, a run directory or a config, in a few readable lines;
`--verify` re-hashes (every shard of a set; an export's weights)."""

from __future__ import annotations

from pathlib import Path

import yaml

from gensynth import storage
from gensynth.config import dump_yaml, load_config
from gensynth.data.manifest import Manifest, manifest_url, read_manifest, verify_shards
from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples
from gensynth.errors import InputDataError, UsageError

RUN_CONFIG = "config.yaml"  # the resolved config a run saves in its directory


def describe_manifest(location: str, manifest: Manifest) -> list[str]:
    lines = [f"shard set  {location}",
             f"split      {manifest.split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
             f"{manifest.num_bytes / 1e6:.1f} MB"]
    image = manifest.schema.get("image")
    if image:
        lines.append(f"images     {image['height']}x{image['width']}x{image['channels']} {image['dtype']}, "
                     f"{image['encoding']}")
    if manifest.class_histogram:
        names = manifest.classes or []
        parts = []
        for label, count in manifest.class_histogram.items():
            i = int(label)
            named = i < len(names) and names[i] != label
            parts.append(f"{label}{'=' + names[i] if named else ''}: {count}")
        lines.append(f"classes    {len(manifest.class_histogram)}: " + ", ".join(parts))
    prov = manifest.provenance
    if prov:
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


def describe_run(folder: Path, verify: bool = False) -> tuple[list[str], bool]:
    """A run directory: its config in one line, checkpoints, export, sample grids, TensorBoard.
    With verify, the export's weights are checked against the sha256 its config.json records."""
    from gensynth.export import CONFIG as EXPORT_CONFIG  # torch and accelerate: imported only for runs
    from gensynth.export import WEIGHTS, ExportError, load_export, read_export_config
    from gensynth.train.checkpoint import complete_checkpoints

    try:
        cfg = yaml.safe_load((folder / RUN_CONFIG).read_text()) or {}
    except yaml.YAMLError as e:
        raise InputDataError(f"{folder / RUN_CONFIG}: not valid YAML: {e}") from None
    section = {k: cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("model", "train", "data")}
    lines = [f"run        {folder}",
             f"config     family {section['model'].get('family', '?')}, {section['train'].get('steps', '?')} steps "
             f"of batch {section['train'].get('batch_size', '?')}, data {section['data'].get('train', '?')}"]
    checkpoints = complete_checkpoints(folder / "checkpoints")
    complete = {path.name for _, path in checkpoints}
    leftovers = [p.name for p in sorted((folder / "checkpoints").glob("*")) if p.is_dir() and p.name not in complete]
    text = (f"{len(checkpoints)} complete, steps {', '.join(str(step) for step, _ in checkpoints)}; resumes from "
            f"{checkpoints[-1][1].name}" if checkpoints else "none complete (a rerun starts from step 0)")
    if leftovers:
        text += f"; {len(leftovers)} incomplete, never resumed from ({', '.join(leftovers)})"
    lines.append(f"checkpoints {text}")
    ok = True
    if (folder / "export" / EXPORT_CONFIG).is_file():
        config = read_export_config(folder)
        weights = folder / "export" / WEIGHTS
        size = weights.stat().st_size if weights.is_file() else 0
        lines.append(f"export     step {config.get('step', '?')}, {size / 1e6:.1f} MB, weights sha256 "
                     f"{str(config.get('weights_sha256'))[:16]}...")
        if verify:
            try:
                load_export(folder)
                lines.append("verify     ok: the weights match their sha256")
            except ExportError as e:
                ok = False
                lines.append(f"verify     FAILED: {e}")
    else:
        lines.append("export     none yet (written at the end of training)")
    grids = sorted((folder / "samples").glob("samples-step-*.png"))
    newest = f", newest {folder / 'samples' / grids[-1].name}" if grids else ""
    lines.append(f"samples    {len(grids)} grids{newest}")
    if (folder / "tb").is_dir():
        lines.append(f"tensorboard tensorboard --logdir {folder / 'tb'}")
    return lines, ok


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
    if not storage.is_remote(url) and (Path(url) / RUN_CONFIG).is_file() and not storage.exists(manifest_url(url)):
        return describe_run(Path(url), verify)
    if not storage.exists(manifest_url(url)):
        raise UsageError(f"nothing to inspect at {url}: expected a shard set (a folder or prefix with "
                         f"manifest.json), a .tar shard, a run directory (with {RUN_CONFIG}) or a YAML config")
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
