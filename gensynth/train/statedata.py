"""Training state as data: a nested state dict (model, optimizer, EMA, scaler, RNG) becomes a JSON tree
plus a flat dict of tensors for safetensors, and back. Nothing here can run code when it is read, unlike
the pickles `torch.save` / Accelerate's `save_state` write (a planted pickle runs on load).

Encoding of the JSON tree: tensors -> {"__tensor__": key}; numpy arrays -> {"__ndarray__": values, "dtype"};
tuples -> {"__tuple__": [...]}; a dict whose keys are not all strings (an optimizer's `state` is keyed by
parameter index) -> {"__items__": [[key, value], ...]}, so key types survive the round trip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MARKS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")
SCALARS = (bool, int, float, str, type(None))


class StateFormatError(ValueError):
    """A state tree that does not decode (wrong marks, unknown tensor keys): the file was not written by us."""


def encode(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-safe tree, tensors). Raises TypeError for a value that is not data (a function, an object)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "value"
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in MARKS for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            if not all(isinstance(k, SCALARS) for k in value):
                raise TypeError(f"state at {path or '/'}: dict keys must be plain values, got "
                                f"{sorted({type(k).__name__ for k in value})}")
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, SCALARS):
            return value
        raise TypeError(f"state at {path or '/'}: a {type(value).__name__} is not data (tensors, numbers, "
                        "strings, lists and dicts only)")

    return walk(tree, ""), tensors


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode`; StateFormatError when the tree names a tensor that is not there."""

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            key = value["__tensor__"]
            if key not in tensors:
                raise StateFormatError(f"names tensor {key!r}, which the tensor file does not hold")
            return tensors[key]
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=np.dtype(str(value.get("dtype"))))
        if "__tuple__" in value:
            return tuple(walk(v) for v in _list(value["__tuple__"]))
        if "__items__" in value:
            items = _list(value["__items__"])
            if not all(isinstance(item, list) and len(item) == 2 for item in items):
                raise StateFormatError("__items__ must be a list of [key, value] pairs")
            return {k: walk(v) for k, v in items}
        return {k: walk(v) for k, v in value.items()}

    try:
        return walk(tree)
    except (TypeError, ValueError) as e:
        if isinstance(e, StateFormatError):
            raise
        raise StateFormatError(str(e)) from None


def _list(value: Any) -> list:
    if not isinstance(value, list):
        raise StateFormatError(f"expected a list, got {type(value).__name__}")
    return value

