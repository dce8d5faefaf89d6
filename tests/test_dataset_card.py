"""Every shard set gensynth writes is a Hugging Face dataset on its own: `datasets.load_dataset(FOLDER)` reads
it through the README.md card (configs + features), with `cls` a ClassLabel of the set's class names."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from gensynth.cli import main
from gensynth.data.card import CARD_NAME, DEFAULT_LICENSE, class_names, read_card
from gensynth.data.index import index_shards
from gensynth.data.ingest import ingest
from gensynth.data.manifest import MANIFEST_NAME, read_manifest
from gensynth.data.sources import open_source
from gensynth.data.tario import iter_samples
from gensynth.evaluate.synthetic import evaluate_synthetic
from gensynth.generate.job import generate
from tests.conftest import write_shard_set
from tests.test_evaluate import tiny_eval_config


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets must read the folder as it is: no hub, and a cache of its own per test."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def raw_samples(folder: str) -> dict[str, tuple[bytes, int, dict]]:
    """Every sample of a set as its shards hold it: key -> (image bytes, label, metadata)."""
    manifest = read_manifest(folder)
    field = manifest.schema["image"]["field"]
    out = {}
    for shard in manifest.shards:
        with open(Path(folder) / shard.name, "rb") as f:
            for key, fields in iter_samples(f):
                out[key] = (fields[field], int(fields["cls"]), json.loads(fields["json"]))
    return out


def load_all(folder: str, split: str, tmp_path: Path) -> None:
    """load_dataset reads every sample, streaming and not, with the labels as a ClassLabel of the names."""
    manifest = read_manifest(folder)
    raw = raw_samples(folder)
    field = manifest.schema["image"]["field"]
    whole = datasets.load_dataset(folder, split=split, cache_dir=str(tmp_path / "hf"))
    streamed = datasets.load_dataset(folder, split=split, streaming=True)
    for ds in (whole, streamed):
        cls = ds.features["cls"]
        assert isinstance(cls, datasets.ClassLabel) and cls.names == class_names(manifest)
        assert isinstance(ds.features[field], datasets.Image)
        seen = {}
        for sample in ds:
            seen[sample["__key__"]] = (np.asarray(sample[field]), sample["cls"], sample["json"])
        assert seen.keys() == raw.keys()  # every sample, once
        for key, (pixels, label, meta) in seen.items():
            data, raw_label, raw_meta = raw[key]
            assert label == raw_label and meta == raw_meta
            assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(data))))


def header(folder: str) -> dict:
    text = (Path(folder) / CARD_NAME).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_an_ingested_set_loads_with_datasets_and_its_card_names_the_split_files(tmp_path):
    src = tmp_path / "src"
    write_shard_set(src, [9, 7, 5], classes=4)
    out = tmp_path / "out"
    manifest = ingest(open_source(f"shards:{src}"), str(out), shard_size=8, license="cc-by-4.0")
    folder = str(out / "train")
    card = header(folder)
    assert card["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "train-*.tar"}]}]
    assert card["license"] == "cc-by-4.0" and manifest.provenance["license"] == "cc-by-4.0"
    feats = {f["name"]: f for f in card["dataset_info"]["features"]}
    assert feats["json"] == {"name": "json", "dtype": "json"}
    assert feats["cls"] == {"name": "cls",
                            "dtype": {"class_label": {"names": {"0": "c0", "1": "c1", "2": "c2", "3": "c3"}}}}
    manifest_bytes = (out / "train" / MANIFEST_NAME).read_bytes()
    assert card["gensynth"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert card["gensynth"]["provenance"]["kind"] == "ingest"
    load_all(folder, "train", tmp_path)


def test_a_set_made_without_a_license_says_unknown_and_its_manifest_has_none(tmp_path):
    manifest = write_shard_set(tmp_path / "s", [3], classes=2)
    assert "license" not in manifest.provenance  # the manifest keeps the bytes it always had
    assert header(str(tmp_path / "s"))["license"] == DEFAULT_LICENSE == "unknown"


def test_index_writes_a_card_only_where_there_is_no_readme(tmp_path):
    mine = tmp_path / "mine"
    write_shard_set(mine, [4, 4], classes=3)
    for name in (MANIFEST_NAME, CARD_NAME):
        (mine / name).unlink()
    index_shards(str(mine), class_names=["shirt", "shoe", "bag"])
    assert header(str(mine))["gensynth"]["provenance"]["kind"] == "indexed"
    assert class_names(read_manifest(str(mine))) == ["shirt", "shoe", "bag"]
    load_all(str(mine), "train", tmp_path)
    theirs = tmp_path / "theirs"
    shutil.copytree(mine, theirs)
    (theirs / MANIFEST_NAME).unlink()
    (theirs / CARD_NAME).write_text("# our own card\n")
    index_shards(str(theirs))
    assert (theirs / CARD_NAME).read_text() == "# our own card\n"


@pytest.fixture(scope="module")
def generated(tiny_gan: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("gen") / "synth"
    generate(str(tiny_gan), str(out), num=30, shard_size=12)
    return str(out)


def test_a_generated_set_loads_with_datasets_despite_its_receipts(generated, tmp_path):
    assert len(list(Path(generated).glob(".receipts/*.json"))) == 3
    assert not (Path(generated) / "receipts").exists()
    card = header(generated)
    assert card["configs"][0]["data_files"] == [{"split": "synth", "path": "synth-*.tar"}]
    assert card["gensynth"]["generator"]["family"] == "gan" and "synthetic" in card["tags"]
    load_all(generated, "synth", tmp_path)
    # and load_dataset(FOLDER) with no split: one split, the set's
    assert list(datasets.load_dataset(generated, cache_dir=str(tmp_path / "hf2"))) == ["synth"]


def test_a_rerun_finds_the_receipts_of_a_run_started_before_they_moved(tiny_gan, tmp_path):
    out = tmp_path / "synth"
    generate(str(tiny_gan), str(out), num=30, shard_size=12)
    # what an unfinished run of the old layout left: receipts/ and no manifest (nor card); one shard missing
    (out / MANIFEST_NAME).unlink()
    (out / CARD_NAME).unlink()
    (out / ".receipts").rename(out / "receipts")
    (out / "synth-000002.tar").unlink()
    kept = {n: (out / n).stat().st_ino for n in ("synth-000000.tar", "synth-000001.tar")}
    result = generate(str(tiny_gan), str(out), num=30, shard_size=12)
    assert result.manifest is not None
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # trusted from their old receipts, not redrawn
    assert not (out / "receipts").exists() and len(list(out.glob(".receipts/*.json"))) == 3
    load_all(str(out), "synth", tmp_path)


def test_eval_puts_its_figures_into_the_generated_sets_card(generated, tiny_gan, tmp_path):
    test = tmp_path / "test"
    write_shard_set(test, [60], split="test")
    before = {p.name: p.read_bytes() for p in Path(generated).glob("*.tar")}
    cfg = tiny_eval_config(tmp_path / "cache", num=30, kid_subset=10, kid_subsets=2, classifier_steps=5, seeds=1)
    # the generator saw only this set, so it is a fair K set for the augmentation gain
    metrics = evaluate_synthetic(generated, str(test), cfg=cfg, k_set=str(tiny_gan.parent / "toy"))
    quality = read_card(generated)["gensynth"]["quality"]
    assert quality["fid"] == pytest.approx(metrics["fidelity"]["fid"], abs=1e-3)
    assert quality["recall"] == pytest.approx(metrics["fidelity"]["recall"], abs=1e-4)
    assert quality["near_copy_fraction"] == pytest.approx(metrics["memorisation"]["near_copy_fraction"], abs=1e-5)
    cas = metrics["usefulness"]["cas"]
    assert quality["cas"] == pytest.approx(cas["cas"], abs=1e-4)
    assert quality["manifest_sha256"] == header(generated)["gensynth"]["manifest_sha256"]
    gain = metrics["usefulness"]["augmentation"]["gain"]
    assert quality["augmentation_gain"] == pytest.approx(gain["mean"], abs=1e-4)
    assert {p.name: p.read_bytes() for p in Path(generated).glob("*.tar")} == before  # shards untouched
    assert "Quality (`gensynth eval`)" in (Path(generated) / CARD_NAME).read_text()
    load_all(generated, "synth", tmp_path)  # the card still loads


def test_shard_cli_takes_a_license(tmp_path, capsys):
    src = tmp_path / "src"
    write_shard_set(src, [5], classes=2)
    assert main(["shard", f"shards:{src}", str(tmp_path / "out"), "--license", "mit"]) == 0
    assert header(str(tmp_path / "out" / "train"))["license"] == "mit"
    assert os.path.exists(tmp_path / "out" / "train" / CARD_NAME)


def test_a_split_name_datasets_refuses_is_made_one_it_takes(tmp_path):
    src = tmp_path / "src"
    write_shard_set(src, [6], classes=3)
    ingest(open_source(f"shards:{src}"), str(tmp_path / "out"), split="val-1")
    folder = str(tmp_path / "out" / "val-1")
    assert header(folder)["configs"][0]["data_files"] == [{"split": "val_1", "path": "val-1-*.tar"}]
    load_all(folder, "val_1", tmp_path)
