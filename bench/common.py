"""What every benchmark prints and saves the same way: the machine it ran on and the result file."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """The facts a throughput figure depends on, recorded in every protocol."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def report(result: dict[str, Any], unit: str, rows: list[tuple[str, str]], summary: str,
           json_path: str | None) -> None:
    """Print the protocol, a two-column table (label, value in `unit`) and a summary line; write --json."""
    print(f"protocol: {result['protocol']}")
    width = max(len(label) for label, _ in rows) + 2
    print(f"{'':{width}s}{unit:>12s}")
    for label, value in rows:
        print(f"{label:{width}s}{value:>12s}")
    print(summary)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")


# A pass counts as measured on a quiet machine when the other processes used less than this many cores meanwhile.
QUIET_CORES = 0.1


def _machine_busy_seconds() -> float | None:
    """CPU-seconds every process on the machine has used since boot (/proc/stat); None where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its finished children (DataLoader workers, pool processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Pass:
    """Times one pass: wall seconds, CPU-seconds of this process and its children, and the cores the machine's
    other processes used meanwhile (`foreign_cores`; None where /proc/stat is unreadable)."""

    def __enter__(self) -> Pass:
        self._busy, self._cpu, self._wall = _machine_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = _own_cpu_seconds() - self._cpu
        busy = _machine_busy_seconds()
        self.foreign_cores = (None if busy is None or self._busy is None else
                              max(0.0, (busy - self._busy - self.cpu) / self.wall))

    @property
    def quiet(self) -> bool:
        return self.foreign_cores is None or self.foreign_cores < QUIET_CORES
