"""A training run as one SLURM job: every task runs the training loop (TrainTask), rank 0 requeues it after
a graceful stop, and the run's slurm.json records it all; submit_train / wait / result_lines for the
submitter."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gensynth.cluster.environment import EarlySignals, distributed_env
from gensynth.cluster.jobs import JobFailed, duration_s, job_info, last_error_line, requeue
from gensynth.cluster.options import SlurmOptions, check_options, make_executor, sbatch_parameters, sbatch_script
from gensynth.config import Config, to_dict
from gensynth.families import config_from_dict, load_run_config
from gensynth.runtime.layout import RunLayout
from gensynth.runtime.record import job_entry, now, read_record, update_record
from gensynth.runtime.signals import REQUEUE_EXIT_CODE

log = logging.getLogger("gensynth")


def latest_checkpoint_name(run: RunLayout) -> str | None:
    """The newest complete checkpoint as slurm.json records it (relative to the run directory)."""
    from gensynth.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run.checkpoints)
    return run.relative(path) if path else None


def checkpoint_step(run: RunLayout) -> int:
    from gensynth.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run.checkpoints)
    return json.loads((path / "trainer.json").read_text())["step"] if path else 0


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
        run = RunLayout.of(cfg)
        if rank == 0:
            with update_record(run.root) as record:
                job = job_entry(record, job_id)
                job["starts"].append({"time": now(), "restart": restart, "hosts": os.environ["SLURM_JOB_NODELIST"],
                                      "master": f"{dist['MASTER_ADDR']}:{dist['MASTER_PORT']}",
                                      "world_size": int(dist["WORLD_SIZE"]),
                                      "resume_from": latest_checkpoint_name(run)
                                      if cfg.train.resume == "auto" else cfg.train.resume})
                job["state"] = record["state"] = "running"
        try:
            from gensynth.train.loop import train

            code = train(cfg)
        except BaseException as e:
            if rank == 0:
                with update_record(run.root) as record:
                    job_entry(record, job_id)["state"] = record["state"] = "failed"
                    record["error"] = f"{type(e).__name__}: {e}"[:1000]
            raise
        accel = accelerator_summary()
        if code == REQUEUE_EXIT_CODE:
            if rank == 0:
                self.requeue(run, job_id)
            # no result: the job is requeued (rank 0 saw to it) and the submitter keeps waiting
            log.warning("rank %d: checkpoint saved, exiting for the requeue", rank)
            sys.exit(REQUEUE_EXIT_CODE)
        if code != 0:
            raise JobFailed(f"training exited with code {code}")
        step = checkpoint_step(run)
        if rank == 0:
            with update_record(run.root) as record:
                job_entry(record, job_id)["state"] = record["state"] = "completed"
                record.update(step=step, last_checkpoint=latest_checkpoint_name(run), error=None,
                              export=run.relative(run.export) if run.export.is_dir() else None)
        return {"rank": rank, "job_id": job_id, "restart": restart, "step": step, "run_dir": str(run.root),
                "env": dist, "accelerator": accel}

    def requeue(self, run: RunLayout, job_id: str) -> None:
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
        step = checkpoint_step(run)
        error = None
        with update_record(run.root) as record:
            job = job_entry(record, job_id)
            stop = {"time": now(), "reason": reason, "step": step, "checkpoint": latest_checkpoint_name(run),
                    "requeued": False}
            job["stops"].append(stop)
            record.update(step=step, last_checkpoint=stop["checkpoint"])
            if cancelled:
                error = f"{reason} (job state {state}) at step {step}, after saving {stop['checkpoint']}; not requeued"
            elif job["requeues"] >= self.max_requeues:  # per job: a new submission starts afresh
                error = (f"stopped ({reason}) at step {step} after {job['requeues']} requeues "
                         f"(--max-requeues {self.max_requeues}); submit again to continue")
            else:
                refused = requeue(job_id)
                if refused:  # e.g. the job was cancelled: then stopping is what was asked
                    error = f"stopped ({reason}) at step {step}; scontrol requeue refused: {refused}"
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
    run = RunLayout.of(cfg)
    folder = opts.log_folder or str(run.slurm_logs)
    params = sbatch_parameters(opts, opts.job_name or f"gensynth-{cfg.run.name}")
    task = TrainTask(to_dict(cfg), signal_delay=opts.signal_delay, max_requeues=opts.max_requeues)
    command = " ".join(["gensynth train", config, *overrides]) + "  (in each task, through submitit)"
    script = sbatch_script(folder, params)
    return task, Submission(run.root, params, folder, command, script)


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


def result_lines(sub: Submission, results: list[dict[str, Any]]) -> list[str]:
    record = read_record(sub.run_dir) or {}
    first = results[0]
    return [f"job {sub.job_id} done: step {first['step']}, {record.get('requeues', 0)} requeue(s), "
            f"{first['accelerator']['num_processes']} processes ({first['accelerator']['distributed_type']}, "
            f"{first['accelerator']['backend']})",
            f"run {sub.run_dir}: last checkpoint {record.get('last_checkpoint')}, export {record.get('export')}"]
