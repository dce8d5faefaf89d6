"""What a job asks SLURM for: SlurmOptions (one `gensynth submit` flag per field), turned into submitit's
sbatch parameters, its executor, or the sbatch script it would submit (--dry-run)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gensynth.config import from_values, option
from gensynth.errors import UsageError


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
    """SLURM tasks (training processes) per node: as asked, else one per GPU, else one."""
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


def make_executor(folder: str | Path, params: dict[str, Any]) -> Any:
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


def check_options(opts: SlurmOptions) -> None:
    """The minimums declared on SlurmOptions (argparse only checks types)."""
    for f in dataclasses.fields(SlurmOptions):
        low = f.metadata.get("min")
        value = getattr(opts, f.name)
        if low is not None and value < low:
            raise UsageError(f"--{f.name.replace('_', '-')} {value}: must be >= {low}")


def options_from(values: dict[str, Any]) -> SlurmOptions:
    """SlurmOptions from parsed arguments (unknown keys ignored, None means default)."""
    return from_values(SlurmOptions, values)
