"""Hostile run folders and exports: nothing in a checkpoint or an export runs code or is trusted unchecked.

A run folder on a shared filesystem can be written by others. Each test plants or edits something as an
attacker (or a bad disk) would, then asserts that the gensynth command refuses it with one line naming the
file, and that a planted pickle never ran (its payload would create a marker file).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gensynth.cli import main
from gensynth.export import ExportError, load_export, read_export_config
from gensynth.train.checkpoint import COMPLETE, latest_checkpoint
from tests.conftest import IN_CI, subprocess_env, write_shard_set
from tests.helpers import one_line_error, run_dir, tiny_config


class Payload:
    """Unpickling this creates `marker`: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps(Payload(marker)))


def vouch(checkpoint: Path) -> None:
    """Rewrite COMPLETE so its digests match the planted files: the attacker who edits the folder can do this
    too, so the refusal must not rest on the digests alone."""
    listed = json.loads((checkpoint / COMPLETE).read_text())
    listed["files"] = {name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() for name in listed["files"]}
    (checkpoint / COMPLETE).write_text(json.dumps(listed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run directory) of a 10-step tiny GAN run with its checkpoint at step 10."""
    root = tmp_path_factory.mktemp("hostile_ckpt")
    write_shard_set(root / "toy", [40, 33, 30])
    config = tiny_config(root, str(root / "toy"), train__steps=10, train__eval_every=0)
    done = subprocess.run([sys.executable, "-m", "gensynth", "-q", "train", str(config)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, run_dir(config)


def copy_run(trained: tuple[Path, Path], tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of the trained run under another run.name (the config points at it)."""
    config, run = trained
    text = config.read_text().replace("name: tiny", f"name: {name}")
    copy = tmp_path / f"{name}.yaml"
    copy.write_text(text)
    shutil.copytree(run, run_dir(copy))
    return copy, run_dir(copy)


def resume(config: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["-q", "train", str(config), "train.steps=20", *overrides])
    return code, capsys.readouterr().err


def test_checkpoint_holds_only_safetensors_and_json(trained):
    checkpoint = latest_checkpoint(trained[1] / "checkpoints")
    suffixes = {p.suffix for p in checkpoint.iterdir()}
    assert suffixes <= {".safetensors", ".json", ""}, suffixes
    listed = json.loads((checkpoint / COMPLETE).read_text())["files"]
    assert set(listed) == {p.name for p in checkpoint.iterdir()} - {COMPLETE}


def test_a_pickle_planted_in_any_checkpoint_file_never_runs(trained, tmp_path, capsys):
    names = sorted(p.name for p in latest_checkpoint(trained[1] / "checkpoints").iterdir())
    assert len(names) >= 10  # models, optimizers, the EMA, the rank's RNG, trainer state, config, COMPLETE
    for name in names:
        config, run = copy_run(trained, tmp_path, f"planted-{name.replace('.', '-')}")
        checkpoint = latest_checkpoint(run / "checkpoints")
        marker = tmp_path / f"ran-{name}"
        plant(checkpoint / name, marker)
        if name != COMPLETE:
            vouch(checkpoint)
        code, err = resume(config, capsys)
        assert not marker.exists(), f"the pickle planted in {name} ran"
        assert code != 0, f"a pickle in {name} was accepted"
        line = one_line_error(err)
        assert str(checkpoint / name) in line and "refused" in line, line


def test_a_pickle_beside_the_checkpoint_files_is_refused(trained, tmp_path, capsys):
    """What Accelerate's save_state writes (custom_checkpoint_0.pkl, loaded with weights_only=False)."""
    config, run = copy_run(trained, tmp_path, "extra-pickle")
    checkpoint = latest_checkpoint(run / "checkpoints")
    marker = tmp_path / "ran"
    plant(checkpoint / "custom_checkpoint_0.pkl", marker)
    code, err = resume(config, capsys)
    assert code != 0 and not marker.exists()
    assert "custom_checkpoint_0.pkl: a pickle, refused" in one_line_error(err)


def test_an_edited_checkpoint_file_is_refused_and_verify_says_so(trained, tmp_path, capsys):
    config, run = copy_run(trained, tmp_path, "edited")
    checkpoint = latest_checkpoint(run / "checkpoints")
    state = json.loads((checkpoint / "trainer.json").read_text())
    state["step"] = 5
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    code, err = resume(config, capsys)
    assert code == 1 and "trainer.json: sha256 does not match COMPLETE" in one_line_error(err)
    assert main(["inspect", str(run), "--verify"]) == 1
    assert "verify     FAILED" in capsys.readouterr().out


def test_resume_with_another_architecture_names_the_options_that_differ(trained, tmp_path, capsys):
    config, _ = copy_run(trained, tmp_path, "arch")
    code, err = resume(config, capsys, "gan.g_channels=16")
    line = one_line_error(err)
    assert code == 2 and "gan.g_channels=16 (checkpoint: 8)" in line, line
    assert "train.steps" not in line  # options that do not shape the model may change on resume


def test_resume_from_the_data_only_checkpoint_continues(trained, tmp_path, capsys):
    config, run = copy_run(trained, tmp_path, "resumes")
    code, err = resume(config, capsys)
    assert code == 0, err[-2000:]
    state = json.loads((latest_checkpoint(run / "checkpoints") / "trainer.json").read_text())
    assert state["step"] == 20 and state["resumes"] == 1


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temporary_folder(trained, tmp_path):
    if os.geteuid() != 0:
        assert not IN_CI, "CI runs as root: the full-disk test needs to mount a tmpfs"
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the run's config, TensorBoard events and sample grids, not for a checkpoint (about 300 kB)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], check=True)
    try:
        config, _ = trained
        text = config.read_text().replace(f"root: {config.parent / 'runs'}", f"root: {disk}")
        full = tmp_path / "full.yaml"
        full.write_text(text)
        done = subprocess.run([sys.executable, "-m", "gensynth", "-q", "train", str(full), "run.name=full"],
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        line = one_line_error(done.stderr)
        assert "cannot write checkpoint" in line and "No space left" in line, line
        assert not list((disk / "full" / "checkpoints").glob("*.tmp-*")), "the half-written checkpoint stayed"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -------------------------------------------------------------------------------------------------- exports


@pytest.mark.parametrize("field,value", [("classes", ["x"] * 10), ("step", 999), ("run", "someone-else")])
def test_an_edited_export_config_is_refused(trained, tmp_path, capsys, field, value):
    export = tmp_path / "export"
    shutil.copytree(trained[1] / "export", export)
    config = json.loads((export / "config.json").read_text())
    assert config[field] != value
    config[field] = value
    (export / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    with pytest.raises(ExportError, match=f"differs from the config recorded in model.safetensors .* in {field}"):
        load_export(export)
    with pytest.raises(ExportError, match="differs"):
        read_export_config(export)
    assert main(["generate", str(export), str(tmp_path / "out"), "--num", "10"]) == 2
    assert "it was edited" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_any_byte_of_an_export_config_is_covered(trained, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(trained[1] / "export", export)
    assert load_export(export)[1]["step"] == 10
    (export / "config.json").write_bytes((export / "config.json").read_bytes().replace(b"\n", b"\n ", 1))
    with pytest.raises(ExportError, match="it was edited"):
        load_export(export)


def test_inspect_verify_fails_an_edited_export(trained, tmp_path, capsys):
    _, run = copy_run(trained, tmp_path, "inspected")
    assert main(["inspect", str(run), "--verify"]) == 0
    assert "the weights and config match" in capsys.readouterr().out
    config = json.loads((run / "export" / "config.json").read_text())
    config["classes"][0] = "renamed"
    (run / "export" / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    assert main(["inspect", str(run), "--verify"]) == 1
    assert "verify     FAILED" in capsys.readouterr().out


def test_a_killed_runs_half_written_checkpoint_is_removed_by_the_next_one(trained, tmp_path, capsys):
    from gensynth import storage

    config, run = copy_run(trained, tmp_path, "debris")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    checkpoints = run / "checkpoints"
    killed = checkpoints / f".step-00000015.tmp-{int(dead.stdout)}-deadbeef-{storage.HOST}"
    alive = checkpoints / f".step-00000016.tmp-{os.getpid()}-0123abcd-{storage.HOST}"  # this process: alive
    for folder in (killed, alive):
        folder.mkdir()
        (folder / "model_0.safetensors").write_bytes(b"half")
    code, err = resume(config, capsys)
    assert code == 0, err[-2000:]
    assert not killed.exists(), "a dead writer's half-written checkpoint stayed"
    assert alive.exists(), "a live writer's folder was taken"
