"""SLURM through submitit: submit a training run, turn SLURM's environment into torch.distributed's,
requeue on preemption and time limits, and keep a record of it all in the run directory.

    python slurm/train.py configs/gan_fashion.yaml --nodes 2 --gpus-per-node 8 --partition p
    gensynth submit train configs/gan_fashion.yaml --nodes 2 --dry-run

One SLURM task per training process. Each task exports MASTER_ADDR (the first node's address),
MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, exactly the variables
`accelerate launch` / torchrun set, then runs the ordinary training loop in-process: the loop's
Accelerator (gensynth/train/loop.py build_accelerator) comes out the same as under `accelerate launch`.

Requeue, for every rank: SLURM sends SIGTERM (preemption) or SIGUSR2 (`--signal=USR2@delay` before the
time limit) to every task. The loop agrees on the stop at the next step, every rank saves a checkpoint
and returns 75 (gensynth/runtime/signals.py). Then global rank 0 runs `scontrol requeue` and every task
exits without a result; the requeued job runs the same submission again and the loop resumes from the
newest checkpoint (`train.resume=auto` is forced from the first requeue on). submitit's own
`checkpoint()` route is not used because it runs on global rank 0 only.

`runs/<name>/slurm.json` records every job id, each start (hosts, rank-0 address, checkpoint resumed
from), each stop (reason, step, checkpoint, requeued or not), the requeue count and the final state;
`gensynth inspect runs/<name>` shows it.

Generation (`python slurm/generate.py RUN OUT --num N --array 3`): array task i runs
`gensynth.generate.generate(..., task=i, tasks=N)`; a job that depends on the array (afterany) verifies
every shard and writes the manifest; `--task-ids` resubmits single tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gensynth.config import Config, option, to_dict
from gensynth.errors import GensynthError, UsageError
from gensynth.families import config_from_dict, load_run_config
from gensynth.runtime.signals import REQUEUE_EXIT_CODE, STOP_SIGNALS

log = logging.getLogger("gensynth")

RECORD = "slurm.json"
MASTER_PORT_BASE = 20000  # MASTER_PORT = base + job id % span: the same on every task, rarely shared by two jobs
MASTER_PORT_SPAN = 10000
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class JobFailed(GensynthError):
    """A submitted job ended without a result (failed, cancelled, or stopped without a requeue)."""


@dataclass
class SlurmOptions:
    """What to ask SLURM for; `gensynth submit` makes one --flag per field (underscores become dashes)."""

    partition: str = option("", "partition (queue); empty: the cluster's default partition")
    nodes: int = option(1, "nodes; one SLURM task per training process on each", min=1)
    tasks_per_node: int = option(0, "processes per node (SLURM tasks); 0: one per GPU, or 1 without GPUs", min=0)
    gpus_per_node: int = option(0, "GPUs per node (sbatch --gpus-per-node); 0: CPU only", min=0)
    cpus_per_task: int = option(0, "CPU cores per process (sbatch --cpus-per-task); 0: SLURM's default", min=0)
    time: str = option("60", "time limit: minutes, or [D-]HH:MM[:SS]; a run that reaches it checkpoints and is "
                       "requeued")
    account: str = option("", "account to charge (sbatch --account)")
    qos: str = option("", "quality of service (sbatch --qos)")
    constraint: str = option("", "node features (sbatch --constraint), e.g. a100")
    sbatch: list[str] = option([], "extra sbatch flags, KEY=VALUE or KEY, repeatable: --sbatch mem=64G "
                               "--sbatch exclusive")
    log_folder: str = option("", "submitit's folder (scripts, pickles, logs); %%j is the job id; "
                             "default <run dir>/slurm/%%j")
    job_name: str = option("", "job name; default gensynth-<run.name>")
    signal_delay: int = option(120, "seconds before the time limit at which SLURM sends SIGUSR2 so the run saves "
                               "and requeues; slurmctld checks limits every 30 s, so keep it >= 30 plus the time a "
                               "checkpoint takes", min=30)
    max_requeues: int = option(50, "stop requeueing after this many requeues (preemptions and time limits)", min=0)


# ----------------------------------------------------------------------------------------------
# sbatch parameters


def parse_time(text: str) -> int:
    """A time limit in sbatch's formats -> whole minutes, rounded up: '90' (minutes), 'MM:SS', 'HH:MM:SS',
    'D-HH', 'D-HH:MM', 'D-HH:MM:SS'."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise UsageError(f"--time {text!r}: expected minutes, or [D-]HH:MM:SS as sbatch takes it, e.g. 90 or 1:30:00")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:
        seconds = a * 60 if b is None else a * 60 + b if c is None else (a * 60 + b) * 60 + c
    else:
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    return max(1, -(-seconds // 60))


def parse_sbatch_flags(flags: list[str]) -> dict[str, Any]:
    """['mem=64G', 'exclusive', '--mail-type=END'] -> {'mem': '64G', 'exclusive': True, 'mail-type': 'END'}."""
    out: dict[str, Any] = {}
    for flag in flags:
        key, sep, value = flag.lstrip("-").partition("=")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise UsageError(f"--sbatch {flag!r}: expected KEY=VALUE or KEY, e.g. --sbatch mem=64G")
        out[key.replace("_", "-")] = value if sep else True
    return out


def tasks_per_node(opts: SlurmOptions) -> int:
    return opts.tasks_per_node or opts.gpus_per_node or 1


def sbatch_parameters(opts: SlurmOptions, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its own names) for these options."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": tasks_per_node(opts),
        "time": parse_time(opts.time),
        "signal_delay_s": opts.signal_delay,
        "additional_parameters": {"requeue": True, **parse_sbatch_flags(opts.sbatch)},
    }
    for key, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                       ("constraint", opts.constraint)):
        if value:
            params[key] = value
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    return params


def make_executor(folder: str | Path, params: dict[str, Any]):
    """The submitit AutoExecutor for SLURM with these parameters (needs the SLURM client tools)."""
    import shutil

    import submitit

    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UsageError("no SLURM client tools (sbatch, srun) on PATH: run on a login node, start the dev cluster "
                         "(sudo slurm/dev-cluster.sh), or use --dry-run")
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    try:
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    except (ValueError, NameError) as e:
        raise UsageError(f"sbatch parameters rejected by submitit: {e}") from None
    return executor


def sbatch_script(folder: str | Path, params: dict[str, Any], array: int = 1) -> str:
    """The sbatch script submitit would write for these parameters (a job array of `array` tasks when
    more than 1), made by submitit itself; works without SLURM on the machine (for --dry-run)."""
    from submitit.slurm.slurm import SlurmExecutor

    class ScriptOnlyExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # SlurmExecutor refuses to exist without srun; this one only writes text
            return 2

    executor = ScriptOnlyExecutor(folder=str(folder))
    try:
        executor.update_parameters(**params)
    except (ValueError, NameError) as e:
        raise UsageError(f"sbatch parameters rejected by submitit: {e}") from None
    if array > 1:
        executor.parameters["map_count"] = array  # what submitit's own array submission sets
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ----------------------------------------------------------------------------------------------
# inside a job: SLURM -> torch.distributed


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def node_address(hostname: str) -> str:
    """An address other nodes can reach `hostname` at: the name itself when it resolves, otherwise the
    NodeAddr that SLURM uses for it (`scontrol show node`), e.g. logical nodes of a one-host cluster."""
    with contextlib.suppress(OSError):
        socket.getaddrinfo(hostname, None)
        return hostname
    out = subprocess.run(["scontrol", "show", "node", hostname, "--oneliner"], capture_output=True, text=True,
                         timeout=60)
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"cannot find an address for node {hostname}: it does not resolve and "
                           f"`scontrol show node {hostname}` says: {(out.stderr or out.stdout).strip()}")
    return m.group(1)


def distributed_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's env:// variables for this SLURM task (what torchrun / accelerate launch set)."""
    from submitit.slurm.slurm import _parse_node_list

    env = os.environ if environ is None else environ
    try:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        node, local_rank = int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"])
        job_id = int(env["SLURM_JOB_ID"])
        hosts = _parse_node_list(env["SLURM_JOB_NODELIST"])
    except KeyError as e:
        raise RuntimeError(f"not inside a SLURM task: {e.args[0]} is not set") from None
    per_node = expand_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", str(world)))
    local_world = per_node[node] if node < len(per_node) else world // max(1, len(hosts))
    return {
        "MASTER_ADDR": node_address(hosts[0]),  # rank 0 runs on the first node (block distribution)
        "MASTER_PORT": str(MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN),
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
        "GROUP_RANK": str(node),  # torchrun's name for the node index
    }


class EarlySignals:
    """Stop signals that arrive before the work loop (training or generation) listens, during start-up or
    while a checkpoint is restored, are held, then sent again to this process once the loop has installed
    its own handlers (StopRequest); signals after the loop has returned are ignored. submitit's handler,
    which would requeue from global rank 0 alone, is kept out of the way for the whole task."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}
        self._done = threading.Event()

    def __enter__(self) -> EarlySignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._hold)
        threading.Thread(target=self._forward, name="early-signals", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _hold(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            self.pending = signum

    def _forward(self) -> None:
        while not self._done.wait(0.1):
            sig = self.pending
            if sig is not None and signal.getsignal(sig) != self._hold:
                log.warning("passing %s, received during start-up, to the training loop", signal.Signals(sig).name)
                self.pending = None
                os.kill(os.getpid(), sig)
                return


# ----------------------------------------------------------------------------------------------
# the run's record: runs/<name>/slurm.json


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GensynthError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def update_record(run_dir: str | Path):
    """Read-modify-write slurm.json under a lock (the submitter and a job's rank 0 may both write)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f".{RECORD}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_record(run_dir) or {"jobs": [], "requeues": 0, "state": "new"}
        yield record
        tmp = run_dir / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(run_dir / RECORD)


def job_entry(record: dict[str, Any], job_id: str) -> dict[str, Any]:
    for job in record["jobs"]:
        if job["job_id"] == job_id:
            return job
    job = {"job_id": job_id, "starts": [], "stops": [], "requeues": 0}
    record["jobs"].append(job)
    return job


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def latest_checkpoint_name(run_dir: Path) -> str | None:
    from gensynth.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    return f"checkpoints/{path.name}" if path else None


def checkpoint_step(run_dir: Path) -> int:
    from gensynth.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints")
    return json.loads((path / "trainer.json").read_text())["step"] if path else 0


# ----------------------------------------------------------------------------------------------
# the submitted callable


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, RunTime, TimeLimit, Restarts, ...); empty when it fails."""
    out = subprocess.run(["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def duration_s(text: str | None) -> int | None:
    """SLURM's [D-][HH:]MM:SS -> seconds; None for UNLIMITED or anything else."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text or "")
    if not m:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


class TrainTask:
    """What every SLURM task of a training job runs (pickled by submitit; rerun as is after a requeue)."""

    def __init__(self, config: dict[str, Any], signal_delay: int, max_requeues: int):
        self.config = config  # the resolved config, validated at submission
        self.signal_delay = signal_delay
        self.max_requeues = max_requeues

    def __call__(self) -> dict[str, Any]:
        with EarlySignals():  # first thing: SLURM may signal a job that has only just started
            return self.run()

    def run(self) -> dict[str, Any]:
        dist = distributed_env()
        if int(dist["WORLD_SIZE"]) > 1:  # one process: no process group, as `accelerate launch` does it
            os.environ.update(dist)
        # torchrun's default; set before torch starts its thread pool (train.threads overrides it)
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        job_id = os.environ["SLURM_JOB_ID"]
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        rank = int(dist["RANK"])
        cfg: Config = config_from_dict(self.config)
        if restart:
            cfg.train.resume = "auto"  # a requeued job continues, whatever the first start asked for
        run_dir = Path(cfg.run.root) / cfg.run.name
        if rank == 0:
            with update_record(run_dir) as record:
                job = job_entry(record, job_id)
                job["starts"].append({"time": now(), "restart": restart, "hosts": os.environ["SLURM_JOB_NODELIST"],
                                      "master": f"{dist['MASTER_ADDR']}:{dist['MASTER_PORT']}",
                                      "world_size": int(dist["WORLD_SIZE"]),
                                      "resume_from": latest_checkpoint_name(run_dir)
                                      if cfg.train.resume == "auto" else cfg.train.resume})
                job["state"] = record["state"] = "running"
        try:
            from gensynth.train.loop import train

            code = train(cfg)
        except BaseException as e:
            if rank == 0:
                with update_record(run_dir) as record:
                    job_entry(record, job_id)["state"] = record["state"] = "failed"
                    record["error"] = f"{type(e).__name__}: {e}"[:1000]
            raise
        accel = accelerator_summary()
        if code == REQUEUE_EXIT_CODE:
            if rank == 0:
                self.requeue(run_dir, job_id)
            # no result: the job is requeued (rank 0 saw to it) and the submitter keeps waiting
            log.warning("rank %d: checkpoint saved, exiting for the requeue", rank)
            sys.exit(REQUEUE_EXIT_CODE)
        if code != 0:
            raise JobFailed(f"training exited with code {code}")
        step = checkpoint_step(run_dir)
        if rank == 0:
            with update_record(run_dir) as record:
                job_entry(record, job_id)["state"] = record["state"] = "completed"
                record.update(step=step, last_checkpoint=latest_checkpoint_name(run_dir), error=None,
                              export="export" if (run_dir / "export").is_dir() else None)
        return {"rank": rank, "job_id": job_id, "restart": restart, "step": step, "run_dir": str(run_dir),
                "env": dist, "accelerator": accel}

    def requeue(self, run_dir: Path, job_id: str) -> None:
        """Rank 0, after every rank saved: record the stop, then `scontrol requeue` unless over the limit."""
        info = job_info(job_id)
        ran, limit = duration_s(info.get("RunTime")), duration_s(info.get("TimeLimit"))
        # SLURM may send the time-limit signal up to 60 s before `signal_delay` (sbatch --signal); what
        # arrives earlier than that is a preemption (or a manual `scancel --signal`)
        timed_out = ran is not None and limit is not None and ran >= limit - self.signal_delay - 65
        # a job SLURM is already ending (a plain scancel: COMPLETING or CANCELLED) stops here, not requeued;
        # `scontrol requeue` would accept it and bring it back
        state = info.get("JobState", "RUNNING")
        cancelled = state != "RUNNING"
        reason = ("cancelled" if state in ("COMPLETING", "CANCELLED") else state.lower()) if cancelled else \
            "time limit" if timed_out else "preempted"
        step = checkpoint_step(run_dir)
        error = None
        with update_record(run_dir) as record:
            job = job_entry(record, job_id)
            stop = {"time": now(), "reason": reason, "step": step, "checkpoint": latest_checkpoint_name(run_dir),
                    "requeued": False}
            job["stops"].append(stop)
            record.update(step=step, last_checkpoint=stop["checkpoint"])
            if cancelled:
                error = f"{reason} (job state {state}) at step {step}, after saving {stop['checkpoint']}; not requeued"
            elif job["requeues"] >= self.max_requeues:  # per job: a new submission starts afresh
                error = (f"stopped ({reason}) at step {step} after {job['requeues']} requeues "
                         f"(--max-requeues {self.max_requeues}); submit again to continue")
            else:
                out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
                if out.returncode != 0:  # e.g. the job was cancelled: then stopping is what was asked
                    error = (f"stopped ({reason}) at step {step}; scontrol requeue refused: "
                             f"{(out.stderr or out.stdout).strip()}")
            if error:
                job["state"] = record["state"] = "stopped"
                record["error"] = error
            else:
                stop["requeued"] = True
                record["requeues"] += 1
                job["requeues"] += 1
                job["state"] = record["state"] = "requeued"
        if error:
            raise JobFailed(error)
        log.warning("job %s requeued (%s) at step %d; it resumes from %s", job_id, reason, step, stop["checkpoint"])


def accelerator_summary() -> dict[str, Any]:
    """The Accelerate state the loop ran with (to check it matches an `accelerate launch`)."""
    from accelerate.state import PartialState

    state = PartialState()
    return {"distributed_type": str(state.distributed_type).split(".")[-1], "backend": state.backend,
            "num_processes": state.num_processes, "process_index": state.process_index,
            "local_process_index": state.local_process_index, "device": str(state.device)}


# ----------------------------------------------------------------------------------------------
# submitting


@dataclass
class Submission:
    """A submitted (or, with dry_run, described) job."""

    run_dir: Path
    params: dict[str, Any]
    folder: str
    command: str
    script: str
    job: Any = None  # submitit.Job once submitted

    @property
    def job_id(self) -> str | None:
        return self.job.job_id if self.job is not None else None

    def describe(self) -> list[str]:
        nodes, per_node = self.params["nodes"], self.params["ntasks_per_node"]
        gpus = self.params.get("gpus_per_node")
        lines = [f"run          {self.run_dir}",
                 f"processes    {nodes} node{'s' * (nodes > 1)} x {per_node} task{'s' * (per_node > 1)} = "
                 f"{nodes * per_node}" + (f", {gpus} GPUs per node" if gpus else ", CPU"),
                 f"each task    {self.command}",
                 f"requeue      on SIGTERM or SIGUSR2 ({self.params['signal_delay_s']} s before the "
                 f"{self.params['time']} min limit): every rank checkpoints, rank 0 requeues, the job resumes",
                 f"log folder   {self.folder}"]
        if self.job_id:
            lines.insert(0, f"job          {self.job_id} submitted")
        return lines


def prepare_train(config: str, overrides: list[str] | tuple[str, ...],
                  opts: SlurmOptions) -> tuple[TrainTask, Submission]:
    """Resolve the config (a bad key fails here, not in the queue) and the job's parameters."""
    check_options(opts)
    cfg: Config = load_run_config(config, overrides)
    run_dir = Path(cfg.run.root) / cfg.run.name
    folder = opts.log_folder or str(run_dir / "slurm" / "%j")
    params = sbatch_parameters(opts, opts.job_name or f"gensynth-{cfg.run.name}")
    task = TrainTask(to_dict(cfg), signal_delay=opts.signal_delay, max_requeues=opts.max_requeues)
    command = " ".join(["gensynth train", config, *overrides]) + "  (in each task, through submitit)"
    script = sbatch_script(folder, params)
    return task, Submission(run_dir, params, folder, command, script)


def submit_train(config: str, overrides: list[str] | tuple[str, ...], opts: SlurmOptions,
                 dry_run: bool = False) -> Submission:
    task, sub = prepare_train(config, overrides, opts)
    if dry_run:
        return sub
    executor = make_executor(sub.folder, sub.params)
    sub.job = executor.submit(task)
    with update_record(sub.run_dir) as record:
        job = job_entry(record, sub.job.job_id)
        job.update(submitted=now(), log_folder=str(sub.job.paths.folder), nodes=sub.params["nodes"],
                   tasks_per_node=sub.params["ntasks_per_node"], partition=sub.params.get("partition"),
                   time_min=sub.params["time"], config=config, overrides=list(overrides), state="submitted")
        record["state"] = "submitted"
    log.info("submitted job %s: %s", sub.job.job_id, sub.run_dir)
    return sub


def wait(sub: Submission, poll_s: float = 5.0, timeout_s: float | None = None) -> list[dict[str, Any]]:
    """Block until the job is done (through requeues), logging its state changes; every task's result."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    job = sub.job
    shown: tuple = ()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        job.watcher.update()
        state = job.watcher.get_state(job.job_id, mode="cache")
        record = read_record(sub.run_dir) or {}
        seen = (state, record.get("requeues"), record.get("state"))
        if seen != shown:
            shown = seen
            log.info("job %s: %s, run %s, %s requeue(s), step %s", job.job_id, state, record.get("state", "?"),
                     record.get("requeues", 0), record.get("step", "?"))
        if job.done():
            break
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(f"job {job.job_id} still {state} after {timeout_s:.0f} s (logs: {job.paths.folder})")
        time.sleep(poll_s)
    try:
        return job.results()
    except (FailedJobError, UncompletedJobError) as e:
        record = read_record(sub.run_dir) or {}
        reason = record.get("error") or last_error_line(str(e))
        raise JobFailed(f"job {job.job_id} ended {job.state}: {reason} (logs: {job.paths.folder})") from None


def last_error_line(text: str) -> str:
    """The 'SomeError: message' line of a traceback that submitit wraps in its own message."""
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if re.match(r"^(\[rank\d+\]: )?[\w.]+(Error|Exception|Failed)\b.*:", line)]
    return errors[-1] if errors else next((line for line in reversed(lines) if line), "no message")


def result_lines(sub: Submission, results: list[dict[str, Any]]) -> list[str]:
    record = read_record(sub.run_dir) or {}
    first = results[0]
    return [f"job {sub.job_id} done: step {first['step']}, {record.get('requeues', 0)} requeue(s), "
            f"{first['accelerator']['num_processes']} processes ({first['accelerator']['distributed_type']}, "
            f"{first['accelerator']['backend']})",
            f"run {sub.run_dir}: last checkpoint {record.get('last_checkpoint')}, export {record.get('export')}"]


# ----------------------------------------------------------------------------------------------
# generation as a job array


def requeue_self(job_id: str, max_requeues: int) -> None:
    """Requeue this job (or array element) after a graceful stop, up to `max_requeues` times; not when
    SLURM is already ending it (a plain scancel)."""
    state = job_info(job_id).get("JobState", "RUNNING")
    if state != "RUNNING":
        raise JobFailed(f"stopped (job state {state}); not requeued")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise JobFailed(f"stopped after {restarts} requeues (--max-requeues {max_requeues}); submit again to finish")
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise JobFailed(f"stopped; scontrol requeue {job_id} refused: {(out.stderr or out.stdout).strip()}")
    log.warning("job %s requeued; it continues with the shards still missing", job_id)


class GenerateTask:
    """What array task i of a generation job runs: its shards (k % tasks == i), no manifest. Several SLURM
    tasks per array task split that share again (torch.distributed environment, as for training)."""

    def __init__(self, source: str, out: str, tasks: int, kwargs: dict[str, Any], max_requeues: int):
        self.source, self.out, self.tasks, self.kwargs = source, out, tasks, kwargs
        self.max_requeues = max_requeues

    def __call__(self, task: int) -> dict[str, Any]:
        with EarlySignals():
            if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
                os.environ.update(distributed_env())
            from gensynth.generate import GenerationStopped, generate

            try:
                result = generate(self.source, self.out, task=task, tasks=self.tasks, **self.kwargs)
            except GenerationStopped as e:  # the shard in progress was finished; the rest is for the requeue
                log.warning("%s", e)
                if int(os.environ.get("SLURM_PROCID", "0")) == 0:
                    job = os.environ.get("SLURM_ARRAY_JOB_ID")
                    requeue_self(f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ["SLURM_JOB_ID"],
                                 self.max_requeues)
                sys.exit(REQUEUE_EXIT_CODE)
        return {"task": task, "generated": result.generated, "skipped": result.skipped, "samples": result.samples,
                "seconds": result.seconds}


class FinalizeTask:
    """The step after the array: verify every shard against its receipt and write the manifest."""

    def __init__(self, source: str, out: str, kwargs: dict[str, Any]):
        self.source, self.out, self.kwargs = source, out, kwargs

    def __call__(self) -> list[str]:
        from gensynth.generate import generate, summary

        return summary(generate(self.source, self.out, finalize_only=True, **{**self.kwargs, "device": "cpu"}))


@dataclass
class GenerationSubmission:
    """A generation job array (or, with dry_run, its description) and the finalizing job after it."""

    out: str
    tasks: int
    task_ids: list[int]
    array_params: dict[str, Any]
    finalize_params: dict[str, Any] | None
    folder: str
    script: str
    finalize_script: str | None
    jobs: list[Any] = dataclasses.field(default_factory=list)  # submitit jobs, one per array task
    finalize_job: Any = None

    def describe(self) -> list[str]:
        ids = ",".join(map(str, self.task_ids))
        lines = [f"out          {self.out}",
                 f"array        {len(self.task_ids)} of {self.tasks} tasks (ids {ids}); task i writes the shards "
                 f"k with k % {self.tasks} == i",
                 "finalize     " + ("a job after the array (--dependency=afterany) verifies every shard and writes "
                                    "manifest.json" if self.finalize_params else "task 0 writes manifest.json itself"),
                 f"log folder   {self.folder}"]
        if self.jobs:
            array_id = self.jobs[0].job_id.split("_")[0]
            lines.insert(0, f"jobs         array {array_id}" + (f", finalize {self.finalize_job.job_id}"
                                                                   if self.finalize_job else "") + " submitted")
        return lines


def prepare_generate(source: str, out: str, gen: dict[str, Any], tasks: int, task_ids: list[int] | None,
                     opts: SlurmOptions) -> tuple[GenerateTask, FinalizeTask | None, GenerationSubmission]:
    """Check the generation arguments here (a bad one fails now, not in the queue), then build the job."""
    from gensynth.families import load_sampler
    from gensynth.generate import build_job

    check_options(opts)
    if tasks < 1:
        raise UsageError(f"--array {tasks}: need at least 1 task")
    ids = sorted(set(task_ids)) if task_ids else list(range(tasks))
    if any(not 0 <= i < tasks for i in ids):
        raise UsageError(f"--task-ids {','.join(map(str, task_ids or []))}: each must be in 0..{tasks - 1} "
                         f"(--array {tasks})")
    sampler = load_sampler(source, device="cpu")
    job = build_job(sampler, source, gen.get("num"), gen.get("per_class"), gen.get("seed", 0),
                    gen.get("shard_size", 5000), gen.get("encoding", "png"), gen.get("options") or {})
    if tasks > job.num_shards:
        raise UsageError(f"--array {tasks}: the job has only {job.num_shards} shards; use at most that many tasks")
    folder = opts.log_folder or str(Path("slurm-logs") / "%j")
    array_params = sbatch_parameters(opts, opts.job_name or "gensynth-generate")
    task = GenerateTask(source, out, tasks, gen, opts.max_requeues)
    final = None
    finalize_params = None
    if tasks > 1:
        final = FinalizeTask(source, out, gen)
        finalize_params = {**sbatch_parameters(dataclasses.replace(opts, nodes=1, tasks_per_node=1, gpus_per_node=0),
                                               opts.job_name or "gensynth-finalize"),
                           "dependency": "afterany:ARRAY_JOB_ID"}
    sub = GenerationSubmission(out, tasks, ids, array_params, finalize_params, folder,
                               script=sbatch_script(folder, array_params, array=len(ids)),
                               finalize_script=sbatch_script(folder, finalize_params) if finalize_params else None)
    return task, final, sub


def submit_generate(source: str, out: str, gen: dict[str, Any], tasks: int, task_ids: list[int] | None,
                    opts: SlurmOptions, dry_run: bool = False) -> GenerationSubmission:
    """Submit array tasks (all, or only `task_ids`: a failed task is resubmitted alone) and, for more
    than one task, the finalizing job that runs when they have all ended."""
    task, final, sub = prepare_generate(source, out, gen, tasks, task_ids, opts)
    if dry_run:
        return sub
    executor = make_executor(sub.folder, sub.array_params)
    with executor.batch():
        jobs = [executor.submit(task, i) for i in sub.task_ids]
    sub.jobs = jobs
    if final is not None:
        array_id = jobs[0].job_id.split("_")[0]
        sub.finalize_params["dependency"] = f"afterany:{array_id}"
        sub.finalize_job = make_executor(sub.folder, sub.finalize_params).submit(final)
    log.info("submitted array %s of %d task(s)%s", jobs[0].job_id.split("_")[0], len(jobs),
             f", finalize job {sub.finalize_job.job_id}" if sub.finalize_job else "")
    return sub


def wait_generation(sub: GenerationSubmission, poll_s: float = 5.0, timeout_s: float | None = None) -> list[str]:
    """Block until the array and the finalizing job are done; the summary lines (or JobFailed naming the
    tasks to resubmit)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    everything = [*sub.jobs, *([sub.finalize_job] if sub.finalize_job else [])]
    watcher = everything[0].watcher
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        watcher.update()
        if all(job.done() for job in everything):
            break
        if deadline is not None and time.monotonic() > deadline:
            raise JobFailed(f"generation jobs still running after {timeout_s:.0f} s (logs: {sub.folder})")
        time.sleep(poll_s)
    failed = []
    results = []
    for task_id, job in zip(sub.task_ids, sub.jobs):
        try:
            results.append(job.result())
        except (FailedJobError, UncompletedJobError) as e:
            failed.append(f"task {task_id} (job {job.job_id}, {job.state}): {last_error_line(str(e))}")
    if failed:
        ids = ",".join(str(t) for t, j in zip(sub.task_ids, sub.jobs) if j.state != "COMPLETED")
        raise JobFailed("; ".join(failed) + f". Resubmit them alone with the same arguments and --task-ids {ids}")
    lines = [f"task {r['task']}: {r['generated']} shards generated, {r['skipped']} already there"
             for r in results]
    if sub.finalize_job is None:
        return lines
    try:
        return lines + sub.finalize_job.result()
    except (FailedJobError, UncompletedJobError) as e:
        raise JobFailed(f"finalize job {sub.finalize_job.job_id} ({sub.finalize_job.state}): "
                        f"{last_error_line(str(e))}") from None


def check_options(opts: SlurmOptions) -> None:
    """The minimums declared on SlurmOptions (argparse only checks types)."""
    for f in dataclasses.fields(SlurmOptions):
        low = f.metadata.get("min")
        value = getattr(opts, f.name)
        if low is not None and value < low:
            raise UsageError(f"--{f.name.replace('_', '-')} {value}: must be >= {low}")


def options_from(values: dict[str, Any]) -> SlurmOptions:
    """SlurmOptions from parsed arguments (unknown keys ignored, None means default)."""
    names = {f.name for f in dataclasses.fields(SlurmOptions)}
    return SlurmOptions(**{k: v for k, v in values.items() if k in names and v is not None})
