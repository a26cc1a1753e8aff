"""Regression: numeric label parsing, the metrics, the target scale saved with the model, the pipeline round
trip, bad input, serving scores, the compute_metrics hook, and train -> evaluate -> predict through the CLI on a
tiny random BERT."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, run_textune, write_csv, write_jsonl
from textune.config import load_config
from textune.data import parse_numeric_labels
from textune.errors import ConfigError, TextuneError
from textune.tasks import get_task, task_of
from textune.tasks.regression import regression_metrics


def toy_pair(rng: random.Random) -> dict:
    """Two short texts, each with one sentiment word; the score (0, 2.5 or 5) counts the positive ones, so the
    target is learnable and needs both texts of the pair."""
    row, positives = {}, 0
    for column in ("text", "text_b"):
        positive = rng.random() < 0.5
        positives += positive
        words = rng.sample(FILLER, rng.randint(1, 3))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
        row[column] = " ".join(words)
    row["score"] = 2.5 * positives
    return row


@pytest.fixture(scope="module")
def reg_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("reg-data")
    rng = random.Random(3)
    return {"train": write_csv(d / "train.csv", [toy_pair(rng) for _ in range(320)]),
            "validation": write_csv(d / "validation.csv", [toy_pair(rng) for _ in range(64)])}


def reg_overrides(tiny_model: Path, data: dict, out: Path, **extra) -> dict:
    return {"task": "regression", "model.name": str(tiny_model), "model.max_length": 32,
            "data.train": str(data["train"]), "data.validation": str(data["validation"]),
            "data.text_pair_column": "text_b", "data.label_column": "score", "train.epochs": 4,
            "train.batch_size": 16, "train.lr": 5e-3, "train.warmup_ratio": 0.1, "train.logging_steps": 5,
            "train.mixed_precision": "no", "output_dir": str(out), **extra}


@pytest.fixture(scope="module")
def reg_run(tiny_model, reg_data, tmp_path_factory) -> Path:
    from textune.train import train

    seen = []

    def hook(preds, labels):
        seen.append((preds.shape, float(labels.max())))
        return {"within_one": float((np.abs(preds - labels) <= 1.0).mean())}

    run = train(load_config(None, reg_overrides(tiny_model, reg_data, tmp_path_factory.mktemp("runs") / "reg")),
                compute_metrics=hook)
    assert seen and seen[-1] == ((64,), 5.0)  # predictions and labels on the user's 0-5 scale
    return run


# ---------------------------------------------------------------- pure pieces


def test_parse_numeric_labels_reads_numbers_and_numeric_text():
    assert parse_numeric_labels([1, 0.5, "0.25", " 3 "], "data.train", "y").tolist() == [1.0, 0.5, 0.25, 3.0]


@pytest.mark.parametrize("values, match", [
    ([0.1, "high", 0.3], r"data\.train row 2: label column 'y' holds 'high', not a number; .*fix or remove the row; "
                         r"class names belong to task: classification"),
    ([0.1, None], r"data\.train row 2: label column 'y' is empty"),
    ([float("nan")], r"row 1: label column 'y' holds nan"),
    ([True], r"row 1: label column 'y' holds True"),
])
def test_parse_numeric_labels_names_the_row(values, match):
    with pytest.raises(TextuneError, match=match):
        parse_numeric_labels(values, "data.train", "y")


def test_regression_metrics_hand_case():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 5.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert m["mse"] == pytest.approx(0.25) and m["mae"] == pytest.approx(0.25)
    assert m["spearman"] == pytest.approx(1.0) and 0.95 < m["pearson"] < 1.0
    flat = regression_metrics(np.zeros(3), np.array([0.0, 1.0, 2.0]))
    assert flat["pearson"] == 0.0 and flat["spearman"] == 0.0  # no NaN from a constant prediction


def test_config_keys_and_metrics():
    cfg = load_config(None, {"task": "regression", "data.train": "x.csv", "data.label_scale": [0, 5]})
    assert cfg.train.metric == "pearson" and cfg.train.greater_is_better
    cfg = load_config(None, {"task": "regression", "data.train": "x.csv", "train.metric": "mae"})
    assert cfg.train.greater_is_better is False  # mse, mae: lower is better
    with pytest.raises(ConfigError, match=r"data\.label_scale: expected \[low, high\] with low < high"):
        load_config(None, {"task": "regression", "data.train": "x.csv", "data.label_scale": [5, 0]})
    with pytest.raises(ConfigError, match=r"data\.label_scale: is for task regression or embedding, not classification"):
        load_config(None, {"data.train": "x.csv", "data.label_scale": [0, 1]})
    with pytest.raises(ConfigError, match=r"data\.augment\.mixup_alpha: mixup mixes class labels"):
        load_config(None, {"task": "regression", "data.train": "x.csv", "data.augment.mixup_alpha": 0.2})


# ---------------------------------------------------------------- a trained model


def test_learns_the_toy_target_and_saves_its_scale(reg_run):
    metrics = json.loads((reg_run / "metrics.json").read_text())["validation"]
    assert metrics["pearson"] > 0.8 and metrics["spearman"] > 0.7, metrics
    assert {"pearson", "spearman", "mse", "mae", "loss", "within_one"} <= set(metrics)
    # the loss is the MSE of the normalised target: the 0-5 scale's MSE divided by 5 squared
    assert metrics["loss"] == pytest.approx(metrics["mse"] / 25, rel=1e-3)
    config = json.loads((reg_run / "model" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert config["label_scale"] == [0.0, 5.0] and config["id2label"] == {"0": "score"}
    assert task_of(reg_run) == "regression" and task_of(reg_run / "model") == "regression"
    history = [json.loads(line) for line in (reg_run / "history.jsonl").read_text().splitlines()]
    assert any("eval_within_one" in r for r in history)  # the hook's metric is recorded at each evaluation


def test_pipeline_round_trip(reg_run):
    from transformers import pipeline

    ours = get_task("regression").load_predictor(reg_run)
    texts, pairs = ["good film", "bad plot"], ["great acting", "nice story"]
    scores = ours.predict_scores(texts, pairs)
    pipe = pipeline("text-classification", model=str(reg_run / "model"), function_to_apply="none")
    theirs = [pipe({"text": t, "text_pair": p}) for t, p in zip(texts, pairs)]
    theirs = [r[0] if isinstance(r, list) else r for r in theirs]
    assert [r["label"] for r in theirs] == ["score", "score"]
    # the pipeline gives the normalised output; label_scale maps it back
    assert np.allclose([0.0 + r["score"] * 5.0 for r in theirs], scores, atol=1e-4)
    assert scores[0] > scores[1]  # two positive words against one


def test_serve_answers_scores(reg_run):
    from fastapi.testclient import TestClient

    from openapi_check import assert_matches_schema
    from textune.serving import ServeSettings, create_app

    predictor = get_task("regression").load_predictor(reg_run)
    with TestClient(create_app(predictor, ServeSettings(), "reg")) as client:
        r = client.post("/v1/classify", json={"texts": ["good film"], "text_pairs": ["great acting"]})
        assert r.status_code == 200, r.text
        assert_matches_schema(client, "POST", "/v1/classify", r)
        assert client.get("/v1/models").json()["task"] == "regression"  # the registry's name, not classification
        (result,) = r.json()["results"]
        assert set(result) == {"score"} and 2.5 < result["score"] < 7


def test_report_has_scatter(reg_run):
    from textune.report import write_report

    page = write_report(reg_run).read_text()
    assert "Predicted against true" in page and "Largest validation errors" in page and "Spearman" in page


# ---------------------------------------------------------------- bad input and the CLI


def test_string_labels_stop_before_anything_is_written(tiny_model, tmp_path, capsys):
    from textune.cli import main

    rows = [{"text": "good film", "label": "positive"}, {"text": "bad film", "label": "negative"}] * 4
    out = tmp_path / "run"
    cfg = load_config(None, {"task": "regression", "model.name": str(tiny_model),
                             "data.train": str(write_csv(tmp_path / "t.csv", rows)), "output_dir": str(out)})
    from textune.train import train

    with pytest.raises(TextuneError, match=r"data\.train row 1: label column 'label' holds 'positive', not a number"):
        train(cfg)
    assert not out.exists()
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"task": "regression", "output_dir": str(out), "model": {"name": str(tiny_model)},
                                  "data": {"train": str(tmp_path / "t.csv")}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 1" in err[0] and "task: classification" in err[0]
    assert not out.exists()


def test_non_numeric_cell_in_validation_names_split_and_row(tiny_model, reg_data, tmp_path):
    rows = [toy_pair(random.Random(1)) for _ in range(5)]
    rows[3]["score"] = "n/a"
    bad = write_jsonl(tmp_path / "v.jsonl", rows)
    cfg = load_config(None, reg_overrides(tiny_model, {**reg_data, "validation": bad}, tmp_path / "run"))
    with pytest.raises(TextuneError, match=r"data\.validation row 4: label column 'score' holds 'n/a'"):
        get_task("regression").load_inputs(cfg)


def test_cli_train_evaluate_predict(tiny_model, reg_data, tmp_path):
    cfg = tmp_path / "reg.yaml"
    cfg.write_text(json.dumps({"task": "regression", "output_dir": str(tmp_path / "run"),
                               "model": {"name": str(tiny_model), "max_length": 32},
                               "data": {"train": str(reg_data["train"]), "validation": str(reg_data["validation"]),
                                        "text_pair_column": "text_b", "label_column": "score", "label_scale": [0, 5]},
                               "train": {"epochs": 1, "batch_size": 16, "mixed_precision": "no"}}))

    proc = run_textune("train", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "learnt as (y - 0) / 5" in proc.stdout and "pearson" in proc.stdout
    run = tmp_path / "run"
    proc = run_textune("evaluate", run, "--data", reg_data["validation"], "--output", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spearman" in proc.stdout and {"pearson", "mse", "mae"} <= set(json.loads((tmp_path / "m.json").read_text()))
    proc = run_textune("predict", run, "--input", reg_data["validation"], "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and isinstance(rows[0]["score"], float) and "text_pair" in rows[0]


def test_search_minimises_error_metrics():
    from textune.search import search_direction

    cfg = load_config(None, {"task": "regression", "data.train": "x.csv", "train.metric": "mse"})
    assert search_direction(cfg) == ("mse", "minimize")
    cfg = load_config(None, {"task": "regression", "data.train": "x.csv"})
    assert search_direction(cfg) == ("pearson", "maximize")
