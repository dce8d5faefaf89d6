"""`gensynth inspect` on a run directory: config, checkpoints, export, grids; --verify checks the export.
(Shard sets and single shards: tests/test_ingest.py; configs: tests/test_config.py.)"""

from __future__ import annotations

import shutil

from gensynth.cli import main
from tests.conftest import write_shard_set
from tests.helpers import run_dir, tiny_family_config, train_ok


def test_inspect_a_run_directory_and_verify_its_export(tiny_gan, tmp_path, capsys):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_gan, run)  # the fixture is shared: damage a copy
    (run / "checkpoints" / "step-00000009").mkdir()  # a half-written checkpoint (no COMPLETE marker)
    capsys.readouterr()
    assert main(["inspect", str(run), "--verify"]) == 0
    text = capsys.readouterr().out
    assert f"run        {run}" in text
    assert "config     family gan, 4 steps of batch 8, data " in text
    assert "checkpoints 1 complete, steps 4; resumes from step-00000004; 1 incomplete, never resumed from " \
           "(step-00000009)" in text
    assert "export     step 4, " in text and "weights sha256 " in text
    assert "verify     ok: the weights and config match their sha256" in text
    assert "verify     ok: step-00000004: every file matches its sha256, no pickle" in text
    assert f"samples    1 grids, newest {run / 'samples' / 'samples-step-00000004.png'}" in text
    assert f"tensorboard --logdir {run / 'tb'}" in text

    weights = run / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert main(["inspect", str(run)]) == 0, "without --verify nothing is re-hashed"
    assert main(["inspect", str(run), "--verify"]) == 1
    assert "verify     FAILED: " in capsys.readouterr().out


def test_inspect_a_run_without_export_or_checkpoints(tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text("model: {family: gan}\ntrain: {steps: 10, batch_size: 4}\n")
    assert main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    assert "checkpoints none complete (a rerun starts from step 0)" in text
    assert "export     none yet" in text and "samples    0 grids" in text


def test_inspect_counts_the_grids_of_every_family(tmp_path, capsys):
    """A VQ-VAE saves reconstructions-step-*.png, not samples-step-*.png: inspect finds them (and any grid_name)."""
    write_shard_set(tmp_path / "train", [40, 33, 30])
    config = tiny_family_config(tmp_path, {"train": str(tmp_path / "train")}, "vqvae", train__steps=20,
                                train__eval_every=0)
    train_ok(config)
    run = run_dir(config)
    assert main(["inspect", str(run)]) == 0
    newest = run / "samples" / "reconstructions-step-00000020.png"
    assert f"samples    2 grids, newest {newest}" in capsys.readouterr().out
    (run / "samples" / "mine-step-00000030.png").write_bytes(newest.read_bytes())  # a family of one's own
    (run / "samples" / "notes.png").write_bytes(b"")  # not a grid
    assert main(["inspect", str(run)]) == 0
    assert f"samples    3 grids, newest {run / 'samples' / 'mine-step-00000030.png'}" in capsys.readouterr().out
