"""Metric plug-ins: they measure what they claim on data with a known answer."""

from __future__ import annotations

import pytest
import torch

from gensynth.errors import ConfigError
from gensynth.evaluate.metrics import check_metrics, evaluate


def real_like(n: int = 400, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    base = (labels[:, None, None, None] * 40).float()  # class-dependent mean image
    images = (base + torch.rand(n, 1, 8, 8, generator=g) * 60).round().to(torch.uint8)  # at most 180
    return images, labels


def test_variety_is_one_for_the_same_distribution_and_near_zero_for_collapse():
    real, labels = real_like()
    other, other_labels = real_like()
    other = torch.roll(other, shifts=1, dims=0)  # same distribution, other pairing
    other_labels = torch.roll(other_labels, shifts=1, dims=0)
    same = evaluate(["variety"], other, other_labels, real, labels)["variety"]
    assert abs(same - 1.0) < 0.02
    collapsed = torch.stack([real[labels == c][0] for c in labels])  # one image per class, repeated
    assert evaluate(["variety"], collapsed, labels, real, labels)["variety"] < 1e-6


def test_mean_gap_is_zero_for_identical_sets_and_grows_with_a_shift():
    real, labels = real_like()
    assert evaluate(["mean_gap"], real, labels, real, labels)["mean_gap"] == 0.0
    shifted = real + 51  # no pixel passes 255, so the gap is exactly 51/255
    assert evaluate(["mean_gap"], shifted, labels, real, labels)["mean_gap"] == pytest.approx(51 / 255, abs=0.01)


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="available: class_consistency, fid, kid, mean_gap, variety"):
        check_metrics(["fid_typo"])
