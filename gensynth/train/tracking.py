"""What a run reports: TensorBoard scalars and image grids under runs/<name>/tb/, PNG grids under
samples/ (gensynth/runtime/layout.py), a progress bar on a terminal, plain log lines in batch jobs. Only the
main process writes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from gensynth.data.codec import encode_png
from gensynth.progress import interactive
from gensynth.runtime.layout import RunLayout

log = logging.getLogger("gensynth")

class Tracker:
    def __init__(self, run: RunLayout, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.run = run
        self.writer = None
        self.bar = None
        self.started = time.monotonic()
        self.start_step = start_step
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.tb))
        run.samples.mkdir(parents=True, exist_ok=True)
        if interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run.root.name, unit="step",
                            dynamic_ncols=True)
        self.total = total_steps

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in values.items() if k.startswith("loss/")})
        else:
            rate = (step - self.start_step) / max(time.monotonic() - self.started, 1e-9)
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("step %d/%d (%.2f steps/s) %s", step, self.total, rate, shown)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def grid(self, step: int, tag: str, grid: np.ndarray) -> Path | None:
        """Log an image grid to TensorBoard and save it as samples/<tag>-step-<8 digits>.png."""
        if not self.enabled:
            return None
        self.writer.add_image(tag, grid, step, dataformats="HWC")
        path = self.run.grid(tag, step)
        path.write_bytes(encode_png(grid))
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
