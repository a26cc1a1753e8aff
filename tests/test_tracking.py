"""Experiment trackers (logging.report_to): config checks, and a real MLflow run read back from its local store."""

import json

import pytest

from conftest import toy_overrides
from textune.cli import main
from textune.config import load_config
from textune.errors import ConfigError
from textune.train import train


def read_history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_unknown_tracker_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"logging.report_to: 'mlfow' is not a tracker \(did you mean mlflow\?\); "
                                          r"choose from tensorboard, mlflow, wandb"):
        load_config(None, {"data.train": "x.csv", "logging.report_to": ["mlfow"]})


def test_tracker_without_its_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.report_to: wandb needs the wandb package, which is not "
                                          r"installed; pip install wandb or remove it"):
        load_config(None, {"data.train": "x.csv", "logging.report_to": ["wandb"]})


def test_deprecated_tensorboard_flag_is_report_to_tensorboard():
    pytest.importorskip("tensorboard")
    cfg = load_config(None, {"data.train": "x.csv", "logging.tensorboard": True, "logging.report_to": ["tensorboard"]})
    assert cfg.logging.report_to == ["tensorboard"]


def test_cli_refuses_a_missing_tracker_before_writing_anything(tiny_model, toy_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    (tmp_path / "c.yaml").write_text("logging: {report_to: [mlflow]}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--model.name", str(tiny_model), "--data.train",
                 str(toy_data["train"]), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'textune[mlflow]'" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def mlflow_client(monkeypatch):
    """A function run -> MlflowClient on that run's own store (RUN/mlflow.db, the default without
    MLFLOW_TRACKING_URI)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return lambda run: MlflowClient(f"sqlite:///{run / 'mlflow.db'}")


def test_mlflow_gets_the_config_every_record_and_the_final_metrics(tiny_model, toy_data, tmp_path, mlflow_client):
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "train.max_steps": 6, "train.logging_steps": 2, "train.eval_steps": 3, "logging.report_to": ["mlflow"]}))
    run = train(cfg)
    client = mlflow_client(run)
    (found,) = client.search_runs([client.get_experiment_by_name("textune").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.lr"] == "0.003" and params["train.max_steps"] == "6"
    assert params["model.name"] == str(tiny_model) and params["task"] == "classification"
    assert params["logging.report_to"] == '["mlflow"]'

    history = read_history(run)
    logged = lambda key: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, key)]
    assert logged("train/loss") == [(r["step"], r["loss"]) for r in history if r["type"] == "train"]
    assert [s for s, _ in logged("train/loss")] == [2, 4, 6]
    assert logged("eval/accuracy") == [(r["step"], r["eval_accuracy"]) for r in history if r["type"] == "eval"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert found.data.metrics["final/validation_accuracy"] == metrics["validation"]["accuracy"]
    assert found.data.metrics["final/validation_loss"] == metrics["validation"]["loss"]


def test_a_run_stopped_by_an_error_ends_its_mlflow_run_in_the_store_the_environment_names(
        tiny_model, toy_data, tmp_path, mlflow_client, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    def prune(record):  # what a hyper-parameter search does to a bad trial
        raise RuntimeError("pruned")

    store = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "train.max_steps": 2, "train.eval_steps": 2, "logging.report_to": ["mlflow"]}))
    with pytest.raises(RuntimeError, match="pruned"):
        train(cfg, on_evaluate=prune)
    assert mlflow.active_run() is None  # the next run in this process can start its own
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("textune").experiment_id])
    assert found.info.status != "RUNNING"


def test_an_mlflow_file_store_is_one_line_saying_what_mlflow_wants_and_leaves_no_run_folder(
        tiny_model, toy_data, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")  # MLflow 3 refuses this store unless asked
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "c.yaml").write_text("logging: {report_to: [mlflow]}\ntrain: {max_steps: 1}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--model.name", str(tiny_model), "--data.train",
                 str(toy_data["train"]), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert ("logging.report_to: mlflow refuses MLFLOW_TRACKING_URI=file:./mlruns, a file store, unless "
            "MLFLOW_ALLOW_FILE_STORE=true; set that, point MLFLOW_TRACKING_URI at a database") in err[0]
    assert not (tmp_path / "run").exists()
