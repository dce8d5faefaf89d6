"""Soft labels: `gensynth generate --relabel` stores a teacher's class probabilities with every sample
(soft.npy), the loaders hand them out as batch["soft_label"], `gensynth eval` trains synthetic samples
against them; the teacher sees no more labels than the generator did; a job without --relabel is unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from gensynth.cli import main
from gensynth.config import EvalConfig
from gensynth.data import MixLoader, ShardLoader, read_manifest
from gensynth.data.manifest import manifest_sha256
from gensynth.evaluate.classifier import Pool, Recipe, accuracy, train_classifier
from gensynth.evaluate.extractor import load_extractor, protocol_digest, recipe_for, train_extractor
from gensynth.evaluate.sets import load_image_set
from gensynth.evaluate.synthetic import evaluate_synthetic
from gensynth.evaluate.teacher import teacher_epochs
from gensynth.families import load_sampler
from gensynth.generate.job import generate
from gensynth.generate.options import GenerateOptions
from gensynth.generate.plan import build_job
from tests.conftest import write_shard_set
from tests.helpers import one_line_error

CLASSES = 10


@pytest.fixture(scope="module")
def made(tiny_gan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny GAN's samples with soft labels (teacher trained once, in a cache of this module) and without."""
    root = tmp_path_factory.mktemp("soft")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GENSYNTH_CACHE", str(root / "cache"))
        test = str(root / "test")
        write_shard_set(test, [30], split="test")
        common = {"num": 45, "shard_size": 16, "seed": 3}
        generate(tiny_gan, str(root / "on"), relabel=True, **common)
        generate(tiny_gan, str(root / "off"), **common)
    train = json.loads((tiny_gan / "export" / "config.json").read_text())["training_data"][0]["train"]
    return {"on": str(root / "on"), "off": str(root / "off"), "test": test, "cache": str(root / "cache"),
            "train": train, "root": str(root)}


def teacher_probabilities(manifest_provenance: dict, images: torch.Tensor) -> torch.Tensor:
    """The recorded teacher's softmax, computed here straight from its export."""
    model = load_extractor(manifest_provenance["relabel"]["teacher"]["folder"]).model.eval()
    with torch.no_grad():
        return model(model.normalize(images)).softmax(1)


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_manifest_records_the_soft_field_and_a_teacher_of_the_generators_own_set(made, tiny_gan):
    manifest = read_manifest(made["on"])
    assert manifest.schema["arrays"] == {"soft": {"field": "soft.npy", "dtype": "float32", "shape": [CLASSES]}}
    teacher = manifest.provenance["relabel"]["teacher"]
    seen = json.loads((tiny_gan / "export" / "config.json").read_text())["training_data"][0]
    assert teacher["trained_on"]["manifest_sha256"] == seen["manifest_sha256"] == manifest_sha256(made["train"])
    assert teacher["trained_on"]["samples"] == 103  # the generator's 103 images, nothing more
    assert teacher["test"] is None and teacher["test_accuracy"] is None  # no test set beside its training set
    assert teacher["protocol"]["steps"] == 500  # a small set still gets the classifier recipe's steps
    assert Path(teacher["folder"]).parent.parent == Path(made["cache"]) / "extractors"  # the extractor cache
    with tarfile.open(Path(made["on"]) / manifest.shards[0].name) as tar:
        assert sum(m.name.endswith(".soft.npy") for m in tar.getmembers()) == 16


def test_soft_labels_round_trip_through_shard_loader_and_mix_loader(made):
    manifest = read_manifest(made["on"])
    soft_by_key = {}
    for batch in ShardLoader(made["on"], batch_size=20, shuffle_buffer=0, rank=0, world_size=1):
        soft = batch["soft_label"]
        assert "soft" not in batch and soft.dtype == torch.float32 and soft.shape == (len(batch["key"]), CLASSES)
        assert torch.allclose(soft.sum(1), torch.ones(len(soft)), atol=1e-5) and (soft >= 0).all()
        assert torch.allclose(soft, teacher_probabilities(manifest.provenance, batch["image"]), atol=1e-5)
        soft_by_key.update(zip(batch["key"], soft))
    assert len(soft_by_key) == 45

    mix = MixLoader({"real": made["train"], "synth": made["on"]}, batch_size=10, num_workers=0)
    assert mix.soft_width == CLASSES
    for step, batch in enumerate(mix):
        soft, source, labels = batch["soft_label"], batch["source"], batch["label"]
        assert soft.shape == (10, CLASSES) and torch.allclose(soft.sum(1), torch.ones(10), atol=1e-5)
        real = source == 0  # real samples carry the one-hot of their label
        assert torch.equal(soft[real], torch.nn.functional.one_hot(labels[real], CLASSES).float())
        synth = [i for i, s in enumerate(source.tolist()) if s == 1]
        assert torch.equal(soft[synth], torch.stack([soft_by_key[batch["key"][i]] for i in synth]))
        if step == 3:
            break
    plain = next(iter(MixLoader({"real": made["train"], "synth": made["off"]}, batch_size=10)))
    assert "soft_label" not in plain  # no source has soft labels: the batch is what it always was


def test_a_job_without_relabel_is_unchanged_and_relabel_only_adds_soft_npy(made, tiny_gan, capsys):
    on, off = read_manifest(made["on"]), read_manifest(made["off"])
    assert "arrays" not in off.schema and "relabel" not in off.provenance
    for a, b in zip(on.shards, off.shards):
        with_soft, without = members(Path(made["on"]) / a.name), members(Path(made["off"]) / b.name)
        assert not any(name.endswith(".soft.npy") for name in without)
        # the same samples, byte for byte, plus one soft.npy each
        assert {n: v for n, v in with_soft.items() if not n.endswith(".soft.npy")} == without
    # the fingerprint of a job without --relabel (or --reject-copies) is the one the code before them computed
    # (no such fields)
    job = build_job(load_sampler(tiny_gan), str(tiny_gan), GenerateOptions(num=45, shard_size=16, seed=3))
    before = {k: v for k, v in asdict(job).items() if k not in ("relabel", "novelty")}
    assert off.provenance["fingerprint"] == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert on.provenance["fingerprint"] != off.provenance["fingerprint"]  # relabel makes it another job
    capsys.readouterr()
    assert main(["-q", "generate", str(tiny_gan), made["on"], "--num", "45", "--shard-size", "16", "--seed", "3"]) == 2
    assert "already holds a finished shard set made with other settings" in one_line_error(capsys.readouterr().err)


def test_relabelled_shards_are_deterministic_and_the_cached_teacher_is_reused(made, tiny_gan, monkeypatch, caplog):
    monkeypatch.setenv("GENSYNTH_CACHE", made["cache"])
    caplog.set_level("INFO", logger="gensynth")
    again = Path(made["root"]) / "again"
    generate(tiny_gan, str(again), num=45, shard_size=16, seed=3, relabel=True, relabel_test=made["test"])
    assert "training the feature extractor" not in caplog.text  # the cached teacher
    manifest = read_manifest(str(again))
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in read_manifest(made["on"]).shards]
    teacher = manifest.provenance["relabel"]["teacher"]  # --relabel-test measured the same teacher's accuracy
    assert teacher["test"]["url"] == made["test"] and 0 <= teacher["test_accuracy"] <= 1
    # a teacher retrained from scratch (cache cleared) is the same teacher: the same job, the same bytes
    monkeypatch.setenv("GENSYNTH_CACHE", str(Path(made["root"]) / "fresh-cache"))
    caplog.clear()
    fresh = Path(made["root"]) / "fresh"
    generate(tiny_gan, str(fresh), num=45, shard_size=16, seed=3, relabel=True)
    assert "training the feature extractor" in caplog.text
    retrained = read_manifest(str(fresh))
    assert retrained.provenance["fingerprint"] == read_manifest(made["on"]).provenance["fingerprint"]
    assert [s.sha256 for s in retrained.shards] == [s.sha256 for s in manifest.shards]


def test_a_teacher_that_saw_more_labels_than_the_generator_is_refused(made, tiny_gan, tmp_path, monkeypatch, capsys):
    more = tmp_path / "more"
    write_shard_set(more, [40, 33, 30, 60])  # the generator's 103 images and 60 more labelled ones
    big = train_extractor(str(more), None, tmp_path / "big", epochs=0.5)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["-q", "generate", str(tiny_gan), str(out), "--num", "10", "--relabel",
                 "--relabel-teacher", str(big.folder)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--relabel refused" in line and str(more) in line and "no more labels than the generator saw" in line
    assert not out.exists() or not list(out.glob("*.tar"))

    # the same teacher planted in the cache under the generator's set is refused too: its config says what it saw
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))
    digest = protocol_digest(recipe_for(teacher_epochs(103), 0))
    shutil.copytree(big.folder, tmp_path / "cache" / "extractors" / manifest_sha256(made["train"]) / digest)
    assert main(["-q", "generate", str(tiny_gan), str(out), "--num", "10", "--relabel"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--relabel refused: the cached teacher" in line and str(more) in line
    assert main(["-q", "generate", str(tiny_gan), str(out), "--num", "10", "--relabel-teacher", "x"]) == 2
    assert "only apply with --relabel" in one_line_error(capsys.readouterr().err)


def test_soft_targets_drive_the_classifier_loss():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.int64)  # every hard label says class 0...
    soft = torch.nn.functional.one_hot(torch.full((64,), 2), 3).float()  # ...every soft label class 2
    recipe = Recipe(steps=30, batch_size=16)
    hard = train_classifier([(Pool(images, labels), 16)], 3, recipe, seed=0)
    taught = train_classifier([(Pool(images, labels, soft=soft), 16)], 3, recipe, seed=0)
    assert accuracy(hard, images, labels) == 1.0
    assert accuracy(taught, images, torch.full((64,), 2)) == 1.0  # it learnt the soft targets, not the labels


def test_eval_trains_the_synthetic_samples_on_their_soft_labels(made, tmp_path):
    synth = load_image_set(made["on"])
    assert synth.soft is not None and synth.soft.shape == (45, CLASSES)
    assert torch.equal(synth.select([3, 1]).soft, synth.soft[[3, 1]])
    assert load_image_set(made["off"]).soft is None
    cfg = EvalConfig(cache=str(tmp_path / "cache"), extractor_epochs=1.0, num=30, kid_subset=10, kid_subsets=2,
                     classifier_steps=3, classifier_batch_size=16, seeds=1, closest_pairs=2, cas=False)
    metrics = {name: evaluate_synthetic(made[name], made["test"], train=made["train"], cfg=cfg, k_set=made["train"])
               for name in ("on", "off")}
    used = metrics["on"]["protocol"]["soft_labels"]
    assert "cross-entropy against its soft label" in used["used_by"]
    assert used["teacher"] == read_manifest(made["on"]).provenance["relabel"]["teacher"]
    assert metrics["on"]["usefulness"]["augmentation"]["soft_labels"] is True
    assert metrics["off"]["protocol"]["soft_labels"] is None
    assert metrics["off"]["usefulness"]["augmentation"]["soft_labels"] is False
