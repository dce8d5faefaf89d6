"""MixLoader: real and synthetic shard sets in a fixed per-batch ratio, exact over the primary, resumable."""

from __future__ import annotations

from collections import Counter

import pytest

from gensynth.data.mix import MixLoader, split_batch
from gensynth.data.writer import ShardSetWriter
from gensynth.errors import UsageError
from tests.conftest import toy_image, write_shard_set


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mix")
    write_shard_set(root / "real", [17, 5, 23, 1, 30, 11, 16])  # 103 samples, keys train-*
    with ShardSetWriter(str(root / "synth"), "synth", shard_size=20) as w:  # 50 samples, keys synth-*
        for i in range(50):
            w.add(f"synth-{i:08d}", toy_image(1000 + i), label=i % 10)
        w.finish(classes=[f"c{i}" for i in range(10)])
    return {"real": str(root / "real"), "synth": str(root / "synth")}


def keys_by_source(batches: list[dict]) -> tuple[list[str], list[str]]:
    real = [k for b in batches for k, s in zip(b["key"], b["source"].tolist()) if s == 0]
    synth = [k for b in batches for k, s in zip(b["key"], b["source"].tolist()) if s == 1]
    return real, synth


def test_split_batch_largest_remainder():
    assert split_batch(8, [1, 1]) == [4, 4]
    assert split_batch(8, [3, 1]) == [6, 2]
    assert split_batch(10, [1, 1, 1]) == [4, 3, 3]
    with pytest.raises(UsageError, match="gives the primary source no sample"):
        split_batch(4, [1, 9])


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_is_every_real_sample_once_with_synthetic_at_the_ratio(sets, workers):
    loader = MixLoader(sets, batch_size=8, ratio={"real": 3, "synth": 1}, weights={"synth": 0.25},
                       num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 18  # ceil(103 / 6)
    real, synth = keys_by_source(batches)
    assert sorted(real) == [f"train-{i:08d}" for i in range(103)]
    assert len(synth) == 18 * 2  # the synthetic stream never runs short
    assert len(set(synth)) == len(synth) <= 50  # fewer than one synthetic pass: no repeats yet
    for b in batches[:-1]:
        assert b["source"].tolist() == [0] * 6 + [1] * 2
        assert b["weight"].tolist() == [1.0] * 6 + [0.25] * 2
        assert b["image"].shape == (8, 1, 8, 8) and b["label"].shape == (8,)


def test_synthetic_stream_covers_its_set_each_pass_and_continues_across_epochs(sets):
    loader = MixLoader(sets, batch_size=8, num_workers=0)  # 4 + 4: 26 steps per real epoch
    first = list(loader)
    second = list(loader)
    _, synth = keys_by_source(first + second)
    assert len(synth) == 2 * 26 * 4 == 208
    passes = [synth[i:i + 50] for i in range(0, 200, 50)]
    for p in passes:  # every synthetic sample once per pass of its own
        assert sorted(p) == [f"synth-{i:08d}" for i in range(50)]
    assert passes[0] != passes[1], "each pass draws a fresh order"
    real1, _ = keys_by_source(first)
    real2, _ = keys_by_source(second)
    assert sorted(real1) == sorted(real2) and real1 != real2  # a new real epoch, a new order


def test_ranks_split_the_real_epoch_and_take_equal_steps(sets):
    per_rank = [list(MixLoader(sets, batch_size=8, rank=r, world_size=2, num_workers=0)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1])
    real = [keys_by_source(b)[0] for b in per_rank]
    assert set(real[0]).isdisjoint(real[1]) and len(real[0]) + len(real[1]) == 103
    synth = [keys_by_source(b)[1] for b in per_rank]
    assert set(synth[0][:25]).isdisjoint(synth[1][:25])  # the synthetic set is split across ranks too


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [1, 7, 20])
def test_resume_mid_epoch_gives_the_very_same_batches(sets, workers, k):
    reference = list(MixLoader(sets, batch_size=8, num_workers=workers))
    loader = MixLoader(sets, batch_size=8, num_workers=workers)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    resumed = MixLoader(sets, batch_size=8, num_workers=workers)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["key"] for b in rest] == [b["key"] for b in reference[k:]]


def test_bad_ratio_and_mismatched_resume_are_refused(sets):
    with pytest.raises(UsageError, match="not among the sources"):
        MixLoader(sets, batch_size=8, ratio={"real": 1, "fake": 1})
    with pytest.raises(UsageError, match="at least two sources"):
        MixLoader({"real": sets["real"]}, batch_size=8)
    state = MixLoader(sets, batch_size=8).state_dict()
    other = MixLoader(sets, batch_size=8, ratio={"real": 3, "synth": 1})
    with pytest.raises(UsageError, match="cannot resume the mix"):
        other.load_state_dict(state)


def test_labels_come_with_their_source(sets):
    batch = next(iter(MixLoader(sets, batch_size=10, num_workers=0)))
    counts = Counter(batch["source"].tolist())
    assert counts == {0: 5, 1: 5}
    assert all(k.startswith("train-") for k in batch["key"][:5])
    assert all(k.startswith("synth-") for k in batch["key"][5:])


def test_sources_with_other_image_sizes_or_classes_are_refused(sets, tmp_path):
    write_shard_set(tmp_path / "big", [10], size=16)
    with pytest.raises(UsageError, match="8x8x1 images.*16x16x1.*one image format per batch"):
        MixLoader({"real": sets["real"], "big": str(tmp_path / "big")}, batch_size=8)
    with ShardSetWriter(str(tmp_path / "named"), "synth", shard_size=20) as w:
        for i in range(10):
            w.add(f"synth-{i:08d}", toy_image(i), label=i % 10)
        w.finish(classes=[f"other{i}" for i in range(10)])
    with pytest.raises(UsageError, match="class lists differ"):
        MixLoader({"real": sets["real"], "named": str(tmp_path / "named")}, batch_size=8)
