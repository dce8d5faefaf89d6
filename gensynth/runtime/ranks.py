"""This process's rank, and agreement across ranks: one tiny all-reduce, so every rank takes the same branch
(a stop, a roll-back, a failed checkpoint write) and none is left waiting at a collective the others skipped."""

from __future__ import annotations

import os

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size): the process group's when one is running, otherwise RANK and WORLD_SIZE as
    `accelerate launch`, torchrun and the SLURM jobs set them; (0, 1) for a lone process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def all_agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR across ranks (one tiny all-reduce; a no-op in a single process)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def leave_together() -> None:
    """The end of a job's collectives: wait for every rank, then take the process group down.

    Why the wait: a rank that destroys its group and exits while another still holds the connection
    (rank 0 writing the export) now and then aborts at interpreter exit with SIGABRT ("terminate called
    without an active exception"), so a finished job reports a failure; measured in about 1 in 40
    two-rank gloo runs on CPU, and in none of 180 with the barrier first. A no-op in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
