"""Where a run keeps its files: runs/<name>/ as training, SLURM, `gensynth inspect` and the demo see it.

    config.yaml                  the resolved config (written once the run's checks passed)
    train.log                    the main process's log lines, appended across resumes
    metrics.jsonl                one JSON object per logged step: {"step": ..., <scalar tag>: <value>, ...}
    checkpoints/step-<8 digits>/ the training state
    tb/                          TensorBoard events (train.log_with); tb/<time>/: each start's hyperparameters
    mlruns/                      MLflow's file store (train.log_with mlflow, MLFLOW_TRACKING_URI unset)
    samples/<tag>-step-<8 digits>.png   image grids
    export/                      the final generator
    best/ + best.json            the best generator so far (eval.best_by)
    slurm.json                   the SLURM jobs' record
    slurm/<job id>/              submitit's scripts and logs
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

GRID_FILE = re.compile(r"(?P<tag>.+)-step-(?P<step>\d{8})\.png")


class RunLayout:
    """The paths of one run directory (nothing is created here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of(cls, cfg: Any) -> RunLayout:
        """The run directory a config names: run.root / run.name."""
        return cls(Path(cfg.run.root) / cfg.run.name)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def best_json(self) -> Path:
        return self.root / "best.json"

    @property
    def slurm_record(self) -> Path:
        return self.root / "slurm.json"

    @property
    def slurm_logs(self) -> Path:
        """submitit's folders, one per job id (as submitit names them, %j)."""
        return self.root / "slurm" / "%j"

    def relative(self, path: Path) -> str:
        """`path` as recorded in the run's own files (best.json, slurm.json): relative to the run directory."""
        return path.relative_to(self.root).as_posix()

    def grid(self, tag: str, step: int) -> Path:
        return self.samples / f"{tag}-step-{step:08d}.png"

    def grids(self, tag: str | None = None) -> list[Path]:
        """The grids saved under samples/ (of one tag, or of every tag), oldest step first."""
        found = [(m, p) for p in self.samples.glob("*-step-*.png") if (m := GRID_FILE.fullmatch(p.name))
                 and (tag is None or m["tag"] == tag)]
        return [p for m, p in sorted(found, key=lambda mp: (int(mp[0]["step"]), mp[1].name))]
