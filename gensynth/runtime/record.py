"""The run's SLURM record, runs/<name>/slurm.json: every job id, each start and stop, the requeues and the
final state. The SLURM jobs write it (gensynth/cluster); `gensynth inspect` reads it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gensynth.errors import GensynthError
from gensynth.runtime.layout import RunLayout


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The record, or None when the run never went through SLURM."""
    path = RunLayout(run_dir).slurm_record
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GensynthError(f"{path}: not valid JSON ({e})") from None


@contextlib.contextmanager
def update_record(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write slurm.json under a lock (the submitter and a job's rank 0 may both write)."""
    path = RunLayout(run_dir).slurm_record
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_record(run_dir) or {"jobs": [], "requeues": 0, "state": "new"}
        yield record
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.rename(path)


def job_entry(record: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The record's entry for one job, added when new."""
    for job in record["jobs"]:
        if job["job_id"] == job_id:
            return job
    job = {"job_id": job_id, "starts": [], "stops": [], "requeues": 0}
    record["jobs"].append(job)
    return job


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
