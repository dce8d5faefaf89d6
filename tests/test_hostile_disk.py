"""A hostile disk: a full disk during `gensynth shard` and `gensynth generate`, debris of killed runs,
a `kill -9` in the middle of the ingest swap (folder and S3), and a reader that closes the pipe.

Crashes are real SIGKILLs at a chosen instant (GENSYNTH_FAULT, gensynth/faults.py); the full disk is a
2 MB tmpfs mounted for the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from gensynth import storage
from gensynth.data.manifest import read_manifest, verify_shards
from tests.conftest import need, subprocess_env, write_shard_set
from tests.s3server import BUCKET, S3

TIMEOUT_S = 300
CRASH_POINTS = ["ingest.staged", "ingest.swap", "ingest.cleanup"]


def gensynth(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gensynth", "-q", *args], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def npz(path: Path, n: int, size: int = 8, seed: int = 0) -> str:
    """A source of `n` random images (labels 0..4); a different seed gives different shard bytes."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, size=(n, size, size), dtype=np.uint8),
             labels=(np.arange(n) % 5).astype(np.int64))
    return f"npz:{path}"


def temporary_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if storage.TMP_MARK in p.name)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: the disk that fills up."""
    need(os.geteuid() == 0, "mounting a 2 MB tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ----------------------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("command", ["shard", "generate"])
def test_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_files(command, small_disk, tmp_path,
                                                                            request):
    out = small_disk / "out"
    if command == "shard":
        # a small set that fits, then an --overwrite that does not (~3 KB a sample, 2000 samples)
        assert gensynth("shard", npz(tmp_path / "small.npz", 40), str(out), "--shard-size", "16").returncode == 0
        before = digests(out / "train")
        done = gensynth("shard", npz(tmp_path / "big.npz", 2000, seed=1), str(out), "--shard-size", "200",
                        "--overwrite")
    else:
        tiny_gan = request.getfixturevalue("tiny_gan")
        done = gensynth("generate", str(tiny_gan), str(out), "--num", "4000", "--shard-size", "250")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith(f"gensynth {command}: error: cannot write ")
    assert str(out) in lines[0] and "No space left on device" in lines[0], lines[0]
    assert temporary_files(small_disk) == []
    if command == "shard":  # nothing is lost: the existing set is as it was, and still verifies
        assert digests(out / "train") == before
        assert verify_shards(str(out / "train"), read_manifest(str(out / "train"))) == []
    else:  # every shard published before the disk filled up has its receipt: a rerun resumes from there
        shards = sorted(p.stem for p in out.glob("synth-*.tar"))
        assert shards and shards == sorted(p.stem for p in (out / ".receipts").glob("*.json"))
        assert not (out / "manifest.json").exists()


def test_a_failed_publication_aborts_the_shard_written_meanwhile(tiny_gan, tmp_path):
    # shard k is written while shard k-1 is published on a thread; here every receipt fails to be written
    # (its folder is a file), so the wait on shard 0's publication fails after shard 1 was written. In
    # process, so that a draft left open (its temporary file alive until the process exits) would show.
    from gensynth.errors import GensynthError
    from gensynth.generate.job import generate

    out = tmp_path / "out"
    out.mkdir()
    (out / ".receipts").write_bytes(b"not a folder")
    with pytest.raises(GensynthError, match="cannot write receipt ") as failed:
        generate(str(tiny_gan), str(out), num=300, shard_size=100)
    assert "\n" not in str(failed.value)
    assert temporary_files(out) == []  # shard 1's draft was removed at once
    assert sorted(p.name for p in out.glob("synth-*.tar")) == ["synth-000000.tar"]  # no receipt: a rerun redoes it
    assert not (out / "manifest.json").exists()

# ---------------------------------------------------------------------------------- debris of killed runs


def test_rerun_of_a_killed_shard_removes_its_staged_shards_and_nothing_live(tmp_path):
    out = tmp_path / "out"
    folder = out / "train"
    assert gensynth("shard", npz(tmp_path / "a.npz", 60), str(out), "--shard-size", "16").returncode == 0
    source = npz(tmp_path / "b.npz", 90, seed=1)
    killed = gensynth("shard", source, str(out), "--shard-size", "16", "--overwrite", GENSYNTH_FAULT="ingest.staged")
    assert killed.returncode == -9, killed.stderr[-3000:]
    staged = temporary_files(folder)
    assert len(staged) == 6, "the killed run left its six staged shards"
    # a live writer's file (this process) and another host's file: neither can be proven dead
    live = folder / f".train-000009.tar{storage.TMP_MARK}{os.getpid()}-0000beef-{storage.HOST}"
    elsewhere = folder / f".train-000009.tar{storage.TMP_MARK}{dead_pid()}-0000cafe-another-host"
    live.write_bytes(b"being written")
    elsewhere.write_bytes(b"someone else's")

    rerun = gensynth("shard", source, str(out), "--shard-size", "16", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert temporary_files(folder) == sorted([f"{live.name}", f"{elsewhere.name}"])
    manifest = read_manifest(str(folder))
    assert manifest.num_samples == 90 and verify_shards(str(folder), manifest) == []
    assert sorted(digests(folder)) == sorted([s.name for s in manifest.shards] + ["manifest.json", "README.md"]
                                             + [live.name, elsewhere.name])


def test_rerun_of_a_killed_generate_removes_its_temporary_files(tiny_gan, tmp_path):
    out = tmp_path / "synth"
    args = [str(tiny_gan), str(out), "--num", "600", "--shard-size", "200"]
    killed = gensynth("generate", *args, GENSYNTH_FAULT="generate.write")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [Path(p).name.split(storage.TMP_MARK)[0] for p in temporary_files(out)] == [".synth-000000.tar"]

    rerun = gensynth("generate", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert temporary_files(out) == []
    manifest = read_manifest(str(out))
    assert manifest.num_samples == 600 and verify_shards(str(out), manifest) == []


# --------------------------------------------------------------------------- kill -9 in the ingest swap


def check_listed_shards_whole(read: Callable[[str], bytes | None], sets: list[list[str]]) -> None:
    """There is a manifest; every shard it lists is there with its recorded bytes and sha256; and it is
    one of `sets` (the sha256s of the old or the new set), not a mixture or a subset."""
    manifest = read("manifest.json")
    assert manifest is not None, "no manifest at this instant"
    shards = json.loads(manifest)["shards"]
    for shard in shards:
        body = read(shard["name"])
        assert body is not None, f"{shard['name']} is listed but missing"
        assert (len(body), hashlib.sha256(body).hexdigest()) == (shard["bytes"], shard["sha256"]), shard["name"]
    assert [s["sha256"] for s in shards] in sets


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_the_overwrite_swap_leaves_a_whole_listed_set_on_a_folder(point, tmp_path):
    out = tmp_path / "out"
    folder = out / "train"
    assert gensynth("shard", npz(tmp_path / "a.npz", 60), str(out), "--shard-size", "16").returncode == 0
    old = [s.sha256 for s in read_manifest(str(folder)).shards]
    source = npz(tmp_path / "b.npz", 100, seed=1)  # other bytes in shards of the same names, and more shards
    killed = gensynth("shard", source, str(out), "--shard-size", "16", "--overwrite", GENSYNTH_FAULT=point)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert temporary_files(folder), "killed before it finished"

    def read(name: str) -> bytes | None:
        return (folder / name).read_bytes() if (folder / name).exists() else None

    fresh = tmp_path / "fresh"
    assert gensynth("shard", source, str(fresh), "--shard-size", "16").returncode == 0
    new = [s.sha256 for s in read_manifest(str(fresh / "train")).shards]
    check_listed_shards_whole(read, [old, new])

    rerun = gensynth("shard", source, str(out), "--shard-size", "16", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert digests(folder) == digests(fresh / "train"), "the rerun gives the set a clean ingest gives, nothing else"


@pytest.mark.s3
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_during_the_overwrite_swap_leaves_a_whole_listed_set_on_s3(point, s3: S3, tmp_path):
    out = f"s3://{BUCKET}/swap-{point}"
    prefix = f"swap-{point}/train/"
    assert gensynth("shard", npz(tmp_path / "a.npz", 60), out, "--shard-size", "16").returncode == 0
    old = [s.sha256 for s in read_manifest(f"{out}/train").shards]
    source = npz(tmp_path / "b.npz", 100, seed=1)
    killed = gensynth("shard", source, out, "--shard-size", "16", "--overwrite", GENSYNTH_FAULT=point)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert any(storage.TMP_MARK in k for k in s3.keys(prefix)), "killed before it finished"

    def read(name: str) -> bytes | None:
        return s3.get(prefix + name) if prefix + name in s3.keys(prefix) else None

    fresh = tmp_path / "fresh"
    assert gensynth("shard", source, str(fresh), "--shard-size", "16").returncode == 0
    new = [s.sha256 for s in read_manifest(str(fresh / "train")).shards]
    check_listed_shards_whole(read, [old, new])

    rerun = gensynth("shard", source, out, "--shard-size", "16", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {k[len(prefix):]: hashlib.sha256(s3.get(k)).hexdigest() for k in s3.keys(prefix)} \
        == digests(fresh / "train"), "the rerun gives the set a clean ingest gives, nothing else"


# ------------------------------------------------------------------------------------------ closed stdout


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    write_shard_set(tmp_path / "set", [5, 5])
    proc = subprocess.Popen([sys.executable, "-m", "gensynth", "inspect", str(tmp_path / "set")],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written, as `| head` is after its lines
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=TIMEOUT_S) == 141, err
    assert err == "", err
