"""bench/quality.py's goal verdicts: each goal of the table is judged from the rows it measured, a goal with
nothing measured is reported as such (never as met), and the commit measured is recorded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import bench_module


@pytest.fixture(scope="module")
def quality():
    return bench_module("quality")


def _row(family: str, data: str, cas_ratio=None, recall=None, gain=None, copies=0.0) -> dict:
    return {"family": family, "data": data, "cas_ratio": cas_ratio, "recall": recall, "aug_gain": gain,
            "near_copy_fraction": copies}


def _verdicts(quality, rows) -> dict:
    return {g["goal"]: g["met"] for g in quality.goals(rows)}


def test_goals_judge_each_figure(quality):
    rows = [_row("gan", "all 60000", cas_ratio=0.93, recall=0.55),
            _row(quality.REFERENCE, "all 60000", cas_ratio=0.88, recall=0.2),
            _row("gan", "K = 10 per class", gain=0.025), _row("gan", "K = 50 per class", gain=0.004),
            _row("gan", "K = 100 per class", gain=-0.001, copies=0.02)]
    v = _verdicts(quality, rows)
    assert v["CAS / real, best family >= 0.95"] is False
    assert v["CAS / real, GAN >= 0.90 and above the reference"] is True
    assert v["GAN recall >= 0.5"] is True
    assert v["augmentation gain, best family, K = 10 >= +2.0 points"] is True
    assert v["augmentation gain, best family, K = 50 >= +1.0 points"] is False
    assert v["augmentation gain, best family, K = 100 >= +0.0 points"] is False
    assert v["augmentation gain, every family and K >= -0.3 points"] is True
    assert v["near-copies, every family and K < 1%"] is False


def test_gan_below_the_reference_misses_its_goal(quality):
    rows = [_row("gan", "all 60000", cas_ratio=0.91, recall=0.1), _row(quality.REFERENCE, "all 60000", cas_ratio=0.92)]
    assert _verdicts(quality, rows)["CAS / real, GAN >= 0.90 and above the reference"] is False


def test_goal_with_nothing_measured_is_not_met_but_unmeasured(quality):
    judged = quality.goals([_row("gan", "all 60000", cas_ratio=0.5, recall=0.1)])
    k10 = next(g for g in judged if "K = 10" in g["goal"])
    assert k10["met"] is None and k10["measured"] is None
    assert "not measured" in "\n".join(quality.goal_lines(judged))


def test_commit_names_the_checkout(quality):
    assert len(quality.commit().split("+")[0]) == 40


def test_result_file_holds_no_path_of_the_cache(quality, tmp_path):
    """The result file is committed: the extractor cache's folder (this machine's home) is written as a name."""
    cache = tmp_path / "home" / ".cache" / "gensynth"
    result = {"details": [{"metrics": {"extractor": {"folder": str(cache / "extractors" / "abc" / "def")}}}]}
    text = quality.result_text(result, cache)
    assert str(tmp_path) not in text
    folder = json.loads(text)["details"][0]["metrics"]["extractor"]["folder"]
    assert folder == f"{quality.CACHE_NAME}/extractors/abc/def"


def test_render_prints_a_saved_result_without_running(tmp_path):
    rows = [{**_row("gan", "all 60000", cas_ratio=0.5, recall=0.1), "steps": 10, "cpu_min": 1.0, "fid": 30.0,
             "fid_floor": 0.1, "kid_x1000": 1.0, "kid_floor_x1000": 0.0, "precision": 0.8, "precision_floor": 0.9,
             "recall_floor": 0.9, "class_consistency": 0.8, "near_copy_floor": 0.0, "cas": 0.4, "cas_real": 0.8,
             "aug_real": None, "aug_mixed": None, "aug_gain_std": None}]
    saved = tmp_path / "quality.json"
    saved.write_text(json.dumps({"protocol": ["protocol line"], "rows": rows}))
    out = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--render", str(saved)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "protocol line" in out.stdout and "| gan | all 60000 | 10 (1.0) | 30.00 (0.10)" in out.stdout
    assert "| GAN recall >= 0.5 | 0.100 | no |" in out.stdout
    saved.write_text("{}")
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--render", str(saved)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a result file" in bad.stderr and "Traceback" not in bad.stderr


def test_a_set_is_drawn_for_what_its_row_measures_and_the_filter_is_counted(quality, tmp_path, monkeypatch):
    """A full-data row draws with --purpose cas: where the family's measured defaults for it include the
    classifier filter, the set is filtered and the row says how many draws it threw away; another purpose is
    another measurement, not a reuse of the first."""
    import dataclasses

    import torch

    from gensynth.config import EvalConfig
    from gensynth.data.manifest import read_manifest
    from gensynth.families.gan.sampler import GANSampler
    from tests.conftest import train_tiny_gan, write_shard_set

    torch.set_num_threads(1)
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(GANSampler, "PURPOSES", {"cas": {"filter_threshold": 0.3}})
    data = tmp_path / "toy"
    write_shard_set(data / "train", [40, 40], classes=2)  # two classes: some samples of each pass 0.3
    write_shard_set(data / "test", [30], split="test", classes=2)
    run = train_tiny_gan(tmp_path / "runs", str(data / "train"), name="gan_full")
    cfg = dataclasses.replace(EvalConfig(), num=40, classifier_steps=3, extractor_epochs=1.0, classifier_batch_size=8)
    training = {"steps": 2, "cpu_s": 60.0}
    synth, report = tmp_path / "synth", tmp_path / "report"
    args = (run, synth, 40, str(data / "test"), str(data / "train"), report, cfg, training, 1, False)
    metrics = quality.generate_and_evaluate(*args, "cas")
    kept = read_manifest(str(synth)).provenance["filter"]
    assert kept["threshold"] == 0.3 and metrics["purpose"] == "cas"
    assert metrics["filtered_out"] == kept["dropped"]
    line = quality.table([quality.row("gan", "all 80", training, metrics)])[-1]
    assert f"% (filter: {kept['dropped']} redrawn) |" in line
    plain = quality.generate_and_evaluate(*args, "general")
    assert plain["purpose"] == "general" and plain["filtered_out"] is None
    assert read_manifest(str(synth)).provenance["filter"] is None
