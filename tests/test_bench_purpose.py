"""bench/purpose.py on tiny GAN runs: every value of the sweep is measured for both purposes (CAS on the
full-data model with its seeds, augmentation on the K-shot model at a fixed mix, not the mix search), and a
value is adopted only where it beats the plain default by more than the spread. The figures are the
benchmark's business."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from gensynth.data.ingest import ingest
from gensynth.data.sources import open_source
from tests.conftest import REPO, train_tiny_gan, write_shard_set
from tests.helpers import bench_module


def _rows(values: list[float], spread: float = 0.01) -> list[dict]:
    return [{"truncation": i, "value": v, "spread": spread} for i, v in enumerate(values)]


def test_a_value_is_adopted_only_past_the_spread():
    judge = bench_module("purpose").judge
    assert judge(_rows([0.80, 0.85, 0.70]), "truncation") == {"best": 1, "default": 0, "margin": 0.85 - 0.80,
                                                              "noise": 0.01, "adopt": True}
    assert judge(_rows([0.80, 0.805]), "truncation")["adopt"] is False  # within the spread: keep the default
    assert judge(_rows([0.80, 0.70]), "truncation")["adopt"] is False  # the default is best


def test_the_sweep_measures_both_purposes_for_every_value(tmp_path: Path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))
    data, work = tmp_path / "toy", tmp_path / "work"
    write_shard_set(data / "train", [40, 40])
    write_shard_set(data / "test", [30], split="test")
    ingest(open_source(f"shards:{data / 'train'}"), str(work / "data" / "fashion-k3"), split="train", per_class=3,
           seed=0)
    train_tiny_gan(work / "runs", str(data / "train"), name="gan_full")
    train_tiny_gan(work / "runs", str(work / "data" / "fashion-k3" / "train"), name="gan_k3")
    out = tmp_path / "purpose.json"
    argv = ["--work", str(work), "--data", str(data), "--families", "gan", "--values", "0,1.5", "--k", "3",
            "--num", "40", "--seeds", "2", "--cas-seeds", "2", "--parallel", "1", "--json", str(out),
            "eval.classifier_steps=3", "eval.extractor_epochs=1", "eval.classifier_batch_size=8"]
    # a subprocess, as users run it: its measurement processes import the script as __main__
    done = subprocess.run([sys.executable, str(REPO / "bench" / "purpose.py"), *argv], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gan cas: best truncation=" in done.stdout and "fixed mix" in done.stdout
    gan = json.loads(out.read_text())["families"]["gan"]
    assert gan["option"] == "truncation"
    assert [r["truncation"] for r in gan["cas"]] == [0.0, 1.5] == [r["truncation"] for r in gan["augment"]]
    assert all(len(r["cas_ratios"]) == 2 and math.isfinite(r["value"]) for r in gan["cas"])
    assert all(len(r["gains"]) == 2 and math.isfinite(r["value"]) for r in gan["augment"])
    assert set(gan["judged"]) == {"cas", "augment"}
    metrics = json.loads((work / "purpose" / "reports" / "gan_k3-truncation-1.5" / "metrics.json").read_text())
    mix = metrics["usefulness"]["recommended_mix"]
    assert mix["searched"] is False  # the sampling value is the only thing that changes


def test_the_samplers_take_exactly_the_values_the_committed_sweeps_adopted():
    """docs/results/purpose.json (each family's sampling option) and purpose_filter.json (the classifier filter)
    are what `--purpose` stands on: a sampler's PURPOSES holds a value for a purpose exactly where a sweep adopted
    one (a later sweep that changes its mind must change the code too)."""
    from gensynth.families.gan.sampler import GANSampler
    from gensynth.families.prior.sampler import PriorSampler
    from gensynth.families.vae.sampler import VAESampler

    samplers = {"gan": GANSampler, "prior": PriorSampler, "vae": VAESampler}
    adopted: dict[str, dict] = {family: {} for family in samplers}
    for sweep in ("purpose.json", "purpose_filter.json"):
        swept = json.loads((REPO / "docs" / "results" / sweep).read_text())["families"]
        assert set(swept) <= set(samplers), sweep
        for family, entry in swept.items():
            for purpose, j in entry["judged"].items():
                if j["adopt"]:
                    adopted[family].setdefault(purpose, {})[entry["option"]] = j["best"]
    for family, sampler in samplers.items():
        assert sampler.PURPOSES == adopted[family], family


def test_the_sweep_can_sweep_the_classifier_filter_for_cas_alone(tmp_path: Path, monkeypatch):
    """--option filter_threshold draws each set through `generate --filter T` (0: no filter), and --purposes cas
    needs and measures only the full-data model. A threshold no sample reaches is a failed row, not the end of
    the sweep; a rerun reuses the rows it measured."""
    torch.set_num_threads(1)
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))
    data, work = tmp_path / "toy", tmp_path / "work"
    # two classes: a barely trained classifier still gives some samples of each their label above 0.3
    write_shard_set(data / "train", [40, 40], classes=2)
    write_shard_set(data / "test", [30], split="test", classes=2)
    train_tiny_gan(work / "runs", str(data / "train"), name="gan_full")  # no K-shot run: not needed for cas
    out = tmp_path / "purpose.json"
    argv = ["--work", str(work), "--data", str(data), "--families", "gan", "--option", "filter_threshold",
            "--values", "0,0.3,0.999", "--purposes", "cas", "--num", "40", "--cas-seeds", "1", "--parallel", "1",
            "--json", str(out), "eval.classifier_steps=3", "eval.extractor_epochs=1", "eval.classifier_batch_size=8"]
    done = subprocess.run([sys.executable, str(REPO / "bench" / "purpose.py"), *argv], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    gan = json.loads(out.read_text())["families"]["gan"]
    assert gan["option"] == "filter_threshold" and set(gan["judged"]) == {"cas"} and "augment" not in gan
    off, on, never = gan["cas"]
    assert (off["filter_threshold"], on["filter_threshold"]) == (0.0, 0.3)
    assert never["filter_threshold"] == 0.999 and "after 50 redraws" in never["failed"]
    assert gan["judged"]["cas"]["best"] in (0.0, 0.3) and "failed: shard 0, after 50 redraws" in done.stdout
    assert "filtered_out" not in off and on["filtered_out"] >= 0
    synth = work / "purpose" / "synth"
    filters = [json.loads((synth / f"gan_full-filter_threshold-{v}" / "manifest.json").read_text())["provenance"]
               ["filter"] for v in ("0", "0.3")]
    assert filters[0] is None and filters[1]["threshold"] == 0.3
    assert filters[1]["dropped"] == on["filtered_out"]
    (synth / "gan_full-filter_threshold-0.3" / "manifest.json").unlink()  # a measured row is not drawn again
    again = subprocess.run([sys.executable, str(REPO / "bench" / "purpose.py"), *argv], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["families"]["gan"]["cas"] == [off, on, never]  # the failure too
    assert not (synth / "gan_full-filter_threshold-0.3" / "manifest.json").exists()


def test_an_option_sweep_needs_its_values():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "purpose.py"), "--option", "filter_threshold"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--option needs --values" in done.stderr
