"""The VQ-VAE, its prior and the VAE on the shared training loop, for real: subprocesses, kill -9 and
resume, real gloo ranks, TensorBoard events, exports loaded through gensynth.families.load_sampler.

Tiny configs (8x8 toy images, 8-channel nets) keep steps to milliseconds: these tests check the
machinery (codebook sync, resume, export, collapse guard), not image quality.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gensynth.config import EvalConfig
from gensynth.errors import UsageError
from gensynth.evaluate.sets import load_image_set
from gensynth.export import load_export
from gensynth.families import load_sampler
from gensynth.families.prior.sampler import PriorSampler
from gensynth.families.sampling import NoReconstruction
from gensynth.families.vae.sampler import VAESampler
from gensynth.families.vqvae.sampler import VQVAESampler
from gensynth.families.vqvae.trainer import grid_images, reconstruction_grid
from gensynth.imaging import image_grid
from gensynth.reconstruction import reconstruction_figures
from gensynth.train.checkpoint import latest_checkpoint
from tests.conftest import free_port, write_shard_set
from tests.helpers import (
    gensynth,
    kill9_after_checkpoint,
    last_grid,
    launch_cmd,
    rank_state,
    run_dir,
    run_launches,
    tiny_family_config,
    train_ok,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    write_shard_set(root / "train", [40, 33, 30])
    write_shard_set(root / "test", [25], split="test")
    return {"train": str(root / "train"), "test": str(root / "test"), "root": str(root)}


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def vqvae_run(toy, tmp_path_factory) -> dict:
    """A tiny trained VQ-VAE, with held-out evaluation on the toy test split."""
    folder = tmp_path_factory.mktemp("vqvae")
    config = tiny_family_config(folder, toy, "vqvae", data__test=toy["test"], train__steps=30)
    done = train_ok(config)
    return {"config": config, "run": run_dir(config), "stderr": done.stderr}


def kill_after_a_checkpoint_then_resume(config: Path, steps: int) -> tuple[Path, subprocess.CompletedProcess]:
    """Start training, kill -9 once a random checkpoint (after the first) exists, resume to the end."""
    last = kill9_after_checkpoint(config, random.Random().randrange(40, steps - 60, 20))
    assert int(last.name.split("-")[1]) < steps and not (run_dir(config) / "export").exists()
    resumed = train_ok(config)
    assert f"resumed from {last}" in resumed.stderr
    return last, resumed


def assert_bitwise_equal_runs(a: Path, b: Path) -> None:
    ta, _ = load_export(a)
    tb, _ = load_export(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    fa, fb = latest_checkpoint(a / "checkpoints"), latest_checkpoint(b / "checkpoints")
    assert rank_state(fa)["data_digest"] == rank_state(fb)["data_digest"]
    assert rank_state(fa)["params_digest"] == rank_state(fb)["params_digest"]
    assert json.loads((fb / "trainer.json").read_text())["resumes"] == 1


# -- VQ-VAE


def test_vqvae_kill9_then_resume_equals_an_uninterrupted_run(toy, tmp_path):
    steps = 200
    kw = dict(train__steps=steps, train__checkpoint_every=20, train__eval_every=0, train__sample_every=1000)
    reference = tiny_family_config(tmp_path / "a", toy, "vqvae", **kw)
    train_ok(reference)
    killed = tiny_family_config(tmp_path / "b", toy, "vqvae", **kw)
    kill_after_a_checkpoint_then_resume(killed, steps)
    # bitwise: encoder, decoder and the whole codebook state (EMA counts and sums, usage, restarts)
    assert_bitwise_equal_runs(run_dir(reference), run_dir(killed))
    _, config = load_export(run_dir(killed))
    assert config["codebook"]["restarts_total"] > 0, "dead-code restarts (random) happened across the resume"


def test_vqvae_logs_codebook_figures_heldout_quality_and_reconstruction_grids(vqvae_run):
    run = vqvae_run["run"]
    acc = events(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss/recon", "loss/commitment", "vq/usage", "vq/perplexity", "vq/restarted", "vq/restarts_total",
                "eval/mse_01", "eval/psnr", "eval/ssim", "eval/codebook_used_fraction", "eval/codebook_perplexity",
                "grad_norm", "lr"):
        assert tag in scalars, tag
    assert "eval/variety" not in scalars, "a VQ-VAE alone does not generate"
    assert [e.step for e in acc.Scalars("eval/psnr")] == [10, 20, 30]
    usage = [e.value for e in acc.Scalars("vq/usage")]
    assert all(0 < u <= 1 for u in usage)
    assert [g.step for g in acc.Images("reconstructions")] == [10, 20, 30]
    grid = last_grid(run, "reconstructions")
    assert grid.shape == (2 * (8 + 2) + 2, 10 * (8 + 2) + 2, 1)  # input row over output row, one per class
    _, config = load_export(run)
    assert config["family"] == "vqvae" and config["grid"] == [4, 4]
    assert 0 < config["heldout"]["ssim"] <= 1 and config["heldout"]["psnr"] > 0
    assert 0 < config["codebook"]["usage"] <= 1
    assert "codebook collapse" not in vqvae_run["stderr"]


def test_vqvae_export_reproduces_the_reconstruction_grid_and_refuses_to_sample(vqvae_run, toy):
    run = vqvae_run["run"]
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors"]
    sampler = load_sampler(run)
    assert isinstance(sampler, VQVAESampler) and sampler.classes == [f"c{i}" for i in range(10)]
    inputs = grid_images(toy["test"], 1, 10, seed=0)
    recon = sampler.reconstruct(inputs, torch.arange(10))
    grid = reconstruction_grid(inputs, recon.images, 10)
    assert np.array_equal(grid, last_grid(run, "reconstructions"))
    codes = sampler.encode(inputs)
    assert codes.shape == (10, 4, 4) and codes.dtype == torch.int64 and int(codes.max()) < 16
    assert torch.equal(recon.codes, codes) and sampler.codebook_size == 16
    with pytest.raises(UsageError, match="train the prior"):
        sampler.sample(torch.arange(3), torch.Generator().manual_seed(0))


def test_collapse_guard_warns_when_codebook_usage_falls_below_the_threshold(toy, tmp_path):
    # 2x2 codes per 8x8 image, 8 images a batch: a 2-batch window sees at most 64 of 256 codes, usage <= 25%
    config = tiny_family_config(tmp_path, toy, "vqvae", model__resolution=8, vqvae__downsamples=2,
                         vqvae__codebook_size=256, vqvae__usage_window=2, vqvae__restart_after=0,
                         vqvae__usage_warn=0.5, train__steps=10, train__eval_every=0)
    done = train_ok(config)
    warnings = [line for line in done.stderr.splitlines() if "codebook collapse" in line]
    assert len(warnings) == 2 and "WARNING" in warnings[0], done.stderr[-3000:]  # steps 5 and 10
    assert "below vqvae.usage_warn=0.5" in warnings[0]


@pytest.mark.multiprocess
def test_codebooks_identical_across_two_gloo_processes(toy, tmp_path):
    # 256 codes for 256 encoder outputs a step (both ranks): some go unused, so restarts happen too
    config = tiny_family_config(tmp_path, toy, "vqvae", train__steps=12, train__checkpoint_every=6, train__eval_every=0,
                         vqvae__codebook_size=256, vqvae__restart_after=2, vqvae__usage_window=2)
    results = run_launches([launch_cmd(config, port=free_port())])
    assert results[0].returncode == 0, results[0].stdout[-4000:]
    for ckpt in (run_dir(config) / "checkpoints").iterdir():
        r0, r1 = rank_state(ckpt, 0), rank_state(ckpt, 1)
        # before any averaging at the checkpoint: the ranks kept the same codebook by themselves
        assert r0["params_digest_before_sync"] == r1["params_digest_before_sync"], ckpt.name
        assert r0["data_digest"] != r1["data_digest"], "ranks consumed the same data"
    _, export = load_export(run_dir(config))
    assert export["codebook"]["restarts_total"] > 0 and export["codebook"]["batches"] == 12


# -- code shards and the prior over them


def test_code_shards_round_trip_are_reused_and_refuse_another_vqvae(vqvae_run, toy, tmp_path):
    from gensynth.data.manifest import manifest_sha256
    from gensynth.data.stream import ShardLoader
    from gensynth.export import save_export
    from gensynth.families.prior.codes import ensure_codes

    export = str(vqvae_run["run"])
    out = str(tmp_path / "codes")
    manifest = ensure_codes(export, toy["train"], out, batch_size=16)
    prov = manifest.provenance
    assert prov["kind"] == "codes" and prov["vqvae"]["weights_sha256"] == load_export(export)[1]["weights_sha256"]
    assert prov["images"] == {"train": toy["train"], "manifest_sha256": manifest_sha256(toy["train"])}
    assert prov["num_codes"] == 16 and prov["grid"] == [4, 4] and manifest.num_samples == 103
    assert manifest.schema["arrays"]["codes"] == {"field": "codes.npy", "dtype": "int16", "shape": [4, 4]}
    # every grid is what the export's encoder gives for that image, under the same key and label
    sampler = load_sampler(export)
    expected = {}
    for batch in ShardLoader(toy["train"], batch_size=50, mode="exact", shuffle_buffer=0):
        for key, label, codes in zip(batch["key"], batch["label"].tolist(), sampler.encode(batch["image"])):
            expected[key] = (label, codes)
    got = {}
    for batch in ShardLoader(out, batch_size=32, mode="exact", num_workers=2):
        for key, label, codes in zip(batch["key"], batch["label"].tolist(), batch["codes"]):
            got[key] = (label, codes)
    assert got.keys() == expected.keys()
    assert all(got[k][0] == expected[k][0] and torch.equal(got[k][1].long(), expected[k][1]) for k in got)
    from gensynth.inspection import inspect

    lines, ok = inspect(out, verify=True)
    assert ok and "array      codes: int16 [4, 4] (codes.npy)" in lines
    assert any(line.startswith("provenance codes of") and "16 codes" in line for line in lines)
    # reused, not rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    assert ensure_codes(export, toy["train"], out) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamps
    # another VQ-VAE (other weights): refused, nothing overwritten
    tensors, config = load_export(export)
    other = tmp_path / "other"
    save_export(other, {k: v + 1 if k == "decoder.net.0.bias" else v for k, v in tensors.items()},
                {k: v for k, v in config.items() if k not in ("weights_sha256", "format", "gensynth_version")})
    with pytest.raises(UsageError, match="another VQ-VAE export"):
        ensure_codes(str(other), toy["train"], out)
    assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == stamps


def test_prior_kill9_then_resume_equals_an_uninterrupted_run(toy, vqvae_run, tmp_path):
    steps = 200
    codes = tmp_path / "codes"
    kw = dict(train__steps=steps, train__checkpoint_every=20, train__eval_every=0, train__sample_every=1000,
              data__train=str(codes), prior__vqvae=str(vqvae_run["run"]), prior__images=toy["train"])
    reference = tiny_family_config(tmp_path / "a", toy, "prior", **kw)
    first = train_ok(reference)
    assert "extracting codes" in first.stderr
    killed = tiny_family_config(tmp_path / "b", toy, "prior", **kw)
    _, resumed = kill_after_a_checkpoint_then_resume(killed, steps)
    assert "reusing the code shards" in resumed.stderr and "extracting codes" not in resumed.stderr
    assert_bitwise_equal_runs(run_dir(reference), run_dir(killed))


def test_prior_export_is_self_contained_and_reproduces_the_runs_samples(toy, vqvae_run, tmp_path):
    vq_copy = tmp_path / "vq"
    shutil.copytree(vqvae_run["run"] / "export", vq_copy / "export")
    # guidance 2 as the run's default: its grids use it, and so must its export when no option is given
    config = tiny_family_config(tmp_path, toy, "prior", data__train=str(tmp_path / "codes"), prior__vqvae=str(vq_copy),
                         train__steps=20, prior__guidance=2.0,
                         prior__label_dropout=0.1)
    train_ok(config)
    run = run_dir(config)
    acc = events(run)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/nll", "loss/bits_per_code", "lr", "eval/variety", "eval/mean_gap"} <= scalars
    shutil.rmtree(vq_copy)  # the prior's export carries the VQ-VAE's codebook and decoder
    with pytest.raises(NoReconstruction, match="VQ-VAE export its codes came from"):  # but not its encoder
        load_sampler(run).reconstruct(grid_images(toy["test"], 1, 10), torch.arange(10))
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors"]
    tensors, config_json = load_export(run)
    assert {k.split(".")[0] for k in tensors} == {"prior", "vqvae"}
    assert not any(k.startswith("vqvae.encoder.") for k in tensors)
    assert config_json["vqvae"]["weights_sha256"] == load_export(vqvae_run["run"])[1]["weights_sha256"]
    sampler = load_sampler(run)
    assert isinstance(sampler, PriorSampler) and (sampler.height, sampler.width) == (8, 8)
    labels = torch.arange(10).repeat_interleave(10)
    images = sampler.sample(labels, torch.Generator().manual_seed(0), {})
    assert np.array_equal(image_grid(images.permute(0, 2, 3, 1).numpy(), rows=10), last_grid(run, "samples"))
    assert config_json["architecture"]["null_class"] and config_json["sampling_defaults"]["guidance"] == 2.0
    assert torch.equal(images, sampler.sample(labels, torch.Generator().manual_seed(0), {"guidance": 2.0}))
    assert not torch.equal(images, sampler.sample(labels, torch.Generator().manual_seed(0), {"guidance": 1.0}))
    again = sampler.sample(labels[:7], torch.Generator().manual_seed(5), {"temperature": 0.7, "top_k": 3})
    assert torch.equal(again, sampler.sample(labels[:7], torch.Generator().manual_seed(5),
                                             {"temperature": 0.7, "top_k": 3}))
    for bad, needle in (({"temperature": 0}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
                        ({"guidance": 0}, "guidance"), ({"truncation": 0.5}, "do not apply")):
        with pytest.raises(UsageError, match=needle):
            sampler.sample(labels[:2], torch.Generator().manual_seed(0), bad)


def test_prior_synthetic_set_names_the_images_it_learnt_from_for_memorisation_and_the_k_shot_check(
        toy, vqvae_run, tmp_path):
    """A prior trains on code shards, but its samples owe everything to images: the export and the generated
    set's provenance name the image set behind the codes (and the VQ-VAE's own training set), so the
    evaluation compares with those images and the K-shot check sees both stages."""
    from gensynth.data.manifest import manifest_sha256
    from gensynth.evaluate.sets import load_image_set
    from gensynth.evaluate.usefulness import check_generator_saw_only
    from gensynth.generate.job import generate

    codes = tmp_path / "codes"
    config = tiny_family_config(tmp_path, toy, "prior", data__train=str(codes), prior__vqvae=str(vqvae_run["run"]),
                         prior__images=toy["train"], train__steps=10, train__eval_every=0)
    train_ok(config)
    config_json = load_export(run_dir(config))[1]
    data = config_json["data"]
    train_sha = manifest_sha256(toy["train"])
    assert data["manifest_sha256"] == manifest_sha256(str(codes)) != train_sha
    vqvae_seen = load_export(vqvae_run["run"])[1]["training_data"]
    assert [(s["train"], s["manifest_sha256"], s["model"], s["kind"]) for s in config_json["training_data"]] == [
        (toy["train"], train_sha, "prior", "images"), (str(codes), data["manifest_sha256"], "prior", "derived"),
        *[(s["train"], s["manifest_sha256"], "vqvae", "images") for s in vqvae_seen]]
    out = tmp_path / "synth"
    generate(str(run_dir(config)), str(out), num=20, shard_size=10)
    synthetic = load_image_set(str(out))
    seen = synthetic.provenance["training_data"]
    assert seen == config_json["training_data"]  # generation records the whole list
    check_generator_saw_only(synthetic, load_image_set(toy["train"]))  # both stages saw exactly this set
    seen[-1]["manifest_sha256"] = "0" * 64  # as if the VQ-VAE had trained on more images
    with pytest.raises(UsageError, match="the vqvae stage behind"):
        check_generator_saw_only(synthetic, load_image_set(toy["train"]))


def test_prior_refuses_codes_of_another_vqvae_and_a_missing_vqvae(toy, vqvae_run, tmp_path):
    codes = tmp_path / "codes"
    write_shard_set(codes, [10])  # something else already lives where the codes would go
    config = tiny_family_config(tmp_path, toy, "prior", data__train=str(codes), prior__vqvae=str(vqvae_run["run"]))
    done = gensynth("train", str(config))
    assert done.returncode == 2 and "remove it or set data.train" in done.stderr and "Traceback" not in done.stderr
    missing = gensynth("train", str(config), "prior.vqvae=")
    assert missing.returncode == 2 and "needs prior.vqvae" in missing.stderr


def evaluate_generated(run: Path, toy: dict[str, str], folder: Path) -> dict:
    """`gensynth eval` (the library entry) of 30 samples generated from `run`, CAS off, a tiny extractor."""
    from gensynth.evaluate.synthetic import evaluate_synthetic
    from gensynth.generate.job import generate

    generate(str(run), str(folder / "synth"), num=30, shard_size=30)
    cfg = EvalConfig(cache=str(Path(toy["root"]) / "extractors"), extractor_epochs=1.0, num=30, kid_subset=10,
                     kid_subsets=2, seeds=1, classifier_steps=5, cas=False)
    evaluate_synthetic(str(folder / "synth"), toy["test"], train=toy["train"], report=str(folder / "report"), cfg=cfg)
    return json.loads((folder / "report" / "metrics.json").read_text())


def test_eval_of_a_prior_set_reports_its_vqvaes_reconstruction_figures_as_training_measured_them(
        toy, vqvae_run, tmp_path):
    config = tiny_family_config(tmp_path, toy, "prior", data__train=str(tmp_path / "codes"),
                                prior__vqvae=str(vqvae_run["run"]), train__steps=5, train__eval_every=0,
                                prior__label_dropout=0.0)
    train_ok(config)
    # without label dropout there is no 'no class' token: guidance is refused, in one line
    with pytest.raises(UsageError, match="trained without a 'no class' token"):
        load_sampler(run_dir(config)).sample(torch.arange(2), torch.Generator().manual_seed(0), {"guidance": 2.0})
    rec = evaluate_generated(run_dir(config), toy, tmp_path)["reconstruction"]
    assert rec["images"] == 25 and rec["codebook_size"] == 16, rec  # all real test images, the VQ-VAE's codebook
    assert 0 < rec["mse_01"] < 0.5 and 0 < rec["psnr"] < 100 and 0 < rec["ssim"] <= 1
    assert 0 < rec["codebook_used_fraction"] <= 1 and 1 <= rec["codebook_perplexity"] <= 16
    # one convention: the VQ-VAE's held-out figures (first eval.heldout_samples=20 test images) are the same
    # function of the export's reconstructions
    test = load_image_set(toy["test"])
    sampler = load_sampler(vqvae_run["run"])
    again = sampler.reconstruct(test.images[:20], test.labels[:20])
    expected = reconstruction_figures(test.images[:20], again.images, again.codes, 16)
    heldout = load_export(vqvae_run["run"])[1]["heldout"]
    for key in ("mse_01", "psnr", "ssim", "codebook_used_fraction", "codebook_perplexity"):
        assert heldout[key] == pytest.approx(expected[key], rel=1e-4), key



def test_a_prior_trained_with_a_relative_vqvae_path_reconstructs_from_another_directory(
        toy, vqvae_run, tmp_path, monkeypatch):
    relative = os.path.relpath(vqvae_run["run"])  # as a user types it, from where they train
    config = tiny_family_config(tmp_path, toy, "prior", data__train=str(tmp_path / "codes"), prior__vqvae=relative,
                                train__steps=2, train__eval_every=0)
    train_ok(config)
    run = run_dir(config)
    monkeypatch.chdir(tmp_path)  # where `relative` names nothing
    assert not Path(relative).exists()
    test = load_image_set(toy["test"])
    again = load_sampler(run).reconstruct(test.images[:4], test.labels[:4])
    assert again.images.shape == test.images[:4].shape


# -- VAE


def test_eval_of_a_vae_set_reports_reconstruction_figures(toy, tmp_path):
    config = tiny_family_config(tmp_path, toy, "vae", train__steps=20, train__eval_every=0)
    train_ok(config)
    rec = evaluate_generated(run_dir(config), toy, tmp_path)["reconstruction"]
    assert rec["images"] == 25 and "codebook_size" not in rec, rec  # no codebook
    assert 0 < rec["mse_01"] < 0.5 and 0 < rec["psnr"] < 100 and -1 <= rec["ssim"] <= 1
    test = load_image_set(toy["test"])
    recon = load_sampler(run_dir(config)).reconstruct(test.images, test.labels)
    assert recon.codes is None and rec["mse_01"] == reconstruction_figures(test.images, recon.images)["mse_01"]
    assert reconstruction_figures(test.images, test.images)["mse_01"] == 0.0


def test_vae_logs_elbo_terms_reports_test_elbo_and_its_export_reproduces_the_samples(toy, tmp_path):
    config = tiny_family_config(tmp_path, toy, "vae", data__test=toy["test"], train__steps=20, vae__sigma=0.0)
    train_ok(config)
    run = run_dir(config)
    acc = events(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("elbo/recon_nll", "elbo/kl", "elbo/elbo", "kl_weight", "sigma", "eval/test_elbo",
                "eval/test_recon_nll", "eval/test_kl", "eval/variety"):
        assert tag in scalars, tag
    weights = [e.value for e in acc.Scalars("kl_weight")]
    assert weights == sorted(weights) and weights[0] < 1 and weights[-1] == 1.0  # the warm-up
    test = {e.step: e.value for e in acc.Scalars("eval/test_elbo")}
    terms = {k: acc.Scalars(f"eval/test_{k}")[-1].value for k in ("recon_nll", "kl")}
    assert test[20] == pytest.approx(-(terms["recon_nll"] + terms["kl"]), rel=1e-5)
    assert sorted(p.name for p in (run / "export").iterdir()) == ["config.json", "model.safetensors"]
    tensors, export = load_export(run)
    assert export["family"] == "vae" and export["heldout"]["test_elbo"] == pytest.approx(test[20], rel=1e-5)
    # the optimal sigma's running average, started at 1, moved towards the batches' RMS error
    assert export["sigma"] != 1.0 and export["sigma"] == pytest.approx(float(tensors["log_sigma"].exp()))
    sampler = load_sampler(run)
    assert isinstance(sampler, VAESampler)
    labels = torch.arange(10).repeat_interleave(10)
    images = sampler.sample(labels, torch.Generator().manual_seed(0))
    assert np.array_equal(image_grid(images.permute(0, 2, 3, 1).numpy(), rows=10), last_grid(run, "samples"))
    cooler = sampler.sample(labels, torch.Generator().manual_seed(0), {"temperature": 0.1})
    assert not torch.equal(cooler, images)


def test_diffaugment_names_the_config_allows_are_the_ones_implemented():
    from gensynth.families.gan import DIFFAUGMENT_POLICIES
    from gensynth.families.gan.augment import POLICIES

    assert tuple(POLICIES) == DIFFAUGMENT_POLICIES


def test_minibatch_std_groups_never_mix_the_real_and_fake_halves():
    """The GAN's discriminator sees real and fake images in one batch, one half each: a group holding both
    would hide that the fakes lack variety."""
    from gensynth.models.dcgan import MinibatchStd

    real, fake = torch.randn(8, 4, 4, 4), torch.full((8, 4, 4, 4), 0.5)  # fakes without any variety
    std = MinibatchStd(4)(torch.cat([real, fake]))[:, -1, 0, 0]
    assert torch.all(std[8:] < 1e-3), "a fake's group held real images"
    assert torch.all(std[:8] > 0.1)


def gan_trainer(**gan: object):
    """A GAN trainer on 8x8 grey images of 10 classes, on the CPU, with gan.<key>=value overrides."""
    from accelerate import Accelerator

    from gensynth.config import load_config
    from gensynth.families.gan import GANOptions
    from gensynth.families.gan.trainer import GANTrainer
    from gensynth.families.training import DataInfo

    overrides = ["model.family=gan", "model.resolution=8", "gan.z_dim=8", "gan.g_channels=8", "gan.d_channels=8",
                 "gan.max_channels=16", *(f"gan.{k}={v}" for k, v in gan.items())]
    cfg = load_config(None, overrides, {"gan": GANOptions})
    data = DataInfo(8, 8, 1, 10, [f"c{i}" for i in range(10)], None)
    return GANTrainer(cfg, Accelerator(cpu=True), data)


def test_mode_seeking_draws_each_label_twice_and_penalises_pairs_that_look_alike():
    torch.manual_seed(0)
    real, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    seen = []
    trainer = gan_trainer(mode_seeking=1.0)
    trainer.G.register_forward_hook(lambda module, args, out: seen.append((*args, out.detach().float())))
    metrics = trainer.train_step(real, labels, 0).metrics
    z, fake_labels, fake = seen[0]
    assert fake_labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # pairs of one label, two noises
    assert not torch.equal(z[:4], z[4:])
    apart = (fake[:4] - fake[4:]).abs().mean() / (z[:4] - z[4:]).abs().mean()
    assert float(metrics["loss/mode_seeking"]) == pytest.approx(float(1 / (apart + 1e-5)), rel=1e-5)  # MSGAN's
    off = gan_trainer().train_step(real, labels, 0).metrics
    assert "loss/mode_seeking" not in off
    stepped = {}
    for weight in (1.0, 1e-12):  # the same pairs and noise; only the term's weight differs
        torch.manual_seed(1)
        trainer = gan_trainer(mode_seeking=weight)
        trainer.train_step(real, labels, 0)
        stepped[weight] = torch.cat([p.detach().flatten() for p in trainer.G.parameters()])
    assert not torch.allclose(stepped[1.0], stepped[1e-12])  # the term is in the generator's loss
