"""Real Fashion-MNIST from Debian's dataset-fashion-mnist: ingest, counts, histogram, HF datasets agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from gensynth.data.stream import ShardLoader
from gensynth.demo import FASHION_MNIST_CLASSES, run_demo
from tests.conftest import FASHION_DIR, need


@pytest.fixture(scope="module")
def fashion_shards(tmp_path_factory) -> Path:
    need(FASHION_DIR.is_dir(), "needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fashion")
    for split in ("train", "test"):
        assert main(["shard", f"idx:{FASHION_DIR}", str(out), "--split", split, "--class-names",
                     ",".join(FASHION_MNIST_CLASSES)]) == 0
    return out


@pytest.mark.parametrize("split, total, per_class", [("train", 60000, 6000), ("test", 10000, 1000)])
def test_counts_and_class_histogram(fashion_shards, split, total, per_class):
    manifest = read_manifest(str(fashion_shards / split))
    assert manifest.num_samples == total
    assert manifest.class_histogram == {str(c): per_class for c in range(10)}
    assert manifest.classes == FASHION_MNIST_CLASSES
    assert manifest.schema["image"] | {} == {"field": "png", "encoding": "png", "height": 28, "width": 28,
                                             "channels": 1, "dtype": "uint8"}
    sources = manifest.provenance["files"]
    assert [Path(f["path"]).name.split("-")[0] for f in sources] == [
        "train" if split == "train" else "t10k"] * 2


def test_hf_datasets_reads_the_shards_and_agrees(fashion_shards, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = fashion_shards / "test"
    files = sorted(str(p) for p in folder.glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"test": files}, split="test", streaming=True)
    assert isinstance(ds.features["png"], datasets.Image)
    hf_labels = {ex["__key__"]: ex["cls"] for ex in ds.select_columns(["__key__", "cls"])}
    ours = {}
    for batch in ShardLoader(str(folder), batch_size=500, mode="exact", decode_meta=False):
        ours.update(zip(batch["key"], batch["label"].tolist()))
    assert len(hf_labels) == 10000 and hf_labels == ours
    first = next(iter(ds))  # HF decodes our PNGs to the same 28x28 image
    assert first["png"].size == (28, 28)


def test_hf_reads_train_count(fashion_shards):
    datasets = pytest.importorskip("datasets")
    files = sorted(str(p) for p in (fashion_shards / "train").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    labels = [ex["cls"] for ex in ds.select_columns(["cls"])]
    assert len(labels) == 60000 and all(labels.count(c) == 6000 for c in range(10))


def test_demo_runs_end_to_end(fashion_shards, capsys, tmp_path):
    # reuses the verified shards; a short training stage (the real demo trains for minutes)
    code = run_demo(str(fashion_shards), str(FASHION_DIR), num_workers=2,
                    overrides=[f"run.root={tmp_path}", "train.steps=4", "train.sample_every=2", "train.eval_every=2",
                               "gan.g_channels=8", "gan.d_channels=8", "gan.max_channels=16",
                               # a tiny evaluation: an extractor of a few dozen steps, a few classifier steps
                               f"eval.cache={tmp_path / 'cache'}", "eval.extractor_epochs=0.05", "eval.num=300",
                               "eval.classifier_steps=5", "eval.kid_subset=100", "eval.kid_subsets=2"],
                    synth=str(tmp_path / "synth"), num_synthetic=300, report=str(tmp_path / "report"))
    out = capsys.readouterr().out
    assert code == 0
    assert "verify     ok: 12 shards" in out and "streamed 60000 samples, each exactly once" in out
    grid = tmp_path / "demo_gan" / "samples" / "samples-step-00000004.png"
    assert "sample grid, one row per class (T-shirt/top, Trouser" in out and str(grid) in out
    assert grid.is_file() and (tmp_path / "demo_gan" / "export" / "model.safetensors").is_file()
    assert "synthetic set: 300 samples in 1 shards" in out and "webdataset.WebDataset(" in out
    synth = read_manifest(str(tmp_path / "synth"))
    assert synth.class_histogram == {str(c): 30 for c in range(10)} and synth.classes == FASHION_MNIST_CLASSES
    report = tmp_path / "report"
    assert f"report: {report / 'report.html'}" in out and "FID" in out and "near-copies" in out
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["protocol"]["evaluated_samples"] == 300 and metrics["synthetic"]["url"] == str(tmp_path / "synth")
