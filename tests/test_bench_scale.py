"""bench/scale.py's plan part on a small analog: it reports the plan the loader would run (the batches of the
first and last worker add up to their share) and a subset of parts merges into an earlier result file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gensynth.data.plan import exact_rank_batches
from tests.conftest import REPO


def test_plan_part_reports_each_workers_share_and_merges_with_the_earlier_file(tmp_path: Path):
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"search": [{"refs": 1}], "protocols": {"search": "earlier"}}))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--quick", "--parts", "plan,state",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["search"] == [{"refs": 1}] and result["protocols"]["search"] == "earlier"
    assert set(result["protocols"]) == {"plan", "state", "search"}
    assert result["exactness"]["every_sample_once"] is True
    _, sizes = exact_rank_batches(10_000 * 10_000, 4096, 256, 0)
    first = result["plan"][0]
    assert first["batches"] == -(-len(sizes) // 8) and first["samples"] == 256 * first["batches"]


def test_unknown_part_is_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--parts", "plan,speed"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--parts plan,speed" in proc.stderr and "Traceback" not in proc.stderr
