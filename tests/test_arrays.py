"""Shard sets that carry non-image arrays (a VQ-VAE's code grids): writer, manifest schema, loader."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch

from gensynth.data.codec import DecodeError, decode_array, encode_array
from gensynth.data.manifest import read_manifest
from gensynth.data.stream import ShardLoader
from gensynth.data.tario import TarShardWriter
from gensynth.data.writer import ShardSetWriter
from tests.conftest import toy_image


def grid_of(i: int) -> np.ndarray:
    """A 3x4 int16 grid that encodes its sample index (so decoded values can be checked)."""
    return (np.arange(12, dtype=np.int16).reshape(3, 4) + 100 * i).astype(np.int16)


def write_code_set(folder, counts: list[int], with_image: bool = False) -> None:
    index = 0
    with ShardSetWriter(str(folder), "train", shard_size=max(counts) + 1) as w:
        for count in counts:
            for _ in range(count):
                w.add(f"train-{index:08d}", toy_image(index) if with_image else None, label=index % 3,
                      arrays={"codes": grid_of(index)})
                index += 1
            w.end_shard()
        w.finish(classes=["a", "b", "c"], provenance={"kind": "test"})


def test_array_codec_round_trips_and_checks_dtype_and_shape():
    a = grid_of(7)
    assert np.array_equal(decode_array(encode_array(a), "int16", (3, 4)), a)
    with pytest.raises(DecodeError, match="schema says int32"):
        decode_array(encode_array(a), "int32", (3, 4))
    with pytest.raises(DecodeError, match="shape"):
        decode_array(encode_array(a), "int16", (4, 3))
    with pytest.raises(ValueError, match="not allowed"):
        encode_array(np.array(["x"], dtype=object))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="cannot decode"):  # never unpickled
        decode_array(pickled.getvalue(), "int16", (1,))


def test_code_shards_round_trip_through_the_loader(tmp_path):
    write_code_set(tmp_path / "codes", [10, 7, 9])
    manifest = read_manifest(str(tmp_path / "codes"))
    assert manifest.schema["arrays"] == {"codes": {"field": "codes.npy", "dtype": "int16", "shape": [3, 4]}}
    assert "image" not in manifest.schema and manifest.num_samples == 26
    seen = []
    for batch in ShardLoader(str(tmp_path / "codes"), batch_size=4, mode="exact", num_workers=2, shuffle_buffer=8):
        assert "image" not in batch
        assert batch["codes"].dtype == torch.int16 and batch["codes"].shape[1:] == (3, 4)
        for key, label, grid in zip(batch["key"], batch["label"].tolist(), batch["codes"]):
            i = int(key.rsplit("-", 1)[1])
            assert label == i % 3 and np.array_equal(grid.numpy(), grid_of(i))
            seen.append(key)
    assert sorted(seen) == [f"train-{i:08d}" for i in range(26)]


def test_resume_mid_epoch_with_arrays(tmp_path):
    write_code_set(tmp_path / "codes", [10, 7, 9])
    kw = dict(batch_size=4, mode="exact", num_workers=2, shuffle_buffer=8, seed=2)
    full = [k for b in ShardLoader(str(tmp_path / "codes"), **kw) for k in b["key"]]
    first = ShardLoader(str(tmp_path / "codes"), **kw)
    it = iter(first)
    head = [k for _ in range(3) for k in next(it)["key"]]
    resumed = ShardLoader(str(tmp_path / "codes"), **kw)
    resumed.load_state_dict(first.state_dict())
    assert head + [k for b in resumed for k in b["key"]] == full


def test_images_and_arrays_together(tmp_path):
    write_code_set(tmp_path / "both", [5, 4], with_image=True)
    schema = read_manifest(str(tmp_path / "both")).schema
    assert "image" in schema and "arrays" in schema
    batch = next(iter(ShardLoader(str(tmp_path / "both"), batch_size=9, mode="exact", shuffle_buffer=0)))
    assert batch["image"].shape == (9, 1, 8, 8) and batch["codes"].shape == (9, 3, 4)
    for key, image, grid in zip(batch["key"], batch["image"], batch["codes"]):
        i = int(key.rsplit("-", 1)[1])
        assert torch.equal(image[0], torch.from_numpy(toy_image(i)[:, :, 0]))
        assert np.array_equal(grid.numpy(), grid_of(i))


@pytest.mark.parametrize("with_arrays", [False, True])
def test_add_many_writes_the_shards_that_add_writes(tmp_path, with_arrays):
    """A batch (generation's path) gives the bytes of adding its samples one by one, also when it crosses
    a shard boundary, and the same manifest (histogram, schema)."""
    from gensynth.data.codec import encode_images
    from gensynth.data.writer import meta_json

    n = 23
    images = np.stack([toy_image(i) for i in range(n)])
    labels = [i % 3 for i in range(n)]
    metas = [meta_json({"index": i}) for i in range(n)]
    soft = np.random.default_rng(0).random((n, 3)).astype(np.float32)
    keys = [f"train-{i:08d}" for i in range(n)]
    with ShardSetWriter(str(tmp_path / "one"), "train", shard_size=10) as w:
        for i in range(n):
            w.add(keys[i], images[i], labels[i], metas[i], {"soft": soft[i]} if with_arrays else None)
        one = w.finish(classes=["a", "b", "c"])
    with ShardSetWriter(str(tmp_path / "many"), "train", shard_size=10) as w:
        for lo, hi in [(0, 7), (7, 16), (16, n)]:  # 7, then 9 crossing shard 0's end, then 7 crossing shard 1's
            w.add_many(keys[lo:hi], images[lo:hi], encode_images(images[lo:hi], "png"), labels[lo:hi], metas[lo:hi],
                       {"soft": soft[lo:hi]} if with_arrays else None)
        many = w.finish(classes=["a", "b", "c"])
    assert [s.samples for s in many.shards] == [10, 10, 3]
    assert many.to_json() == one.to_json()
    for shard in one.shards:
        assert (tmp_path / "many" / shard.name).read_bytes() == (tmp_path / "one" / shard.name).read_bytes()


def test_writer_refuses_inconsistent_samples(tmp_path):
    with ShardSetWriter(str(tmp_path / "a"), "train") as w:
        w.add("train-0", None, label=0, arrays={"codes": grid_of(0)})
        with pytest.raises(ValueError, match="the same arrays in every sample"):
            w.add("train-1", None, label=0, arrays={"codes": grid_of(1).astype(np.int32)})
        with pytest.raises(ValueError, match="the same arrays in every sample"):
            w.add("train-2", None, label=0, arrays={"other": grid_of(1)})
        with pytest.raises(ValueError, match="has an image, the samples before it have none"):
            w.add("train-3", toy_image(3), label=0, arrays={"codes": grid_of(3)})
        with pytest.raises(ValueError, match="needs an image or at least one array"):
            ShardSetWriter(str(tmp_path / "b"), "train").add("train-0", None, label=0)
        with pytest.raises(ValueError, match="array name"):
            ShardSetWriter(str(tmp_path / "c"), "train").add("train-0", None, arrays={"cls": grid_of(0)})


def test_a_bad_array_is_skipped_logged_and_counted(tmp_path, caplog):
    write_code_set(tmp_path / "codes", [6])
    shard = tmp_path / "codes" / "train-000000.tar"
    # rewrite the shard with one sample's grid of the wrong shape (same sample count as the manifest says)
    from gensynth.data.tario import iter_samples

    with open(shard, "rb") as f:
        samples = list(iter_samples(f))
    samples[2][1]["codes.npy"] = encode_array(np.zeros((2, 2), dtype=np.int16))
    with open(shard, "wb") as f:
        writer = TarShardWriter(f)
        for key, fields in samples:
            writer.write(key, fields)
        writer.close()
    loader = ShardLoader(str(tmp_path / "codes"), batch_size=6, mode="exact", max_corrupt_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="gensynth"):
        batches = list(loader)
    assert sum(len(b["key"]) for b in batches) == 5 and loader.corrupt == 1
    assert "train-00000002" in caplog.text and "shape" in caplog.text
