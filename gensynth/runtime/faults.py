"""Crash tests: GENSYNTH_FAULT=<point> makes the process SIGKILL itself at that point, exactly as a
`kill -9` arriving at that instant would (no finally blocks, no atexit, no flushing). Unset, it costs
one environment lookup. The points are named where they are placed, e.g. "ingest.swap".
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("GENSYNTH_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
