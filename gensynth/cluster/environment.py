"""Inside a job: SLURM's environment turned into torch.distributed's (what torchrun / `accelerate launch`
set), and stop signals held until the work loop listens."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from typing import Any

from gensynth.runtime.signals import STOP_SIGNALS

log = logging.getLogger("gensynth")

MASTER_PORT_BASE = 20000  # MASTER_PORT = base + job id % span: the same on every task, rarely shared by two jobs
MASTER_PORT_SPAN = 10000


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
