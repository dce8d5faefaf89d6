"""Submit a training run to SLURM (through submitit): `gensynth submit train` under another name.

    python slurm/train.py configs/gan_fashion.yaml --nodes 2 --tasks-per-node 1 --partition debug [key=value ...]
    python slurm/train.py configs/gan_fashion_gpu.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --dry-run

Options: `python slurm/train.py --help`; the logic is in the package gensynth/cluster/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gensynth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["submit", "train", *sys.argv[1:]]))
