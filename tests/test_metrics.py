"""Metric plug-ins: they measure what they claim on data with a known answer."""

from __future__ import annotations

import pytest
import torch

from gensynth.errors import ConfigError
from gensynth.evaluate.metrics import MetricContext, check_metrics, evaluate


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
    names = "class_consistency, fid, kid, mean_gap, near_copies, recall, usefulness, variety"
    with pytest.raises(ConfigError, match=f"available: {names}"):
        check_metrics(["fid_typo"])


def test_near_copies_counts_training_images_as_copies_and_fresh_draws_at_the_floor():
    train, labels = real_like(200)
    unseen, _ = real_like(400)
    unseen = unseen[200:]  # same distribution, other draws: never seen in training
    context = MetricContext(copy_reference_factory=lambda: (train, unseen, 1 / 3))
    copied = evaluate(["near_copies"], train[:100], labels[:100], train, labels, context=context)
    assert copied["near_copies"] == 1.0
    fresh = evaluate(["near_copies"], unseen[:100], labels[:100], train, labels, context=context)
    assert fresh["near_copies"] < 0.05 and fresh["near_copies_floor"] < 0.05
    half = torch.cat([train[:50], unseen[:50]])
    assert evaluate(["near_copies"], half, labels[:100], train, labels, context=context)["near_copies"] == \
        pytest.approx(0.5, abs=0.05)
