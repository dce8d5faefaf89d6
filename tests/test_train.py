"""The training loop with the GAN family, for real: subprocesses, kill -9, signals, gloo ranks.

A tiny config (8x8 toy images, 8-channel nets) keeps each step to milliseconds, so these tests
exercise the loop's machinery (checkpoint, resume, signals, logging, export), not image quality.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from gensynth.export import ExportError, load_export
from gensynth.families.gan.ema import standing_statistics
from gensynth.models.dcgan import Generator
from gensynth.runtime.signals import REQUEUE_EXIT_CODE
from gensynth.train.checkpoint import COMPLETE, latest_checkpoint, read_part
from tests.conftest import free_port, subprocess_env, write_shard_set
from tests.helpers import (
    TIMEOUT_S,
    gensynth,
    kill9_after_checkpoint,
    launch_cmd,
    rank_state,
    run_dir,
    run_launches,
    tiny_config,
)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train") / "toy"
    write_shard_set(folder, [40, 33, 30])
    return str(folder)


def test_kill9_then_resume_equals_an_uninterrupted_run(toy_data, tmp_path):
    steps = 300
    reference = tiny_config(tmp_path / "a", toy_data, train__steps=steps, train__checkpoint_every=20)
    done = gensynth("train", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tiny_config(tmp_path / "b", toy_data, train__steps=steps, train__checkpoint_every=20)
    target = random.Random().randrange(40, 200, 20)  # a random checkpointed step to kill after
    last = kill9_after_checkpoint(killed, target)
    killed_at = int(last.name.split("-")[1])
    assert killed_at < steps and not (run_dir(killed) / "export").exists()

    resumed = gensynth("train", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stderr
    # bitwise: same weights (generator EMA export) and the same data stream, key for key
    a, _ = load_export(run_dir(reference))
    b, _ = load_export(run_dir(killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final_a = latest_checkpoint(run_dir(reference) / "checkpoints")
    final_b = latest_checkpoint(run_dir(killed) / "checkpoints")
    assert rank_state(final_a)["data_digest"] == rank_state(final_b)["data_digest"]
    assert rank_state(final_a)["params_digest"] == rank_state(final_b)["params_digest"]
    assert json.loads((final_b / "trainer.json").read_text())["resumes"] == 1


def test_half_written_checkpoint_is_ignored(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    assert gensynth("train", str(config)).returncode == 0
    ckpts = run_dir(config) / "checkpoints"
    broken = ckpts / "step-00000020"  # newer, but a crash left it without its COMPLETE marker
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    (broken / "trainer.json").write_text("{")
    assert latest_checkpoint(ckpts).name == "step-00000010"
    more = gensynth("train", str(config), "train.steps=15")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stderr and "step-00000010" in more.stderr


def test_tensorboard_events_hold_scalars_and_sample_grids(toy_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, toy_data, train__steps=20)
    assert gensynth("train", str(config)).returncode == 0
    events = EventAccumulator(str(run_dir(config) / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("loss/d", "loss/g", "lr/g", "lr/d", "grad_norm/d", "grad_norm/g", "perf/samples_per_s",
                "perf/data_wait_fraction", "eval/variety", "eval/mean_gap"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("eval/variety")] == [10, 20]
    assert [e.step for e in events.Scalars("loss/d")] == [5, 10, 15, 20]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [10, 20]
    assert grids[0].height == 10 * (8 + 2) + 2  # one row per class, 8x8 images, 2 px padding
    assert sorted(p.name for p in (run_dir(config) / "samples").iterdir()) == [
        "samples-step-00000010.png", "samples-step-00000020.png"]


def test_fid_and_class_consistency_in_training_keep_a_pointer_to_the_best_generator(toy_data, tmp_path):
    """eval.metrics fid / class_consistency: the extractor for the run's data is trained once and cached,
    the metrics land in TensorBoard, and best.json names the step of the lowest FID, exported to best/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gensynth.families import load_sampler

    cache = tmp_path / "cache"
    config = tiny_config(tmp_path, toy_data, train__steps=30,
                         eval__metrics=["fid", "class_consistency", "variety"],
                         eval__real_test=toy_data, eval__cache=str(cache), eval__extractor_epochs=2.0)
    done = gensynth("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training the feature extractor" in done.stderr
    cached = list((cache / "extractors").glob("*/*/config.json"))
    assert len(cached) == 1
    events = EventAccumulator(str(run_dir(config) / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    fids = {e.step: e.value for e in events.Scalars("eval/fid")}
    assert sorted(fids) == [10, 20, 30] and all(v >= 0 for v in fids.values())
    assert all(0 <= e.value <= 1 for e in events.Scalars("eval/class_consistency"))
    assert "eval/variety" in events.Tags()["scalars"]  # the weight-free plug-ins still run beside them
    best = json.loads((run_dir(config) / "best.json").read_text())
    assert best["fid"] == pytest.approx(min(fids.values()), rel=1e-5)
    assert fids[best["step"]] == pytest.approx(best["fid"], rel=1e-5)
    assert best["checkpoint"] == f"checkpoints/step-{best['step']:08d}"  # eval_every = checkpoint_every here
    sampler = load_sampler(run_dir(config) / "best")  # the best generator: an export like any other
    assert sampler.config["step"] == best["step"] and sampler.family == "gan"
    again = gensynth("train", str(config), "train.steps=40")  # resumed: the cached extractor is reused
    assert again.returncode == 0 and "training the feature extractor" not in again.stderr


def test_the_best_export_is_picked_by_usefulness_when_that_metric_runs(toy_data, tmp_path):
    """eval.best_by=auto with the usefulness plug-in: best.json names eval/usefulness, the highest value
    logged, which is class consistency x recall at that step; best/ is that step's generator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gensynth.families import load_sampler

    config = tiny_config(tmp_path, toy_data, train__steps=30, eval__metrics=["usefulness", "fid"],
                         eval__real_test=toy_data, eval__cache=str(tmp_path / "cache"), eval__extractor_epochs=2.0)
    done = gensynth("train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    events = EventAccumulator(str(run_dir(config) / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(f"eval/{tag}")}
              for tag in ("usefulness", "class_consistency", "recall", "precision", "fid")}
    assert sorted(logged["usefulness"]) == [10, 20, 30]
    for step, value in logged["usefulness"].items():
        assert value == pytest.approx(logged["class_consistency"][step] * logged["recall"][step], abs=1e-6)
    best = json.loads((run_dir(config) / "best.json").read_text())
    assert best["metric"] == "eval/usefulness"
    assert best["value"] == pytest.approx(max(logged["usefulness"].values()), rel=1e-5)
    assert logged["usefulness"][best["step"]] == pytest.approx(best["value"], rel=1e-5)
    assert load_sampler(run_dir(config) / "best").config["step"] == best["step"]


def test_a_copying_model_is_never_the_best_export_and_generate_warns_with_the_figure(toy_data, tmp_path):
    """near_copies at or above eval.max_copies: the evaluation is no candidate for best/, the export records
    the figure, and generate warns with it. Limit 0 makes every evaluation count as copying; limit 1 none."""
    common = dict(train__steps=20, eval__metrics=["near_copies", "variety"], eval__best_by="fid",
                  eval__real_test=toy_data, data__test=toy_data)
    strict = tiny_config(tmp_path / "strict", toy_data, eval__max_copies=0.0, **common)
    done = gensynth("train", str(strict))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "near-copies of training images (eval.max_copies 0.0%): not a candidate for best/" in done.stderr
    recorded = load_export(run_dir(strict))[1]["last_eval"]
    assert recorded["step"] == 20 and 0.0 <= recorded["near_copies"] <= 1.0 and recorded["max_copies"] == 0.0
    generated = gensynth("generate", str(run_dir(strict)), str(tmp_path / "synth"), "--num", "10")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert f"{100 * recorded['near_copies']:.1f}% of its samples were near-copies" in generated.stderr
    assert "Pass --reject-copies to redraw them" in generated.stderr
    lenient = tiny_config(tmp_path / "lenient", toy_data, eval__max_copies=1.0, **common)
    assert gensynth("train", str(lenient)).returncode == 0
    quiet = gensynth("generate", str(run_dir(lenient)), str(tmp_path / "synth2"), "--num", "10")
    assert quiet.returncode == 0 and "copies its training images" not in quiet.stderr


def test_export_reproduces_the_runs_ema_samples_and_refuses_tampering(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    assert gensynth("train", str(config)).returncode == 0
    tensors, export_cfg = load_export(run_dir(config))
    assert export_cfg["family"] == "gan" and export_cfg["step"] == 10
    assert export_cfg["classes"] == [f"c{i}" for i in range(10)] and export_cfg["data"]["manifest_sha256"]
    fresh = Generator(**export_cfg["architecture"])
    fresh.load_state_dict(tensors)
    ema_state = read_part(latest_checkpoint(run_dir(config) / "checkpoints"), "custom_0")["model"]
    ema = Generator(**export_cfg["architecture"])
    ema.load_state_dict(ema_state)
    # the export is the EMA's weights with batch-norm statistics recomputed for them (gan.standing_batches),
    # not the raw generator's statistics the checkpointed EMA carries
    means = [k for k in tensors if k.endswith(".bn.running_mean")]
    assert means and all(torch.equal(tensors[k], ema_state[k]) for k in tensors if ".bn." not in k)
    assert not any(torch.equal(tensors[k], ema_state[k]) for k in means)
    gen, y = torch.Generator().manual_seed(2), torch.arange(8) % 10
    standing = standing_statistics(ema, lambda _: (torch.randn(8, 16, generator=gen), y), 50)
    assert all(torch.equal(tensors[k], v) for k, v in standing.state_dict().items())
    z, y = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 10
    with torch.no_grad():
        assert torch.equal(fresh.eval()(z, y), standing(z, y))
        assert not torch.equal(fresh.eval()(z, y), ema.eval()(z, y))
    weights = run_dir(config) / "export" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match"):
        load_export(run_dir(config))


def test_nonfinite_loss_rolls_back_then_stops_with_a_clear_message(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    assert gensynth("train", str(config)).returncode == 0
    blown = gensynth("train", str(config), "train.steps=40", "gan.lr_d=1e30", "gan.lr_g=1e30",
                     "train.max_nonfinite=3")
    assert blown.returncode == 1, blown.stderr[-3000:]
    assert "rolling back to" in blown.stderr and "step-00000010" in blown.stderr
    assert "NaN/Inf" in blown.stderr and "again after rolling back" in blown.stderr
    assert "Traceback" not in blown.stderr


def test_learning_rate_override_applies_on_resume(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    assert gensynth("train", str(config)).returncode == 0
    more = gensynth("train", str(config), "train.steps=15", "gan.lr_g=1e-3")
    assert more.returncode == 0 and "lr/g=0.001 " in more.stderr


# -- real torch.distributed (gloo) under accelerate launch


@pytest.mark.multiprocess
@pytest.mark.parametrize("machines", [1, 2], ids=["2proc", "2nodes"])
def test_ranks_end_identical_having_seen_different_data(toy_data, tmp_path, machines):
    config = tiny_config(tmp_path, toy_data, train__steps=12)
    port = free_port()
    results = run_launches([launch_cmd(config, machines=machines, machine_rank=r, port=port)
                            for r in range(machines)])
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    assert results[0].stdout.count("2 processes, gloo, cpu") == 1, results[0].stdout[-4000:]  # the main process's
    metrics = (run_dir(config) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [5, 10, 12]  # written once, by the main process
    last = latest_checkpoint(run_dir(config) / "checkpoints")
    r0, r1 = rank_state(last, 0), rank_state(last, 1)
    assert r0["params_digest"] == r1["params_digest"], "ranks hold different weights"
    assert r0["data_digest"] != r1["data_digest"], "ranks consumed the same data"
    assert (r0["loader"]["rank"], r1["loader"]["rank"]) == (0, 1) and r0["loader"]["world_size"] == 2
    assert r0["samples_seen"] == r1["samples_seen"] == 12 * 8


@pytest.mark.multiprocess
def test_ema_agrees_across_ranks_whose_last_batches_differ(toy_data, tmp_path):
    """Exact mode: 103 samples over 2 ranks end each epoch with batches of 4 and 3 images; the generator EMA
    steps by the images of all ranks, so both ranks still hold the same weights, EMA included."""
    config = tiny_config(tmp_path, toy_data, data__mode="exact", train__steps=8, train__checkpoint_every=8)
    results = run_launches([launch_cmd(config, port=free_port())])
    assert results[0].returncode == 0, results[0].stdout[-4000:]
    last = latest_checkpoint(run_dir(config) / "checkpoints")
    r0, r1 = rank_state(last, 0), rank_state(last, 1)
    assert r0["samples_seen"] != r1["samples_seen"], "the ranks' batches should have differed"
    assert r0["params_digest"] == r1["params_digest"], "the ranks' generator EMAs diverged"


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.multiprocess
def test_sigusr1_makes_both_ranks_save_and_exit_for_requeue_then_resume(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=100000, train__log_every=1,
                         train__checkpoint_every=100000)
    proc = subprocess.Popen(launch_cmd(config, port=free_port()), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not any("step 5/" in line for line in list(lines)):
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ranks = children(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGUSR1)  # one rank only: the all-reduce tells the other
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0
    assert out.count(f"exitcode  : {REQUEUE_EXIT_CODE}") + out.count(f"exitcode: {REQUEUE_EXIT_CODE}") >= 1, out[-3000:]
    saved = latest_checkpoint(run_dir(config) / "checkpoints")
    assert saved is not None and (saved / COMPLETE).is_file()
    assert (saved / "rank0.json").is_file() and (saved / "rank1.json").is_file()
    step = int(saved.name.split("-")[1])
    assert json.loads((saved / "trainer.json").read_text())["stops"] == 1
    # requeued: the same command continues from that checkpoint and finishes
    results = run_launches([launch_cmd(config, f"train.steps={step + 3}", port=free_port())])
    assert results[0].returncode == 0, results[0].stdout[-4000:]
    assert f"resumed from {saved}" in results[0].stdout
    final = latest_checkpoint(run_dir(config) / "checkpoints")
    assert final.name == f"step-{step + 3:08d}"
    assert rank_state(final, 0)["params_digest"] == rank_state(final, 1)["params_digest"]
    assert rank_state(final, 0)["samples_seen"] == (step + 3) * 8
