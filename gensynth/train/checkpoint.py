"""Checkpoints: `runs/<name>/checkpoints/step-<8 digits>/`, full state, complete or absent, data only.

A checkpoint holds safetensors and JSON, nothing that is unpickled on resume (a pickle planted in a run
folder on a shared filesystem would otherwise run on the next `gensynth train`):
- `model_<i>.safetensors`: the weights of every model the family passed to `accelerator.prepare`;
- `optimizer_<i>`, `scheduler_<i>`, `custom_<i>` (objects given to `accelerator.register_for_checkpointing`,
  e.g. the generator EMA): `.json` (the state tree) + `.safetensors` (its tensors, when it has any);
- `scaler.json`: the fp16 GradScaler, when there is one;
- `rank<r>.json` + `rank<r>.safetensors`: that rank's loader position, a digest of the sample keys it
  consumed, its RNG states (Python, NumPy, torch, CUDA) and Accelerate's step counter;
- `config.json` (the run's resolved config, to say which options changed when the shapes do not match),
  `trainer.json` (step, counters) and `COMPLETE`: the sha256 of every file above.

All ranks write into `.step-<n>.tmp-<pid>-<rand>-<host>/` (rank 0's PID and host); after a barrier rank 0
writes `COMPLETE`, renames the folder into place and prunes all but the last K. The next checkpoint removes
such folders of killed runs (their PID is dead on this host). A folder without `COMPLETE` (a crash
mid-write) is never resumed from.
On resume every file is checked against `COMPLETE` and parsed as safetensors or JSON; anything else
(a pickle, an edited file) is refused with one line naming the file. The checkpoint folder must be on
storage every rank sees (a shared filesystem on a cluster). Every rank reads all saved `rank<r>` parts:
a run may resume on another number of processes (the models and optimizers are the same on every
rank; the data loader splits the rest of the epoch over the new ranks, see own_rank_state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file

from gensynth import storage
from gensynth.errors import ConfigError, GensynthError, StorageError
from gensynth.runtime.ranks import all_agree
from gensynth.train.statedata import StateFormatError, decode, encode

log = logging.getLogger("gensynth")
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
RUN_CONFIG = "config.json"
FORMAT = "gensynth-checkpoint/2"
_NAME = re.compile(r"step-(\d{8})")
# what a pickle (protocol 2+) or a torch.save zip starts with; such a file is refused, whatever its name
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")


class CheckpointError(GensynthError):
    """A checkpoint that is damaged, edited, or holds something that is not data (a pickle)."""


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


# -- writing


def _write_part(folder: Path, name: str, tree: Any) -> None:
    """`name.json` (the tree) and, when it holds tensors, `name.safetensors`."""
    data, tensors = encode(tree)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(data))


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shared_parts(accelerator: Accelerator) -> dict[str, Any]:
    """Everything every rank holds alike (DDP keeps the models and optimizers equal): written by rank 0."""
    parts: dict[str, Any] = {}
    for i, opt in enumerate(accelerator._optimizers):
        parts[f"optimizer_{i}"] = opt.state_dict()
    for i, scheduler in enumerate(accelerator._schedulers):
        parts[f"scheduler_{i}"] = scheduler.state_dict()
    for i, obj in enumerate(accelerator._custom_objects):
        parts[f"custom_{i}"] = obj.state_dict()
    if accelerator.scaler is not None:
        parts["scaler"] = accelerator.scaler.state_dict()
    return parts


def _together(accelerator: Accelerator, what: str, work: Callable[[], None], cleanup: Path) -> None:
    """Run `work` on this rank; if it fails to write on any rank (a full disk, say), every rank raises one
    StorageError (no rank is left waiting at a barrier) and rank 0 removes the half-written folder."""
    failure = None
    try:
        work()
    except OSError as e:
        failure = f"{e.filename or cleanup}: {e.strerror or e}"
    except SafetensorError as e:  # safetensors reports its own I/O errors (a full disk) this way
        failure = f"{cleanup}: {str(e).removeprefix('Error while serializing: ')}"
    if all_agree([failure is not None], accelerator.device)[0]:
        if accelerator.is_main_process:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise StorageError(f"cannot write {what}: {failure or 'another process failed to write its part'}; "
                           "earlier checkpoints are untouched (free space, then rerun to resume)")


def _main_owner_tag(accelerator: Accelerator) -> str:
    """Rank 0's storage.owner_tag(), the same string on every rank."""
    tag = [storage.owner_tag() if accelerator.is_main_process else None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(tag, src=0)  # between our own processes, not from disk
    return str(tag[0])


def save_checkpoint(accelerator: Accelerator, folder: str | Path, step: int, trainer_state: dict[str, Any],
                    rank_state: dict[str, Any], keep: int, config: dict[str, Any]) -> Path:
    """Collective: every rank must call it at the same step."""
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    # named with rank 0's PID and host, so a later run can prove a killed run's half-written folder dead
    tmp = folder / f".{checkpoint_name(step)}{storage.TMP_MARK}{_main_owner_tag(accelerator)}"
    what = f"checkpoint {final}"
    rank = accelerator.process_index

    def prepare() -> None:
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            for name in storage.remove_debris(str(folder)):
                log.info("removed %s, left by a killed run", folder / name)
            tmp.mkdir()

    def write() -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(accelerator._models):
                state = accelerator.unwrap_model(model).state_dict()
                save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()},
                          str(tmp / f"model_{i}.safetensors"))
            for name, tree in _shared_parts(accelerator).items():
                _write_part(tmp, name, tree)
            (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=1))
            (tmp / TRAINER_STATE).write_text(json.dumps(
                {**trainer_state, "step": step, "world_size": accelerator.num_processes}, indent=1))
        _write_part(tmp, f"rank{rank}", {**rank_state, "rng": rng_state(), "accelerate_step": accelerator.step})

    def publish() -> None:
        if accelerator.is_main_process:
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / COMPLETE).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
            if final.exists():  # the same step saved again (after a roll-back): replace it
                shutil.rmtree(final)
            tmp.rename(final)

    _together(accelerator, what, prepare, tmp)
    _together(accelerator, what, write, tmp)
    _together(accelerator, what, publish, tmp)
    if accelerator.is_main_process:
        for _, old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


# -- reading: nothing is trusted until it is checked


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _looks_pickled(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return path.suffix in _PICKLE_SUFFIXES or any(head.startswith(m) for m in _PICKLE_MAGIC)


def verify_checkpoint(path: str | Path) -> dict[str, str]:
    """The files of a checkpoint and their sha256, after refusing pickles, edits and missing files.
    Raises CheckpointError with one line naming the file."""
    path = Path(path)
    refused = "refused: a checkpoint holds only safetensors and JSON"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if _looks_pickled(file):
            raise CheckpointError(f"{file}: a pickle, {refused} (it was planted, or written by a gensynth "
                                  "older than data-only checkpoints); not loaded")
    try:
        complete = json.loads((path / COMPLETE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        complete = None
    files = complete.get("files") if isinstance(complete, dict) and complete.get("format") == FORMAT else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointError(f"{path / COMPLETE}: not a {FORMAT} file list ({refused}, with the sha256 of each "
                              "file in COMPLETE); not loaded. Resume from another checkpoint or train.resume=never")
    for name, digest in files.items():
        file = path / name
        if Path(name).name != name or name in (".", "..", COMPLETE):
            raise CheckpointError(f"{path / COMPLETE}: lists {name!r}, which is not a file name of this folder")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete; not loaded")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: sha256 does not match {COMPLETE}: the file was changed after it was "
                                  "written; not loaded")
    return files


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not JSON ({e}); refused") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(file.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{file}: not a safetensors file ({e}); refused") from None


def _read_part(path: Path, name: str, files: dict[str, str]) -> Any:
    if f"{name}.json" not in files:
        raise CheckpointError(f"{path}: has no {name}.json; it was written by another model or setup")
    tensors = _read_tensors(path / f"{name}.safetensors") if f"{name}.safetensors" in files else {}
    try:
        return decode(_read_json(path / f"{name}.json"), tensors)
    except StateFormatError as e:
        raise CheckpointError(f"{path / name}.json: {e}; refused") from None


def read_part(path: str | Path, name: str) -> Any:
    """One state part of a verified checkpoint, e.g. `custom_0` (the GAN's EMA) or `rank0`."""
    return _read_part(Path(path), name, verify_checkpoint(path))


def config_changes(saved: Any, current: dict[str, Any]) -> list[str]:
    """`key=now (checkpoint: then)` for every option that differs, flattened to section.key."""
    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix.rstrip("."): tree}
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    before, now = flat(saved if isinstance(saved, dict) else {}), flat(current)
    return [f"{k}={now.get(k)!r} (checkpoint: {before.get(k)!r})" for k in sorted(set(before) | set(now))
            if before.get(k) != now.get(k)]


def _mismatch(path: Path, what: str, saved_config: Any, config: dict[str, Any]) -> ConfigError:
    changes = [c for c in config_changes(saved_config, config) if not c.startswith(("train.", "eval.", "run."))]
    said = ("options that differ from the checkpoint's config: " + "; ".join(changes)) if changes else \
        "no model option differs, so the training data's classes or image size did"
    return ConfigError(f"{path} does not fit this run's {what}: {said}. Resume with the checkpoint's values, or "
                       "start a new run (another run.name, or train.resume=never)")


def load_checkpoint(accelerator: Accelerator, path: str | Path,
                    config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore models, optimizers, schedulers, registered objects, scaler and this rank's RNG; return
    (trainer state, this rank's own state: loader position etc.). `config` is this run's resolved config."""
    path = Path(path)
    files = verify_checkpoint(path)
    trainer_state = _read_json(path / TRAINER_STATE)
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("step"), int):
        raise CheckpointError(f"{path / TRAINER_STATE}: expected an object with an integer 'step'; refused")
    saved_world = trainer_state.get("world_size")
    if not isinstance(saved_world, int) or saved_world < 1:
        raise CheckpointError(f"{path / TRAINER_STATE}: expected an integer 'world_size'; refused")
    saved_config = _read_json(path / RUN_CONFIG) if RUN_CONFIG in files else {}
    models = [(f"model_{i}", accelerator.unwrap_model(m)) for i, m in enumerate(accelerator._models)]
    shared = _shared_parts(accelerator)  # names only: which parts this run expects
    expected = {f"{n}.safetensors" for n, _ in models} | {f"{n}.json" for n in shared}
    if missing := sorted(expected - set(files)):
        raise _mismatch(path, f"model (it lacks {', '.join(missing)})", saved_config, config)
    for name, model in models:
        tensors = _read_tensors(path / f"{name}.safetensors")
        own = model.state_dict()
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise _mismatch(path, f"model ({name}: other parameter names or shapes)", saved_config, config)
        model.load_state_dict(tensors)
    targets = {**{f"optimizer_{i}": o for i, o in enumerate(accelerator._optimizers)},
               **{f"scheduler_{i}": s for i, s in enumerate(accelerator._schedulers)},
               **{f"custom_{i}": c for i, c in enumerate(accelerator._custom_objects)}}
    if accelerator.scaler is not None:
        targets["scaler"] = accelerator.scaler
    for name, target in targets.items():
        state = _read_part(path, name, files)
        try:
            target.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise _mismatch(path, f"{name} state ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                            saved_config, config) from None
    rank_state = own_rank_state(path, files, saved_world, accelerator.process_index, accelerator.num_processes)
    try:
        if rank_state["rng"] is not None:
            set_rng_state(rank_state["rng"])
        accelerator.step = int(rank_state.pop("accelerate_step"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}/rank{accelerator.process_index}.json: no usable RNG state ({e}); "
                              "refused") from None
    rank_state.pop("rng")
    return trainer_state, rank_state


def own_rank_state(path: Path, files: dict[str, str], saved_world: int, rank: int, world: int) -> dict[str, Any]:
    """This rank's state, with "loader" the list of every saved rank's loader state (the loader picks its own,
    or re-splits the epoch's rest on another world size or worker count). On another world size: the RNG of
    the saved rank of this index (None past the saved ranks: they keep the run's seeding), Accelerate's step
    of rank 0, and a data digest that chains all saved ranks' digests; rank 0 carries the samples seen by all
    saved ranks, so their sum over ranks still counts the whole run."""
    states = [_read_part(path, f"rank{r}", files) for r in range(saved_world)]
    if not all(isinstance(s, dict) and "loader" in s for s in states):
        raise CheckpointError(f"{path}: a rank<r>.json without a loader state; refused")
    loaders = [s["loader"] for s in states]
    if saved_world == world:
        return {**states[rank], "loader": loaders}
    log.info("%s was saved by %d processes, this run has %d: the rest of its epoch is split over this run's "
             "ranks", path, saved_world, world)
    base = states[rank] if rank < saved_world else {**states[0], "rng": None}
    digest = hashlib.sha256("\n".join(["world", str(saved_world)] + [str(s.get("data_digest")) for s in states])
                            .encode()).hexdigest()
    seen = sum(int(s.get("samples_seen", 0)) for s in states) if rank == 0 else 0
    return {**base, "rank": rank, "loader": loaders, "data_digest": digest, "samples_seen": seen,
            "accelerate_step": states[0].get("accelerate_step")}
