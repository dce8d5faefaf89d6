"""bench/gpu.py's CPU-free parts: the plan, the figures read from metrics.jsonl, the verdict and the report.
(The check itself needs a CUDA machine: `make gpu-check`.)"""

from __future__ import annotations

import json

import pytest

from tests.helpers import bench_module


@pytest.fixture(scope="module")
def gpu():
    return bench_module("gpu")


def test_the_plan_covers_every_family_and_precision_and_all_gpus_when_there_are_several(gpu):
    one = gpu.plan(list(gpu.FAMILIES), list(gpu.PRECISIONS), 1)
    assert [c.name for c in one] == [f"{f}-{p}-1gpu" for p in ("bf16", "fp16") for f in ("gan", "vqvae", "vae",
                                                                                            "prior")]
    four = gpu.plan(["gan"], ["fp16"], 4)
    assert [c.name for c in four] == ["gan-fp16-1gpu", "gan-fp16-4gpu"]
    assert [c.family for c in gpu.plan(["prior"], ["bf16"], 1)] == ["vqvae", "prior"]  # its VQ-VAE first
    with pytest.raises(SystemExit, match="unknown diffusion, fp8"):
        gpu.plan(["diffusion"], ["fp8"], 1)


def test_several_gpus_train_through_accelerate_launch_with_the_nccl_config(gpu, tmp_path):
    cmd = gpu.train_command(gpu.Check("gan", "fp16", 8), tmp_path, 200, ["train.checkpoint_every=100"])
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"] and cmd[4].endswith("gpu-multi.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--mixed_precision") + 1] == "fp16"
    assert "train.mixed_precision=fp16" in cmd and "train.device=cuda" in cmd
    assert cmd[-1] == "train.checkpoint_every=100"
    single = gpu.train_command(gpu.Check("gan", "bf16", 1), tmp_path, 200, [])
    assert single[1:4] == ["-m", "gensynth", "train"]


def test_figures_come_from_the_second_half_and_the_verdict_names_each_failure(gpu, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 50, "perf/samples_per_s": 10.0, "perf/data_wait_fraction": 0.9, "health/nonfinite_steps": 0},
            {"step": 110, "perf/samples_per_s": 1000.0, "perf/data_wait_fraction": 0.02, "perf/gpu_peak_gib": 1.5,
             "health/nonfinite_steps": 0},
            {"step": 200, "perf/samples_per_s": 3000.0, "perf/data_wait_fraction": 0.04, "perf/gpu_peak_gib": 2.5,
             "health/nonfinite_steps": 0}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ok = gpu.Outcome(gpu.Check("gan", "bf16", 1), resumed=True)
    gpu.summarise(ok, gpu.read_metrics(metrics, after_step=100))
    assert (ok.train_images_per_s, ok.data_wait, ok.peak_gib) == (2000.0, pytest.approx(0.03), 2.5)
    assert gpu.judge(ok, 0.05) == []
    bad = gpu.Outcome(gpu.Check("vae", "fp16", 1), data_wait=0.2, nonfinite_steps=3, resumed=False)
    assert gpu.judge(bad, 0.05) == ["3 steps with a non-finite loss",
                                    "the second half did not resume from the first half's checkpoint",
                                    "data wait 20.0% > 5%"]
    ok.failures, bad.failures = gpu.judge(ok, 0.05), gpu.judge(bad, 0.05)
    lines = gpu.table([ok, bad])
    assert lines[2].startswith("| gan-bf16-1gpu | 2,000 | 3.0% | 2.50 | - | ok |")
    assert "3 steps with a non-finite loss" in lines[3]


def test_without_a_gpu_it_says_so_and_lists_what_it_would_run(gpu, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this test is about machines without one")
    assert gpu.main(["--families", "gan", "--precisions", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "gan-bf16-1gpu" in err
    with pytest.raises(SystemExit):
        gpu.main(["--steps", "1"])
