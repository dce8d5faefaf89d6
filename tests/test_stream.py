"""ShardLoader in one process: exactness per rank, resume mid-epoch, epochs, resampled, damage."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gensynth.data.manifest import read_manifest
from gensynth.data.stream import CorruptDataError, ShardLoader
from gensynth.errors import UsageError
from tests.conftest import toy_image, write_shard_set


def read_epoch(folder: str, **kw) -> list[dict]:
    return list(ShardLoader(folder, **kw))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_exact_epoch_covers_every_sample_once_across_ranks(uneven_shards, world, workers):
    folder, manifest = uneven_shards
    all_keys: list[str] = []
    steps = set()
    for rank in range(world):
        loader = ShardLoader(folder, batch_size=4, mode="exact", num_workers=workers, rank=rank, world_size=world)
        batches = list(loader)
        steps.add(len(batches))
        assert len(batches) == len(loader)
        all_keys += keys_of(batches)
    assert len(all_keys) == manifest.num_samples == len(set(all_keys))
    assert len(steps) == 1, "ranks must take the same number of steps"


def test_batches_hold_decoded_pixels_labels_and_meta(uneven_shards):
    folder, _ = uneven_shards
    for batch in ShardLoader(folder, batch_size=8, mode="exact"):
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (1, 8, 8)
        for image, label, key, meta in zip(batch["image"], batch["label"], batch["key"], batch["meta"]):
            index = int(key.rsplit("-", 1)[1])
            assert meta["source_index"] == index
            assert int(label) == index % 10
            assert torch.equal(image[0], torch.from_numpy(toy_image(index)[:, :, 0]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_k_batches_gives_exactly_the_rest(uneven_shards, workers):
    folder, _ = uneven_shards
    kw = dict(batch_size=4, mode="exact", num_workers=workers, shuffle_buffer=16, seed=3)
    full = read_epoch(folder, **kw)
    for k in (0, 1, 2, 5, 7, len(full) - 1, len(full)):
        first = ShardLoader(folder, **kw)
        head = take(first, k)
        state = first.state_dict()
        resumed = ShardLoader(folder, **kw)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert keys_of(head) + keys_of(tail) == keys_of(full), f"k={k}"
        # and the next epoch follows on normally
        assert resumed.epoch == 1


def test_resume_mid_epoch_on_each_of_two_ranks(uneven_shards):
    folder, manifest = uneven_shards
    union: list[str] = []
    for rank in (0, 1):
        kw = dict(batch_size=4, num_workers=2, shuffle_buffer=16, seed=3, rank=rank, world_size=2)
        full = keys_of(read_epoch(folder, **kw))
        for k in (3, 8):
            first = ShardLoader(folder, **kw)
            head = take(first, k)
            resumed = ShardLoader(folder, **kw)
            resumed.load_state_dict(first.state_dict())
            assert keys_of(head) + keys_of(list(resumed)) == full, f"rank {rank} k={k}"
        union += full
    assert len(union) == len(set(union)) == manifest.num_samples


def test_resume_on_another_rank_count_from_one_ranks_state_is_refused(uneven_shards):
    """Another world size needs every saved rank's state (tests/test_elastic.py); one rank's is not enough."""
    folder, _ = uneven_shards
    loader = ShardLoader(folder, batch_size=4, rank=0, world_size=2)
    state = loader.state_dict()
    other = ShardLoader(folder, batch_size=4, rank=0, world_size=3)
    with pytest.raises(UsageError, match="world_size=2 -> 3 from one rank's state"):
        other.load_state_dict(state)


def test_two_epochs_give_two_orders_and_a_seed_repeats(uneven_shards):
    folder, _ = uneven_shards
    loader = ShardLoader(folder, batch_size=4, mode="exact")
    epoch0, epoch1 = keys_of(list(loader)), keys_of(list(loader))
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = ShardLoader(folder, batch_size=4, mode="exact")
    assert keys_of(list(again)) == epoch0
    other_seed = ShardLoader(folder, batch_size=4, mode="exact", seed=1)
    assert keys_of(list(other_seed)) != epoch0


def take(loader: ShardLoader, n: int) -> list[dict]:
    out: list[dict] = []
    if n == 0:
        return out
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_is_endless_full_batches_each_epoch_complete(uneven_shards, workers):
    folder, manifest = uneven_shards
    loader = ShardLoader(folder, batch_size=5, mode="resampled", num_workers=workers)
    batches = take(loader, 3 * manifest.num_samples // 5)  # three epochs' worth, never runs dry
    assert all(len(b["key"]) == 5 for b in batches)
    if workers == 0:  # one slot: each epoch is one pass over every sample
        keys = keys_of(batches)
        n = manifest.num_samples
        for e in range(2):
            assert sorted(keys[e * n:(e + 1) * n]) == sorted(keys[:n]) == sorted(set(keys[:n]))
        assert keys[:n] != keys[n:2 * n]


@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_resume_continues_the_same_stream(uneven_shards, workers):
    folder, _ = uneven_shards
    kw = dict(batch_size=6, mode="resampled", num_workers=workers, seed=5)
    reference = keys_of(take(ShardLoader(folder, **kw), 60))
    for k in (1, 7, 23, 41):  # across epoch boundaries (103 samples / 6 per batch)
        first = ShardLoader(folder, **kw)
        head = take(first, k)
        resumed = ShardLoader(folder, **kw)
        resumed.load_state_dict(first.state_dict())
        tail = take(resumed, 60 - k)
        assert keys_of(head) + keys_of(tail) == reference, f"k={k}"


def test_rank_with_nothing_left_steps_with_an_empty_batch(tmp_path):
    write_shard_set(tmp_path / "s", [3])
    lengths = []
    for rank in range(4):
        batches = list(ShardLoader(str(tmp_path / "s"), batch_size=2, rank=rank, world_size=4))
        lengths.append([len(b["key"]) for b in batches])
        assert all(b["image"].shape[1:] == (1, 8, 8) for b in batches)
    assert sorted(lengths) == [[0], [1], [1], [1]]


def corrupt_one_png(folder: Path, shard: str, key: str) -> None:
    """Overwrite the png bytes of one sample in place (same length, so the tar stays valid)."""
    path = folder / shard
    data = bytearray(path.read_bytes())
    name = f"{key}.png".encode()
    at = data.index(name)
    start = at + 512  # member data follows its 512-byte header
    data[start + 8:start + 40] = b"\x00" * 32  # keep the PNG signature, break the chunks
    path.write_bytes(bytes(data))


def test_corrupt_sample_is_skipped_counted_and_logged(tmp_path, caplog):
    write_shard_set(tmp_path / "s", [10, 10, 10])
    corrupt_one_png(tmp_path / "s", "train-000001.tar", "train-00000013")
    loader = ShardLoader(str(tmp_path / "s"), batch_size=4, max_corrupt_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="gensynth"):
        keys = keys_of(list(loader))
    assert len(keys) == 29 and "train-00000013" not in keys
    assert loader.corrupt == 1
    assert "train-000001.tar" in caplog.text and "train-00000013" in caplog.text


def test_too_many_corrupt_samples_fail_loudly(tmp_path):
    write_shard_set(tmp_path / "s", [10, 10, 10])
    corrupt_one_png(tmp_path / "s", "train-000001.tar", "train-00000013")
    loader = ShardLoader(str(tmp_path / "s"), batch_size=4, max_corrupt_fraction=0.0)
    with pytest.raises(CorruptDataError, match="max_corrupt_fraction"):
        list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_skipped_and_ranks_stay_in_step(tmp_path, workers):
    folder = tmp_path / "s"
    manifest = write_shard_set(folder, [10, 10, 10, 10, 10])
    shard = folder / "train-000002.tar"
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    steps = []
    keys: list[str] = []
    for rank in range(2):
        loader = ShardLoader(str(folder), batch_size=3, num_workers=workers, rank=rank, world_size=2,
                             max_corrupt_fraction=0.5)
        batches = list(loader)
        steps.append(len(batches))
        keys += keys_of(batches)
    assert steps[0] == steps[1]
    lost = manifest.num_samples - len(keys)
    assert 0 < lost < 10 and len(keys) == len(set(keys))
    assert not any(k in keys for k in ("train-00000029",)), "the cut-off tail of shard 2 cannot be delivered"


def test_manifest_is_required_for_a_folder(tmp_path):
    with pytest.raises(UsageError, match="manifest.json"):
        ShardLoader(str(tmp_path), batch_size=2)


def test_pattern_and_list_sources_count_without_manifest(uneven_shards):
    folder, manifest = uneven_shards
    pattern = f"{folder}/train-{{000000..000006}}.tar"
    by_pattern = ShardLoader(pattern, batch_size=4)
    assert by_pattern.manifest is None and by_pattern.num_samples == manifest.num_samples
    assert sorted(keys_of(list(by_pattern))) == sorted(keys_of(list(ShardLoader(folder, batch_size=4))))
    listed = ShardLoader([f"{folder}/train-000000.tar", f"{folder}/train-000002.tar"], batch_size=4)
    assert listed.num_samples == 17 + 23


def test_npy_shards_decode_the_same_pixels(tmp_path):
    write_shard_set(tmp_path / "png", [6, 5], encoding="png")
    write_shard_set(tmp_path / "npy", [6, 5], encoding="npy")
    assert read_manifest(str(tmp_path / "npy")).schema["image"]["encoding"] == "npy"
    a = ShardLoader(str(tmp_path / "png"), batch_size=11, shuffle_buffer=0)
    b = ShardLoader(str(tmp_path / "npy"), batch_size=11, shuffle_buffer=0)
    (ba,), (bb,) = list(a), list(b)
    assert ba["key"] == bb["key"] and torch.equal(ba["image"], bb["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(uneven_shards, workers):
    folder, _ = uneven_shards
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(ShardLoader(folder, batch_size=4, num_workers=workers), 2)
    assert torch.equal(torch.rand(3), expected)


def test_batches_travel_grouped_in_a_slot_ring_inline_or_shared_and_arrive_the_same(uneven_shards, monkeypatch):
    """Small batches leave a worker several to a message; the images go through the loader's ring of reused
    shared slots, or (without fork) inside the pickle or, when large, as one shared-memory tensor. Every way
    they arrive as the same writable tensors."""
    import gensynth.data.collate as collate
    import gensynth.data.stream as stream

    folder, _ = uneven_shards
    kw = dict(batch_size=8, num_workers=2, shuffle_buffer=0)
    assert ShardLoader(folder, **kw).dataset.group == 8, "small batches travel eight to a message"
    message = next(iter(ShardLoader(folder, batch_size=8).dataset))
    assert isinstance(message["images"], np.ndarray) and message["sizes"] == [8]
    ringed = list(ShardLoader(folder, **kw))
    monkeypatch.setattr(collate.SlotRing, "usable", staticmethod(lambda: False))
    grouped = list(ShardLoader(folder, **kw))
    monkeypatch.setattr(stream, "GROUP_BYTES", 0)  # workers are forked: they see it too
    monkeypatch.setattr(collate, "SHARED_MESSAGE_BYTES", 0)
    assert ShardLoader(folder, **kw).dataset.group == 1
    assert isinstance(next(iter(ShardLoader(folder, batch_size=8).dataset))["images"], torch.Tensor)
    shared = list(ShardLoader(folder, **kw))
    assert len(ringed) == len(grouped) == len(shared) == 13
    for a, b, c in zip(ringed, grouped, shared):
        assert a["key"] == b["key"] == c["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["label"], c["label"])
        for batch in (a, b, c):
            assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.int64
            assert batch["image"].is_contiguous() and list(batch) == ["image", "label", "key", "meta"]
            batch["image"][:1] += 1  # writable, no warning


def test_batches_held_past_the_ring_stay_intact(tmp_path):
    """A consumer that keeps every batch holds every slot: the workers then send images the other way
    (no wait, no hang), and no held batch is overwritten by a later one."""
    folder = tmp_path / "many"
    write_shard_set(folder, [40, 40, 40])
    kw = dict(batch_size=1, num_workers=2, shuffle_buffer=0, prefetch_factor=2)
    loader = ShardLoader(str(folder), **kw)
    assert 120 // loader.dataset.group > 2 * (2 + 1), "more messages than the workers' slots"
    held = list(loader)
    fresh = [(b["key"], b["image"].clone()) for b in ShardLoader(str(folder), **kw)]  # each dropped at once
    assert [b["key"] for b in held] == [key for key, _ in fresh] and len(held) == 120
    assert all(torch.equal(a["image"], image) for a, (_, image) in zip(held, fresh))


def test_slot_ring_reuses_a_slot_once_its_images_are_freed():
    import gc

    from gensynth.data.collate import SlotRing

    ring = SlotRing(workers=1, slots=2, slot_bytes=2 * 4)
    images = [np.full((2, 1, 2, 2), i, dtype=np.uint8) for i in range(3)]
    first, second = ring.put(0, [images[0]]), ring.put(0, [images[1][:1], images[1][1:]])
    assert first[0] != second[0] and ring.put(0, [images[2]]) is None, "both slots busy: the caller sends it apart"
    assert ring.put(0, [np.zeros((3, 1, 2, 2), np.uint8)]) is None, "too large for a slot"
    kept = torch.from_numpy(ring.take(second))
    taken = ring.take(first)
    assert np.array_equal(taken, images[0]) and torch.equal(kept, torch.from_numpy(images[1]))
    del taken
    gc.collect()
    third = ring.put(0, [images[2]])
    assert third is not None and third[0] == first[0], "the freed slot is the one reused"
    assert torch.equal(kept, torch.from_numpy(images[1])), "a slot still viewed is never written"
