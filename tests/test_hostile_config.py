"""Config values that used to pass validation and crash (or silently misbehave) later: each is refused
before anything runs, with one line naming the key and what is allowed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gensynth.cli import main
from gensynth.errors import ConfigError
from gensynth.families import load_run_config
from tests.helpers import one_line_error


@pytest.mark.parametrize("override,allowed", [
    ("gan.lr_g=nan", "finite"),
    ("train.grad_clip=nan", "finite"),  # NaN passed min=0 and silently turned clipping off
    ("gan.lr_d=.inf", "finite"),
    ("train.batch_size=99999999999", "must be <= 65536"),
    ("train.batch_size=99999999999999999999", "must fit in 64 bits"),
    ("model.resolution=33", "a power of two"),
    ("gan.diffaugment=bogus", "comma-separated list of color, translation, cutout"),
    ("gan.diffaugment=translation,bogus", "comma-separated list"),
    ("run.name=../..", "a plain folder name inside run.root"),
    ("run.name=/tmp/elsewhere", "a plain folder name inside run.root"),
    ("run.name=a/../../b", "a plain folder name inside run.root"),
    ("train.steps=0", "must be >= 1"),  # wrote an untrained export with exit 0
])
def test_bad_value_is_refused_at_validation(tmp_path, capsys, override, allowed):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=allowed):
        load_run_config(None, [override])
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{root: {tmp_path / 'runs'}}}\n")
    assert main(["train", str(config), override]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert key in line and allowed in line, line
    assert not (tmp_path / "runs").exists() and not Path("/tmp/elsewhere").exists()


@pytest.mark.parametrize("family,resolution,allowed", [("vqvae", 30, "divisible by 2^vqvae.downsamples = 4"),
                                                        ("vae", 14, "divisible by 2^vae.downsamples = 4")])
def test_resolution_must_suit_the_family(family, resolution, allowed):
    with pytest.raises(ConfigError, match=re.escape(allowed)):
        load_run_config(None, [f"model.family={family}", f"model.resolution={resolution}"])
    assert load_run_config(None, [f"model.family={family}", "model.resolution=28"]).model.resolution == 28


def test_prior_heads_must_divide_width():
    with pytest.raises(ConfigError, match="prior.heads=3 is not allowed: it must divide prior.width=128"):
        load_run_config(None, ["model.family=prior", "prior.heads=3"])


def test_good_values_still_pass():
    cfg = load_run_config(None, ["gan.diffaugment=translation, cutout", "run.name=gan_fashion-2", "train.steps=1",
                             "train.grad_clip=1.0", "gan.lr_g=1e-4"])
    assert cfg.gan.diffaugment == "translation, cutout" and cfg.train.steps == 1 and cfg.gan.lr_g == 1e-4


def test_a_duplicate_yaml_key_is_an_error(tmp_path, capsys):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  steps: 10\n  batch_size: 8\n  steps: 2000\n")
    with pytest.raises(ConfigError, match="duplicate key 'steps'"):
        load_run_config(config)
    assert main(["train", str(config)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "dup.yaml" in line and "duplicate key 'steps'" in line and "line 4" in line, line
