"""What every benchmark prints and saves the same way: the machine it ran on and the result file."""

from __future__ import annotations

import json
import os
import platform
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
