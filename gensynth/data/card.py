"""`README.md`: a shard set's Hugging Face dataset card, so `datasets.load_dataset(FOLDER)` reads the set as
it is. Built from the manifest alone (the source of truth) and written after it; it never touches a shard.

The YAML header holds what `datasets` reads: `configs` (the split's tar files) and `dataset_info.features`,
which its WebDataset builder takes instead of guessing from the first samples: `cls` is a ClassLabel with
the set's class names, the image an Image, each array a fixed-shape list or ArrayND, the per-sample `json`
a Json (any object: a declared struct that missed one key would make every load fail). Under `gensynth:`
it adds the manifest's sha256, provenance and, for a generated set once `gensynth eval` has run, its
quality figures.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import yaml

from gensynth import storage
from gensynth.data.manifest import MANIFEST_NAME, Manifest, write_manifest

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
# "unknown": gensynth cannot know the terms of the images a set was made from (nor of a model's training
# data); the Hub accepts it, and it does not claim that some other licence exists, as "other" would
DEFAULT_LICENSE = "unknown"
_MARK = "gensynth"  # the YAML key that tells a card gensynth wrote from a README someone else did
_ND = {2: "array2_d", 3: "array3_d", 4: "array4_d", 5: "array5_d"}


def hf_split(split: str) -> str:
    """The split name `datasets` shows: the manifest's, with any character datasets refuses (it takes
    word characters) made `_`: `val-1` -> `val_1`."""
    return re.sub(r"\W", "_", split) or "train"


def class_names(manifest: Manifest) -> list[str]:
    """One name per label 0..num_classes-1: the manifest's names, then the label itself for any beyond them."""
    names = list(manifest.classes or [])
    return names + [str(i) for i in range(len(names), manifest.num_classes or 0)]


def features(manifest: Manifest) -> list[dict[str, Any]]:
    """`dataset_info.features` as the card's YAML spells them (datasets' Features._to_yaml_list)."""
    feats: list[dict[str, Any]] = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    image = manifest.schema.get("image")
    if image:
        feats.append({"name": image["field"], "dtype": "image"})
    for spec in (manifest.schema.get("arrays") or {}).values():
        shape, dtype = spec["shape"], spec["dtype"]
        if not shape:
            feats.append({"name": spec["field"], "dtype": dtype})
        elif len(shape) == 1:
            feats.append({"name": spec["field"], "list": dtype, "length": shape[0]})
        elif len(shape) in _ND:
            feats.append({"name": spec["field"], "dtype": {_ND[len(shape)]: {"shape": shape, "dtype": dtype}}})
    # an indexed set whose label is not its `cls` field: datasets would look for it in `cls`
    foreign_label = manifest.provenance.get("kind") == "indexed" and manifest.provenance.get("label_key") != "cls"
    if manifest.num_classes is not None and not foreign_label:
        names = class_names(manifest)
        feats.append({"name": "cls", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}})
    if "json" in manifest.schema:
        # Json, not a struct: the keys differ between writers and a generated sample's options are nested
        feats.append({"name": "json", "dtype": "json"})
    return feats


def data_files(manifest: Manifest) -> str | list[str]:
    """The split's files: the glob for a set of gensynth's own names, else (tars indexed as they were) each name."""
    split = re.escape(manifest.split)
    if manifest.shards and all(re.fullmatch(rf"{split}-\d{{6}}\.tar", s.name) for s in manifest.shards):
        return f"{manifest.split}-*.tar"
    return [s.name for s in manifest.shards]


def card_data(manifest: Manifest, quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's YAML header, as data."""
    prov = manifest.provenance
    generated = prov.get("kind") == "generate"
    tags = ["gensynth", "webdataset"] + (["synthetic"] if generated else [])
    extra: dict[str, Any] = {
        "format": manifest.format, "manifest": MANIFEST_NAME,
        "manifest_sha256": hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest(),
        "split": manifest.split, "num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
        "provenance": prov}
    if generated:
        extra["generator"] = {"family": prov.get("family"), "export": prov.get("export"),
                              "seed": prov.get("seed"), "training_data": prov.get("training_data")}
    if quality:
        extra["quality"] = quality
    data: dict[str, Any] = {"license": prov.get("license") or DEFAULT_LICENSE, "tags": tags}
    if manifest.schema.get("image") and manifest.num_classes is not None:
        data["task_categories"] = ["image-classification"]
    data["configs"] = [{"config_name": "default",
                        "data_files": [{"split": hf_split(manifest.split), "path": data_files(manifest)}]}]
    data["dataset_info"] = {"config_name": "default", "features": features(manifest)}
    data[_MARK] = extra
    return data


def render(manifest: Manifest, quality: dict[str, Any] | None = None) -> str:
    """The whole card: YAML header, then a few lines for people."""
    data = card_data(manifest, quality)
    prov = manifest.provenance
    split = hf_split(manifest.split)
    lines = [f"# {'Synthetic' if prov.get('kind') == 'generate' else 'Shard'} set ({manifest.split})", "",
             f"{manifest.num_samples} samples in {len(manifest.shards)} WebDataset shards, described by "
             f"`{MANIFEST_NAME}` (sha256 `{data[_MARK]['manifest_sha256'][:16]}...`), which gensynth reads and "
             "which this card repeats.", "",
             "```python", "import datasets",
             f'ds = datasets.load_dataset("path/to/this/folder", split="{split}")  # streaming=True reads as it goes',
             "```", ""]
    if manifest.num_classes is not None:
        lines += [f"Classes (`cls`): {', '.join(class_names(manifest))}.", ""]
    if quality:
        shown = ", ".join(f"{k} {v}" for k, v in quality.items() if isinstance(v, (int, float)))
        lines += [f"Quality (`gensynth eval`): {shown}.", ""]
    lines += [f"License: {data['license']}.", ""]
    header = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n" + "\n".join(lines)


def read_card(folder: str) -> dict[str, Any] | None:
    """The YAML header of the README.md in `folder`, or None when there is none or it has no header."""
    url = storage.join(folder, CARD_NAME)
    if not storage.exists(url):
        return None
    text = storage.read_bytes(url).decode("utf-8", errors="replace")
    if not text.startswith("---\n"):
        return {}
    try:
        data = yaml.safe_load(text[4:text.find("\n---", 4)])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def publish(folder: str, manifest: Manifest) -> str:
    """What every writer of a finished set calls: the manifest (atomically, last of the set's data), then the
    card built from it. Returns the manifest's URL."""
    url = write_manifest(folder, manifest)
    write_card(folder, manifest)
    return url


def write_card(folder: str, manifest: Manifest, quality: dict[str, Any] | None = None) -> bool:
    """Write the set's card after its manifest (atomically); a README.md that gensynth did not write (the
    one beside tars someone else made) is left as it is. Returns whether the card was written."""
    existing = read_card(folder)
    if existing is not None and _MARK not in existing:
        log.info("%s already has a %s of its own: left as it is", folder, CARD_NAME)
        return False
    storage.write_bytes(storage.join(folder, CARD_NAME), render(manifest, quality).encode("utf-8"), "write card")
    return True
