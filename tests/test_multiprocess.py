"""Real torch.distributed (gloo on CPU) under `accelerate launch`: 2 processes on one machine, and
2 simulated nodes on 127.0.0.1 (two launches, machine_rank 0 and 1). One exact epoch with 0 and 2
DataLoader workers per rank: the union of keys equals the input, no duplicates, no rank hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, write_shard_set

SCRIPT = Path(__file__).parent / "scripts" / "read_epoch.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
COMMON = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2"]
HANG_TIMEOUT_S = 240  # a rank waiting on another shows up as this timeout, not as a silent pass


def launch_env() -> dict[str, str]:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(Path.cwd()))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_all(commands: list[list[str]]) -> None:
    """Start every command at once (nodes must meet), wait, and kill them all on a hang."""
    procs = [subprocess.Popen(c, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) for c in commands]
    try:
        outputs = [p.communicate(timeout=HANG_TIMEOUT_S)[0].decode(errors="replace") for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        pytest.fail(f"launch did not finish in {HANG_TIMEOUT_S} s: a rank hung")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def check_epoch(out: Path, total_keys: set[str], workers: int) -> None:
    records = [json.loads((out / f"rank{r}-w{workers}.json").read_text()) for r in range(2)]
    assert {r["world"] for r in records} == {2}
    assert records[0]["steps"] == records[1]["steps"] > 0
    k0, k1 = records[0]["keys"], records[1]["keys"]
    assert set(k0).isdisjoint(k1), "two ranks saw the same sample"
    assert len(k0) + len(k1) == len(total_keys) and set(k0) | set(k1) == total_keys


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, set[str]]:
    folder = tmp_path_factory.mktemp("mp") / "uneven"
    write_shard_set(folder, [17, 5, 23, 1, 30, 11, 16])  # 7 uneven shards, 103 samples
    keys = {f"train-{i:08d}" for i in range(103)}
    return str(folder), keys


@pytest.mark.multiprocess
def test_two_processes_one_machine(shards, tmp_path):
    folder, keys = shards
    cmd = [*ACCELERATE, *COMMON, "--num_machines", "1", "--main_process_port", str(free_port()),
           str(SCRIPT), folder, str(tmp_path), "0", "2"]
    run_all([cmd])
    for workers in (0, 2):
        check_epoch(tmp_path, keys, workers)


@pytest.mark.multiprocess
def test_two_simulated_nodes(shards, tmp_path):
    folder, keys = shards
    port = str(free_port())
    commands = [[*ACCELERATE, *COMMON, "--num_machines", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                 str(SCRIPT), folder, str(tmp_path), "0", "2"] for rank in (0, 1)]
    run_all(commands)
    for workers in (0, 2):
        check_epoch(tmp_path, keys, workers)


@pytest.mark.multiprocess
def test_ranks_leave_the_process_group_together(tmp_path):
    """A rank that is done waits for one still working before either takes the group down (leaving alone
    aborts a finished job now and then at interpreter exit)."""
    cmd = [*ACCELERATE, *COMMON, "--num_machines", "1", "--main_process_port", str(free_port()),
           str(Path(__file__).parent / "scripts" / "leave_together.py"), str(tmp_path)]
    run_all([cmd])
    busy, done = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert busy["entered"] - done["entered"] > 1.0, "rank 0 was meant to arrive late"
    assert done["left"] >= busy["entered"], "rank 1 left before rank 0 had finished its work"
    assert busy["group_down"] and done["group_down"]
