"""bench/cdcgan.py, the quality benchmark's reference row: a few steps on a tiny 28x28 set must give a shard
set that gensynth's evaluation reads like a family's (same image shape, every class, provenance naming the
training data). Quality is the benchmark's business, not this test's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gensynth.evaluate.sets import load_image_set
from tests.conftest import write_shard_set
from tests.helpers import bench_module


@pytest.fixture(scope="module")
def cdcgan():
    return bench_module("cdcgan")


def test_reference_trains_and_writes_an_evaluable_balanced_set(cdcgan, tmp_path: Path):
    torch.set_num_threads(1)
    real = tmp_path / "real"
    manifest = write_shard_set(real, [40, 40], size=28)  # 80 images, 8 per class c0..c9
    record = cdcgan.run(str(real), str(tmp_path / "out"), budget_s=None, steps=3, num=25, width=4, batch_size=16)
    assert record["steps"] == 3 and record["cpu_s"] > 0
    assert json.loads((tmp_path / "out" / "training.json").read_text())["steps"] == 3

    synth = load_image_set(record["synthetic"])
    assert tuple(synth.images.shape) == (25, 1, 28, 28) and synth.images.dtype == torch.uint8
    counts = torch.bincount(synth.labels, minlength=10).tolist()
    assert counts == [3] * 5 + [2] * 5  # balanced, the remainder to the first classes
    assert synth.classes == manifest.classes
    assert synth.provenance["training_data"] == {"train": str(real)}
    # the generator's output is not a constant image (the networks ran and were sampled with noise)
    assert synth.images.float().std() > 0


def test_reference_stops_on_its_cpu_budget(cdcgan):
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    # a budget already spent when training starts (the process has used CPU to get here): no step is taken
    G, record = cdcgan.train(images, labels, 4, budget_s=0.0, width=4, log_every=0)
    assert record["steps"] == 0
    G, record = cdcgan.train(images, labels, 4, budget_s=cdcgan.cpu_seconds() + 1e6, steps=2, width=4, log_every=0)
    assert record["steps"] == 2
    x = G(torch.randn(5, G.z_dim), torch.arange(5) % 4)
    assert tuple(x.shape) == (5, 1, 8, 8) and float(x.abs().max()) <= 1.0
