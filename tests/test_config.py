"""Config: YAML + key=value overrides into the typed schema; bad keys and values get one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gensynth.cli import main
from gensynth.config import Config, dump_yaml
from gensynth.errors import ConfigError, UsageError
from gensynth.families import load_run_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_run_config(None)
    assert isinstance(cfg, Config) and cfg.train.batch_size == 128 and cfg.data.mode == "resampled"


def test_yaml_then_overrides_nested_with_dots(tmp_path):
    path = write(tmp_path, "run: {name: a, seed: 3}\ntrain: {batch_size: 32}\n")
    cfg = load_run_config(path, ["train.batch_size=64", "data.mode=exact", "data.max_corrupt_fraction=0.5"])
    assert (cfg.run.name, cfg.run.seed, cfg.train.batch_size) == ("a", 3, 64)
    assert cfg.data.mode == "exact" and cfg.data.max_corrupt_fraction == 0.5


def test_scientific_notation_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) parses 2e-4 as a string; learning rates are written that way
    cfg = load_run_config(write(tmp_path, "gan: {lr_g: 2e-4}\n"), ["gan.lr_d=1e-3"])
    assert cfg.gan.lr_g == 2e-4 and cfg.gan.lr_d == 1e-3


def test_a_bare_no_is_the_choice_no_not_a_bool(tmp_path):
    # YAML 1.1 reads `no` as false: in the file and in an override it is still train.mixed_precision's "no"
    assert load_run_config(write(tmp_path, "train: {mixed_precision: no}\n")).train.mixed_precision == "no"
    assert load_run_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision=True is not allowed"):
        load_run_config(None, ["train.mixed_precision=yes"])  # no choice is spelt yes, on or true


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_run_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(None, ["run.name=x", "data.num_workers=0"])
    again = load_run_config(write(tmp_path, dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.batchsize=3", "unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    ("trian.batch_size=3", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.batch_size=abc", "train.batch_size='abc' is not allowed: must be an integer"),
    ("train.batch_size=0", "train.batch_size=0 is not allowed: must be >= 1"),
    ("train.batch_size=2.5", "must be an integer"),
    ("data.mode=sometimes", "data.mode='sometimes' is not allowed: one of 'exact', 'resampled'"),
    ("data.max_corrupt_fraction=2", "must be <= 1.0"),
    ("data.num_workers=true", "must be an integer"),
    ("batch_size", "is not of the form section.key=value"),
    ("train=3", "train must be a mapping"),
])
def test_bad_override_names_key_value_and_what_is_allowed(override, needle):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "run: [unclosed\n"))
    with pytest.raises(UsageError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path, capsys):
    path = write(tmp_path, "data:\n  moed: exact\n")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'data.mode'" in err[0] and "Traceback" not in err[0]


def test_cli_prints_resolved_config(tmp_path, capsys):
    assert main(["inspect", str(REPO / "configs" / "loader_fashion.yaml"), "train.batch_size=7"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["batch_size"] == 7 and resolved["run"]["root"] == "runs"


def test_prior_guidance_needs_the_no_class_token_of_label_dropout():
    with pytest.raises(ConfigError, match=r"prior.guidance=2.0 needs prior.label_dropout > 0"):
        load_run_config("configs/prior_fashion.yaml", ["prior.guidance=2"])  # label dropout is off by default
    with pytest.raises(ConfigError, match=r"prior.guidance=0.0 is not allowed: a scale > 0"):
        load_run_config("configs/prior_fashion.yaml", ["prior.guidance=0", "prior.label_dropout=0.1"])
    cfg = load_run_config("configs/prior_fashion.yaml", ["prior.guidance=2", "prior.label_dropout=0.1"])
    assert cfg.prior.guidance == 2
