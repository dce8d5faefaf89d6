"""The honest baseline (classic augmentation of the real images), the recommended mix chosen on a
validation split without the test set, the file MixLoader reads it from, and the verdict. Real parts:
toy shard sets written and cut with the real tools (gensynth shard --per-class), a few classifier steps."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from gensynth.config import EvalConfig
from gensynth.data.manifest import manifest_sha256
from gensynth.data.mix import RECOMMENDATION_FILE, MixLoader, read_recommendation
from gensynth.errors import ConfigError, UsageError
from gensynth.evaluate import usefulness
from gensynth.evaluate.augment import ClassicAugment, cutout
from gensynth.evaluate.classifier import batches_from_pools
from gensynth.evaluate.recommend import recommend, unseen_real, verdict
from gensynth.evaluate.sets import load_image_set
from gensynth.evaluate.synthetic import evaluate_synthetic, summary_lines, usefulness_protocol
from gensynth.families import load_run_config
from tests.test_evaluate import CLASSES, env, synthetic_provenance, tiny_eval_config, toy_images, write_set

GRID = {"mix_fractions": [0.25, 0.75], "mix_weights": [1.0], "mix_filters": "none,agree", "mix_seeds": 2}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    """Real toy sets; the synthetic one is credited to a generator trained on the K = 5 set, and 60% of its
    labels are wrong, so the grid points differ (unfiltered, at a large share, it teaches wrong labels)."""
    root = tmp_path_factory.mktemp("mix")
    train = write_set(root / "train", *toy_images(400, seed=1))
    images, labels = toy_images(200, seed=2)
    test = write_set(root / "test", images, labels, split="test")
    rng = np.random.default_rng(0)
    poisoned = write_set(root / "test_poisoned", images, rng.permutation(labels), split="test")
    done = subprocess.run([sys.executable, "-m", "gensynth", "shard", f"shards:{train}", str(root / "k5"),
                           "--split", "train", "--per-class", "5"], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    k_set = str(root / "k5" / "train")
    images, labels = toy_images(200, seed=3)
    wrong = np.concatenate([rng.choice(np.flatnonzero(labels == c), 30, replace=False) for c in range(CLASSES)])
    labels[wrong] = (labels[wrong] + 1) % CLASSES  # 30 of each class's 50 relabelled: still balanced
    synth = write_set(root / "synth", images, labels, split="synth", provenance=synthetic_provenance(k_set))
    return {"root": str(root), "train": train, "test": test, "test_poisoned": poisoned, "k_set": k_set,
            "synth": synth}


def run_eval(toy: dict[str, str], test: str, report: Path, cache: Path, **changes) -> dict:
    cfg = tiny_eval_config(cache, cas=False, **{**GRID, **changes})
    return evaluate_synthetic(toy["synth"], toy[test], train=toy["train"], report=str(report), cfg=cfg)


@pytest.fixture(scope="module")
def evaluated(toy, tmp_path_factory) -> dict[str, dict]:
    """One evaluation against the real test set, one against the same images with permuted labels."""
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for name in ("test", "test_poisoned"):
        metrics = run_eval(toy, name, root / name, root / "cache")
        out[name] = {"metrics": metrics, "report": root / name}
    return out


# ---------------------------------------------------------------------------------------------- without the test set


def test_the_recommended_mix_does_not_move_when_the_test_labels_are_poisoned(evaluated):
    clean = evaluated["test"]["metrics"]["usefulness"]
    poisoned = evaluated["test_poisoned"]["metrics"]["usefulness"]
    # the poisoned labels reach the reported test figures (near chance: 4 classes)...
    assert clean["augmentation"]["real_only"]["mean"] > 0.8 > 0.5 > poisoned["augmentation"]["real_only"]["mean"]
    # ...but not the choice, nor any validation figure it was made from (CPU training is deterministic)
    assert clean["recommended_mix"] == poisoned["recommended_mix"]
    mix = clean["recommended_mix"]
    grid = mix["search"]["grid"]
    assert sorted((g["synthetic_fraction"], g["filter"]) for g in grid) == sorted(product([0.25, 0.75],
                                                                                         ["none", "agree"]))
    best = max(grid, key=lambda g: g["validation_accuracy"]["mean"])
    assert (mix["synthetic_fraction"], mix["synthetic_weight"], mix["filter"]) == (
        best["synthetic_fraction"], best["synthetic_weight"], best["filter"])
    # the grid separates: unfiltered at 75% of each batch, 60% wrong labels cost validation accuracy
    worst = next(g for g in grid if g["synthetic_fraction"] == 0.75 and g["filter"] == "none")
    assert worst["validation_accuracy"]["mean"] < best["validation_accuracy"]["mean"]
    # the reported test run is the chosen mix, with other seeds than the search's
    aug = clean["augmentation"]
    assert (aug["protocol"]["synthetic_fraction"], aug["protocol"]["synthetic_filter"]) == (
        mix["synthetic_fraction"], mix["filter"])
    assert not set(mix["search"]["seeds"]) & {aug["protocol"]["seed"] + i for i in range(3)}


def test_the_validation_labels_are_outside_the_k_set_and_counted(toy, evaluated):
    mix = evaluated["test"]["metrics"]["usefulness"]["recommended_mix"]
    assert mix["labels"] == {"k_set": 5 * CLASSES, "validation": 50 * CLASSES, "total": 55 * CLASSES}
    assert mix["validation"]["per_class"] == {str(c): 50 for c in range(CLASSES)}
    assert mix["chosen_on"].startswith(f"validation split of {50 * CLASSES} real labels (50 per class) outside "
                                       "the K set")
    k_set, train = load_image_set(toy["k_set"]), load_image_set(toy["train"])
    unseen, origin = unseen_real(k_set, train)
    assert len(unseen) == len(train) - len(k_set) and "20 images identical to a K-set image" in origin
    k_pixels = {bytes(x.numpy().tobytes()) for x in k_set.images}
    assert not any(bytes(x.numpy().tobytes()) in k_pixels for x in unseen.images)
    # given the K set itself as the training set, the set it was cut from (its provenance) serves
    again, _ = unseen_real(k_set, k_set)
    assert again is not None and len(again) == len(unseen)


def test_without_unseen_real_labels_the_configured_mix_is_used_and_said_so(toy, tmp_path):
    k_set = load_image_set(toy["k_set"])
    k_set.manifest.provenance["source"] = f"shards:{tmp_path / 'gone'}"  # the set it was cut from is gone
    cfg = tiny_eval_config(tmp_path, **GRID, synthetic_fraction=0.5, synthetic_filter="agree")
    protocol = usefulness_protocol(cfg)
    chosen, record = recommend(k_set, load_image_set(toy["synth"]), k_set, CLASSES, protocol, cfg)
    assert chosen == protocol and record["searched"] is False and "search" not in record
    assert (record["synthetic_fraction"], record["filter"]) == (0.5, "agree")
    assert "not readable here" in record["chosen_on"] and record["labels"]["validation"] == 0


# ---------------------------------------------------------------------------------------------- the classic baseline


def test_classic_augmentation_transforms_each_image_by_a_shift_and_a_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.from_numpy(toy_images(64, seed=9)[0]).permute(0, 3, 1, 2).contiguous()
    out = ClassicAugment.parse("shift,flip", shift=2)(images, g)
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2), mode="replicate").to(torch.uint8)  # edge pixels
    h, w = images.shape[2:]
    moved = 0
    for x, y, p in zip(images, out, padded):
        windows = [p[:, dy:dy + h, dx:dx + w] for dy in range(5) for dx in range(5)]  # every shift of x
        assert any(torch.equal(y, v) or torch.equal(y, v.flip(2)) for v in windows)  # shifted, then maybe mirrored
        moved += not torch.equal(x, y)
    assert moved > 32  # most images changed (1 in 50 draws the identity)
    holes = cutout(torch.full((20, 1, 12, 12), 9, dtype=torch.uint8), 4, g)
    assert all(0 < int((h == 0).sum()) <= 16 for h in holes)  # one 4x4 square, clipped at the edges
    with pytest.raises(UsageError, match="unknown part rotate"):
        ClassicAugment.parse("shift,rotate")


def test_the_baseline_and_the_mixed_arm_train_on_augmented_real_batches(toy, monkeypatch):
    seen = []
    real_train = usefulness.train_classifier

    def spy(pools, *args, **kwargs):
        seen.append([(pool.augment, count) for pool, count in pools])
        return real_train(pools, *args, **kwargs)

    monkeypatch.setattr(usefulness, "train_classifier", spy)
    k_set, synth, test = (load_image_set(toy[k]) for k in ("k_set", "synth", "test"))
    cfg = EvalConfig(classifier_steps=3, classifier_batch_size=16, seeds=1, real_augment="shift,flip",
                     augment_synthetic=False)
    protocol = usefulness_protocol(cfg)
    out = usefulness.augmentation_gain(k_set, synth, test, CLASSES, protocol)
    expected = ClassicAugment(shift=2, flip=True)
    assert seen == [[(expected, 16)], [(expected, 8), (None, 8)]]  # real only; real (augmented) + synthetic
    assert out["protocol"]["augment"] == {"spec": "shift,flip", "shift": 2, "flip": True, "cutout": 0}
    assert out["protocol"]["recipe"]["shift"] == 0  # no second translation on top
    # the batches the baseline arm trains on are transformed, the stored images are not
    pool = protocol.pool(k_set.images, k_set.labels)
    images, labels, _ = next(batches_from_pools([(pool, 20)], 1, torch.Generator().manual_seed(0)))
    originals = {int(lab): [] for lab in labels}
    for x, lab in zip(k_set.images, k_set.labels.tolist()):
        originals.setdefault(lab, []).append(x)
    changed = sum(not any(torch.equal(x, o) for o in originals[int(lab)]) for x, lab in zip(images, labels))
    assert changed > 10
    none = usefulness_protocol(EvalConfig(real_augment="none")).pool(k_set.images, k_set.labels)
    assert none.augment is None


def test_eval_records_the_baseline_in_its_protocol(evaluated):
    metrics = evaluated["test"]["metrics"]
    assert metrics["protocol"]["classifier"]["augment"] == {"spec": "shift", "shift": 2, "flip": False, "cutout": 0}
    assert "shift (eval.real_augment)" in metrics["protocol"]["baseline"]
    assert metrics["usefulness"]["augmentation"]["protocol"]["augment"]["spec"] == "shift"


def test_bad_augmentation_and_grid_values_are_one_clear_line():
    for override, text in (("eval.real_augment=shift,rotate", "eval.real_augment='shift,rotate' is not allowed"),
                           ("eval.mix_fractions=[0.5,1.0]", "eval.mix_fractions=[0.5, 1.0] is not allowed"),
                           ("eval.mix_weights=[]", "eval.mix_weights=[] is not allowed"),
                           ("eval.mix_filters=", "eval.mix_filters='' is not allowed")):
        with pytest.raises(ConfigError, match=text.replace("[", r"\[").replace("]", r"\]")):
            load_run_config(None, [override])
    with pytest.raises(ConfigError, match="mix_fractions"):  # the library checks an EvalConfig built in code too
        evaluate_synthetic("nowhere", "nowhere", cfg=EvalConfig(mix_fractions=[0.0]))


def test_the_test_set_given_as_the_training_set_is_refused(toy, tmp_path):
    # else the recommended mix would validate on the test set
    with pytest.raises(UsageError, match="--train and --real both name the set"):
        evaluate_synthetic(toy["synth"], toy["test"], train=toy["test"], cfg=tiny_eval_config(tmp_path))


# ---------------------------------------------------------------------------------------------- the file and MixLoader


def test_mixloader_reads_the_recommended_mix(toy, evaluated):
    report = evaluated["test"]["report"]
    rec = json.loads((report / RECOMMENDATION_FILE).read_text())
    mix = rec["recommended_mix"]
    assert mix == {k: evaluated["test"]["metrics"]["usefulness"]["recommended_mix"][k] for k in mix}
    assert rec["verdict"] == evaluated["test"]["metrics"]["verdict"]["verdict"]
    loader = MixLoader.from_recommendation(toy["k_set"], None, str(report), batch_size=16, num_workers=0)
    n_syn = int(round(16 * mix["synthetic_fraction"]))
    assert loader.counts == [16 - n_syn, n_syn]
    assert loader.weights == [1.0, mix["synthetic_weight"]]
    batch = next(iter(loader))
    assert batch["weight"].tolist() == [1.0] * (16 - n_syn) + [mix["synthetic_weight"]] * n_syn
    target = read_recommendation(str(report))["synthetic"]
    if mix["filter"] == "agree":  # the filtered set written beside it, a subset of the evaluated one
        assert target["url"] == str(report / "recommended_synthetic") and target["kept"] < 200
        kept = load_image_set(target["url"])
        assert set(kept.keys) < set(load_image_set(toy["synth"]).keys)
    else:
        assert manifest_sha256(target["url"]) == manifest_sha256(toy["synth"])
    with pytest.raises(UsageError, match="is not the synthetic set .* was measured on"):
        MixLoader.from_recommendation(toy["k_set"], toy["train"], str(report), batch_size=16)
    (report.parent / "broken.json").write_text(json.dumps({**rec, "recommended_mix": {**mix, "synthetic_weight": 0}}))
    with pytest.raises(UsageError, match="synthetic_weight > 0"):
        MixLoader.from_recommendation(toy["k_set"], None, str(report.parent / "broken.json"), batch_size=16)
    with pytest.raises(UsageError, match="no recommended mix there"):
        read_recommendation(str(report.parent))


def test_the_agree_filter_recommendation_streams_only_the_kept_samples(toy, tmp_path):
    report = tmp_path / "agree"
    metrics = run_eval(toy, "test", report, tmp_path / "cache", mix_filters="agree", mix_fractions=[0.25])
    assert metrics["usefulness"]["recommended_mix"]["filter"] == "agree"
    target = read_recommendation(str(report))["synthetic"]
    kept = load_image_set(target["url"])
    assert 0 < len(kept) == target["kept"] < 200  # 60% wrong labels: the K-set classifier rejects many
    assert kept.provenance["filtered"]["of"] == 200 and kept.provenance["training_data"][0]["train"] == toy["k_set"]
    loader = MixLoader.from_recommendation(toy["k_set"], None, str(report), batch_size=8, num_workers=0)
    streamed = {k for b in loader for k, s in zip(b["key"], b["source"].tolist()) if s == 1}
    assert streamed and streamed <= set(kept.keys)


# ---------------------------------------------------------------------------------------------- the verdict


def gain(runs: list[float]) -> dict:
    a = np.asarray(runs)
    return {"k": 10, "gain": {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                              "runs": runs}, "protocol": {"augment": {"spec": "shift,flip"}}}


def test_verdict_from_the_paired_gain_and_its_spread():
    assert verdict(gain([0.03, 0.025, 0.035]))["verdict"] == "helps"
    assert verdict(gain([-0.03, -0.02, -0.04]))["verdict"] == "hurts"
    assert verdict(gain([0.02, -0.015, 0.01]))["verdict"] == "neutral"
    assert verdict(gain([0.05]))["verdict"] == "unknown"  # one seed: no spread
    v = verdict(gain([-0.03, -0.02, -0.04]))
    assert v["line"].startswith("HURTS: real + synthetic vs real only (classic augmentation: shift,flip): -3.00")
    assert v["advice"] == "Don't use it for augmentation."
    copying = verdict(gain([0.03, 0.025, 0.035]), {"near_copy_fraction": 0.3, "real_floor_fraction": 0.02})
    assert copying["verdict"] == "helps" and "It copies: 30.0% of its samples are near-copies" in copying["advice"]
    skipped = verdict({"skipped": "no K set"})
    assert skipped["verdict"] == "unknown" and skipped["advice"] == "No K set."


def test_without_augmentation_the_verdict_says_what_the_set_is_worth_alone_and_whether_it_copies():
    """A full-data generator (the demo's) has no augmentation gain: its first lines still give CAS and copying."""
    cas = {"cas": 0.6381, "real_accuracy": 0.8468, "ratio": 0.7535}
    v = verdict({"skipped": "the generator was trained on all of train"}, {"near_copy_fraction": 0.0,
                                                                         "real_floor_fraction": 0.0019}, cas=cas)
    assert v["verdict"] == "unknown" and v["line"].startswith("UNKNOWN as augmentation")
    assert "carries 0.75 of real data's value: 63.8% test accuracy against 84.7%" in v["line"]
    assert v["advice"].endswith("It does not copy: 0.00% of its samples are near-copies of the generator's training "
                                "images (real floor 0.19%).")
    assert "CAS" not in verdict({"skipped": "x"}, cas={"skipped": "eval.cas=false"})["line"]


def test_the_verdict_leads_the_report_and_the_summary(evaluated):
    metrics, report = evaluated["test"]["metrics"], evaluated["test"]["report"]
    v = metrics["verdict"]
    assert v["verdict"] in ("helps", "neutral", "hurts")
    assert v["line"].startswith(v["verdict"].upper() + ": real + synthetic vs real only")
    assert "at the recommended mix" in v["line"]
    lines = summary_lines(metrics, str(report))
    assert lines[:2] == [v["line"], v["advice"]]
    page = (report / "report.html").read_text()
    body = page.split("<body>", 1)[1]
    assert body.startswith("<h1>Synthetic data report</h1><p class='verdict")  # the first lines of the page
    import html

    assert html.escape(v["line"]) in body[:1000] and html.escape(v["advice"]) in body[:1500]
    assert "Recommended mix" in page and "validation accuracy" in page
