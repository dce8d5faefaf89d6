"""Generate a synthetic set on SLURM as a job array: `gensynth submit generate` under another name.

    python slurm/generate.py runs/gan_fashion data/synth/v1 --num 100000 --seed 0 --array 3 --wait
    python slurm/generate.py runs/gan_fashion data/synth/v1 --num 100000 --seed 0 --array 3 --task-ids 1

Array task i writes the shards k with k % N == i; a job after the array writes manifest.json. Options:
`python slurm/generate.py --help`; the logic is in the package gensynth/cluster/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gensynth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["submit", "generate", *sys.argv[1:]]))
