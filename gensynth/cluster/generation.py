"""Generation as a SLURM job array: array task i writes the shards k with k % tasks == i (GenerateTask),
a job after the array (afterany) verifies every shard and writes the manifest (FinalizeTask); a stopped
task requeues itself; `--task-ids` resubmits single tasks."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gensynth.cluster.environment import EarlySignals, distributed_env
from gensynth.cluster.jobs import JobFailed, job_info, last_error_line, requeue
from gensynth.cluster.options import SlurmOptions, check_options, make_executor, sbatch_parameters, sbatch_script
from gensynth.errors import UsageError
from gensynth.runtime.signals import REQUEUE_EXIT_CODE

if TYPE_CHECKING:  # the generate package imports torch: loaded only when a job runs
    from gensynth.generate.options import GenerateOptions

log = logging.getLogger("gensynth")


def requeue_self(job_id: str, max_requeues: int) -> None:
    """Requeue this job (or array element) after a graceful stop, up to `max_requeues` times; not when
    SLURM is already ending it (a plain scancel)."""
    state = job_info(job_id).get("JobState", "RUNNING")
    if state != "RUNNING":
        raise JobFailed(f"stopped (job state {state}); not requeued")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise JobFailed(f"stopped after {restarts} requeues (--max-requeues {max_requeues}); submit again to finish")
    refused = requeue(job_id)
    if refused:
        raise JobFailed(f"stopped; scontrol requeue {job_id} refused: {refused}")
    log.warning("job %s requeued; it continues with the shards still missing", job_id)


class GenerateTask:
    """What array task i of a generation job runs: its shards (k % tasks == i), no manifest. Several SLURM
    tasks per array task split that share again (torch.distributed environment, as for training)."""

    def __init__(self, source: str, out: str, tasks: int, gen: GenerateOptions, max_requeues: int):
        self.source, self.out, self.tasks, self.gen = source, out, tasks, gen
        self.max_requeues = max_requeues

    def __call__(self, task: int) -> dict[str, Any]:
        with EarlySignals():
            if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
                os.environ.update(distributed_env())
            from gensynth.generate.job import GenerationStopped, generate

            try:
                result = generate(self.source, self.out, self.gen, task=task, tasks=self.tasks)
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

    def __init__(self, source: str, out: str, gen: GenerateOptions):
        self.source, self.out, self.gen = source, out, gen

    def __call__(self) -> list[str]:
        from gensynth.generate.job import generate, summary

        return summary(generate(self.source, self.out, self.gen, finalize=True, device="cpu"))


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


def prepare_generate(source: str, out: str, gen: GenerateOptions, tasks: int, task_ids: list[int] | None,
                     opts: SlurmOptions) -> tuple[GenerateTask, FinalizeTask | None, GenerationSubmission]:
    """Check the generation arguments here (a bad one fails now, not in the queue), then build the job."""
    from gensynth.families import load_sampler
    from gensynth.generate.plan import build_job

    check_options(opts)
    if tasks < 1:
        raise UsageError(f"--array {tasks}: need at least 1 task")
    ids = sorted(set(task_ids)) if task_ids else list(range(tasks))
    if any(not 0 <= i < tasks for i in ids):
        raise UsageError(f"--task-ids {','.join(map(str, task_ids or []))}: each must be in 0..{tasks - 1} "
                         f"(--array {tasks})")
    sampler = load_sampler(source, device="cpu")
    job = build_job(sampler, source, gen)
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


def submit_generate(source: str, out: str, gen: GenerateOptions, tasks: int, task_ids: list[int] | None,
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
