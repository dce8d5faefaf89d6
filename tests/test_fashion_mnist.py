"""Real Fashion-MNIST from Debian's dataset-fashion-mnist: ingest, counts, histogram, HF datasets agrees."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from gensynth.data.stream import ShardLoader
from gensynth.demo import FASHION_MNIST_CLASSES, drop_stale_codes, run_demo, stage_configs
from gensynth.errors import UsageError
from gensynth.families import load_run_config
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


@pytest.fixture(scope="module")
def demo_run(fashion_shards, tmp_path_factory) -> tuple[int, str, Path]:
    """make demo's two stages (a VQ-VAE, then the prior over its codes), tiny, on the verified shards."""
    out = tmp_path_factory.mktemp("demo")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = run_demo(str(fashion_shards), str(FASHION_DIR), num_workers=2,
                        config=["configs/vqvae_fashion.yaml", "configs/prior_fashion.yaml"],
                        overrides=[f"run.root={out}", "train.steps=4", "train.sample_every=2", "train.eval_every=2",
                                   "train.checkpoint_every=2", "vqvae.base_channels=4", "vqvae.max_channels=8",
                                   "vqvae.embed_dim=8", "vqvae.codebook_size=16", "vqvae.res_blocks=1",
                                   "eval.heldout_samples=200", "prior.width=16", "prior.layers=1", "prior.heads=2",
                                   # a tiny evaluation: an extractor of a few dozen steps, a few classifier steps
                                   f"eval.cache={out / 'cache'}", "eval.extractor_epochs=0.05", "eval.num=300",
                                   "eval.classifier_steps=5", "eval.kid_subset=100", "eval.kid_subsets=2"],
                        synth=str(out / "synth"), num_synthetic=300, report=str(out / "report"))
    return code, buffer.getvalue(), out


def test_demo_runs_end_to_end(fashion_shards, demo_run):
    code, out, root = demo_run
    assert code == 0
    assert "verify     ok: 12 shards" in out and "streamed 60000 samples, each exactly once" in out
    # the stages train in order, the prior on the codes of the VQ-VAE the demo just trained
    assert f"train the VQ-VAE for 4 steps into {root / 'demo_vqvae'} (stage 1 of 2)" in out
    assert f"over the VQ-VAE's codes for 4 steps into {root / 'demo_prior'} (stage 2 of 2)" in out
    prior = json.loads((root / "demo_prior" / "export" / "config.json").read_text())
    vqvae = json.loads((root / "demo_vqvae" / "export" / "config.json").read_text())
    assert prior["vqvae"]["weights_sha256"] == vqvae["weights_sha256"]
    codes = read_manifest(f"{fashion_shards}-codes/demo_vqvae")
    assert codes.num_samples == 60000 and codes.provenance["vqvae"]["weights_sha256"] == vqvae["weights_sha256"]
    grid = root / "demo_prior" / "samples" / "samples-step-00000004.png"
    assert "sample grid, one row per class (T-shirt/top, Trouser" in out and str(grid) in out
    assert grid.is_file() and (root / "demo_prior" / "export" / "model.safetensors").is_file()
    assert "synthetic set: 300 samples in 1 shards" in out and "webdataset.WebDataset(" in out
    synth = read_manifest(str(root / "synth"))
    assert synth.class_histogram == {str(c): 30 for c in range(10)} and synth.classes == FASHION_MNIST_CLASSES
    report = root / "report"
    assert f"report: {report / 'report.html'}" in out and "FID" in out and "near-copies" in out
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["protocol"]["evaluated_samples"] == 300 and metrics["synthetic"]["url"] == str(root / "synth")


def test_demo_replaces_only_code_shards_of_another_vqvae(fashion_shards, demo_run, tmp_path):
    _, _, root = demo_run
    stale = tmp_path / "codes"
    shutil.copytree(fashion_shards / "test", stale)  # a shard set, but not this VQ-VAE's codes
    cfg = load_run_config("configs/prior_fashion.yaml", [f"prior.vqvae={root / 'demo_vqvae'}",
                                                           f"data.train={stale}"])
    drop_stale_codes(cfg)
    assert not stale.exists()
    current = f"{fashion_shards}-codes/demo_vqvae"
    cfg = load_run_config("configs/prior_fashion.yaml", [f"prior.vqvae={root / 'demo_vqvae'}", f"data.train={current}"])
    drop_stale_codes(cfg)
    assert read_manifest(current).num_samples == 60000


def test_demo_stages_are_wired_to_the_data_and_the_stage_before(tmp_path):
    gan, = stage_configs(["configs/gan_fashion.yaml"], str(tmp_path / "d"), [f"run.root={tmp_path}"])
    assert (gan.run.name, gan.data.train, gan.data.test) == ("demo_gan", str(tmp_path / "d" / "train"), "")
    vq, prior = stage_configs(["configs/vqvae_fashion.yaml", "configs/prior_fashion.yaml"], str(tmp_path / "d"),
                              [f"run.root={tmp_path}", "train.steps=7"])
    assert (vq.run.name, vq.data.test, vq.train.steps) == ("demo_vqvae", str(tmp_path / "d" / "test"), 7)
    assert (prior.prior.vqvae, prior.prior.images) == (str(tmp_path / "demo_vqvae"), str(tmp_path / "d" / "train"))
    assert prior.data.train == f"{tmp_path / 'd'}-codes/demo_vqvae"
    # a run name of the user's names one stage; several stages get it with their family (no two share a run)
    named = stage_configs(["configs/vqvae_fashion.yaml", "configs/prior_fashion.yaml"], "d", ["run.name=mine"])
    assert [c.run.name for c in named] == ["mine_vqvae", "mine_prior"]
    gan, = stage_configs(["configs/gan_fashion.yaml"], "d", ["run.name=mine"])
    assert gan.run.name == "mine"
    with pytest.raises(UsageError, match="a prior stage needs its VQ-VAE stage before it"):
        list(stage_configs(["configs/prior_fashion.yaml"], str(tmp_path / "d"), []))
