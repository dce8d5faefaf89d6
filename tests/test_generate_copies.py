"""--reject-copies: samples that are near-copies of the model's training images (the evaluation's rule) are
redrawn, counted per class and recorded; a model that only copies is refused with the classes named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from gensynth.errors import GensynthError
from gensynth.evaluate.filter import CopyFilter
from gensynth.evaluate.memorisation import memorisation
from gensynth.evaluate.sets import load_image_set
from gensynth.families import load_sampler
from gensynth.generate import job as generate_job
from gensynth.generate import shards
from gensynth.generate.job import generate
from gensynth.generate.options import GenerateOptions
from gensynth.generate.plan import build_job, interleaved_labels
from gensynth.generate.shards import draw_shard
from tests.conftest import write_shard_set


def own_samples(sampler, seed: int, n: int = 64) -> torch.Tensor:
    """n of the model's own samples (uint8 [n, C, H, W]) from noise of `seed`."""
    return sampler.sample(torch.arange(n) % sampler.num_classes, torch.Generator().manual_seed(seed), {})


def test_the_copy_rule_is_the_evaluations(tiny_gan):
    sampler = load_sampler(tiny_gan)
    train, unseen, drawn = own_samples(sampler, 1), own_samples(sampler, 2), own_samples(sampler, 3)
    drawn[:10] = train[:10]  # ten exact copies among fresh samples
    novel = CopyFilter(train, unseen)
    judged = memorisation(drawn, train, unseen, real=unseen)
    assert novel.threshold == pytest.approx(judged.threshold, rel=1e-6)
    assert torch.equal(novel.copies(drawn), torch.from_numpy(judged.near_copy))
    assert novel.copies(drawn)[:10].all()
    # the job's fingerprint holds the rule's inputs, not the figures floating point computes from them
    assert novel.identity == {"copy_ratio": pytest.approx(1 / 3)} and "threshold_rms" in novel.describe


def test_near_copies_are_redrawn_and_counted_per_class(tiny_gan):
    sampler = load_sampler(tiny_gan)
    job = build_job(sampler, str(tiny_gan), GenerateOptions(num=40, shard_size=40))
    labels = interleaved_labels(list(job.counts))
    plain = draw_shard(sampler, job, labels, 0)
    first = torch.from_numpy(plain.images).permute(0, 3, 1, 2)
    copied_at = torch.arange(0, 40, 3)  # the model's first draw of these places is made its training images
    novel = CopyFilter(first[copied_at], own_samples(sampler, 2))
    drawn = draw_shard(sampler, job, labels, 0, novel=novel)
    expected = np.bincount(plain.labels[copied_at.numpy()], minlength=10)
    assert np.array_equal(drawn.copied, expected) and drawn.dropped.sum() == 0 and drawn.scores is None
    kept = np.setdiff1d(np.arange(40), copied_at.numpy())
    assert np.array_equal(drawn.images[kept], plain.images[kept])  # novel samples stay where they were
    assert not novel.copies(torch.from_numpy(drawn.images).permute(0, 3, 1, 2)).any()
    assert np.array_equal(drawn.labels, plain.labels)
    again = draw_shard(sampler, job, labels, 0, novel=novel)
    assert np.array_equal(again.images, drawn.images)  # the redraws are part of the shard's seeded stream


def test_a_model_that_only_copies_gives_up_naming_the_classes(tiny_gan, monkeypatch):
    sampler = load_sampler(tiny_gan)
    job = build_job(sampler, str(tiny_gan), GenerateOptions(num=8, per_class="6,2,0,0,0,0,0,0,0,0", shard_size=8))
    novel = CopyFilter(own_samples(sampler, 1), own_samples(sampler, 2))
    novel.threshold = float("inf")  # every sample of the model counts as a copy
    monkeypatch.setattr(shards, "REDRAW_ROUNDS", 3)
    with pytest.raises(GensynthError, match=r"after 3 redraws: samples of c0 6, c1 2 were still near-copies"):
        draw_shard(sampler, job, interleaved_labels(list(job.counts)), 0, novel=novel)


def test_rejected_copies_go_from_the_receipts_into_the_manifest(tiny_gan, tmp_path, monkeypatch):
    sampler = load_sampler(tiny_gan)
    options = GenerateOptions(num=50, shard_size=25)
    job = build_job(sampler, str(tiny_gan), options)
    labels = interleaved_labels(list(job.counts))
    firsts = [torch.from_numpy(draw_shard(sampler, job, labels, k).images).permute(0, 3, 1, 2) for k in (0, 1)]
    train = torch.cat([firsts[0][:5], firsts[1][:7]])  # 12 of the model's first draws are "training images"
    monkeypatch.setattr(generate_job, "load_copy_filter",
                        lambda config, reference: CopyFilter(train, own_samples(sampler, 2), describe={"train": "t"}))
    out = tmp_path / "set"
    result = generate(str(tiny_gan), str(out), options, reject_copies=True)
    rule = result.manifest.provenance["reject_copies"]
    assert rule["rejected"] == 12 and sum(rule["rejected_per_class"].values()) == 12 and rule["train"] == "t"
    assert rule["copy_ratio"] == pytest.approx(1 / 3) and rule["threshold_rms"] > 0
    published = load_image_set(str(out)).images
    assert memorisation(published, train, own_samples(sampler, 2)).near_copy_fraction == 0
    # a finished set is recognised as the same job; the same job without the filter is another one
    assert generate(str(tiny_gan), str(out), options, reject_copies=True).generated == 0
    assert main(["-q", "generate", str(tiny_gan), str(out), "--num", "50", "--shard-size", "25"]) == 2


def test_cli_reject_copies_reads_the_models_training_images_and_records_the_rule(tiny_gan, tmp_path, capsys):
    unseen = tmp_path / "unseen"
    write_shard_set(unseen, [30], split="test")
    out = tmp_path / "set"
    assert main(["-q", "generate", str(tiny_gan), str(out), "--num", "40", "--reject-copies",
                 "--copy-reference", str(unseen)]) == 0
    rule = read_manifest(str(out)).provenance["reject_copies"]
    sampler = load_sampler(tiny_gan)
    train = load_image_set(sampler.config["training_data"][0]["train"]).images
    expected = memorisation(load_image_set(str(out)).images, train, load_image_set(str(unseen)).images)
    assert rule["threshold_rms"] == pytest.approx(expected.threshold, abs=1e-6)
    assert rule["train"]["images"] == len(train) and rule["unseen"]["images"] == 30
    assert rule["rejected"] == 0  # this model's samples are far from its noise images
    assert expected.near_copy_fraction == 0


@pytest.mark.parametrize("args, needle", [
    (["--reject-copies"], "has no test set beside it: name one with --copy-reference"),
    (["--copy-reference", "x"], "--copy-reference only applies with --reject-copies"),
    (["--reject-copies", "--copy-reference", "{tmp}/nothing"], "no shard set there"),
    (["--reject-copies", "--copy-reference", "{tmp}/big"], "the unseen real images are 16x16x1, the model's "
                                                           "training images 8x8x1"),
])
def test_cli_reject_copies_refusals_are_one_line(tiny_gan, tmp_path, capsys, args, needle):
    write_shard_set(tmp_path / "big", [5], split="test", size=16)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "set"), "--num", "10", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
