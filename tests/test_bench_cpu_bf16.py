"""bench/cpu_bf16.py: each measurement process times its family's real step at the precision asked for (the
speed ratio itself is the benchmark's business, not this test's)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gensynth.train.loop import cpu_has_bf16
from tests.conftest import REPO, subprocess_env

PRECISIONS = ["no", "bf16"] if cpu_has_bf16() else ["no"]


@pytest.mark.parametrize("family", ["gan", "vqvae", "vae", "prior"])
def test_one_measurement_times_the_familys_step_at_the_precision_asked(family):
    for precision in PRECISIONS:
        done = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_bf16.py"), "--one", family, precision,
                               "--steps", "2", "--warmup", "1"], env=subprocess_env(), capture_output=True,
                              text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert figures["precision"] == precision
        assert figures["steps_per_s"] > 0 and figures["steps_per_cpu_s"] > 0
