"""Progress for long work: a tqdm bar on an interactive terminal, plain log lines otherwise (batch jobs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("gensynth")


def interactive() -> bool:
    return sys.stderr.isatty()


def rate(per_s: float) -> str:
    """A rate for a progress line: whole numbers from 10 up, two significant digits below (0.091, not 0)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it",
             every_s: float = 10.0) -> Iterator[T]:
    """Yield `items`, showing progress: tqdm on a terminal, else a log line every `every_s` seconds."""
    if interactive():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s: %d%s %s (%s %s/s)", desc, done, of, unit, rate(done / (now - start)), unit)
    elapsed = time.monotonic() - start
    log.info("%s: %d %s in %.1f s", desc, done, unit, elapsed)
