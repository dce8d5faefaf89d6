"""Launched by tests/test_multiprocess.py under `accelerate launch`: each rank reads one exact epoch.

    accelerate launch --multi_gpu --num_processes 2 ... tests/scripts/read_epoch.py SHARDS OUT WORKERS...

Every step all-reduces a counter, so ranks that took different numbers of steps would hang (the
test's timeout catches that). Each rank writes OUT/rank<r>-w<workers>.json with the keys it saw.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from gensynth.data.stream import ShardLoader


def main() -> None:
    shards, out = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator(cpu=True)  # cpu= explicitly: else each process trains alone (notes)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == world
    for workers in map(int, sys.argv[3:]):
        # the loader reads rank and world size from the process group itself
        loader = ShardLoader(shards, batch_size=4, mode="exact", num_workers=workers)
        assert (loader.rank, loader.world_size) == (rank, world)
        keys, steps = [], 0
        for batch in loader:
            keys += batch["key"]
            steps += 1
            total = torch.tensor([1])
            torch.distributed.all_reduce(total)  # lockstep: every rank must be here for every step
            assert int(total) == world
        record = {"rank": rank, "world": world, "workers": workers, "steps": steps, "keys": keys,
                  "node": accelerator.state.local_process_index}
        (out / f"rank{rank}-w{workers}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
