"""Local storage: atomic writes (whole or nothing, no temporary file left), listings that hide temporary
names, moves, brace patterns. The same functions on S3 are tested against a moto server in test_s3.py."""

from __future__ import annotations

import logging
import os

import pytest

from gensynth import storage
from gensynth.errors import UsageError
from gensynth.progress import progress, rate


def test_atomic_write_publishes_whole_on_success(tmp_path):
    target = tmp_path / "sub" / "a.tar"
    with storage.atomic_write(str(target)) as f:
        f.write(b"first half ")
        assert not target.exists(), "nothing is visible under the final name while writing"
        assert [p.name for p in target.parent.iterdir()][0].startswith(".a.tar.tmp-")
        f.write(b"second half")
    assert target.read_bytes() == b"first half second half"
    assert os.listdir(target.parent) == ["a.tar"]


def test_atomic_write_failure_leaves_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "a.tar"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with storage.atomic_write(str(target)) as f:
            f.write(b"new, but never finished")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.tar"]


def test_listdir_hides_temporary_names_and_move_replaces(tmp_path):
    (tmp_path / "b.tar").write_bytes(b"b")
    (tmp_path / ".b.tar.tmp-123-abcd").write_bytes(b"partial")
    (tmp_path / ".train.tmp-staging-1-ff").mkdir()
    assert storage.listdir(str(tmp_path)) == ["b.tar"]
    assert storage.listdir(str(tmp_path / "missing")) == []
    (tmp_path / "c.tar").write_bytes(b"c")
    storage.move(str(tmp_path / "c.tar"), str(tmp_path / "b.tar"))
    assert (tmp_path / "b.tar").read_bytes() == b"c" and not (tmp_path / "c.tar").exists()
    storage.remove_folder(str(tmp_path / ".train.tmp-staging-1-ff"))
    assert not (tmp_path / ".train.tmp-staging-1-ff").exists()


@pytest.mark.parametrize("pattern, expected", [
    ("x-{000..002}.tar", ["x-000.tar", "x-001.tar", "x-002.tar"]),
    ("x-{8..11}.tar", ["x-8.tar", "x-9.tar", "x-10.tar", "x-11.tar"]),
    ("{a,b}/s-{0..1}.tar", ["a/s-0.tar", "a/s-1.tar", "b/s-0.tar", "b/s-1.tar"]),
    ("s3://bucket/p/train-{000000..000001}.tar", ["s3://bucket/p/train-000000.tar", "s3://bucket/p/train-000001.tar"]),
    ("plain.tar", ["plain.tar"]),
    ("{x,{1..2}}", ["x", "1", "2"]),  # nested
    ("s-{1..003}", ["s-001", "s-002", "s-003"]),  # the padding of the wider end
    ("{0..6..3}", ["0", "3", "6"]),  # a step
    ("{a..c}", ["a", "b", "c"]),  # letters
    ("x-{2..0}", ["x-2", "x-1", "x-0"]),  # counting down, as the shell does
])
def test_brace_patterns(pattern, expected):
    assert storage.expand_braces(pattern) == expected


@pytest.mark.parametrize("pattern, needle", [("x-{abc}.tar", "cannot expand"), ("x-{0..1.tar", "unbalanced"),
                                             ("x-{0..99999999999}.tar", "names more than")])
def test_bad_brace_patterns_are_usage_errors(pattern, needle):
    with pytest.raises(UsageError, match=needle):
        storage.expand_braces(pattern)


def test_join_parent_basename_for_paths_and_urls():
    assert storage.join("s3://b/p/", "train", "x.tar") == "s3://b/p/train/x.tar"
    assert storage.parent("s3://b/p/train/x.tar") == "s3://b/p/train"
    assert storage.basename("s3://b/p/train/") == "train"
    assert storage.join("data", "train") == os.path.join("data", "train")


def test_progress_logs_plain_lines_when_not_on_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="gensynth"):
        assert list(progress(range(5), total=5, desc="shard train", unit="samples", every_s=0.0)) == list(range(5))
    lines = [r.getMessage() for r in caplog.records]
    assert "shard train: 3/5 samples" in " ".join(lines)
    assert lines[-1].startswith("shard train: 5 samples in ")


def test_progress_rates_below_one_keep_their_digits():
    assert [rate(r) for r in (0.0909, 2.345, 33.7, 1250.2)] == ["0.091", "2.3", "34", "1250"]


def test_progress_draws_a_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("gensynth.progress.interactive", lambda: True)
    assert sum(progress(range(7), total=7, desc="shard train", unit="samples")) == 21
    assert "shard train: 100%" in capsys.readouterr().err
