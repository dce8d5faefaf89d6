"""Stop requests: SIGTERM, SIGUSR1 and SIGUSR2 set a flag; the loop agrees on it across ranks at the
next step, saves a checkpoint on every rank and exits with REQUEUE_EXIT_CODE so a scheduler requeues.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "temporary failure, try again"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Installs handlers on enter, restores the previous ones on exit; `signum` is the first signal seen."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; nothing to install here
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"
