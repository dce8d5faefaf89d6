"""Checkpoints: `runs/<name>/checkpoints/step-<8 digits>/`, full state, complete or absent.

All ranks write into `.tmp-step-<n>/` (Accelerate's save_state: models, optimizers, scaler, custom
objects such as the EMA, and each rank's RNG; plus `rank<r>.json`: that rank's loader position and
a digest of the sample keys it has consumed). After a
barrier, rank 0 writes `trainer.json` and the `COMPLETE` marker, renames the folder into place and
prunes all but the last K. A folder without the marker (a crash mid-write) is never resumed from.
The checkpoint folder must be on storage every rank sees (a shared filesystem on a cluster).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

log = logging.getLogger("gensynth")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
_NAME = re.compile(r"step-(\d{8})")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and (path / COMPLETE).is_file() and (path / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = complete_checkpoints(folder)
    return found[-1][1] if found else None


def save_checkpoint(accelerator: Accelerator, folder: str | Path, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank must call it at the same step."""
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    (tmp / f"rank{accelerator.process_index}.json").write_text(json.dumps(rank_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**trainer_state, "step": step, "world_size": accelerator.num_processes}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        (tmp / COMPLETE).write_text("")
        if final.exists():  # the same step saved again (after a roll-back): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore Accelerate's state; return (trainer state, this rank's own state: loader position etc.)."""
    path = Path(path)
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if trainer_state.get("world_size") != accelerator.num_processes:
        from gensynth.errors import UsageError

        raise UsageError(f"{path} was saved by {trainer_state.get('world_size')} processes, this run has "
                         f"{accelerator.num_processes}: resume with the same number of processes "
                         "(or start a new run)")
    accelerator.load_state(str(path))
    rank_state = json.loads((path / f"rank{accelerator.process_index}.json").read_text())
    return trainer_state, rank_state
