"""Exports: what generation and other teams load. `model.safetensors` (weights only) + `config.json`
(architecture, label set, image format, training step, data manifest sha256, and the sha256 of the
weights file). The weights file records the config too, so that sha256 covers every byte of the export:
a tampered, swapped or edited file is refused. Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from gensynth import __version__, storage
from gensynth.errors import UsageError
from gensynth.runtime.layout import RunLayout

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "gensynth-export/1"


class ExportError(UsageError):
    """An export that is missing, not safetensors, or does not match its config."""


def _config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=1, sort_keys=True) + "\n").encode()


def save_export(folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Write weights then config (both atomically); returns the config as written.

    The config also goes into the weights file's safetensors metadata, so `weights_sha256` (the export's
    identity, recorded in every synthetic set's provenance) covers every byte of the export: an edited
    config.json no longer matches the config inside the weights and is refused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = json.dumps({"format": FORMAT, **config, "gensynth_version": __version__}, sort_keys=True)
    tmp = folder / f".{WEIGHTS}{storage.TMP_MARK}write"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT, "config": recorded})
    data = tmp.read_bytes()
    tmp.replace(folder / WEIGHTS)
    full = {**json.loads(recorded), "weights_sha256": hashlib.sha256(data).hexdigest()}
    storage.write_bytes(str(folder / CONFIG), _config_bytes(full))
    return full


def export_folder(path: str | Path) -> Path:
    """A run directory or an export directory -> the export directory."""
    path, run = Path(path), RunLayout(path)
    if (run.export / CONFIG).is_file():
        return run.export
    if (path / CONFIG).is_file():
        return path
    raise ExportError(f"no export at {path}: expected {run.export / CONFIG} (a run directory) "
                      f"or {path}/{CONFIG} (an export directory)")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{folder / CONFIG}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ExportError(f"{folder / CONFIG}: format {found!r}, expected {FORMAT!r}")
    return config


def _embedded_config(weights: Path, data: bytes) -> dict[str, Any]:
    """The config a weights file records in its safetensors header (8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < size <= len(data) - 8:
            raise ValueError(f"header length {size} for a {len(data)}-byte file")
        header = json.loads(data[8:8 + size])
        text = (header.get("__metadata__") or {}).get("config") if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{weights}: not a safetensors file: {e}") from None
    if not isinstance(text, str):
        raise ExportError(f"{weights}: records no config (written by a gensynth whose export digest did not cover "
                          "config.json); re-export from the run directory")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(f"{weights}: its recorded config is not JSON: {e}") from None


def verify_export(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """(config, weights bytes) once every byte of the export is checked: the weights against the sha256 in
    config.json, and config.json against the config recorded inside the weights."""
    folder = export_folder(path)
    config = _read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{weights} is missing (an export is {WEIGHTS} + {CONFIG})")
    data = weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != config.get("weights_sha256"):
        raise ExportError(f"{weights}: sha256 {digest[:16]}... does not match {CONFIG} "
                          f"({str(config.get('weights_sha256'))[:16]}...): the file was changed or replaced; "
                          "re-export from the run directory")
    expected = {**_embedded_config(weights, data), "weights_sha256": digest}
    if (folder / CONFIG).read_bytes() != _config_bytes(expected):
        edited = sorted(k for k in set(config) | set(expected) if config.get(k) != expected.get(k))
        raise ExportError(f"{folder / CONFIG}: differs from the config recorded in {WEIGHTS} (the export's sha256 "
                          f"covers both){' in ' + ', '.join(edited) if edited else ''}: it was edited; re-export "
                          "from the run directory")
    return expected, data


def read_export_config(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The export's config; checked with `verify_export` unless verify=False (only to describe an export)."""
    return verify_export(path)[0] if verify else _read_config(export_folder(path))


def load_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config), after checking every byte of the export (`verify_export`)."""
    config, data = verify_export(path)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ExportError(f"{export_folder(path) / WEIGHTS}: not a safetensors file: {e}") from None
    return tensors, config


__all__ = ["ExportError", "export_folder", "load_export", "load_file", "read_export_config", "save_export",
           "verify_export"]
