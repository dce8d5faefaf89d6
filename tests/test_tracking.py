"""Trackers through Accelerate (train.log_with: TensorBoard and MLflow, read back with their own readers), the
run folder's metrics.jsonl and train.log, the start lines, and what a refused run leaves behind (nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gensynth.errors import ConfigError
from gensynth.train.tracking import check_trackers, hyperparameters, installed_trackers
from tests.conftest import write_shard_set
from tests.helpers import gensynth, one_line_error, run_dir, tiny_config, train_ok


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tracking") / "toy"
    write_shard_set(folder, [40, 33, 30])
    return str(folder)


def tensorboard_scalars(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_hparams(tb: Path) -> dict:
    """The hyperparameters of the (one) start, as TensorBoard's hparams plugin reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    files = sorted(tb.glob("*/events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_scalars_and_config_reach_tensorboard_and_mlflow_and_the_run_folder(toy_data, tmp_path, monkeypatch):
    config = tiny_config(tmp_path, toy_data, train__steps=20, train__log_with=["tensorboard", "mlflow"])
    done = train_ok(config)
    run = run_dir(config)

    lines = metrics_lines(run)
    assert [line["step"] for line in lines] == [5, 10, 15, 20]  # one object per logged step, eval/* included
    tb = tensorboard_scalars(run / "tb")
    logged = {(tag, line["step"]): value for line in lines for tag, value in line.items() if tag != "step"}
    assert logged and {tag for tag, _ in logged} == set(tb)
    for (tag, step), value in logged.items():
        assert tb[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # TensorBoard keeps float32
    assert sorted(step for tag, step in logged if tag == "eval/variety") == [10, 20]

    hparams = tensorboard_hparams(run / "tb")
    assert hparams["train.steps"].number_value == 20
    assert hparams["model.family"].string_value == "gan"
    assert hparams["train.log_with"].string_value == "tensorboard,mlflow"  # lists flattened to strings
    assert hparams["data.train"].string_value == toy_data

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("gensynth").experiment_id])
    assert found.info.run_name == "tiny"
    assert found.data.params["train.steps"] == "20" and found.data.params["model.family"] == "gan"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss/d")}
    assert history == {line["step"]: pytest.approx(line["loss/d"], rel=1e-12) for line in lines}

    log = (run / "train.log").read_text()
    assert "1 process, no torch.distributed, cpu" in log and "1 process, no torch.distributed, cpu" in done.stderr
    assert "step 20/20" in log and "export written" in log


def test_a_refused_run_leaves_the_run_folder_as_it_was(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    train_ok(config)
    run = run_dir(config)
    names = ("config.yaml", "train.log", "metrics.jsonl")
    before = {name: (run / name).read_bytes() for name in names}
    refusals = {
        "gan.g_channels=16": "gan.g_channels",  # another architecture than the checkpoint's
        f"data.train={tmp_path / 'missing'}": "missing",  # no such data set
        "train.log_with=[tensorbord]": "unknown tracker 'tensorbord'",
    }
    for override, said in refusals.items():
        refused = gensynth("train", str(config), "train.steps=20", override)
        assert refused.returncode != 0, override
        assert said in one_line_error(refused.stderr), refused.stderr[-2000:]
        assert {name: (run / name).read_bytes() for name in names} == before, override
    elsewhere = gensynth("train", str(config), "run.name=other", f"data.train={tmp_path / 'missing'}")
    assert elsewhere.returncode != 0 and not (run.parent / "other").exists()


def test_a_resumed_run_appends_to_train_log_and_logs_each_step_once(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=10)
    train_ok(config)
    run = run_dir(config)
    first_log = (run / "train.log").read_text()
    # as if the run had logged step 15 and been killed in the middle of the next line, before a checkpoint
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 15, "loss/d": 1234.5}\n{"step": 2')
    resumed = train_ok(config, "train.steps=20")
    assert "resumed from" in resumed.stderr
    lines = metrics_lines(run)
    assert [line["step"] for line in lines] == [5, 10, 15, 20]
    assert lines[2]["loss/d"] != 1234.5 and "loss/g" in lines[2]
    log = (run / "train.log").read_text()
    assert log.startswith(first_log) and "resumed from" in log[len(first_log):]
    assert log.count("1 process, no torch.distributed, cpu") == 2


def test_the_launchers_mixed_precision_is_named_when_the_config_overrides_it(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=1, train__eval_every=0)
    done = gensynth("train", str(config), ACCELERATE_MIXED_PRECISION="bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "mixed precision" in line]
    assert len(said) == 1, said
    assert "WARNING" in said[0] and "(ACCELERATE_MIXED_PRECISION) set mixed precision bf16" in said[0]
    assert "train.mixed_precision=no wins" in said[0] and "set train.mixed_precision=bf16" in said[0]
    agreed = gensynth("train", str(config), "run.name=agreed", ACCELERATE_MIXED_PRECISION="no")
    assert agreed.returncode == 0 and "mixed precision" not in agreed.stderr


def test_without_trackers_the_run_folder_still_gets_metrics_and_log(toy_data, tmp_path):
    config = tiny_config(tmp_path, toy_data, train__steps=5, train__eval_every=0, train__log_with=[])
    done = train_ok(config)
    run = run_dir(config)
    assert not (run / "tb").exists() and "Warning" not in done.stderr
    assert [line["step"] for line in metrics_lines(run)] == [5]
    assert "step 5/5" in (run / "train.log").read_text()
    assert len(list((run / "samples").glob("samples-step-*.png"))) == 1


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_installed_ones():
    assert {"tensorboard", "mlflow"} <= set(installed_trackers())  # the test extras install mlflow-skinny
    with pytest.raises(ConfigError) as missing:
        check_trackers(["tensorboard", "wandb"], installed=["tensorboard", "mlflow"])
    assert str(missing.value) == ("train.log_with: wandb is not installed (installed here: tensorboard, mlflow); "
                                  "pip install wandb, or leave wandb out of train.log_with")
    assert "\n" not in str(missing.value)
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; choose from tensorboard, mlflow, wandb"):
        check_trackers(["tensorbord"], installed=["tensorboard"])
    assert check_trackers(["mlflow", "tensorboard", "mlflow"], installed=["tensorboard", "mlflow"]) == [
        "mlflow", "tensorboard"]
    assert check_trackers([], installed=[]) == []


def test_hyperparameters_are_the_config_flat_with_scalars_and_strings():
    flat = hyperparameters({"train": {"steps": 3, "log_with": ["tensorboard", "mlflow"], "grad_clip": 0.5},
                            "eval": {"cas": True, "extractor": None}, "gan": {"nested": {"depth": 2}}})
    assert flat == {"train.steps": 3, "train.log_with": "tensorboard,mlflow", "train.grad_clip": 0.5,
                    "eval.cas": True, "eval.extractor": "", "gan.nested.depth": 2}
