"""What a run reports. The scalars and the resolved config (as hyperparameters) go to Accelerate's trackers
(train.log_with: TensorBoard under runs/<name>/tb/ by default, also with the sample grids; mlflow, wandb, aim,
comet_ml when installed), and, whatever the trackers, to the run folder (gensynth/runtime/layout.py):
metrics.jsonl (one JSON object per logged step), train.log (the main process's log lines) and PNG grids under
samples/. On a terminal a progress bar, in batch jobs plain log lines. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from gensynth.config import Config, to_dict
from gensynth.data.codec import encode_png
from gensynth.errors import ConfigError
from gensynth.progress import interactive
from gensynth.runtime.layout import RunLayout
from gensynth.runtime.ranks import leave_together

log = logging.getLogger("gensynth")

# train.log_with names (Accelerate's) -> the pip package that brings each
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "aim": "aim", "comet_ml": "comet_ml"}
PROJECT = "gensynth"  # the project / experiment name the trackers file runs under; each run is named run.name
LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def installed_trackers() -> list[str]:
    """The train.log_with names whose package is installed here (Accelerate's own test)."""
    from accelerate.tracking import get_available_trackers

    found = {str(t) for t in get_available_trackers()}
    return [name for name in TRACKERS if name in found]


def check_trackers(names: list[str], installed: list[str] | None = None) -> list[str]:
    """train.log_with without repeats; a name that is unknown or not installed is one clear line (Accelerate
    itself would drop it with a debug message, and the run would go on without it)."""
    installed = installed_trackers() if installed is None else installed
    have = ", ".join(installed) or "none"
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
                              f"(installed here: {have})")
        if name not in installed:
            raise ConfigError(f"train.log_with: {name} is not installed (installed here: {have}); "
                              f"pip install {TRACKERS[name]}, or leave {name} out of train.log_with")
    return list(dict.fromkeys(names))


def accelerate_log_with(names: list[str], run: RunLayout) -> list[Any] | None:
    """Accelerator(log_with=...): TensorBoard as Accelerate's own tracker built here, so that it writes to the
    run's tb/ (built by init_trackers it would write to <project_dir>/<project name>). None for no tracker
    (Accelerate warns that none is installed when given an empty list)."""
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker(run.tb.name, str(run.tb.parent)) if name == "tensorboard" else name
            for name in names] or None


def hyperparameters(config: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """The resolved config flat, as trackers take hyperparameters: "section.key" -> a scalar or a string
    (TensorBoard refuses lists and drops None; a list becomes "a,b", None "")."""
    flat: dict[str, str | int | float | bool] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (list, tuple)):
                flat[f"{prefix}{key}"] = ",".join(map(str, value))
            elif value is None:
                flat[f"{prefix}{key}"] = ""
            else:
                flat[f"{prefix}{key}"] = value

    walk(config, "")
    return flat


def announce(acc: Accelerator, mixed_precision: str) -> None:
    """The start lines of the main process: processes, torch.distributed backend, device and the precision it
    trains in, and a launcher setting that the config overrides (Accelerator(mixed_precision=...) wins over
    accelerate launch's)."""
    if not acc.is_main_process:
        return
    from accelerate.state import PartialState

    n = acc.num_processes
    precision = "fp32" if acc.mixed_precision == "no" else acc.mixed_precision
    chosen = f" (train.mixed_precision={mixed_precision})" if mixed_precision == "auto" else ""
    log.info("%d process%s, %s, %s, %s%s", n, "" if n == 1 else "es", PartialState().backend or "no torch.distributed",
             acc.device.type, precision, chosen)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched and launched not in (mixed_precision, acc.mixed_precision):  # auto may resolve to what it says
        # "no" is also what a launcher config says when it leaves precision to the training script
        (log.info if launched == "no" else log.warning)(
            "accelerate launch (ACCELERATE_MIXED_PRECISION) set mixed precision %s, but train.mixed_precision=%s "
            "wins (the gensynth config decides); to train with the launcher's, set train.mixed_precision=%s",
            launched, mixed_precision, launched)


class HeldLines(logging.Handler):
    """Log records kept in memory until the run's checks passed."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """train.log: the main process's log lines, appended across resumes. The lines logged before the run's
    checks passed are held and written only then, so a refused run leaves the file as it was."""

    def __init__(self) -> None:
        self.held: HeldLines | None = HeldLines()
        self.file: logging.FileHandler | None = None
        log.addHandler(self.held)

    def open(self, path: Path | None) -> None:
        """The checks passed: the held lines go to `path` and later ones follow (None: not the main process)."""
        held, self.held = self.held, None
        if held is None:
            return
        log.removeHandler(held)
        if path is not None:
            self.file = logging.FileHandler(path, mode="a", encoding="utf-8")
            self.file.setFormatter(LOG_FORMAT)
            for record in held.records:
                self.file.handle(record)
            log.addHandler(self.file)

    def close(self) -> None:
        for handler in (self.held, self.file):
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
        self.held = self.file = None


def plain(value: Any) -> int | float:
    """A scalar as the trackers take it: they skip what is not an int or a float (a numpy float32, say)."""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return int(value)
    return float(value)


class MetricsFile:
    """metrics.jsonl: {"step": ..., <tag>: <value>, ...} per logged step. A resumed run first drops the lines
    past its checkpoint (logged before a crash or a stop, then done again), so each step appears once."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines() if self.before(line, start_step)]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        self.file = path.open("a", encoding="utf-8")

    @staticmethod
    def before(line: str, step: int) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut by a kill -9
            return False

    def write(self, step: int, values: dict[str, int | float]) -> None:
        # strict JSON has no NaN or Infinity: null stands for them
        record = {k: v if math.isfinite(v) else None for k, v in values.items()}
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()  # whole lines on disk, whatever happens to the process next

    def close(self) -> None:
        self.file.close()


class Tracker:
    """The run's reporting from its first step on (created once every check passed)."""

    def __init__(self, acc: Accelerator, run: RunLayout, cfg: Config, start_step: int):
        self.acc = acc
        self.enabled = acc.is_main_process
        self.run = run
        self.writer = None
        self.bar = None
        self.metrics: MetricsFile | None = None
        self.pending: dict[str, int | float] = {}
        self.start_step = start_step
        self.total = cfg.train.steps
        self.started = time.monotonic()
        if not self.enabled:
            return
        names = cfg.train.log_with
        if "mlflow" in names:
            point_mlflow(run)
        acc.init_trackers(PROJECT, config=hyperparameters(to_dict(cfg)),
                          init_kwargs={"mlflow": {"run_name": cfg.run.name},
                                       "wandb": {"name": cfg.run.name, "dir": str(run.root)}})
        if "tensorboard" in names:
            self.writer = acc.get_tracker("tensorboard", unwrap=True)
        self.metrics = MetricsFile(run.metrics, start_step)
        run.samples.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()  # the steps/s shown leave out the trackers' start (mlflow's: seconds)
        if interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start_step, desc=run.root.name, unit="step", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars of this step: shown now, sent to the trackers and metrics.jsonl together at advance()."""
        if not self.enabled:
            return
        self.pending.update({key: plain(value) for key, value in values.items()})
        if self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in values.items() if k.startswith("loss/")})
        else:
            rate = (step - self.start_step) / max(time.monotonic() - self.started, 1e-9)
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("step %d/%d (%.2f steps/s) %s", step, self.total, rate, shown)

    def advance(self, step: int) -> None:
        """The step is done: its scalars (if any) to every tracker and to metrics.jsonl as one record."""
        if self.bar is not None:
            self.bar.update(1)
        if self.pending:
            self.acc.log(self.pending, step=step)
            self.metrics.write(step, self.pending)
            self.pending = {}

    def grid(self, step: int, tag: str, grid: np.ndarray) -> Path | None:
        """Log an image grid to TensorBoard and save it as samples/<tag>-step-<8 digits>.png."""
        if not self.enabled:
            return None
        if self.writer is not None:
            self.writer.add_image(tag, grid, step, dataformats="HWC")
        path = self.run.grid(tag, step)
        path.write_bytes(encode_png(grid))
        return path

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, together: bool) -> None:
        """together: every rank ended the loop at once (done, or stopped by a signal): the trackers are
        finished and the ranks take the process group down together. After an error only the trackers are
        finished: another rank may still wait inside a collective."""
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        for tracker in self.acc.trackers:
            tracker.finish()
        if together:
            leave_together()


def point_mlflow(run: RunLayout) -> None:
    """MLflow without a server: MLFLOW_TRACKING_URI when set, else a file store in the run folder."""
    # set before mlflow is imported: its telemetry would fetch a config and post usage at import
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store unless asked
    import mlflow

    mlflow.set_tracking_uri(run.mlruns.resolve().as_uri())
