"""`gensynth augment REAL SYNTH OUT`: one shard set of real and synthetic samples, interleaved at a mix.

Teams that read with plain webdataset or Hugging Face datasets cannot use MixLoader; this writes the mix
as an ordinary shard set (it streams, verifies and loads like any other):
- every real sample once, and as many synthetic ones as make `synthetic_fraction` of the set (all of
  SYNTH at most), spread evenly through the shards: each stretch of the set has the mix;
- real samples are copied byte for byte (image, cls and any arrays; only the key gets a `real-` prefix),
  synthetic ones too (`synth-` prefix); each sample's `json` says {"source", "weight", "key", "meta"}:
  where it came from, the loss weight a trainer should give it, its own key and its original json;
- when SYNTH has soft labels (`soft.npy`), a real sample gets its one-hot label as `soft.npy`, so every
  sample of the set has the same fields;
- the manifest's provenance names both inputs by their manifest sha256 and records the mix.

Every input shard a sample is copied from is read whole and hash-checked against its manifest; a mismatch
stops the run and leaves OUT as it was (the shards are staged and swapped in as `gensynth shard` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from gensynth import __version__, storage
from gensynth.data.codec import array_field, decode_label, encode_array
from gensynth.data.ingest import remove_set_debris, swap_in
from gensynth.data.manifest import (
    MANIFEST_NAME,
    HashingReader,
    Manifest,
    manifest_sha256,
    manifest_url,
    read_manifest,
)
from gensynth.data.tario import CorruptShard, TruncatedShard, iter_samples
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import InputDataError, UsageError
from gensynth.progress import progress

log = logging.getLogger("gensynth")
SPLIT = "train"
SOFT = "soft"  # the array of soft labels a synthetic set may carry (generate --relabel)


def read_mix(path: str) -> dict[str, Any]:
    """The synthetic_fraction and synthetic_weight of a recommended_mix JSON written by `gensynth eval`."""
    try:
        block = json.loads(storage.read_bytes(path))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--mix {path}: not a readable JSON file ({e})") from None
    block = block.get("recommended_mix", block) if isinstance(block, dict) else None
    if not isinstance(block, dict) or not {"synthetic_fraction", "synthetic_weight"} <= set(block):
        raise UsageError(f"--mix {path}: expected a recommended_mix block with synthetic_fraction and "
                         "synthetic_weight (gensynth eval writes one next to metrics.json)")
    return block


def _check_pair(real: Manifest, synth: Manifest, real_url: str, synth_url: str) -> None:
    for url, m in ((real_url, real), (synth_url, synth)):
        if m.image_shape is None or not m.class_histogram:
            raise UsageError(f"{url}: augment needs a labelled image set (its manifest has no images or no labels)")
    if real.image_shape != synth.image_shape or real.schema["image"]["field"] != synth.schema["image"]["field"]:
        raise UsageError(f"{synth_url} holds {synth.schema['image']['field']} images of {synth.image_shape} (H, W, C), "
                         f"{real_url} {real.schema['image']['field']} of {real.image_shape}: generate the synthetic "
                         "set at the real set's size and encoding (gensynth generate --encoding)")
    if real.classes and synth.classes and real.classes != synth.classes:
        raise UsageError(f"{synth_url} names its classes {synth.classes[:4]}..., {real_url} {real.classes[:4]}...: "
                         "the two sets must share one class list")
    real_arrays = set(real.schema.get("arrays") or {})
    synth_arrays = set(synth.schema.get("arrays") or {}) - {SOFT}
    if real_arrays != synth_arrays:
        raise UsageError(f"{real_url} has arrays {sorted(real_arrays) or 'none'}, {synth_url} "
                         f"{sorted(synth_arrays) or 'none'}: augment joins sets whose samples hold the same fields")


def _samples(url: str, manifest: Manifest, limit: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The first `limit` samples of a set in manifest order; each shard they come from is read whole and its
    sha256 checked."""
    left = limit
    for shard in manifest.shards:
        if left <= 0:
            return
        shard_url = storage.join(url, shard.name)
        with storage.open_read(shard_url) as f, storage.storage_errors(shard_url, "read"):
            reader = HashingReader(f)
            try:
                for sample in iter_samples(reader):
                    if left > 0:
                        left -= 1
                        yield sample
            except (TruncatedShard, CorruptShard) as e:
                raise InputDataError(f"{shard_url}: {e}; nothing was written (run `gensynth inspect {url} "
                                     "--verify`)") from None
            reader.read_rest()
        if (reader.sha.hexdigest(), reader.size) != (shard.sha256, shard.bytes):
            raise InputDataError(f"{shard_url} does not match its manifest entry (sha256 or size); nothing was "
                                 f"written (run `gensynth inspect {url} --verify`)")


def synthetic_count(real: int, available: int, fraction: float) -> int:
    """Synthetic samples that make `fraction` of a set holding `real` real ones, at most `available`."""
    return min(available, int(round(real * fraction / (1 - fraction))))


def interleave(real: int, synthetic: int) -> Iterator[bool]:
    """True (synthetic) or False (real) per position: each prefix holds its share of synthetic samples,
    to one sample."""
    total = real + synthetic
    taken = 0
    for i in range(total):
        want = (i + 1) * synthetic // total
        yield want > taken
        taken = want


def augment(real: str, synthetic: str, out: str, synthetic_fraction: float = 0.5, synthetic_weight: float = 1.0,
            shard_size: int = 5000, overwrite: bool = False, mix_source: str | None = None,
            license: str = "") -> Manifest:
    """Write the augmented set OUT from REAL and SYNTH; see the module docstring."""
    if not 0 < synthetic_fraction < 1:
        raise UsageError(f"synthetic fraction {synthetic_fraction}: must be strictly between 0 and 1")
    if not synthetic_weight >= 0:
        raise UsageError(f"synthetic weight {synthetic_weight}: must be >= 0")
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: must be >= 1")
    real_m, synth_m = read_manifest(real), read_manifest(synthetic)
    _check_pair(real_m, synth_m, real, synthetic)
    if storage.exists(manifest_url(out)) and not overwrite:
        raise UsageError(f"{out} already holds a complete shard set ({MANIFEST_NAME}); pass --overwrite to replace "
                         "it, or choose another OUT")
    n_real = real_m.num_samples
    n_syn = synthetic_count(n_real, synth_m.num_samples, synthetic_fraction)
    if n_syn < synthetic_count(n_real, 10**18, synthetic_fraction):
        log.warning("%s holds %d samples, fewer than the %d that a synthetic share of %.2f needs: all are used "
                    "(share %.3f)", synthetic, synth_m.num_samples, synthetic_count(n_real, 10**18, synthetic_fraction),
                    synthetic_fraction, n_syn / (n_real + n_syn))
    num_classes = synth_m.num_classes or 0
    shape = real_m.image_shape
    arrays = {name: (spec["dtype"], tuple(spec["shape"]))
              for name, spec in (synth_m.schema.get("arrays") or {}).items()}
    has_soft = SOFT in arrays
    remove_set_debris(out)
    stage = storage.owner_tag()
    streams = {False: _samples(real, real_m, n_real), True: _samples(synthetic, synth_m, n_syn)}
    with ShardSetWriter(out, SPLIT, shard_size, real_m.schema["image"]["field"], stage=stage) as writer:
        for is_synth in progress(interleave(n_real, n_syn), total=n_real + n_syn, desc="augment", unit="samples"):
            key, fields = next(streams[is_synth])
            label = decode_label(fields.get("cls"), num_classes)
            try:
                meta = json.loads(fields["json"]) if "json" in fields else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise InputDataError(f"{synthetic if is_synth else real}: sample {key}: its json field is not "
                                     "JSON; nothing was written") from None
            fields = dict(fields)
            if has_soft and not is_synth:
                fields[array_field(SOFT)] = encode_array(np.eye(num_classes, dtype=np.float32)[label])
            source = "synthetic" if is_synth else "real"
            fields["json"] = json.dumps({"source": source, "weight": synthetic_weight if is_synth else 1.0,
                                         "key": key, "meta": meta}, sort_keys=True, separators=(",", ":")).encode()
            writer.add_encoded(f"{'synth' if is_synth else 'real'}-{key}", fields, label, shape, arrays)
        for stream in streams.values():  # the last shard each stream read from is checked once read whole
            next(stream, None)
        provenance = {"kind": "augment",
                      "real": {"train": real, "manifest_sha256": manifest_sha256(real), "samples": n_real},
                      "synthetic": {"train": synthetic, "manifest_sha256": manifest_sha256(synthetic),
                                    "samples": n_syn, "of": synth_m.num_samples,
                                    "training_data": synth_m.provenance.get("training_data")},
                      "mix": {"synthetic_fraction": synthetic_fraction, "synthetic_weight": synthetic_weight,
                              "share": n_syn / (n_real + n_syn), "from": mix_source},
                      "shard_size": shard_size, "gensynth_version": __version__,
                      **({"license": license} if license else {})}
        manifest = writer.manifest(classes=real_m.classes or synth_m.classes, provenance=provenance)
    swap_in(out, SPLIT, manifest, stage)
    log.info("wrote %d real + %d synthetic samples in %d shards and %s", n_real, n_syn, len(manifest.shards),
             manifest_url(out))
    return manifest
