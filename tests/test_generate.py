"""The generation job, for real: shards read back by plain webdataset and HF datasets, determinism across
runs, processes and array tasks, kill -9 and rerun, idempotence, and refusals (tampered export, other job)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gensynth.cli import main
from gensynth.data.manifest import read_manifest, verify_shards
from gensynth.data.stream import ShardLoader
from gensynth.data.tario import iter_samples
from gensynth.errors import UsageError
from gensynth.generate.job import generate
from gensynth.generate.plan import class_counts, interleaved_labels
from tests.conftest import REPO, free_port, subprocess_env
from tests.helpers import TIMEOUT_S, gensynth

PER_CLASS = [30, 0, 25, 5, 10, 10, 10, 5, 5, 3]  # 103 samples, class 1 left out on purpose


def tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -------------------------------------------------------------------------------------------- the plan


def test_class_counts_balanced_counts_and_proportions():
    assert class_counts(103, 10) == [11, 11, 11] + [10] * 7
    assert class_counts(None, 10, ",".join(map(str, PER_CLASS))) == PER_CLASS
    assert class_counts(10, 3, "0.5,0.25,0.25") == [5, 3, 2]
    assert sum(class_counts(1001, 3, "0.3,0.3,0.4")) == 1001


@pytest.mark.parametrize("args, needle", [
    ((103, 10, "1,2,3"), "has 3 values, the model has 10 classes"),
    ((50, 3, "10,10,10"), "add up to 30, --num is 50"),
    ((10, 3, "0.5,0.5,0.5"), "sum to 1"),
    ((10, 3, "a,b,c"), "give counts"),
    ((0, 3, None), "--num must be >= 1"),
])
def test_class_counts_errors_say_what_is_allowed(args, needle):
    from gensynth.errors import UsageError

    with pytest.raises(UsageError, match=needle):
        class_counts(*args)


def test_interleaved_labels_keep_every_shard_near_the_overall_proportions():
    counts = [500, 250, 125, 125]
    labels = interleaved_labels(counts)
    assert np.bincount(labels).tolist() == counts
    for start in range(0, 1000, 100):  # any 100 consecutive samples: within one of the exact share
        shard = np.bincount(labels[start:start + 100], minlength=4)
        assert np.all(np.abs(shard - np.array(counts) / 10) <= 1), shard


# -------------------------------------------------------------------------------------------- local


def test_local_set_reads_back_through_webdataset_hf_and_our_loader(tiny_gan, tmp_path, capsys, monkeypatch):
    out = tmp_path / "synth"
    assert main(["-q", "generate", str(tiny_gan), str(out), "--per-class", ",".join(map(str, PER_CLASS)),
                 "--shard-size", "20", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic set: 103 samples in 6 shards" in printed and "webdataset.WebDataset(" in printed
    manifest = read_manifest(str(out))
    assert [s.samples for s in manifest.shards] == [20, 20, 20, 20, 20, 3]
    assert manifest.class_histogram == {str(c): n for c, n in enumerate(PER_CLASS) if n}
    assert verify_shards(str(out), manifest) == []
    prov = manifest.provenance
    export_cfg = json.loads((tiny_gan / "export" / "config.json").read_text())
    assert prov["kind"] == "generate" and prov["family"] == "gan" and prov["seed"] == 3
    assert prov["export"]["weights_sha256"] == export_cfg["weights_sha256"]
    assert prov["training_data"] == [{"train": export_cfg["data"]["train"], "kind": "images", "model": "gan",
                                      "manifest_sha256": export_cfg["data"]["manifest_sha256"]}]
    assert prov["per_class"] == {str(c): n for c, n in enumerate(PER_CLASS)} and prov["gensynth_version"]

    import webdataset as wds

    urls = [str(out / s.name) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert len(samples) == 103 and len({s["__key__"] for s in samples}) == 103
    assert Counter(int(s["cls"]) for s in samples) == Counter({c: n for c, n in enumerate(PER_CLASS) if n})
    first = samples[0]
    assert first["png"].size == (8, 8)
    meta = first["json"]
    assert meta["family"] == "gan" and meta["seed"] == 3 and meta["shard"] == 0 and meta["index"] == 0
    assert meta["class"] == f"c{int(first['cls'])}" and meta["export_sha256"] == export_cfg["weights_sha256"]

    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
    hf = {ex["__key__"]: ex["cls"] for ex in ds.select_columns(["__key__", "cls"])}
    assert hf == {s["__key__"]: int(s["cls"]) for s in samples}

    ours = {}
    for batch in ShardLoader(str(out), batch_size=16, mode="exact"):
        ours.update(zip(batch["key"], batch["label"].tolist()))
    assert ours == hf
    assert main(["inspect", str(out), "--verify"]) == 0


def test_same_seed_same_bytes_other_seed_other_images(tiny_gan, tmp_path):
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main(["-q", "generate", str(tiny_gan), str(tmp_path / name), "--num", "60", "--shard-size", "25",
                     "--seed", seed]) == 0
        runs[name] = tree(tmp_path / name)
    assert runs["a"] == runs["b"]
    shards = [k for k in runs["a"] if k.endswith(".tar")]
    assert len(shards) == 3 and all(runs["a"][k] != runs["c"][k] for k in shards)


def test_a_shard_written_from_bytes_encoded_beforehand_is_the_shard_the_job_writes(tiny_gan, tmp_path):
    # bench/generate.py times writing alone this way: it must be the job's own writing
    from gensynth.data.codec import encode_images
    from gensynth.families import load_sampler
    from gensynth.generate.options import GenerateOptions
    from gensynth.generate.plan import build_job
    from gensynth.generate.shards import SetInfo, ShardDraft, draw_shard

    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "job"), "--num", "1100", "--shard-size", "600"]) == 0
    sampler = load_sampler(str(tiny_gan))
    job = build_job(sampler, str(tiny_gan), GenerateOptions(num=1100, shard_size=600))
    labels = interleaved_labels(list(job.counts))
    for k in range(job.num_shards):  # 600 samples (more than one write batch), then 500
        images, shard_labels, scores, dropped, _ = draw_shard(sampler, job, labels, k)
        ShardDraft(SetInfo.of(sampler), job, k, images, shard_labels, scores, dropped,
                   str(tmp_path / "encoded")).write(encode_images(images, job.encoding)).publish()
    job_files = tree(tmp_path / "job")
    assert {k: job_files[k] for k in tree(tmp_path / "encoded")} == tree(tmp_path / "encoded")
    assert len(tree(tmp_path / "encoded")) == 4  # two shards, two receipts

def test_a_run_writes_its_manifest_from_its_own_receipts_and_finalize_reads_every_shard(tiny_gan, tmp_path,
                                                                                       monkeypatch):
    # reading a set back to hash it is a second pass over all of it (on S3, a download): a run knows what
    # it wrote; --finalize (array tasks) does not, and checks every shard
    from gensynth import storage

    hashed = []
    sha256_of = storage.sha256_of
    monkeypatch.setattr(storage, "sha256_of", lambda url: hashed.append(Path(url).name) or sha256_of(url))
    out = tmp_path / "out"
    first = generate(str(tiny_gan), str(out), num=60, shard_size=25)
    assert hashed == [] and first.manifest is not None
    (out / "manifest.json").unlink()
    (out / "synth-000001.tar").unlink()
    again = generate(str(tiny_gan), str(out), num=60, shard_size=25)  # the two left are checked, one redrawn
    assert sorted(hashed) == ["synth-000000.tar", "synth-000002.tar"] and again.generated == 1
    assert again.manifest.to_json() == first.manifest.to_json()
    # the receipts it keeps for that (found or written) hold their shared parts once: ~1 KB each, not 3
    kept = list(again.receipts.values())
    assert len(kept) == 3 and all(r["schema"] is kept[0]["schema"] and r["job"] is kept[0]["job"] for r in kept)
    hashed.clear()
    generate(str(tiny_gan), str(out), num=60, shard_size=25, finalize=True)
    assert sorted(hashed) == ["synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    assert verify_shards(str(out), read_manifest(str(out))) == []

def test_two_processes_write_the_same_shards_as_one(tiny_gan, tmp_path):
    one = gensynth("-q", "generate", str(tiny_gan), str(tmp_path / "one"), "--num", "130", "--shard-size", "20")
    assert one.returncode == 0, one.stderr[-3000:]
    launch = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "launch" / "cpu-2proc.yaml"), "--main_process_port", str(free_port()),
                             "-m", "gensynth", "generate", str(tiny_gan), str(tmp_path / "two"), "--num", "130",
                             "--shard-size", "20"], env=subprocess_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    assert "worker 0 of 2" in launch.stderr and "worker 1 of 2" in launch.stderr
    assert launch.stdout.count("synthetic set: 130 samples in 7 shards") == 1  # one summary, from rank 0
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


def test_writer_processes_write_the_same_shards_as_one_process(tiny_gan, tmp_path):
    """--writers N: shards encoded and written by N forked processes while the model draws the next ones; the
    per-shard determinism makes the set byte for byte the one a single process writes."""
    common = ["--num", "130", "--shard-size", "20", "--seed", "3"]
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "one"), *common, "--writers", "1"]) == 0
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "three"), *common, "--writers", "3"]) == 0
    assert tree(tmp_path / "one") == tree(tmp_path / "three")


def test_a_writer_process_that_dies_is_said_in_one_line_and_a_rerun_finishes(tiny_gan, tmp_path):
    out = tmp_path / "crashed"
    args = ["generate", str(tiny_gan), str(out), "--num", "130", "--shard-size", "20", "--writers", "2"]
    crashed = subprocess.run([sys.executable, "-m", "gensynth", *args],
                             env=subprocess_env(GENSYNTH_FAULT="generate.write"),
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    assert "a shard writer process died" in crashed.stderr and "Traceback" not in crashed.stderr
    assert not (out / "manifest.json").exists()
    rerun = gensynth("-q", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_manifest(str(out)).num_samples == 130 and verify_shards(str(out), read_manifest(str(out))) == []


def test_array_tasks_then_finalize_equal_one_run(tiny_gan, tmp_path, capsys):
    common = ["--num", "130", "--shard-size", "20", "--seed", "2"]
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "one"), *common]) == 0
    out = tmp_path / "array"
    for task in (0, 2):  # task 1 has not run yet
        assert main(["-q", "generate", str(tiny_gan), str(out), *common, "--task", str(task), "--tasks", "3"]) == 0
    assert not (out / "manifest.json").exists()
    capsys.readouterr()
    assert main(["-q", "generate", str(tiny_gan), str(out), *common, "--finalize"]) == 1
    err = capsys.readouterr().err
    assert "2 of 7 shards are missing" in err and "synth-000001.tar" in err and "synth-000004.tar" in err
    assert not (out / "manifest.json").exists()
    assert main(["-q", "generate", str(tiny_gan), str(out), *common, "--task", "1", "--tasks", "3"]) == 0
    assert main(["-q", "generate", str(tiny_gan), str(out), *common, "--finalize"]) == 0
    assert tree(out) == tree(tmp_path / "one")


def test_rerun_skips_complete_shards_and_redoes_a_damaged_or_missing_one(tiny_gan, tmp_path, caplog):
    out = tmp_path / "synth"
    args = ["generate", str(tiny_gan), str(out), "--num", "100", "--shard-size", "25"]
    assert main(["-q", *args]) == 0
    before = tree(out)
    damaged = out / "synth-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "synth-000003.tar").unlink()
    (out / "manifest.json").unlink()  # as if the run had died before finalizing
    with caplog.at_level("INFO", logger="gensynth"):
        assert main(args) == 0
    assert "synth-000002.tar does not match its receipt" in caplog.text
    assert "generate: 4 shards" in caplog.text  # progress over its 4 shards, 2 of them redone
    assert tree(out) == before


def test_other_settings_in_the_same_out_are_refused_unless_overwrite(tiny_gan, tmp_path, capsys):
    out = str(tmp_path / "synth")
    assert main(["-q", "generate", str(tiny_gan), out, "--num", "40", "--shard-size", "25"]) == 0
    capsys.readouterr()
    assert main(["-q", "generate", str(tiny_gan), out, "--num", "40", "--shard-size", "25", "--seed", "9"]) == 2
    assert "already holds a finished shard set made with other settings" in capsys.readouterr().err
    assert main(["-q", "generate", str(tiny_gan), out, "--num", "30", "--shard-size", "10", "--seed", "9",
                 "--overwrite"]) == 0
    manifest = read_manifest(out)
    assert manifest.num_samples == 30 and manifest.provenance["seed"] == 9
    assert sorted(p.name for p in Path(out).glob("*.tar")) == [f"synth-00000{i}.tar" for i in range(3)]
    assert len(list((Path(out) / ".receipts").iterdir())) == 3


def test_sampling_options_of_another_family_are_refused(tiny_gan, tmp_path, capsys):
    assert main(["-q", "generate", str(tiny_gan), str(tmp_path / "t"), "--num", "20", "--truncation", "0.7"]) == 0
    assert read_manifest(str(tmp_path / "t")).provenance["options"] == {"truncation": 0.7}
    capsys.readouterr()
    assert main(["generate", str(tiny_gan), str(tmp_path / "x"), "--num", "20", "--temperature", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "temperature do not apply to a gan export; its options: truncation" in err
    assert not (tmp_path / "x").exists()


def test_tampered_or_pickled_export_is_refused(tiny_gan, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_gan / "export", bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["generate", str(bad), str(tmp_path / "o1"), "--num", "10"]) == 2
    assert "does not match config.json" in capsys.readouterr().err

    torch.save({"w": torch.zeros(3)}, weights)  # a pickle, with a config.json that vouches for it
    cfg = json.loads((bad / "config.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(bad), str(tmp_path / "o2"), "--num", "10"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nowhere"), str(tmp_path / "o3"), "--num", "10"]) == 2
    assert "no export at" in capsys.readouterr().err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


# -------------------------------------------------------------------------------------------- kill -9


def check_visible(out: Path, shard_size: int, total: int, problems: list[str]) -> None:
    """What a reader may see at any moment: whole shards only; a manifest only over verified shards."""
    for tar in out.glob("synth-*.tar"):
        k = int(tar.stem.split("-")[1])
        expected = min(shard_size, total - k * shard_size)
        try:
            with open(tar, "rb") as f:
                count = sum(1 for _ in iter_samples(f))
        except FileNotFoundError:
            continue  # replaced between listing and opening
        except Exception as e:  # noqa: BLE001 - any damage is a finding
            problems.append(f"{tar.name}: {e}")
            continue
        if count != expected:
            problems.append(f"{tar.name}: {count} samples visible, expected {expected}")
    if (out / "manifest.json").exists():
        manifest = read_manifest(str(out))
        bad = verify_shards(str(out), manifest)
        if bad or manifest.num_samples != total:
            problems.append(f"manifest over missing or partial shards: {bad}")


def test_kill9_mid_run_then_rerun_equals_an_uninterrupted_run(medium_gan, tmp_path):
    num, size = 6000, 200
    args = ["--num", str(num), "--shard-size", str(size), "--seed", "4"]
    reference = gensynth("-q", "generate", str(medium_gan), str(tmp_path / "reference"), *args)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            check_visible(out, size, num, problems)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "gensynth", "-q", "generate", str(medium_gan), str(out), *args],
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT_S
        while len(list(out.glob(".receipts/*.json"))) < 3:
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        done_before = len(list(out.glob("synth-*.tar")))
        assert 3 <= done_before < num // size
        rerun = gensynth("generate", str(medium_gan), str(out), *args)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "shards were already complete" in rerun.stdout
    finally:
        stop.set()
        watcher.join(timeout=30)
    check_visible(out, size, num, problems)
    assert problems == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"
    assert tree(out) == tree(tmp_path / "reference")


@pytest.mark.parametrize("writers", ["1", "3"])
def test_sigterm_finishes_the_shard_in_progress_and_exits_for_requeue(medium_gan, tmp_path, writers):
    out = tmp_path / "stopped"
    args = ["--num", "6000", "--shard-size", "200", "--seed", "4", "--writers", writers]
    proc = subprocess.Popen([sys.executable, "-m", "gensynth", "generate", str(medium_gan), str(out), *args],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    while len(list(out.glob(".receipts/*.json"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM after" in err and "rerun the same command" in err and "Traceback" not in err
    shards = sorted(out.glob("synth-*.tar"))
    assert len(shards) == len(list(out.glob(".receipts/*.json"))) < 30  # every published shard has its receipt
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name] and not (out / "manifest.json").exists()
    rerun = gensynth("-q", "generate", str(medium_gan), str(out), *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_manifest(str(out)).num_samples == 6000 and verify_shards(str(out), read_manifest(str(out))) == []


def test_a_purpose_sets_the_sampling_defaults_measured_for_it_and_a_given_option_still_wins(tiny_gan, tmp_path,
                                                                                            monkeypatch):
    from gensynth.families.gan.sampler import GANSampler

    monkeypatch.setattr(GANSampler, "PURPOSES", {"augment": {"truncation": 0.5}})
    aug = generate(str(tiny_gan), str(tmp_path / "a"), num=20, purpose="augment").manifest.provenance
    assert aug["options"] == {"truncation": 0.5} and aug["purpose"] == "augment"
    given = generate(str(tiny_gan), str(tmp_path / "b"), num=20, purpose="augment", truncation=1.5).manifest
    assert given.provenance["options"] == {"truncation": 1.5}
    plain = generate(str(tiny_gan), str(tmp_path / "c"), num=20, purpose="cas").manifest  # none measured for cas
    assert plain.provenance["options"] == {"truncation": 0.0} and plain.provenance["purpose"] == "cas"
    with pytest.raises(UsageError, match="purpose 'fun': use one of general, cas, augment"):
        generate(str(tiny_gan), str(tmp_path / "d"), num=20, purpose="fun")
