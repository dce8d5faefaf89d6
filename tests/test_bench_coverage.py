"""bench/coverage.py's figures on feature rows whose answer is known: a set on the real points covers them all;
a set bunched into a quarter of them has small radii, and its recall falls below its coverage."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import bench_module


def test_bunched_samples_have_small_radii_and_lose_recall_before_coverage():
    coverage_report = bench_module("coverage").coverage_report
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=gen)
    labels = torch.arange(400) % 4
    on_data = coverage_report(real, labels, real + 1e-3 * torch.randn(400, 4, generator=gen), labels)
    assert on_data["coverage"] == 1.0 and on_data["recall"] == pytest.approx(1.0, abs=0.01)
    bunched = real[:100].repeat(4, 1) + 1e-3 * torch.randn(400, 4, generator=gen)
    few = coverage_report(real, labels, bunched, labels)
    assert few["median_radius_synthetic"] < 0.1 * few["median_radius_real"]
    assert few["recall"] < 0.3 < few["coverage"]
    assert set(few["median_radius_per_class"]) == {"0", "1", "2", "3"}
