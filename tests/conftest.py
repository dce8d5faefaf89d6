"""Shared fixtures. Tests that need a real part (Fashion-MNIST, moto server) FAIL when it is missing
under CI (CI=true), and skip with a how-to message only on a developer machine without it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gensynth.data.manifest import Manifest
from gensynth.data.writer import ShardSetWriter

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, how: str) -> None:
    """Fail in CI, skip elsewhere, when a real part is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing in CI: {how}")
    pytest.skip(how)


@pytest.fixture
def fashion_dir() -> Path:
    need(FASHION_DIR.is_dir(), "needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    return FASHION_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_image(i: int, size: int = 8) -> np.ndarray:
    """A small grey image whose pixels encode its index (so decoded pixels can be checked)."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, size=(size, size, 1), dtype=np.uint8)
    image[0, 0, 0] = i % 256
    image[0, 1, 0] = (i // 256) % 256
    return image


def write_shard_set(folder: Path | str, counts: list[int], split: str = "train", classes: int = 10,
                    encoding: str = "png", size: int = 8) -> Manifest:
    """A labelled shard set with exactly `counts[k]` samples in shard k (uneven on purpose)."""
    index = 0
    with ShardSetWriter(str(folder), split, shard_size=max(counts) + 1, encoding=encoding) as w:
        for count in counts:
            for _ in range(count):
                w.add(f"{split}-{index:08d}", toy_image(index, size), label=index % classes,
                      meta={"source_index": index})
                index += 1
            w.end_shard()
        return w.finish(classes=[f"c{i}" for i in range(classes)], provenance={"kind": "test"})


@pytest.fixture
def uneven_shards(tmp_path: Path) -> tuple[str, Manifest]:
    """7 shards (an odd number) of uneven sizes, 103 samples: exercises every edge of the epoch plan."""
    folder = tmp_path / "uneven"
    manifest = write_shard_set(folder, [17, 5, 23, 1, 30, 11, 16])
    return str(folder), manifest


REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m gensynth ...` subprocesses: this checkout first, one thread, CPU."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", **extra)


def train_tiny_gan(root: Path, data: str, name: str = "tiny", resolution: int = 8, channels: int = 8,
                   steps: int = 4) -> Path:
    """A real (if barely trained) GAN run with its export, trained in a subprocess; returns the run dir."""
    import subprocess
    import sys

    import yaml

    cfg = {"run": {"name": name, "root": str(root), "seed": 0},
           "data": {"train": data, "mode": "resampled", "num_workers": 0, "shuffle_buffer": 16},
           "model": {"family": "gan", "resolution": resolution},
           "gan": {"z_dim": 16, "g_channels": channels, "d_channels": 8, "max_channels": max(16, channels)},
           "train": {"steps": steps, "batch_size": 8, "log_every": steps, "sample_every": steps,
                     "checkpoint_every": steps, "eval_every": 0, "threads": 1}}
    path = root / f"{name}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "gensynth", "-q", "train", str(path)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / name


@pytest.fixture(scope="session")
def tiny_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GAN run directory (8x8 toy images, 10 classes c0..c9) with its export."""
    root = tmp_path_factory.mktemp("tiny_gan")
    write_shard_set(root / "toy", [40, 33, 30])
    return train_tiny_gan(root, str(root / "toy"))


@pytest.fixture(scope="session")
def medium_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 28x28 -> 32x32 generator of real width (barely trained): slow enough per shard to stop a
    generation run in the middle."""
    root = tmp_path_factory.mktemp("medium_gan")
    write_shard_set(root / "toy", [40, 33, 30], size=28)
    return train_tiny_gan(root, str(root / "toy"), name="medium", resolution=32, channels=32, steps=2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A moto S3 server on 127.0.0.1 for the module, the AWS variables pointing at it, and bucket BUCKET."""
    from tests.s3server import (
        AWS_VARS_TO_CLEAR,
        BUCKET,
        S3,
        MotoServer,
        MotoUnavailable,
        aws_env,
        clear_fsspec_cache,
        moto_command,
    )

    try:
        import boto3
        import s3fs  # noqa: F401
    except ImportError:
        need(False, "needs S3 support: pip install -e '.[s3,test]' (s3fs, boto3, moto[server])")
    try:
        moto_command()
    except MotoUnavailable as e:
        need(False, f"{e}; pip install 'moto[server]'")
    server = MotoServer.start(tmp_path_factory.mktemp("moto"))
    env = pytest.MonkeyPatch()
    try:
        for var in AWS_VARS_TO_CLEAR:
            env.delenv(var, raising=False)
        for key, value in aws_env(server.endpoint).items():
            env.setenv(key, value)
        clear_fsspec_cache()
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        yield S3(server, client)
    finally:
        env.undo()
        clear_fsspec_cache()
        server.stop()
    assert server.proc.returncode is not None, "moto_server still running"
