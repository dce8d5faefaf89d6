"""Code shards: a VQ-VAE export's code grids of an image shard set, written as a shard set of their own,
so a prior trains from shards with the same loader and loop as every other family.

    extract_codes("runs/vqvae_fashion", "data/fashion/train", "data/fashion-codes/train")

One streaming pass over the images (one process, a fixed order); each sample keeps its source key and
label and holds `codes.npy`, an int16 [grid, grid] array. The manifest's schema lists the array
(`schema["arrays"]["codes"]`); its provenance records what the codes mean and where they came from:
    {"kind": "codes", "vqvae": {"export", "run", "step", "weights_sha256", "config_sha256"},
     "images": {"train": <image shard set>, "manifest_sha256": ...}, "image": {height, width, channels},
     "num_codes": K, "grid": [h, w], "gensynth_version"}
so a prior can check that its codes belong to the VQ-VAE it bundles, and reuse them while they do.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from gensynth import __version__, storage
from gensynth.data.manifest import Manifest, manifest_sha256, manifest_url, read_manifest
from gensynth.data.stream import ShardLoader
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import UsageError
from gensynth.export import CONFIG, export_folder, load_export, read_export_config
from gensynth.families.vqvae.sampler import VQVAESampler
from gensynth.progress import progress

log = logging.getLogger("gensynth")
CODES = "codes"  # the array's name: field codes.npy, batch["codes"]


def export_identity(export: str) -> dict[str, Any]:
    """What identifies a VQ-VAE export: its weights' and config's sha256, run and step (and the data it
    trained on, which a prior's export carries on: a prior's samples owe something to both)."""
    folder = export_folder(export)
    config = read_export_config(folder)
    if config.get("family") != "vqvae":
        raise UsageError(f"{export}: an export of family {config.get('family')!r}; a prior needs a VQ-VAE run "
                         "(model.family=vqvae) or its export/")
    # absolute: the prior's export names it for reconstruction, which may run from another directory
    return {"export": str(folder.resolve()), "run": config.get("run"), "step": config.get("step"),
            "weights_sha256": config["weights_sha256"], "data": config.get("data"),
            "training_data": config.get("training_data"),
            "config_sha256": hashlib.sha256((folder / CONFIG).read_bytes()).hexdigest()}


def codes_match(manifest: Manifest, identity: dict[str, Any]) -> bool:
    prov = manifest.provenance
    return prov.get("kind") == "codes" and prov.get("vqvae", {}).get("weights_sha256") == identity["weights_sha256"]


def extract_codes(export: str, images: str, out: str, batch_size: int = 256, shard_size: int = 5000,
                  device: str | torch.device = "cpu") -> Manifest:
    """Encode every image of `images` with the VQ-VAE `export`; write the code shard set `out` (split train)."""
    identity = export_identity(export)
    sampler = VQVAESampler(*load_export(export), torch.device(device))  # a VQ-VAE: export_identity checked
    source = ShardLoader(images, batch_size=batch_size, mode="exact", rank=0, world_size=1, shuffle_buffer=0,
                         num_workers=1, decode_meta=False)
    if source.manifest is None or "image" not in source.manifest.schema:
        raise UsageError(f"{images}: not an image shard set with a manifest; give prior.images the images to encode")
    image = source.manifest.schema["image"]
    if (image["height"], image["width"], image["channels"]) != (sampler.height, sampler.width, sampler.channels):
        raise UsageError(f"{images} holds {image['height']}x{image['width']}x{image['channels']} images, the VQ-VAE "
                         f"was trained on {sampler.height}x{sampler.width}x{sampler.channels}")
    grid = [sampler.model.grid, sampler.model.grid]
    storage.makedirs(out)
    log.info("extracting codes of %s (%d images) with %s into %s", images, source.num_samples, identity["export"], out)
    with ShardSetWriter(out, "train", shard_size=shard_size) as writer:
        for batch in progress(source, total=len(source), desc="extract codes", unit="batches"):
            codes = sampler.encode(batch["image"]).numpy().astype(np.int16)
            for key, label, grid_codes in zip(batch["key"], batch["label"].tolist(), codes):
                writer.add(key, None, label=label if label >= 0 else None, arrays={CODES: grid_codes})
        provenance = {"kind": "codes", "vqvae": identity,
                      "images": {"train": images, "manifest_sha256": manifest_sha256(images)},
                      "image": {"height": sampler.height, "width": sampler.width, "channels": sampler.channels},
                      "num_codes": sampler.model.codebook_size, "grid": grid, "gensynth_version": __version__}
        manifest = writer.finish(classes=source.manifest.classes, provenance=provenance)
    log.info("wrote %d code grids (%dx%d of %d codes) in %d shards: %s", manifest.num_samples, *grid,
             sampler.model.codebook_size, len(manifest.shards), manifest_url(out))
    return manifest


def ensure_codes(export: str, images: str | None, out: str, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> Manifest:
    """The code shard set at `out`: reused when its manifest records this export's weights sha256, extracted
    when absent; refused (nothing is overwritten) when it holds codes of another export."""
    identity = export_identity(export)
    if storage.exists(manifest_url(out)):
        manifest = read_manifest(out)
        if codes_match(manifest, identity):
            log.info("reusing the code shards at %s (VQ-VAE export sha256 %s...)", out,
                     identity["weights_sha256"][:12])
            return manifest
        found = manifest.provenance.get("vqvae", {}).get("weights_sha256") or "none (not a code shard set)"
        raise UsageError(f"{out} already holds a shard set, of another VQ-VAE export (weights sha256 {found[:16]}), "
                         f"not of {identity['export']} ({identity['weights_sha256'][:16]}); remove it or set "
                         "data.train to a new folder for this VQ-VAE's codes")
    if images is None:
        images = read_export_config(export).get("data", {}).get("train")
        if not images:
            raise UsageError(f"{export} does not record the images it trained on; set prior.images")
    return extract_codes(export, images, out, batch_size=batch_size, device=device)
