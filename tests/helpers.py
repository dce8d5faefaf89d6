"""Helpers shared by several test files: tiny run configs, `gensynth` subprocesses, kill -9, gloo launches.
(Fixtures live in conftest.py; this module is not named test_* so pytest collects nothing from it.)

The tiny configs (8x8 toy images, 8-channel nets) keep each step to milliseconds: tests that use them
check the machinery (checkpoint, resume, signals, logging, export), not image quality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gensynth.data.codec import decode_png
from gensynth.train.checkpoint import complete_checkpoints, latest_checkpoint
from tests.conftest import REPO, subprocess_env


def bench_module(name: str):
    """bench/<name>.py imported as the module bench_<name> (registered: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

TIMEOUT_S = 300
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def write_config(folder: Path, stem: str, cfg: dict, overrides: dict) -> Path:
    """cfg with `section__key=value` overrides, as folder/<stem>-<n>.yaml (n counts the earlier ones)."""
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg[section][name] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{len(list(folder.glob(f'{stem}-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_config(tmp_path: Path, data: str, **overrides) -> Path:
    """A tiny GAN run (run.name tiny) on the shard set `data`."""
    return write_config(tmp_path, "tiny", {
        "run": {"name": "tiny", "root": str(tmp_path / "runs"), "seed": 0},
        "data": {"train": data, "mode": "resampled", "num_workers": 0, "shuffle_buffer": 16},
        "model": {"family": "gan", "resolution": 8},
        "gan": {"z_dim": 16, "g_channels": 8, "d_channels": 8, "max_channels": 16, "ema_kimg": 0.1},
        "train": {"steps": 30, "batch_size": 8, "log_every": 5, "sample_every": 10, "checkpoint_every": 10,
                  "eval_every": 10, "threads": 1},
        "eval": {"num_samples": 50},
    }, overrides)


def tiny_family_config(folder: Path, toy: dict[str, str], family: str, **overrides) -> Path:
    """A tiny run of the VQ-VAE, the prior or the VAE (run.name = the family) on toy["train"]."""
    return write_config(folder, family, {
        "run": {"name": family, "root": str(folder / "runs"), "seed": 0},
        "data": {"train": toy["train"], "mode": "resampled", "num_workers": 0, "shuffle_buffer": 16},
        "model": {"family": family, "resolution": 8},
        "train": {"steps": 20, "batch_size": 8, "log_every": 5, "sample_every": 10, "checkpoint_every": 10,
                  "eval_every": 10, "threads": 1},
        "eval": {"num_samples": 30, "heldout_samples": 20},
        "vqvae": {"base_channels": 8, "max_channels": 16, "downsamples": 1, "res_blocks": 1, "embed_dim": 8,
                  "codebook_size": 16, "kmeans_iters": 2, "restart_after": 3, "usage_window": 3, "usage_warn": 0.0,
                  "grid_per_class": 1},
        "prior": {"width": 16, "layers": 1, "heads": 2, "warmup_steps": 5, "extract_batch_size": 32},
        "vae": {"latent_dim": 4, "base_channels": 8, "max_channels": 16, "downsamples": 1, "kl_warmup_steps": 10},
    }, overrides)


def gensynth(*args: str, timeout: float = TIMEOUT_S, **env: str) -> subprocess.CompletedProcess:
    """`python -m gensynth ARGS` in a subprocess (this checkout, CPU, one thread; `env` added)."""
    return subprocess.run([sys.executable, "-m", "gensynth", *args], env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def train_ok(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = gensynth("train", str(config), *overrides)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def run_dir(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    return Path(cfg["run"]["root"]) / cfg["run"]["name"]


def rank_state(checkpoint: Path, rank: int = 0) -> dict:
    return json.loads((checkpoint / f"rank{rank}.json").read_text())


def last_grid(run: Path, name: str) -> np.ndarray:
    """The newest grid samples/<name>-step-*.png of a run, decoded."""
    path = sorted((run / "samples").glob(f"{name}-step-*.png"))[-1]
    return decode_png(path.read_bytes())


def one_line_error(err: str) -> str:
    """The last line of a command's stderr, asserting there is one and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert lines, "no error message"
    return lines[-1]


def kill9_after_checkpoint(config: Path, target: int) -> Path:
    """Train `config` in a subprocess, kill -9 it once a complete checkpoint at or past step `target` exists;
    return the latest complete checkpoint."""
    proc = subprocess.Popen([sys.executable, "-m", "gensynth", "train", str(config)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir(config) / "checkpoints"
    deadline = time.monotonic() + TIMEOUT_S
    while not any(s >= target for s, _ in complete_checkpoints(ckpts)):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return latest_checkpoint(ckpts)


def launch_cmd(config: Path, *overrides: str, machines: int = 1, machine_rank: int = 0, port: int) -> list[str]:
    """`accelerate launch` of two gloo ranks training `config`: one machine, or one rank of two 'machines'."""
    if machines == 1:
        head = [*ACCELERATE, "--config_file", str(REPO / "launch" / "cpu-2proc.yaml"),
                "--main_process_port", str(port)]
    else:
        head = [*ACCELERATE, "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return [*head, "-m", "gensynth", "train", str(config), *overrides]


def run_launches(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run the commands together; kill their process groups and fail if they hang."""
    procs = [subprocess.Popen(c, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in commands]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("a launch hung")
    return [subprocess.CompletedProcess(p.args, p.returncode, out, "") for p, out in zip(procs, outs)]
