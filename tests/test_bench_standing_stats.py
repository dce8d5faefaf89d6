"""bench/gan_standing_stats.py on a tiny GAN run: every checkpoint gets the three generators' rows, scored by the
evaluation's own metrics, and the EMA with standing statistics samples differently from the EMA with the raw
generator's statistics (else the comparison would measure nothing). What the figures are is the benchmark's
business."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.conftest import train_tiny_gan, write_shard_set
from tests.helpers import bench_module


def test_every_checkpoint_gets_the_three_generators_scored(tmp_path: Path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))
    write_shard_set(tmp_path / "toy" / "train", [40, 40])
    write_shard_set(tmp_path / "toy" / "test", [30], split="test")
    run = train_tiny_gan(tmp_path, str(tmp_path / "toy" / "train"), steps=4)
    bench = bench_module("gan_standing_stats")
    assert bench.main([str(run), "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["step"], r["generator"]) for r in rows] == [(4, name) for name in bench.VARIANTS]
    assert all(math.isfinite(r[k]) for r in rows for k in ("fid", "precision", "recall", "class_consistency"))
    before, now = rows[1], rows[2]
    assert before["fid"] != now["fid"]
