"""A SLURM job from either side: its state (`scontrol show job`), its requeue, and why it failed."""

from __future__ import annotations

import re
import subprocess

from gensynth.errors import GensynthError


class JobFailed(GensynthError):
    """A submitted job ended without a result (failed, cancelled, or stopped without a requeue)."""


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


def requeue(job_id: str) -> str | None:
    """`scontrol requeue JOB_ID`: None when SLURM took it, otherwise what it said when it refused."""
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    return None if out.returncode == 0 else (out.stderr or out.stdout).strip()


def last_error_line(text: str) -> str:
    """The 'SomeError: message' line of a traceback that submitit wraps in its own message."""
    lines = [line.strip() for line in text.splitlines()]
    errors = [line for line in lines if re.match(r"^(\[rank\d+\]: )?[\w.]+(Error|Exception|Failed)\b.*:", line)]
    return errors[-1] if errors else next((line for line in reversed(lines) if line), "no message")
