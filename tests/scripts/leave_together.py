"""Launched by tests/test_multiprocess.py under `accelerate launch`: rank 0 is still busy (as when it writes
the export) while rank 1 has finished; both then call leave_together.

    accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/leave_together.py OUT

Each rank writes OUT/rank<r>.json: when it entered and left leave_together, and whether its group was down.
"""

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from gensynth.runtime.ranks import leave_together

BUSY_S = 1.5  # rank 0's last work; far longer than a rank's own way out, so the order cannot come by chance


def main() -> None:
    out = Path(sys.argv[1])
    rank = Accelerator(cpu=True).process_index
    if rank == 0:
        time.sleep(BUSY_S)
    entered = time.time()
    leave_together()
    left = time.time()
    record = {"entered": entered, "left": left, "group_down": not torch.distributed.is_initialized()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
