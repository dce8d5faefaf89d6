"""Elastic resume: an epoch stopped on one world size / worker count continues on another with every
sample exactly once; the loader in one process (each rank is its own ShardLoader, as under
torch.distributed), then training stopped by a signal on 2 gloo ranks and resumed on 1."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from gensynth.data.elastic import merge
from gensynth.data.mix import MixLoader
from gensynth.data.plan import pool_slice, segments_for_pool, shard_order
from gensynth.data.stream import ShardLoader
from gensynth.errors import UsageError
from gensynth.train.checkpoint import latest_checkpoint
from tests.conftest import REPO, free_port, subprocess_env, write_shard_set
from tests.helpers import ACCELERATE, TIMEOUT_S, rank_state, run_dir, run_launches, tiny_config

SCRIPT = Path(__file__).parent / "scripts" / "train_recording.py"


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def stop_all(folder: str, world: int, workers: int, batches: int, states: list[dict] | None = None,
             **kw) -> tuple[list[str], list[dict], list[int]]:
    """Each rank takes `batches` batches (after loading `states`); (keys, every rank's state, steps left)."""
    keys, saved, left = [], [], []
    for rank in range(world):
        loader = ShardLoader(folder, num_workers=workers, rank=rank, world_size=world, **kw)
        if states is not None:
            loader.load_state_dict(states)
        left.append(len(loader) - batches)
        it = iter(loader)
        keys += keys_of(islice(it, batches))
        saved.append(loader.state_dict())
        it.close()
    return keys, saved, left


def finish(folder: str, world: int, workers: int, states: list[dict], **kw) -> tuple[list[str], set[int]]:
    """Each rank resumes from `states` and reads the rest of the epoch: (keys, the ranks' step counts)."""
    keys, steps = [], set()
    for rank in range(world):
        loader = ShardLoader(folder, num_workers=workers, rank=rank, world_size=world, **kw)
        loader.load_state_dict(states)
        epoch, planned = loader.epoch, len(loader)
        batches = list(loader)
        assert len(batches) == planned and loader.epoch == epoch + 1
        steps.add(len(batches))
        keys += keys_of(batches)
    return keys, steps


@pytest.mark.parametrize("before, after", [((2, 2), (1, 3)), ((1, 0), (3, 0)), ((3, 1), (2, 2))],
                         ids=["2x2-to-1x3", "1-to-3", "3x1-to-2x2"])
def test_an_epoch_resumed_on_another_world_holds_every_sample_once(uneven_shards, before, after):
    folder, manifest = uneven_shards
    kw = dict(batch_size=4, mode="exact", shuffle_buffer=16, seed=3)
    head, states, _ = stop_all(folder, *before, 5, **kw)
    tail, steps = finish(folder, *after, states, **kw)
    assert len(steps) == 1, "every rank takes the same number of steps"
    assert len(head) == 5 * 4 * before[0]
    assert len(head + tail) == len(set(head + tail)) == manifest.num_samples
    # the next epoch is the new world's normal plan
    nxt = []
    for rank in range(after[0]):
        loader = ShardLoader(folder, num_workers=after[1], rank=rank, world_size=after[0], **kw)
        loader.load_state_dict(states)
        list(loader)
        fresh = ShardLoader(folder, num_workers=after[1], rank=rank, world_size=after[0], **kw)
        fresh.set_epoch(1)
        nxt.append(keys_of(loader) == keys_of(fresh))
    assert nxt == [True] * after[0]


def test_a_resumed_remainder_can_stop_and_move_again_and_the_batch_size_may_change(uneven_shards):
    folder, manifest = uneven_shards
    kw = dict(mode="exact", shuffle_buffer=8, seed=1)
    a, states, _ = stop_all(folder, 2, 2, 6, batch_size=4, **kw)
    b, states, left = stop_all(folder, 3, 1, 2, states, batch_size=3, **kw)
    assert min(left) > 0, "the second stop is inside the remainder"
    assert all(s["pool"] for s in states), "the pool travels with the position"
    c, _ = finish(folder, 1, 2, states, batch_size=5, **kw)
    assert len(a + b + c) == len(set(a + b + c)) == manifest.num_samples


def test_the_same_world_from_every_ranks_states_continues_bitwise(uneven_shards):
    folder, _ = uneven_shards
    kw = dict(batch_size=4, mode="exact", shuffle_buffer=16, seed=3, num_workers=2, world_size=2)
    _, states, _ = stop_all(folder, 2, 2, 3, **{k: v for k, v in kw.items() if k not in ("num_workers",
                                                                                     "world_size")})
    for rank in (0, 1):
        one, every = ShardLoader(folder, rank=rank, **kw), ShardLoader(folder, rank=rank, **kw)
        one.load_state_dict(states[rank])
        every.load_state_dict(states)
        a, b = list(one), list(every)
        assert keys_of(a) == keys_of(b) and all((x["image"] == y["image"]).all() for x, y in zip(a, b))


def test_resampled_mode_continues_with_the_next_fresh_epoch(uneven_shards):
    folder, _ = uneven_shards
    kw = dict(batch_size=4, mode="resampled", shuffle_buffer=16, seed=3)
    states = []
    for rank in (0, 1):
        loader = ShardLoader(folder, rank=rank, world_size=2, **kw)
        it = iter(loader)
        list(islice(it, 20))  # 20 x 4 of a 51-52 sample share: inside the second pass
        states.append(loader.state_dict())
        it.close()
    moved = ShardLoader(folder, rank=0, world_size=1, num_workers=2, **kw)
    moved.load_state_dict(states)
    assert moved.epoch == 2
    fresh = ShardLoader(folder, rank=0, world_size=1, num_workers=2, **kw)
    fresh.set_epoch(2)
    assert keys_of(islice(moved, 10)) == keys_of(islice(fresh, 10))


def test_one_ranks_state_on_another_world_or_another_seed_is_refused_in_one_line(uneven_shards):
    folder, _ = uneven_shards
    state = ShardLoader(folder, batch_size=4, rank=0, world_size=2).state_dict()
    with pytest.raises(UsageError, match=r"world_size=2 -> 3 .*every saved rank's state"):
        ShardLoader(folder, batch_size=4, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(UsageError, match="all 2 saved ranks, got ranks \\[0\\]"):
        ShardLoader(folder, batch_size=4, rank=0, world_size=3).load_state_dict([state])
    with pytest.raises(UsageError, match="seed=0"):
        ShardLoader(folder, batch_size=4, rank=0, world_size=3, seed=1).load_state_dict([state])


def test_a_mix_resumes_on_another_world_with_its_primary_epoch_exact(tmp_path):
    write_shard_set(tmp_path / "real", [30, 21])
    write_shard_set(tmp_path / "synth", [25], split="synth")
    sets = {"real": str(tmp_path / "real"), "synth": str(tmp_path / "synth")}
    head, states = [], []
    for rank in (0, 1):
        mix = MixLoader(sets, batch_size=6, rank=rank, world_size=2, shuffle_buffer=8)
        it = iter(mix)
        head += [k for b in islice(it, 2) for k in b["key"] if k.startswith("train-")]
        states.append(mix.state_dict())
    moved = MixLoader(sets, batch_size=6, rank=0, world_size=1, num_workers=2, shuffle_buffer=8)
    moved.load_state_dict(states)
    tail = [k for b in moved for k in b["key"] if k.startswith("train-")]
    assert len(head) == 2 * 2 * 3 and len(head + tail) == len(set(head + tail)) == 51


def test_pool_ranges_map_to_shard_segments_in_the_epochs_order():
    counts = [5, 3, 4]
    order = shard_order(3, 0, 0)
    pool = [(1, 3), (6, 9)]
    assert pool_slice(pool, 1, 4) == [(2, 3), (6, 8)]
    flat = [(s, i) for s in order for i in range(counts[s])]  # the epoch's sample order
    picked = [flat[p] for lo, hi in pool for p in range(lo, hi)]
    assert [(g.shard, i) for g in segments_for_pool(counts, order, pool) for i in range(g.start, g.stop)] == picked
    assert merge([(4, 5), (0, 2), (2, 3), (7, 7)]) == [(0, 3), (4, 5)]


# -- training: stopped by a signal on 2 gloo ranks, resumed on 1


def recorded(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


def train_recording(config: Path, out: Path, procs: int, stop_at: int, *overrides: str) -> tuple[int, str]:
    """(exit code, output) of tests/scripts/train_recording.py on `procs` gloo ranks (1: a plain process)."""
    args = [str(SCRIPT), str(out), str(stop_at), str(config), *overrides]
    if procs == 1:
        done = subprocess.run([sys.executable, *args], env=subprocess_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        return done.returncode, done.stderr
    assert procs == 2
    head = [*ACCELERATE, "--config_file", str(REPO / "launch" / "cpu-2proc.yaml"), "--main_process_port",
            str(free_port())]
    done = run_launches([[*head, *args]])[0]
    return done.returncode, done.stdout


@pytest.mark.multiprocess
@pytest.mark.parametrize("before, stop_at, after, steps, epochs", [
    (2, 5, 1, 25, [0] * 16 + [1] * 4),  # 2 ranks: 40 samples delivered; 1 rank: 64 left = 16 steps
    (1, 7, 2, 20, [0] * 10 + [1] * 3),  # 1 rank: 28 delivered; 2 ranks: 76 left = 10 steps each
], ids=["2-to-1", "1-to-2"])
def test_training_stopped_by_a_signal_resumes_on_another_world_with_every_sample_of_the_epoch_once(
        tmp_path, before, stop_at, after, steps, epochs):
    data = tmp_path / "toy"
    # 104 samples: every rank's batches have equal sizes here (the GAN's EMA decay counts n x ranks images a
    # step, so a rank with a shorter batch would blend differently)
    write_shard_set(data, [40, 33, 31])
    config = tiny_config(tmp_path, str(data), data__mode="exact", train__batch_size=4, train__steps=1000,
                         train__checkpoint_every=1000, train__eval_every=0)
    first, second = tmp_path / "rec-before", tmp_path / "rec-after"
    code, out = train_recording(config, first, before, stop_at)
    assert code != 0 and "stop requested" in out, out[-4000:]
    saved = latest_checkpoint(run_dir(config) / "checkpoints")
    assert saved.name == f"step-{stop_at:08d}"
    assert rank_state(saved)["loader"]["world_size"] == before and rank_state(saved)["loader"]["epoch"] == 0

    code, out = train_recording(config, second, after, 0, f"train.steps={steps}")
    assert code == 0, out[-4000:]
    assert f"resumed from {saved}" in out and f"saved by {before} processes, this run has {after}" in out
    old, new = recorded(first), recorded(second)
    assert len(old) == before * stop_at and len(new) == after * (steps - stop_at)
    epoch0 = [k for r in old + new if r["epoch"] == 0 for k in r["keys"]]
    assert len(epoch0) == len(set(epoch0)) == 104
    for rank in range(after):
        mine = [r["epoch"] for f in sorted(second.glob(f"rank{rank}-*.jsonl")) for r in map(json.loads,
                                                                                          f.read_text().splitlines())]
        assert mine == epochs
    epoch1 = [k for r in new if r["epoch"] == 1 for k in r["keys"]]
    assert len(epoch1) == len(set(epoch1))
    final = latest_checkpoint(run_dir(config) / "checkpoints")
    assert final.name == f"step-{steps:08d}"
    ranks = [rank_state(final, r) for r in range(after)]
    assert all(r["loader"]["world_size"] == after for r in ranks)
    assert len({r["params_digest"] for r in ranks}) == 1, "ranks hold different weights"
    # samples_seen: the saved ranks' total went to rank 0, so the sum over ranks counts the whole run
    assert sum(r["samples_seen"] for r in ranks) == sum(len(r["keys"]) for r in old + new)
