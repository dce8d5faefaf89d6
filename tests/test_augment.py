"""`gensynth augment REAL SYNTH OUT`: one ordinary shard set of real and synthetic samples at a mix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gensynth.cli import main
from gensynth.data.augment import augment, interleave, synthetic_count
from gensynth.data.manifest import manifest_sha256, read_manifest, verify_shards
from gensynth.data.stream import ShardLoader
from gensynth.data.tario import iter_samples
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import InputDataError, UsageError
from gensynth.generate.job import generate
from tests.conftest import toy_image, write_shard_set


def samples_of(folder: Path) -> list[tuple[str, dict[str, bytes]]]:
    out = []
    for shard in read_manifest(str(folder)).shards:
        with open(folder / shard.name, "rb") as f:
            out.extend(iter_samples(f))
    return out


@pytest.fixture(scope="module")
def pair(tiny_gan: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny GAN's real training set (103 toy images) and 60 of its samples."""
    synth = tmp_path_factory.mktemp("augment") / "synth"
    generate(str(tiny_gan), str(synth), num=60, shard_size=25)
    return tiny_gan.parent / "toy", synth


def test_augment_copies_every_real_sample_and_enough_synthetic_ones_interleaved(pair, tmp_path, capsys):
    real, synth = pair
    out = tmp_path / "aug"
    assert main(["-q", "augment", str(real), str(synth), str(out), "--synthetic-fraction", "0.25",
                 "--synthetic-weight", "0.5", "--shard-size", "16"]) == 0
    assert "103 real + 34 synthetic samples" in capsys.readouterr().out  # 103 x 0.25 / 0.75 = 34.3
    manifest = read_manifest(str(out))
    assert verify_shards(str(out), manifest) == [] and manifest.num_samples == 137
    assert [s.samples for s in manifest.shards] == [16] * 8 + [9]
    written = samples_of(out)
    originals = {("real", k): f for k, f in samples_of(real)} | {("synthetic", k): f for k, f in samples_of(synth)}
    sources = []
    for key, fields in written:
        meta = json.loads(fields["json"])
        sources.append(meta["source"])
        original = originals[(meta["source"], meta["key"])]
        assert key == f"{'synth' if meta['source'] == 'synthetic' else 'real'}-{meta['key']}"
        assert fields["png"] == original["png"] and fields["cls"] == original["cls"]  # byte for byte
        assert meta["meta"] == json.loads(original["json"])  # the sample's own json, kept
        assert meta["weight"] == (0.5 if meta["source"] == "synthetic" else 1.0)
    assert Counter(sources) == {"real": 103, "synthetic": 34}
    assert {meta_key for (src, meta_key) in originals if src == "real"} == {
        json.loads(f["json"])["key"] for _, f in written if json.loads(f["json"])["source"] == "real"}
    for n in range(1, len(sources) + 1):  # every stretch from the start holds the mix, to one sample
        assert abs(sources[:n].count("synthetic") - n * 34 / 137) <= 1
    prov = manifest.provenance
    assert prov["kind"] == "augment" and prov["mix"]["synthetic_fraction"] == 0.25
    assert prov["real"]["manifest_sha256"] == manifest_sha256(str(real))
    assert prov["synthetic"]["manifest_sha256"] == manifest_sha256(str(synth))
    assert prov["synthetic"]["training_data"] == read_manifest(str(synth)).provenance["training_data"]
    hist = Counter(int(f["cls"]) for _, f in written)
    assert manifest.class_histogram == {str(c): n for c, n in sorted(hist.items())}
    batches = list(ShardLoader(str(out), batch_size=50, shuffle_buffer=0))  # an ordinary shard set
    assert sum(len(b["label"]) for b in batches) == 137


def test_augment_reads_the_mix_that_eval_recommends(pair, tmp_path):
    real, synth = pair
    mix = tmp_path / "recommended_mix.json"
    mix.write_text(json.dumps({"recommended_mix": {"synthetic_fraction": 0.2, "synthetic_weight": 0.7,
                                                   "filter": "none"}}))
    out = tmp_path / "aug"
    assert main(["-q", "augment", str(real), str(synth), str(out), "--mix", str(mix)]) == 0
    prov = read_manifest(str(out)).provenance
    assert prov["mix"]["synthetic_weight"] == 0.7 and prov["mix"]["from"] == str(mix)
    assert prov["synthetic"]["samples"] == synthetic_count(103, 60, 0.2) == 26
    mix.write_text("{}")
    assert main(["-q", "augment", str(real), str(synth), str(tmp_path / "x"), "--mix", str(mix)]) == 2


def test_a_tampered_input_shard_stops_augment_and_leaves_out_as_it_was(pair, tmp_path):
    real, synth = pair
    copy = tmp_path / "real"
    write_shard_set(copy, [40, 33, 30])
    out = tmp_path / "aug"
    augment(str(copy), str(synth), str(out), 0.25)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = copy / read_manifest(str(copy)).shards[1].name
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the second sample's image bytes: the tar still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(InputDataError, match="does not match its manifest entry"):
        augment(str(copy), str(synth), str(out), 0.5, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_augment_refuses_sets_of_other_sizes_and_a_full_out(pair, tmp_path):
    real, synth = pair
    big = tmp_path / "big"
    write_shard_set(big, [10], size=12)
    with pytest.raises(UsageError, match=r"generate the synthetic set at the real set's size"):
        augment(str(big), str(synth), str(tmp_path / "a"))
    augment(str(real), str(synth), str(tmp_path / "b"))
    with pytest.raises(UsageError, match="already holds a complete shard set"):
        augment(str(real), str(synth), str(tmp_path / "b"))
    for fraction in (0.0, 1.0):
        with pytest.raises(UsageError, match="strictly between 0 and 1"):
            augment(str(real), str(synth), str(tmp_path / "c"), fraction)


def test_real_samples_get_one_hot_soft_labels_when_the_synthetic_set_has_soft_labels(pair, tmp_path):
    real, _ = pair
    soft = tmp_path / "soft"
    rng = np.random.default_rng(0)
    with ShardSetWriter(str(soft), "synth", shard_size=8) as w:
        for i in range(12):
            probs = rng.dirichlet(np.ones(10)).astype(np.float32)
            w.add(f"s-{i:04d}", toy_image(i, 8), label=int(probs.argmax()), meta={"i": i}, arrays={"soft": probs})
        w.finish(classes=[f"c{i}" for i in range(10)], provenance={"kind": "test"})
    out = tmp_path / "aug"
    augment(str(real), str(soft), str(out), 0.1)
    schema = read_manifest(str(out)).schema
    assert schema["arrays"]["soft"] == {"field": "soft.npy", "dtype": "float32", "shape": [10]}
    batch = next(iter(ShardLoader(str(out), batch_size=200, shuffle_buffer=0)))
    real_rows = [i for i, k in enumerate(batch["key"]) if k.startswith("real-")]
    assert len(real_rows) == 103 and len(batch["key"]) == 103 + 11
    one_hot = np.eye(10, dtype=np.float32)[batch["label"][real_rows].numpy()]
    assert np.array_equal(batch["soft_label"][real_rows].numpy(), one_hot)


def test_interleave_spreads_the_minority_evenly():
    order = list(interleave(6, 3))
    assert order.count(True) == 3 and order == [False, False, True] * 3
    assert list(interleave(3, 0)) == [False] * 3 and list(interleave(0, 2)) == [True, True]
