"""Real S3 protocol: a moto server on 127.0.0.1 that this module starts (and stops by its PID).

Covers `gensynth shard` / `inspect` to and from s3://, the loader and plain webdataset reading S3 shards,
atomic publishing, listings and brace patterns on S3, and a dead endpoint failing fast and clearly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gensynth import storage
from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from gensynth.errors import InputDataError, StorageError, UsageError
from tests.conftest import free_port
from tests.s3server import AWS_VARS_TO_CLEAR, BUCKET, S3, aws_env, clear_fsspec_cache
from tests.tcpproxy import SilentEndpoint

pytestmark = pytest.mark.s3

N, SHARD_SIZE, CLASSES = 60, 16, 5
SHARD_COUNTS = [16, 16, 16, 12]
SHARD_NAMES = [f"train-{i:06d}.tar" for i in range(len(SHARD_COUNTS))]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(N, 8, 8), dtype=np.uint8)
    labels = (np.arange(N) % CLASSES).astype(np.int64)
    path = tmp_path_factory.mktemp("src") / "toy.npz"
    np.savez(path, images=images, labels=labels)
    return path, images, labels


@pytest.fixture(scope="module")
def s3_set(s3: S3, npz) -> str:
    """The npz ingested with the CLI to s3://BUCKET/prefix; returns the split's URL."""
    rc = main(["-q", "shard", f"npz:{npz[0]}", f"s3://{BUCKET}/prefix", "--shard-size", str(SHARD_SIZE)])
    assert rc == 0
    return f"s3://{BUCKET}/prefix/train"


def index_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


# ------------------------------------------------------------------------------------ shard + inspect


def test_cli_shard_to_s3_writes_shards_and_manifest_that_verify(s3: S3, s3_set: str, npz, capsys):
    assert s3.keys("prefix/") == sorted([f"prefix/train/{n}" for n in SHARD_NAMES]
                                       + ["prefix/train/README.md", "prefix/train/manifest.json"])
    manifest = json.loads(s3.get("prefix/train/manifest.json"))
    assert [s["name"] for s in manifest["shards"]] == SHARD_NAMES
    assert [s["samples"] for s in manifest["shards"]] == SHARD_COUNTS
    assert manifest["num_samples"] == N
    assert manifest["class_histogram"] == {str(c): N // CLASSES for c in range(CLASSES)}
    for shard in manifest["shards"]:  # the manifest describes the objects really stored
        body = s3.get(f"prefix/train/{shard['name']}")
        assert len(body) == shard["bytes"]
        assert hashlib.sha256(body).hexdigest() == shard["sha256"]

    capsys.readouterr()
    assert main(["inspect", s3_set, "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"shard set  {s3_set}" in out
    assert f"{N} samples in {len(SHARD_COUNTS)} shards" in out
    assert f"verify     ok: {len(SHARD_COUNTS)} shards match" in out


def test_s3_and_local_ingest_give_the_same_bytes(s3: S3, s3_set: str, npz, tmp_path: Path):
    local = tmp_path / "local"
    assert main(["-q", "shard", f"npz:{npz[0]}", str(local), "--shard-size", str(SHARD_SIZE)]) == 0
    assert (local / "train" / "manifest.json").read_bytes() == s3.get("prefix/train/manifest.json")
    for name in SHARD_NAMES:
        assert (local / "train" / name).read_bytes() == s3.get(f"prefix/train/{name}"), name
    assert [s.sha256 for s in read_manifest(str(local / "train")).shards] == \
        [s.sha256 for s in read_manifest(s3_set).shards]


def test_inspect_verify_on_s3_detects_a_replaced_shard(s3: S3, npz, capsys):
    assert main(["-q", "shard", f"npz:{npz[0]}", f"s3://{BUCKET}/damaged", "--shard-size", str(SHARD_SIZE)]) == 0
    body = bytearray(s3.get("damaged/train/train-000001.tar"))
    body[600] ^= 0xFF  # same size, different bytes
    s3.client.put_object(Bucket=BUCKET, Key="damaged/train/train-000001.tar", Body=bytes(body))
    s3.client.delete_object(Bucket=BUCKET, Key="damaged/train/train-000003.tar")
    capsys.readouterr()
    assert main(["inspect", f"s3://{BUCKET}/damaged/train", "--verify"]) == 1
    out = capsys.readouterr().out
    assert "verify     FAILED: 2 of 4 shards" in out
    assert "train-000001.tar: sha256" in out and "train-000003.tar: missing" in out
    assert "train-000000.tar" not in out.split("FAILED")[1]


def test_inspect_one_s3_shard(s3_set: str, capsys):
    capsys.readouterr()
    assert main(["inspect", f"{s3_set}/train-000003.tar"]) == 0
    out = capsys.readouterr().out
    assert f"samples    {SHARD_COUNTS[3]}, fields cls, json, png" in out


def test_reingest_on_s3_needs_overwrite_and_removes_stale_shards(s3: S3, npz, capsys):
    out = f"s3://{BUCKET}/again"
    assert main(["-q", "shard", f"npz:{npz[0]}", out, "--shard-size", str(SHARD_SIZE)]) == 0
    assert len(s3.keys("again/train/")) == len(SHARD_NAMES) + 2
    capsys.readouterr()
    assert main(["-q", "shard", f"npz:{npz[0]}", out, "--shard-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"{out}/train already holds a complete shard set" in err and "--overwrite" in err
    assert len(s3.keys("again/train/")) == len(SHARD_NAMES) + 2  # untouched

    assert main(["-q", "shard", f"npz:{npz[0]}", out, "--shard-size", "32", "--overwrite"]) == 0
    assert s3.keys("again/train/") == ["again/train/README.md", "again/train/manifest.json",
                                       "again/train/train-000000.tar", "again/train/train-000001.tar"]
    assert [s.samples for s in read_manifest(f"{out}/train").shards] == [32, 28]


def test_failed_ingest_to_s3_leaves_no_shards_and_no_manifest(s3: S3, npz):
    from gensynth.data.ingest import ingest
    from gensynth.data.sources import open_source

    class Failing:
        """The npz source, but record number 40 (after two shards are published) cannot be read."""

        def __init__(self) -> None:
            self.inner = open_source(f"npz:{npz[0]}")
            self.spec, self.classes, self.calls = self.inner.spec, self.inner.classes, 0

        def __len__(self) -> int:
            return len(self.inner)

        def record(self, i: int):
            self.calls += 1
            if self.calls == 40:
                raise InputDataError(f"{self.spec}: record {i} is unreadable")
            return self.inner.record(i)

        def provenance(self) -> dict:
            return self.inner.provenance()

    source = Failing()
    with pytest.raises(InputDataError, match="unreadable"):
        ingest(source, f"s3://{BUCKET}/failing", shard_size=SHARD_SIZE)
    assert source.calls == 40
    assert s3.keys("failing/") == []
    assert storage.listdir(f"s3://{BUCKET}/failing/train") == []


def test_shard_to_a_missing_bucket_exits_1_naming_the_url(s3: S3, npz, capsys):
    capsys.readouterr()
    rc = main(["-q", "shard", f"npz:{npz[0]}", "s3://no-such-bucket-gensynth/p", "--shard-size", str(SHARD_SIZE)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "s3://no-such-bucket-gensynth/p/train" in err and "cannot" in err
    assert "Traceback" not in err and "testing" not in err  # the key id and secret are both "testing"


# ------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_loader_reads_the_s3_set_exactly_once(s3_set: str, npz, workers):
    from gensynth.data import ShardLoader

    _, images, labels = npz
    loader = ShardLoader(s3_set, batch_size=7, mode="exact", num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-N // 7)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == N
    assert {index_of(k) for k in keys} == set(range(N))
    for batch in batches:
        for image, label, key in zip(batch["image"], batch["label"], batch["key"]):
            i = index_of(key)
            assert int(label) == labels[i]
            assert np.array_equal(image[0].numpy(), images[i])
    assert loader.corrupt == 0


def test_brace_pattern_over_s3_urls(s3_set: str, npz):
    from gensynth.data import ShardLoader
    from gensynth.data.shards import resolve_shards

    pattern = f"{s3_set}/train-{{000000..000003}}.tar"
    shards, manifest = resolve_shards(pattern)
    assert manifest is None  # counted from the tar headers, over S3
    assert [s.url for s in shards] == [f"{s3_set}/{n}" for n in SHARD_NAMES]
    assert [s.samples for s in shards] == SHARD_COUNTS
    shards, _ = resolve_shards([f"{s3_set}/train-{{000000,000002}}.tar"])
    assert [s.samples for s in shards] == [SHARD_COUNTS[0], SHARD_COUNTS[2]]

    keys = [k for b in ShardLoader(pattern, batch_size=16, mode="exact") for k in b["key"]]
    assert sorted(index_of(k) for k in keys) == list(range(N))


def test_resolve_shards_names_a_missing_s3_shard(s3_set: str):
    from gensynth.data.shards import resolve_shards
    from gensynth.errors import UsageError

    with pytest.raises(UsageError, match=f"shard not found: {s3_set}/train-000004.tar"):
        resolve_shards(f"{s3_set}/train-{{000003..000004}}.tar")


def test_plain_webdataset_reads_s3_shards(s3_set: str, npz):
    import webdataset

    storage.register_webdataset_s3()
    _, _, labels = npz
    urls = [f"{s3_set}/{n}" for n in SHARD_NAMES]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == N
    assert sorted(index_of(s["__key__"]) for s in samples) == list(range(N))
    for s in samples:
        assert int(s["cls"]) == labels[index_of(s["__key__"])]
        assert s["png"][:8] == b"\x89PNG\r\n\x1a\n"
    # webdataset's own brace expansion over an s3:// URL
    braced = webdataset.WebDataset(f"{s3_set}/train-{{000000..000003}}.tar", shardshuffle=False, empty_check=False)
    assert sum(1 for _ in braced) == N


def test_plain_webdataset_writes_s3_shards_that_gensynth_reads(s3: S3):
    import webdataset

    from gensynth.data.shards import resolve_shards

    storage.register_webdataset_s3()
    url = f"s3://{BUCKET}/wds/x-000000.tar"
    with webdataset.TarWriter(url) as sink:
        for i in range(5):
            sink.write({"__key__": f"x-{i:08d}", "cls": str(i).encode(), "txt": b"hello"})
    assert s3.keys("wds/") == ["wds/x-000000.tar"]
    shards, _ = resolve_shards([url])
    assert shards[0].samples == 5


# ------------------------------------------------------------------------------------ storage primitives


def test_atomic_write_to_s3_publishes_whole_or_nothing(s3: S3):
    url = f"s3://{BUCKET}/atomic/blob.bin"
    payload = os.urandom(3 << 20) + b"end"  # a few MB: more than one write, more than one S3 block

    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(url) as f:
        f.write(payload[: 1 << 20])
        raise RuntimeError("boom")
    assert s3.keys("atomic/") == []
    assert not storage.exists(url)

    with storage.atomic_write(url) as f:
        f.write(payload[: 1 << 20])
        assert s3.keys("atomic/") == [], "a reader must not see the object before the write completes"
        f.write(payload[1 << 20:])
    assert s3.get("atomic/blob.bin") == payload
    assert storage.exists(url) and storage.read_bytes(url) == payload
    assert storage.sha256_of(url)[1] == len(payload)

    # a failed rewrite leaves the old object as it was
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(url) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert s3.get("atomic/blob.bin") == payload


def test_listdir_exists_remove_on_s3(s3: S3, s3_set: str):
    expected = ["README.md", "manifest.json", *SHARD_NAMES]
    assert storage.listdir(s3_set) == expected
    assert storage.listdir(s3_set + "/") == expected
    assert storage.listdir(f"s3://{BUCKET}/prefix") == ["train"]
    assert storage.listdir(f"s3://{BUCKET}/nothing-here") == []

    url = f"s3://{BUCKET}/scratch/a.txt"
    storage.write_bytes(url, b"a")
    storage.write_bytes(f"s3://{BUCKET}/scratch/b{storage.TMP_MARK}x", b"tmp")  # temporary names are not listed
    assert storage.listdir(f"s3://{BUCKET}/scratch") == ["a.txt"]
    storage.remove(url)
    assert not storage.exists(url) and "scratch/a.txt" not in s3.keys("scratch/")
    storage.remove(url)  # removing what is gone is fine


# ------------------------------------------------------------------------------------ dead endpoint

SECRET = "Sup3rS3cretValue-must-never-be-printed"


def test_shard_to_a_dead_endpoint_exits_1_fast_naming_the_url(npz, tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    work, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(aws_env(dead, secret=SECRET), TMPDIR=str(tmpdir), PYTHONPATH=str(ROOT))
    out = f"s3://{BUCKET}/prefix"
    try:
        proc = subprocess.run([sys.executable, "-m", "gensynth", "shard", f"npz:{npz[0]}", out,
                               "--shard-size", str(SHARD_SIZE)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:  # subprocess.run killed it
        pytest.fail(f"gensynth shard hung on a dead endpoint: {e}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    error = [line for line in proc.stderr.splitlines() if line.startswith("gensynth shard: error:")]
    assert len(error) == 1, proc.stderr
    assert out in error[0] and dead in error[0], error[0]
    assert "cannot" in error[0] and "connect" in error[0].lower(), error[0]
    assert "Traceback" not in text
    assert SECRET not in text
    assert list(work.iterdir()) == [], "nothing may be written locally (an s3:// URL is not a folder)"
    assert list(tmpdir.iterdir()) == [], "no temporary upload file may be left behind"


@pytest.mark.parametrize("action", ["write", "read", "list", "exists"])
def test_storage_on_a_dead_endpoint_raises_storage_error_naming_url(action, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    for var in AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(var, raising=False)
    for key, value in aws_env(dead, secret=SECRET).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    clear_fsspec_cache()
    url = f"s3://{BUCKET}/dead/{action}.bin"
    try:
        with pytest.raises(StorageError) as info:
            if action == "write":
                storage.write_bytes(url, b"x" * 1000)
            elif action == "read":
                storage.read_bytes(url)
            elif action == "list":
                storage.listdir(url)
            else:
                storage.exists(url)
    finally:
        clear_fsspec_cache()
    message = str(info.value)
    assert url in message and dead in message, message
    assert message.startswith("cannot "), message
    assert SECRET not in message
    assert list(tmp_path.iterdir()) == [], "temporary upload file left behind"


def _point_at(monkeypatch, endpoint: str) -> None:
    for var in AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(var, raising=False)
    for key, value in aws_env(endpoint, secret=SECRET).items():
        monkeypatch.setenv(key, value)
    clear_fsspec_cache()


@pytest.mark.parametrize("action", ["write", "read"])
def test_a_silent_endpoint_fails_after_bounded_retries_saying_it_did_not_answer(action, monkeypatch, tmp_path):
    """Connections succeed and nothing answers (a half-open endpoint): the error comes after the read time-out
    times a bounded number of tries, not after s3fs's 5 x botocore's 3 x 60 s."""
    silent = SilentEndpoint()
    _point_at(monkeypatch, f"http://127.0.0.1:{silent.port}")
    monkeypatch.setenv(storage.READ_TIMEOUT_ENV, "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    url = f"s3://{BUCKET}/silent/{action}.bin"
    try:
        with pytest.raises(StorageError) as info:
            if action == "write":
                storage.write_bytes(url, b"x" * 1000)
            else:
                storage.read_bytes(url)
    finally:
        silent.stop()
        clear_fsspec_cache()
    message = str(info.value)
    assert message.startswith("cannot ") and url in message, message
    assert "no answer within 1 s" in message and storage.READ_TIMEOUT_ENV in message, message
    # each call is tried S3FS_RETRIES x S3_ATTEMPTS times (a read makes two calls): fewer than s3fs's old 5 x 3 for one
    assert 1 <= silent.connections <= 2 * storage.S3FS_RETRIES * storage.S3_ATTEMPTS < 5 * 3, silent.connections
    assert list(tmp_path.iterdir()) == [], "temporary upload file left behind"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "1e9"])
def test_a_bad_read_timeout_is_one_line_naming_the_variable(value, monkeypatch):
    _point_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(storage.READ_TIMEOUT_ENV, value)
    try:
        with pytest.raises(UsageError, match=f"{storage.READ_TIMEOUT_ENV}=.*must be a number of seconds"):
            storage.read_bytes(f"s3://{BUCKET}/x.bin")
    finally:
        clear_fsspec_cache()
