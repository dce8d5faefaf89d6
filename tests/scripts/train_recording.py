"""Launched by tests/test_elastic.py, under `accelerate launch` or alone: `gensynth train` with each rank also
writing what the loop consumed, and optionally a real stop signal at a known step.

    train_recording.py OUT STOP_AT CONFIG [key=value ...]

Run.note_data (the loop's own record of each batch's keys) is wrapped: every call also appends
{"epoch", "keys"} to OUT/rank<r>-<pid>.jsonl. With STOP_AT > 0 the last rank sends itself SIGUSR1 while
taking its STOP_AT-th batch of this launch, so the run stops and checkpoints through the signal path at
that step, whatever the machine's speed.
"""

import json
import os
import signal
import sys
from pathlib import Path

from gensynth.cli import main
from gensynth.train.loop import Run


def record(out: Path, stop_at: int) -> None:
    original = Run.note_data
    taken = [0]

    def note_data(self: Run, keys: list[str]) -> None:
        original(self, keys)
        with (out / f"rank{self.acc.process_index}-{os.getpid()}.jsonl").open("a") as f:
            f.write(json.dumps({"epoch": self.loader.epoch, "keys": list(keys)}) + "\n")
        taken[0] += 1
        if taken[0] == stop_at and self.acc.process_index == self.acc.num_processes - 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    Run.note_data = note_data


if __name__ == "__main__":
    out, stop_at = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    record(out, stop_at)
    raise SystemExit(main(["train", *sys.argv[3:]]))
