"""The README's Python examples run as written (on a small shard set at the paths they name)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gensynth.cli import main
from tests.conftest import write_shard_set

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch, tiny_gan):
    monkeypatch.chdir(tmp_path)
    write_shard_set(tmp_path / "data" / "fashion" / "train", [300, 211, 250])
    write_shard_set(tmp_path / "data" / "fashion" / "test", [100], split="test")
    monkeypatch.setenv("GENSYNTH_CACHE", str(tmp_path / "cache"))  # the evaluation's extractor, not in ~/.cache
    assert main(["-q", "generate", str(tiny_gan), "data/synth/v1", "--num", "120", "--shard-size", "50"]) == 0
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})
