"""Exports: what generation and other teams load. `model.safetensors` (weights only) + `config.json`
(architecture, label set, image format, training step, data manifest sha256, and the sha256 of the
weights file, so a tampered or swapped file is refused). Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gensynth import __version__, storage
from gensynth.errors import UsageError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "gensynth-export/1"


class ExportError(UsageError):
    """An export that is missing, not safetensors, or does not match its config."""


def save_export(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Write weights then config (both atomically); returns the config as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}{storage.TMP_MARK}write"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT})
    data = tmp.read_bytes()
    tmp.replace(folder / WEIGHTS)
    full = {"format": FORMAT, **config, "weights_sha256": hashlib.sha256(data).hexdigest(),
            "gensynth_version": __version__}
    storage.write_bytes(str(folder / CONFIG), (json.dumps(full, indent=1, sort_keys=True) + "\n").encode())
    return full


def export_folder(path: str | Path) -> Path:
    """A run directory or an export directory -> the export directory."""
    path = Path(path)
    if (path / "export" / CONFIG).is_file():
        return path / "export"
    if (path / CONFIG).is_file():
        return path
    raise ExportError(f"no export at {path}: expected {path}/export/{CONFIG} (a run directory) "
                      f"or {path}/{CONFIG} (an export directory)")


def read_export_config(path: str | Path) -> dict[str, Any]:
    folder = export_folder(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{folder / CONFIG}: not valid JSON: {e}") from None
    if config.get("format") != FORMAT:
        raise ExportError(f"{folder / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config), after checking the weights file against the sha256 its config records."""
    folder = export_folder(path)
    config = read_export_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights} is missing (an export is {WEIGHTS} + {CONFIG})")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != config.get("weights_sha256"):
        raise ExportError(f"{weights}: sha256 {digest[:16]}... does not match {CONFIG} "
                          f"({str(config.get('weights_sha256'))[:16]}...): the file was changed or replaced; "
                          "re-export from the run directory")
    try:
        from safetensors.torch import load

        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{weights}: not a safetensors file: {e}") from None
    return tensors, config


__all__ = ["ExportError", "export_folder", "load_export", "load_file", "read_export_config", "save_export"]
