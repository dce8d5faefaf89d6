"""--filter: samples a classifier does not recognise as their label are redrawn, counted and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from gensynth.errors import GensynthError, UsageError
from gensynth.evaluate.classifier import SmallCNN
from gensynth.evaluate.extractor import KIND
from gensynth.evaluate.filter import SampleFilter, load_filter
from gensynth.export import save_export
from gensynth.families import load_sampler
from gensynth.generate import shards
from gensynth.generate.options import GenerateOptions
from gensynth.generate.plan import build_job, interleaved_labels
from gensynth.generate.shards import draw_shard


class BrightnessJudge(nn.Module):
    """A stand-in classifier: confident in class 0 exactly when an image is brighter than `level`."""

    def __init__(self, level: float, classes: int = 10):
        super().__init__()
        self.level, self.classes = level, classes

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.classes)
        logits[:, 0] = 1000 * (x.mean(dim=(1, 2, 3)) - self.level)
        return logits


def test_rejected_samples_are_redrawn_until_every_place_passes(tiny_gan):
    sampler = load_sampler(tiny_gan)
    job = build_job(sampler, str(tiny_gan), GenerateOptions(num=64, per_class="64,0,0,0,0,0,0,0,0,0", shard_size=64))
    labels = interleaved_labels(list(job.counts))
    plain = draw_shard(sampler, job, labels, 0).images
    level = float(np.median(plain.reshape(64, -1).mean(1) / 255))  # about half the samples fail at first
    judge = SampleFilter(BrightnessJudge(level), 0.9, {"threshold": 0.9})
    images, kept_labels, scores, dropped, copied = draw_shard(sampler, job, labels, 0, judge)
    assert (scores >= 0.9).all() and dropped[0] >= 20 and dropped[1:].sum() == 0 and copied is None
    assert (images.reshape(64, -1).mean(1) / 255 > level).all()
    kept_before = plain.reshape(64, -1).mean(1) / 255 > level + 0.005  # clear passes stay where they were
    assert np.array_equal(images[kept_before], plain[kept_before])
    again = draw_shard(sampler, job, labels, 0, judge)
    assert np.array_equal(again[0], images) and np.array_equal(again[3], dropped)


def test_a_shard_that_keeps_redrawing_reports_its_progress_and_gives_up_with_the_classes(tiny_gan, caplog,
                                                                                        monkeypatch):
    sampler = load_sampler(tiny_gan)
    job = build_job(sampler, str(tiny_gan), GenerateOptions(num=8, per_class="6,2,0,0,0,0,0,0,0,0", shard_size=8))
    judge = SampleFilter(BrightnessJudge(2.0), 0.9, {"threshold": 0.9})  # brighter than white: nothing passes
    monkeypatch.setattr(shards, "REDRAW_ROUNDS", 25)
    with caplog.at_level("INFO", logger="gensynth"), pytest.raises(GensynthError, match="after 25 redraws"):
        draw_shard(sampler, job, interleaved_labels(list(job.counts)), 0, judge)
    progress = [r.getMessage() for r in caplog.records if "redraw round" in r.getMessage()]
    assert progress == [f"shard 0: redraw round {r} of at most 25: 8 samples ({sampler.classes[0]} 6, "
                        f"{sampler.classes[1]} 2) still rejected (8 below the filter's 0.90)" for r in (10, 20)]


def constant_classifier(folder, probabilities: list[float]) -> str:
    """A real SmallCNN export whose output ignores the image: zero weights, the head's bias sets it."""
    model = SmallCNN(channels=1, num_classes=10)
    for p in model.parameters():
        nn.init.zeros_(p)
    with torch.no_grad():
        model.head.bias.copy_(torch.log(torch.tensor(probabilities)))
    save_export(folder, model.state_dict(), {"kind": KIND, "architecture": model.architecture,
                                              "test": {"accuracy": 0.5}, "data": {"manifest_sha256": "x"}})
    return str(folder)


def test_cli_filter_records_the_classifier_and_refuses_a_class_it_never_accepts(tiny_gan, tmp_path, capsys):
    classifier = constant_classifier(tmp_path / "clf", [0.95] + [0.05 / 9] * 9)
    out = tmp_path / "kept"
    assert main(["-q", "generate", str(tiny_gan), str(out), "--per-class", "30,0,0,0,0,0,0,0,0,0",
                 "--shard-size", "16", "--filter", "0.9", "--filter-classifier", classifier]) == 0
    manifest = read_manifest(str(out))
    kept = manifest.provenance["filter"]
    assert kept["threshold"] == 0.9 and kept["dropped"] == 0 and kept["classifier_sha256"]
    import webdataset as wds

    scores = [s["json"]["score"] for s in wds.WebDataset([str(out / x.name) for x in manifest.shards],
                                                          shardshuffle=False, empty_check=False).decode()]
    assert len(scores) == 30 and min(scores) == pytest.approx(0.95, abs=1e-4)

    capsys.readouterr()
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "never"), "--num", "20", "--filter",
                 "--filter-classifier", classifier]) == 1
    err = capsys.readouterr().err
    assert "still score below the filter's threshold 0.9" in err and "--filter 0 for none" in err and "c1" in err
    assert not (tmp_path / "never" / "manifest.json").exists()


def test_the_default_classifier_is_the_one_of_the_images_the_samples_imitate(tmp_path):
    # a prior's own training data are code shards; its samples imitate its VQ-VAE's images, whose extractor
    # it must find (or train): the images entry of training_data, not data.train
    prior = {"family": "prior", "data": {"train": str(tmp_path / "codes")},
             "training_data": [{"kind": "images", "model": "prior", "train": str(tmp_path / "images")},
                               {"kind": "derived", "model": "prior", "train": str(tmp_path / "codes")}]}
    with pytest.raises(UsageError, match=f"training data '{tmp_path / 'images'}' is not reachable"):
        load_filter("", prior, 0.9)


def test_purpose_sets_the_filter_measured_best_for_the_family_and_an_explicit_filter_wins(tiny_gan, tmp_path,
                                                                                         monkeypatch):
    from gensynth.families.gan.sampler import GANSampler

    classifier = constant_classifier(tmp_path / "clf", [0.95] + [0.05 / 9] * 9)
    monkeypatch.setattr(GANSampler, "PURPOSES", {"cas": {"filter_threshold": 0.9}})
    common = ["--per-class", "8,0,0,0,0,0,0,0,0,0", "--filter-classifier", classifier]

    def filter_of(name: str, *flags: str) -> dict | None:
        assert main(["-q", "generate", str(tiny_gan), str(tmp_path / name), *common, *flags]) == 0
        return read_manifest(str(tmp_path / name)).provenance["filter"]

    assert filter_of("cas", "--purpose", "cas")["threshold"] == 0.9  # the family's measured value
    assert filter_of("general") is None and filter_of("augment", "--purpose", "augment") is None
    assert filter_of("given", "--purpose", "cas", "--filter", "0.5")["threshold"] == 0.5
    assert filter_of("off", "--purpose", "cas", "--filter", "0") is None  # 0: no filter, whatever the purpose


def test_a_purpose_filter_without_a_classifier_says_how_to_draw_without_it(tiny_gan, tmp_path, monkeypatch):
    from gensynth.families.gan.sampler import GANSampler
    from gensynth.generate.job import job_filter

    monkeypatch.setattr(GANSampler, "PURPOSES", {"cas": {"filter_threshold": 0.9}})
    sampler = load_sampler(tiny_gan)
    sampler.config = {**sampler.config, "training_data": [{"kind": "images", "train": str(tmp_path / "gone")}]}
    with pytest.raises(UsageError, match=r"--purpose cas keeps only the samples .*threshold 0.9.*--filter 0$"):
        job_filter(sampler, GenerateOptions(purpose="cas"))
    assert job_filter(sampler, GenerateOptions(purpose="cas", filter_threshold=0)) is None
