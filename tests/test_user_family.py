"""A family of one's own (tests/userfamily.py, outside the package) is named in model.family and then validated,
trained (one process and two gloo ranks), checkpointed and resumed, exported, sampled, generated from and
evaluated like a built-in one; and found through an entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gensynth.cli import main
from gensynth.config import dump_yaml
from gensynth.errors import ConfigError
from gensynth.export import load_export
from gensynth.families import get_family, load_run_config, load_sampler
from gensynth.train.checkpoint import latest_checkpoint
from tests.conftest import free_port, subprocess_env, write_shard_set
from tests.helpers import gensynth, last_grid, launch_cmd, one_line_error, rank_state, run_dir, run_launches
from tests.userfamily import MeanImageFamily, MeanImageSampler

FAMILY = "tests.userfamily:MeanImageFamily"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("userfamily")
    write_shard_set(root / "train", [40, 33, 30])
    write_shard_set(root / "test", [50], split="test")
    return {"train": str(root / "train"), "test": str(root / "test")}


def user_config(tmp_path: Path, data: str, name: str = "mean", steps: int = 20, **section) -> Path:
    cfg = {"run": {"name": name, "root": str(tmp_path / "runs"), "seed": 0},
           "data": {"train": data, "mode": "resampled", "num_workers": 0, "shuffle_buffer": 16},
           "model": {"family": FAMILY, "resolution": 8},
           "meanimage": {"lr": 0.1, **section},
           "train": {"steps": steps, "batch_size": 8, "log_every": 5, "sample_every": 5, "checkpoint_every": 5,
                     "eval_every": 0, "threads": 1}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_its_section_is_validated_and_dumps_back(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'meanimage.lrr' \(did you mean 'meanimage.lr'\?\)"):
        load_run_config(None, [f"model.family={FAMILY}", "meanimage.lrr=0.1"])
    with pytest.raises(ConfigError, match="meanimage.init_log_scale=9.0 is not allowed: must be <= 5.0"):
        load_run_config(None, [f"model.family={FAMILY}", "meanimage.init_log_scale=9"])
    cfg = load_run_config(None, [f"model.family={FAMILY}", "meanimage.lr=0.5"])
    assert cfg.meanimage.lr == 0.5 and cfg.gan.lr_g == 1e-4  # the built-in sections are there too
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert yaml.safe_load(dumped.read_text())["meanimage"] == {"lr": 0.5, "init_log_scale": 0.0}
    assert load_run_config(dumped) == cfg
    # without model.family naming it, its section is an unknown key like any other
    with pytest.raises(ConfigError, match="unknown key 'meanimage'"):
        load_run_config(None, ["meanimage.lr=0.5"])


@pytest.mark.parametrize("name,needle", [
    ("nosuch", "not built in, no module:Class path, no such entry point"),
    ("tests.nosuchmodule:X", "cannot import tests.nosuchmodule"),
    ("tests.userfamily:MeanImageTrainer", "has no Family subclass named 'MeanImageTrainer'"),
])
def test_an_unknown_family_is_one_line_naming_the_built_ins(tmp_path, capsys, name, needle):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [f"model.family={name}"])
    text = str(e.value)
    assert needle in text and "gan, vqvae, prior, vae" in text and "package.module:ClassName" in text, text
    assert "gensynth.families" in text and "\n" not in text
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{family: '{name}'}}\nrun: {{root: {tmp_path / 'runs'}}}\n")
    assert main(["train", str(config)]) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_an_entry_point_names_the_family(tmp_path, monkeypatch):
    """An installed distribution's entry point in the group gensynth.families (a dist-info on sys.path)."""
    info = tmp_path / "site" / "meanimage_family-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: meanimage-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[gensynth.families]\nmeanimage = {FAMILY}\n")
    with pytest.raises(ConfigError, match="no such entry point"):
        load_run_config(None, ["model.family=meanimage"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert isinstance(get_family("meanimage"), MeanImageFamily)
    assert load_run_config(None, ["model.family=meanimage", "meanimage.lr=0.2"]).meanimage.lr == 0.2


def test_trains_resumes_exactly_exports_generates_and_evaluates(toy, tmp_path):
    straight = user_config(tmp_path / "a", toy["train"], steps=20)
    done = gensynth("train", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    # 10 steps, then the same run continued to 20: the same weights and the same data stream, bitwise
    first = user_config(tmp_path / "b", toy["train"], steps=10)
    assert gensynth("train", str(first)).returncode == 0
    resumed = gensynth("train", str(user_config(tmp_path / "b", toy["train"], steps=20)))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, config_a = load_export(run_dir(straight))
    b, _ = load_export(run_dir(first))
    assert sorted(a) == ["log_scale", "mean"] and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mean"], torch.zeros_like(a["mean"]))  # it learned
    last_a = latest_checkpoint(run_dir(straight) / "checkpoints")
    last_b = latest_checkpoint(run_dir(first) / "checkpoints")
    assert last_a.name == last_b.name == "step-00000020"
    assert rank_state(last_a)["data_digest"] == rank_state(last_b)["data_digest"]
    # the export records the family's import path, and loads back through it
    assert config_a["family"] == FAMILY and config_a["step"] == 20
    assert (run_dir(straight) / "export" / "model.safetensors").is_file()
    sampler = load_sampler(run_dir(straight))
    assert isinstance(sampler, MeanImageSampler) and sampler.family == FAMILY
    from gensynth.imaging import image_grid

    grid = sampler.sample(torch.arange(10).repeat_interleave(4), torch.Generator().manual_seed(0))
    assert (image_grid(grid.permute(0, 2, 3, 1).numpy(), rows=10) == last_grid(run_dir(straight), "samples")).all()
    # gensynth generate writes shards from the export, gensynth eval reads them
    synth = tmp_path / "synth"
    made = gensynth("-q", "generate", str(run_dir(straight)), str(synth), "--num", "60", "--shard-size", "30")
    assert made.returncode == 0, made.stderr[-3000:]
    manifest = json.loads((synth / "manifest.json").read_text())
    assert manifest["num_samples"] == 60 and manifest["provenance"]["family"] == FAMILY
    report = tmp_path / "report"
    evaluated = subprocess.run(
        [sys.executable, "-m", "gensynth", "eval", str(synth), "--real", toy["test"], "--train", toy["train"],
         "--no-cas", "--num", "50", "--report", str(report), f"eval.cache={tmp_path / 'cache'}",
         "eval.extractor_epochs=1.0", "eval.kid_subset=20", "eval.kid_subsets=2", "eval.seeds=1",
         "eval.classifier_steps=5"], env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["protocol"]["evaluated_samples"] == 50


@pytest.mark.multiprocess
def test_trains_on_two_gloo_ranks(toy, tmp_path):
    config = user_config(tmp_path, toy["train"], steps=6)
    results = run_launches([launch_cmd(config, port=free_port())])
    assert results[0].returncode == 0, results[0].stdout[-4000:]
    last = latest_checkpoint(run_dir(config) / "checkpoints")
    r0, r1 = rank_state(last, 0), rank_state(last, 1)
    assert r0["params_digest"] == r1["params_digest"] and r0["data_digest"] != r1["data_digest"]
    assert r0["loader"]["world_size"] == 2 and r0["samples_seen"] == 6 * 8
    assert load_export(run_dir(config))[1]["family"] == FAMILY
