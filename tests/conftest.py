"""Shared fixtures. Tests that need a real part (Fashion-MNIST, moto server) FAIL when it is missing
under CI (CI=true), and skip with a how-to message only on a developer machine without it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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
