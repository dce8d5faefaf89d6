"""train.mixed_precision on CPU: bf16 where the processor computes it, refused where it would only emulate it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gensynth.errors import UsageError
from gensynth.export import load_export
from gensynth.train import loop
from gensynth.train.loop import cpu_has_bf16, resolve_precision
from tests.conftest import subprocess_env, write_shard_set
from tests.helpers import gensynth, rank_state, run_dir, tiny_config

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n\n"


@pytest.mark.parametrize("text, native", [
    (X86.format(extra="avx512_bf16 avx512_vnni"), True),
    (X86.format(extra="amx_bf16 amx_tile"), True),
    (X86.format(extra="avx512_vnni"), False),  # avx512bw alone: oneDNN emulates bf16, slower than fp32
    (ARM.format(extra="sve bf16 i8mm"), True),
    (ARM.format(extra="sve i8mm"), False),
])
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpu_has_bf16(str(cpuinfo)) is native


def test_an_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: native)
    assert resolve_precision("auto", cpu=True) == ("bf16" if native else "no")
    assert resolve_precision("no", cpu=True) == "no"


def test_bf16_on_a_cpu_without_it_and_fp16_on_any_cpu_are_refused_with_what_to_use(monkeypatch):
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    with pytest.raises(UsageError, match="train.mixed_precision=bf16 on CPU needs bf16 instructions.*auto or no"):
        resolve_precision("bf16", cpu=True)
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert resolve_precision("bf16", cpu=True) == "bf16"
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        resolve_precision("fp16", cpu=True)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("precision") / "toy"
    write_shard_set(folder, [40, 33])
    return str(folder)


def test_auto_trains_the_gan_in_bf16_on_this_cpu_when_it_has_it(toy_data, tmp_path):
    """The run says which precision `auto` chose, and the accelerator's autocast really computes in it."""
    config = tiny_config(tmp_path, toy_data, train__steps=10, train__eval_every=0, train__mixed_precision="auto")
    chosen = "bf16" if cpu_has_bf16() else "fp32"
    # a launcher that says what auto chose is not overridden, so nothing is said about it
    done = gensynth("train", str(config), ACCELERATE_MIXED_PRECISION="bf16" if cpu_has_bf16() else "no")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"cpu, {chosen} (train.mixed_precision=auto)" in done.stderr
    assert "mixed precision" not in done.stderr
    probe = ("from gensynth.families import load_run_config; from gensynth.train.loop import build_accelerator; "
             f"import torch; acc = build_accelerator(load_run_config({str(config)!r}, []));\n"
             "with acc.autocast(): print((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)")
    dtype = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True)
    assert dtype.returncode == 0, dtype.stderr[-2000:]
    assert dtype.stdout.strip() == ("torch.bfloat16" if cpu_has_bf16() else "torch.float32")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions, so bf16 training is refused here "
                    "(tested above)")
def test_a_bf16_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(toy_data, tmp_path):
    whole = tiny_config(tmp_path / "a", toy_data, train__steps=20, train__mixed_precision="bf16")
    assert gensynth("train", str(whole)).returncode == 0
    split = tiny_config(tmp_path / "b", toy_data, train__steps=20, train__mixed_precision="bf16")
    first = gensynth("train", str(split), "train.steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = gensynth("train", str(split))
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, _ = load_export(run_dir(whole))
    b, _ = load_export(run_dir(split))
    assert all(t.dtype == torch.float32 for t in a.values() if t.is_floating_point())  # weights stay fp32
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = sorted((run_dir(split) / "checkpoints").glob("step-*"))[-1]
    other = sorted((run_dir(whole) / "checkpoints").glob("step-*"))[-1]
    assert rank_state(last)["params_digest"] == rank_state(other)["params_digest"]


def test_one_process_can_train_runs_of_different_precisions_in_turn(tmp_path):
    """Accelerate refuses a second precision in a process ("AcceleratorState has already been initialized"); gensynth
    demo's stages and any script that trains twice may need one, so each run's accelerator starts afresh."""
    first = "bf16" if cpu_has_bf16() else "no"
    probe = ("from gensynth.families import load_run_config; from gensynth.train.loop import build_accelerator\n"
             f"for precision in [{first!r}, 'no', {first!r}]:\n"
             f"    cfg = load_run_config(None, ['train.mixed_precision=' + precision, 'run.root={tmp_path}', "
             "'train.log_with=[]'])\n"
             "    print(build_accelerator(cfg).mixed_precision)")
    done = subprocess.run([sys.executable, "-c", probe], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [first, "no", first]
