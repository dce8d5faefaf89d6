"""SLURM through submitit, on a real cluster: slurm/dev-cluster.sh runs munge, MariaDB + slurmdbd,
slurmctld and two slurmd (logical nodes n1 and n2) on this host. `make test` starts it (as root) and
stops it afterwards; run by hand: `sudo slurm/dev-cluster.sh`. In CI (CI=true) a missing cluster fails.

The training jobs are submitted together at the start of the module (the cluster runs them side by side)
and each test waits for its own: a 2-node run to the end, one preempted the way the scheduler does it
(`job._interrupt()`: SIGTERM then SIGUSR2 to every task), one stopped by its real time limit. Then a
generation array of 3 tasks. Tiny models and data (8x8 toy images): these test the machinery.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gensynth import cluster
from gensynth.data.stream import ShardLoader
from gensynth.families import load_run_config
from gensynth.runtime.record import read_record
from gensynth.runtime.signals import StopRequest
from gensynth.train.checkpoint import complete_checkpoints
from tests.conftest import REPO, need, write_shard_set

SLURM_DIR = Path(os.environ.get("GENSYNTH_SLURM_DIR", "/tmp/gensynth-slurm"))
DEV_CLUSTER = REPO / "slurm" / "dev-cluster.sh"
STOP_CLUSTER = REPO / "slurm" / "stop-cluster.sh"
HOW = "needs the one-host SLURM dev cluster: run `sudo slurm/dev-cluster.sh` (stop it with slurm/stop-cluster.sh)"
JOB_TIMEOUT_S = 400  # a hung job shows up as this, not as a test that never ends
STEPS = 100
BATCH = 8


# -------------------------------------------------------------------------------------------- no cluster needed


def test_dry_run_prints_the_sbatch_script_submitit_would_submit(tmp_path):
    cmd = [sys.executable, str(REPO / "slurm" / "train.py"), str(REPO / "configs" / "gan_fashion.yaml"),
           "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--qos", "high",
           "--constraint", "a100", "--cpus-per-task", "6", "--time", "1-12:00:00", "--signal-delay", "300",
           "--sbatch", "mem=200G", "--sbatch", "exclusive", "--dry-run", "run.name=big", "train.steps=10"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == [], "a dry run must not write anything"
    folder = tmp_path / "runs" / "big" / "slurm" / "%j"
    flags = dict(re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line).groups()
                 for line in out.stdout.splitlines() if line.startswith("#SBATCH"))
    assert flags == {
        "account": "proj", "constraint": "a100", "cpus-per-task": "6", "exclusive": None, "gpus-per-node": "8",
        "job-name": "gensynth-big", "mem": "200G", "nodes": "4", "ntasks-per-node": "8", "open-mode": "append",
        "partition": "gpu", "qos": "high", "requeue": None, "signal": "USR2@300", "time": "2160",
        "error": f"{folder}/%j_0_log.err", "output": f"{folder}/%j_0_log.out", "wckey": "submitit"}
    srun = [line for line in out.stdout.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --unbuffered --output {folder}/%j_%t_log.out --error {folder}/%j_%t_log.err "
                    f"{sys.executable} -u -m submitit.core._submit {folder}"]
    assert "4 nodes x 8 tasks = 32, 8 GPUs per node" in out.stdout
    assert "gensynth train" in out.stdout and "train.steps=10" in out.stdout


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--time", "soon"], "--time 'soon': expected minutes"),
    (["--signal-delay", "10"], "--signal-delay 10: must be >= 30"),
    (["--sbatch", "=x"], "--sbatch '=x': expected KEY=VALUE"),
    (["train.stpes=5"], "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
])
def test_bad_submit_options_exit_2_with_one_line(args, needle, tmp_path):
    cmd = [sys.executable, "-m", "gensynth", "submit", "train", str(REPO / "configs" / "gan_fashion.yaml"),
           "--dry-run", *args]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_time_limits_and_flags_parse_as_sbatch_reads_them():
    assert [cluster.parse_time(t) for t in ("90", "30:00", "0:30", "1:30:00", "2-00:00:00", "1-2", "1-2:30")] == [
        90, 30, 1, 90, 2880, 1560, 1590]
    assert cluster.parse_sbatch_flags(["mem=64G", "exclusive", "--mail_type=END"]) == {
        "mem": "64G", "exclusive": True, "mail-type": "END"}
    assert cluster.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_distributed_env_from_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NODEID": "2", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "localhost,gpu[02-04]", "SLURM_TASKS_PER_NODE": "2(x4)"}
    assert cluster.distributed_env(env) == {
        "MASTER_ADDR": "localhost", "MASTER_PORT": str(20000 + 123457 % 10000), "RANK": "5", "WORLD_SIZE": "8",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2"}
    with pytest.raises(RuntimeError, match="not inside a SLURM task: SLURM_PROCID"):
        cluster.distributed_env({})


def test_a_signal_during_start_up_reaches_the_training_loop_once_it_listens():
    with cluster.EarlySignals():
        os.kill(os.getpid(), signal.SIGUSR2)  # SLURM signalled before the loop installed its handlers
        time.sleep(0.3)  # held, not lost, and not fatal
        with StopRequest() as stop:
            deadline = time.monotonic() + 10
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.signum == signal.SIGUSR2


# -------------------------------------------------------------------------------------------- the cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """The dev cluster, up; started here (and stopped at the end) when it is down and we are root."""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # jobs inherit the submitter's environment
    conf = SLURM_DIR / "etc" / "slurm.conf"
    if Path("/etc/slurm/slurm.conf").resolve() != conf.resolve():
        env["SLURM_CONF"] = str(conf)
    status = subprocess.run([DEV_CLUSTER, "--status"], capture_output=True, timeout=60).returncode == 0
    started = False
    if not status and os.geteuid() == 0:
        subprocess.run([DEV_CLUSTER], check=False, timeout=600, capture_output=True)
        status = started = subprocess.run([DEV_CLUSTER, "--status"], capture_output=True, timeout=60).returncode == 0
    need(status, HOW)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield
    if started:
        subprocess.run([STOP_CLUSTER], timeout=300, capture_output=True)


def tiny_config(root: Path, data: str, name: str, steps: int = STEPS) -> Path:
    cfg = {"run": {"name": name, "root": str(root / "runs"), "seed": 0},
           "data": {"train": data, "mode": "resampled", "num_workers": 0, "shuffle_buffer": 16},
           "model": {"family": "gan", "resolution": 8},
           "gan": {"z_dim": 16, "g_channels": 8, "d_channels": 8, "max_channels": 16, "ema_kimg": 0.1},
           "train": {"steps": steps, "batch_size": BATCH, "log_every": 10, "sample_every": 60, "checkpoint_every": 20,
                     "keep_checkpoints": 1000, "eval_every": 0, "threads": 1}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Interrupter(threading.Thread):
    """Once a job has written its first periodic checkpoint: preempt it the way the scheduler does
    (`scancel --signal SIGTERM`), or cancel it with a plain `scancel`."""

    def __init__(self, sub: cluster.Submission, cancel: bool = False):
        super().__init__(daemon=True)
        self.sub, self.cancel = sub, cancel
        self.at_step: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            found = complete_checkpoints(self.sub.run_dir / "checkpoints")
            if found:
                self.at_step = found[-1][0]
                try:
                    if self.cancel:
                        subprocess.run(["scancel", self.sub.job_id], check=True, timeout=60)
                    else:  # preemption sends SIGTERM (submitit's own test hook adds a USR2 after it, which on
                        # a busy machine can reach the already requeued job and preempt it a second time)
                        subprocess.run(["scancel", self.sub.job_id, "--signal", "SIGTERM"], check=True, timeout=60)
                except subprocess.CalledProcessError as e:
                    self.error = f"scancel failed (has the job ended already?): {e}"
                return
            time.sleep(0.1)
        self.error = "no checkpoint appeared to interrupt after"


@dataclass
class Jobs:
    config: dict[str, Path]
    subs: dict[str, cluster.Submission]
    interrupters: dict[str, Interrupter]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory) -> Jobs:
    """All training jobs of the module, submitted at once; whatever is still queued at the end is cancelled."""
    root = tmp_path_factory.mktemp("slurm")
    write_shard_set(root / "toy", [40, 33, 30])
    data = str(root / "toy")
    configs = {"reference": tiny_config(root, data, "reference"), "preempted": tiny_config(root, data, "preempted"),
               "timelimit": tiny_config(root, data, "timelimit", steps=10_000_000),
               "cancelled": tiny_config(root, data, "cancelled", steps=10_000_000)}
    # the two jobs that requeue go first: while one waits out its requeue, another job takes its slots
    # a 2-minute limit with the signal 30 s before it: SLURM may signal up to 60 s early (slurmctld checks
    # limits every 30 s), so each start gets it 30 to 90 s in. A 1-minute limit lets it come in the first
    # seconds, when the tasks may not have started yet: a run on a busy machine got no signal and ran into its
    # limit. One requeue allowed, so the second stop ends the job
    subs = {"timelimit": cluster.submit_train(str(configs["timelimit"]), [], cluster.SlurmOptions(
        nodes=2, time="2", signal_delay=30, max_requeues=1))}
    subs["preempted"] = cluster.submit_train(str(configs["preempted"]), [], cluster.SlurmOptions(nodes=2))
    subs["reference"] = cluster.submit_train(str(configs["reference"]), [], cluster.SlurmOptions(nodes=2))
    subs["cancelled"] = cluster.submit_train(str(configs["cancelled"]), [], cluster.SlurmOptions(tasks_per_node=2))
    interrupters = {"preempted": Interrupter(subs["preempted"]), "cancelled": Interrupter(subs["cancelled"], True)}
    for thread in interrupters.values():
        thread.start()
    yield Jobs(configs, subs, interrupters)
    for sub in subs.values():
        subprocess.run(["scancel", sub.job_id], capture_output=True, timeout=60)


def replayed_digests(config: Path, steps: set[int], world: int = 2) -> dict[int, dict[int, str]]:
    """rank -> step -> the digest of the sample keys that rank must have consumed by that step, from a
    fresh loader in this process (the loop hashes the keys of every batch it takes, in order)."""
    cfg = load_run_config(config)
    out: dict[int, dict[int, str]] = {}
    for rank in range(world):
        loader = ShardLoader(cfg.data.train, batch_size=cfg.train.batch_size, mode=cfg.data.mode, seed=cfg.run.seed,
                             shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers, rank=rank,
                             world_size=world, decode_meta=False)
        digest, step, out[rank] = "", 0, {}
        while step < max(steps):
            for batch in loader:
                digest = hashlib.sha256("\n".join([digest, *batch["key"]]).encode()).hexdigest()
                step += 1
                if step in steps:
                    out[rank][step] = digest
                if step == max(steps):
                    break
    return out


def checkpoint_ranks(run_dir: Path, step: int) -> list[dict]:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (folder / "COMPLETE").is_file(), f"no complete checkpoint at step {step}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def check_data_position(config: Path, run_dir: Path, steps: list[int]) -> None:
    """At each step: both ranks saved, hold identical weights, and sit exactly where their data stream must be."""
    expected = replayed_digests(config, set(steps))
    for step in steps:
        ranks = checkpoint_ranks(run_dir, step)
        assert ranks[0]["params_digest"] == ranks[1]["params_digest"], f"ranks out of sync at step {step}"
        for r, state in enumerate(ranks):
            assert state["samples_seen"] == step * BATCH
            assert state["data_digest"] == expected[r][step], f"rank {r}'s data stream is off at step {step}"
        assert ranks[0]["data_digest"] != ranks[1]["data_digest"], "both ranks read the same data"


@pytest.mark.slurm
def test_two_node_training_runs_like_accelerate_launch(jobs, capsys):
    sub = jobs.subs["reference"]
    results = cluster.wait(sub, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        # what `accelerate launch --multi_gpu --num_machines 2` gives each process on CPU: one gloo group
        # over both nodes (device cpu:0 there too)
        assert r["accelerator"] == {"distributed_type": "MULTI_CPU", "backend": "gloo", "num_processes": 2,
                                    "process_index": r["rank"], "local_process_index": 0, "device": "cpu:0"}
        env = r["env"]
        # n1 does not resolve here: MASTER_ADDR is its NodeAddr from `scontrol show node`
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(20000 + int(sub.job_id) % 10000)
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
            str(r["rank"]), "2", "0", "1")
        assert env["GROUP_RANK"] == str(r["rank"])  # one task per node: rank r runs on node r
        assert r["step"] == STEPS
    run = sub.run_dir
    check_data_position(jobs.config["reference"], run, [STEPS])
    assert (run / "export" / "model.safetensors").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/d")] == list(range(10, STEPS + 1, 10))

    record = read_record(run)
    assert record["state"] == "completed" and record["requeues"] == 0
    assert [j["job_id"] for j in record["jobs"]] == [sub.job_id]
    assert record["last_checkpoint"] == f"checkpoints/step-{STEPS:08d}"
    assert record["jobs"][0]["starts"][0]["hosts"] == "n[1-2]"
    # what --dry-run prints is what was submitted
    assert sub.job.paths.submission_file.read_text() == sub.script

    from gensynth.cli import main

    assert main(["inspect", str(run)]) == 0
    shown = capsys.readouterr().out
    assert (f"slurm      completed: job {sub.job_id}, 0 requeue(s), last checkpoint checkpoints/step-{STEPS:08d}"
            in shown)
    assert f"step {STEPS} of {STEPS}, 2 processes" in shown and f"export     step {STEPS}," in shown


@pytest.mark.slurm
def test_preempted_job_checkpoints_on_every_rank_requeues_and_finishes_intact(jobs):
    sub = jobs.subs["preempted"]
    results = cluster.wait(sub, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    interrupter = jobs.interrupters["preempted"]
    interrupter.join(timeout=5)
    assert interrupter.error is None and interrupter.at_step is not None
    record = read_record(sub.run_dir)
    assert record["state"] == "completed" and record["requeues"] == 1, record
    (job,) = record["jobs"]
    (stop,) = job["stops"]
    assert stop["reason"] == "preempted" and stop["requeued"] and job["requeues"] == 1
    stopped_at = stop["step"]
    assert interrupter.at_step <= stopped_at < STEPS, "the signal must stop the run in the middle"
    assert [s["restart"] for s in job["starts"]] == [0, 1]
    assert job["starts"][1]["resume_from"] == stop["checkpoint"] == f"checkpoints/step-{stopped_at:08d}"
    assert all(r["restart"] == 1 and r["step"] == STEPS for r in results)
    trainer = json.loads((sub.run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert (trainer["stops"], trainer["resumes"]) == (1, 1)
    # every rank saved at the stop, and the resumed run ends exactly where the uninterrupted one did
    check_data_position(jobs.config["preempted"], sub.run_dir, [stopped_at, STEPS])
    cluster.wait(jobs.subs["reference"], poll_s=1, timeout_s=JOB_TIMEOUT_S)
    reference = checkpoint_ranks(jobs.subs["reference"].run_dir, STEPS)
    assert [r["loader"] for r in checkpoint_ranks(sub.run_dir, STEPS)] == [r["loader"] for r in reference]
    # and with the same weights, bit for bit. Not the batch-norm running statistics: the loop averages those
    # across ranks at every checkpoint, so the extra checkpoint at the stop moves them (they do not feed back
    # into training)
    from safetensors.torch import load_file

    for name in ("model_0.safetensors", "model_1.safetensors"):
        ours, theirs = (load_file(run / "checkpoints" / f"step-{STEPS:08d}" / name)
                        for run in (sub.run_dir, jobs.subs["reference"].run_dir))
        weights = [k for k in ours if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert ours.keys() == theirs.keys() and len(weights) > 5
        assert all(ours[k].equal(theirs[k]) for k in weights), name


@pytest.mark.slurm
def test_time_limit_checkpoints_on_every_rank_and_the_requeued_job_resumes(jobs):
    sub = jobs.subs["timelimit"]
    with pytest.raises(cluster.JobFailed, match=r"after 1 requeues \(--max-requeues 1\)"):
        cluster.wait(sub, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    record = read_record(sub.run_dir)
    assert record["state"] == "stopped" and record["requeues"] == 1, record
    (job,) = record["jobs"]
    first, second = job["stops"]
    assert first["reason"] == second["reason"] == "time limit"
    assert first["requeued"] and not second["requeued"]
    assert job["starts"][1]["resume_from"] == first["checkpoint"]
    assert 0 < first["step"] < second["step"], "the requeued job went on from where the first one stopped"
    check_data_position(jobs.config["timelimit"], sub.run_dir, [first["step"], second["step"]])
    assert sub.job.state == "FAILED"  # stopped by us at the second signal, not killed by SLURM at the limit


@pytest.mark.slurm
def test_a_cancelled_job_checkpoints_and_stays_cancelled(jobs):
    """A plain scancel: every rank still saves, but the job is not requeued (SLURM would accept the
    requeue of a job it is ending and run it again)."""
    sub = jobs.subs["cancelled"]
    with pytest.raises(cluster.JobFailed, match=r"cancelled \(job state (COMPLETING|CANCELLED)\) at step \d+"):
        cluster.wait(sub, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    interrupter = jobs.interrupters["cancelled"]
    assert interrupter.error is None
    record = read_record(sub.run_dir)
    assert record["state"] == "stopped" and record["requeues"] == 0
    (job,) = record["jobs"]
    (stop,) = job["stops"]
    assert stop["reason"] == "cancelled" and not stop["requeued"] and stop["step"] >= interrupter.at_step
    assert len(job["starts"]) == 1
    check_data_position(jobs.config["cancelled"], sub.run_dir, [stop["step"]])
    time.sleep(3)  # had it been requeued, it would be back in the queue by now
    queued = subprocess.run(["squeue", "-h", "-j", sub.job_id, "-t", "PENDING,RUNNING,REQUEUED"], capture_output=True,
                            text=True)
    assert queued.stdout.strip() == ""
    assert sub.job.state.startswith("CANCELLED")


@pytest.mark.slurm
def test_generation_array_writes_the_same_shards_as_one_process(jobs, tmp_path):
    from gensynth.generate.job import generate
    from gensynth.generate.options import GenerateOptions

    run = jobs.subs["reference"].run_dir
    cluster.wait(jobs.subs["reference"], poll_s=1, timeout_s=JOB_TIMEOUT_S)
    gen = GenerateOptions(num=70, seed=3, shard_size=10, encoding="png", device="cpu")
    single = tmp_path / "single"
    generate(str(run), str(single), gen)
    out = tmp_path / "array"
    opts = cluster.SlurmOptions(log_folder=str(tmp_path / "logs" / "%j"))
    sub = cluster.submit_generate(str(run), str(out), gen, 3, None, opts)
    assert len(sub.jobs) == 3 and sub.finalize_job is not None
    lines = cluster.wait_generation(sub, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    assert [line.split(":")[0] for line in lines[:3]] == ["task 0", "task 1", "task 2"]

    def tars(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.glob("synth-*.tar"))}

    assert len(tars(single)) == 7 and tars(out) == tars(single)
    assert json.loads((out / "manifest.json").read_text())["shards"] == json.loads(
        (single / "manifest.json").read_text())["shards"]
    # a task that failed is resubmitted alone: lose task 1's shards (k % 3 == 1), redo only task 1
    for k in (1, 4):
        (out / f"synth-{k:06d}.tar").unlink()
    (out / "manifest.json").unlink()
    redo = cluster.submit_generate(str(run), str(out), gen, 3, [1], opts)
    assert [j.job_id.count("_") for j in redo.jobs] == [0]  # one job, not an array
    lines = cluster.wait_generation(redo, poll_s=1, timeout_s=JOB_TIMEOUT_S)
    assert lines[0] == "task 1: 2 shards generated, 0 already there"
    assert tars(out) == tars(single)
    assert (out / "manifest.json").is_file()


def test_cluster_scripts_are_shell_clean():
    """The start/stop scripts parse (bash -n); they stop daemons by PID file, never by name."""
    for script in (DEV_CLUSTER, STOP_CLUSTER):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert not re.search(r"\b(pkill|killall)\b", text)
