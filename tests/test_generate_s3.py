"""The generation job against a real S3-protocol server (moto on 127.0.0.1): output read back by plain
webdataset and HF datasets, an endpoint dead at the start, and one that goes away mid-run and comes back."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from gensynth import storage
from gensynth.cli import main
from gensynth.data.manifest import read_manifest
from tests.conftest import free_port, subprocess_env
from tests.s3server import BUCKET, S3, aws_env
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.s3
SECRET = "Sup3rS3cretValue-must-never-be-printed"


def run_generate(endpoint: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(aws_env(endpoint, secret=SECRET))
    return subprocess.run([sys.executable, "-m", "gensynth", "generate", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def objects(s3: S3, prefix: str) -> dict[str, str]:
    return {key[len(prefix):]: hashlib.sha256(s3.get(key)).hexdigest() for key in s3.keys(prefix)}


def local_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generate_to_s3_reads_back_through_webdataset_and_hf(s3: S3, tiny_gan, tmp_path, capsys):
    out = f"s3://{BUCKET}/synth/v1"
    per_class = [4, 4, 4, 4, 4, 4, 4, 4, 4, 7]
    assert main(["-q", "generate", str(tiny_gan), out, "--per-class", ",".join(map(str, per_class)),
                 "--shard-size", "16"]) == 0
    assert main(["inspect", out, "--verify"]) == 0
    assert "verify     ok: 3 shards" in capsys.readouterr().out
    manifest = read_manifest(out)
    urls = [storage.join(out, s.name) for s in manifest.shards]

    import webdataset as wds

    storage.register_webdataset_s3()
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 43 and Counter(int(s["cls"]) for s in samples) == dict(enumerate(per_class))

    datasets = pytest.importorskip("datasets")
    # streaming=False: datasets 5.2.0 streams s3:// by handing block_size=0 to s3fs, which rejects it
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               storage_options={"endpoint_url": s3.endpoint}, cache_dir=str(tmp_path / "hf"))
    labels = [ex["cls"] for ex in ds.select_columns(["cls"])]
    assert Counter(labels) == dict(enumerate(per_class))


def test_dead_endpoint_at_the_start_fails_fast_and_clearly(tiny_gan, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = f"s3://{BUCKET}/synth/dead"
    start = time.monotonic()
    proc = run_generate(dead, str(tiny_gan), out, "--num", "20")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    error = [line for line in proc.stderr.splitlines() if line.startswith("gensynth generate: error:")]
    assert len(error) == 1 and out in error[0] and dead in error[0], proc.stderr
    assert "Traceback" not in text and SECRET not in text
    assert time.monotonic() - start < 120  # bounded retries, not a hang (a generous bound, not a benchmark)


def test_endpoint_gone_mid_run_then_back_completes_the_same_set(s3: S3, medium_gan, tmp_path):
    args = ["--num", "4000", "--shard-size", "200", "--seed", "8"]
    assert main(["-q", "generate", str(medium_gan), str(tmp_path / "local"), *args]) == 0

    proxy = TcpProxy(target_port=s3.server.port).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    prefix = "synth/flaky/"
    out = f"s3://{BUCKET}/{prefix}".rstrip("/")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_")}
    env.update(aws_env(endpoint, secret=SECRET))
    proc = subprocess.Popen([sys.executable, "-m", "gensynth", "generate", str(medium_gan), out, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len([k for k in s3.keys(prefix + ".receipts/")]) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proxy.stop()  # the endpoint goes away mid-run
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("gensynth generate: error:")]
    assert len(error) == 1 and endpoint in error[0] and "Traceback" not in err and SECRET not in err, err[-3000:]
    stored = s3.keys(prefix)
    assert f"{prefix}manifest.json" not in stored
    assert not [k for k in stored if ".tmp-" in k]

    proxy.start()  # back, on the same port, with the objects written so far
    try:
        rerun = run_generate(endpoint, str(medium_gan), out, *args)
    finally:
        proxy.stop()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "shards were already complete" in rerun.stdout
    assert objects(s3, prefix) == local_tree(tmp_path / "local")


def test_no_credentials_in_the_manifest_or_receipts(s3: S3, tiny_gan):
    out = f"s3://{BUCKET}/synth/secret"
    proc = run_generate(s3.endpoint, str(tiny_gan), out, "--num", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key in s3.keys("synth/secret/"):
        assert SECRET.encode() not in s3.get(key)
        assert b"AWS_" not in s3.get(key) and s3.endpoint.encode() not in s3.get(key)
    assert SECRET not in proc.stdout + proc.stderr
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != SECRET
