"""Multi-label classification: label-list parsing in every file format, thresholds chosen on validation and saved,
the metrics, the pipeline round trip, bad input, serving label sets, and train -> evaluate -> predict through the
CLI on a tiny random BERT."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import FILLER, run_textune, write_csv, write_jsonl
from textune.config import load_config
from textune.data import load_multi_label_data, parse_label_lists
from textune.errors import ConfigError, TextuneError
from textune.tasks import get_task, task_of
from textune.tasks.multi_label import best_thresholds, multi_label_metrics


def toy_row(rng: random.Random, sep: str | None = "|") -> dict:
    """Filler words with "good" (label pos), "bad" (neg), "story" (story), each there or not, so any subset of
    the labels (the empty one included). One word per label: the tiny model learns it in a few epochs."""
    words = rng.sample([w for w in FILLER if w != "story"], rng.randint(2, 4))
    labels = []
    for name, pool in (("pos", ["good"]), ("neg", ["bad"]), ("story", ["story"])):
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), rng.choice(pool))
            labels.append(name)
    return {"text": " ".join(words), "labels": sep.join(labels) if sep else labels}


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ml-data")
    rng = random.Random(5)
    return {"train": write_csv(d / "train.csv", [toy_row(rng) for _ in range(320)]),
            "validation": write_csv(d / "validation.csv", [toy_row(rng) for _ in range(64)])}


def ml_overrides(tiny_model: Path, data: dict, out: Path, **extra) -> dict:
    return {"task": "multi-label", "model.name": str(tiny_model), "model.max_length": 32,
            "data.train": str(data["train"]), "data.validation": str(data["validation"]),
            "data.label_column": "labels", "train.epochs": 4, "train.batch_size": 16, "train.lr": 1e-2,
            "train.warmup_ratio": 0.1, "train.logging_steps": 5, "train.mixed_precision": "no",
            "output_dir": str(out), **extra}


@pytest.fixture(scope="module")
def ml_run(tiny_model, ml_data, tmp_path_factory) -> Path:
    from textune.train import train

    return train(load_config(None, ml_overrides(tiny_model, ml_data, tmp_path_factory.mktemp("runs") / "ml")))


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("values, sep, id_names, expected", [
    (["a|b", "b", "", None, " a | c "], "|", None, [["a", "b"], ["b"], [], [], ["a", "c"]]),
    ([["a", "b"], [], ["b", "b"]], "|", None, [["a", "b"], [], ["b"]]),
    (["x;y"], ";", None, [["x", "y"]]),
    ([[0, 2]], "|", ["n0", "n1", "n2"], [["n0", "n2"]]),  # a Hub Sequence(ClassLabel) names its ids
])
def test_parse_label_lists(values, sep, id_names, expected):
    assert parse_label_lists(values, "data.train", "labels", sep, id_names) == expected


@pytest.mark.parametrize("value", ["a||b", "a|", ["a", ""]])
def test_empty_label_names_the_row(value):
    with pytest.raises(TextuneError, match=r"data\.train row 2: label column 'labels' holds an empty label"):
        parse_label_lists(["a", value], "data.train", "labels", "|")


@pytest.mark.parametrize("cell, match", [
    ({"sports": 1, "politics": 0}, r"holds a mapping \(\{'sports': 1, 'politics': 0\}\) where label names belong"),
    ([["sports"], ["politics"]], r"holds a nested list \(\[\['sports'\], \['politics'\]\]\) where one flat list"),
    (True, r"holds true/false \(True\) where label names belong \(a yes/no target is task: classification\)"),
    ([True, False], r"holds true/false \(\[True, False\]\)"),
    ([1, 0, 1], r"holds a vector of 0s and 1s \(\[1, 0, 1\]\) where label names belong"),
])
def test_label_cells_that_are_not_label_names_are_refused_naming_file_and_row(cell, match, tmp_path):
    rows = [{"text": f"text {i}", "labels": ["sports"] if i % 2 else ["politics"]} for i in range(8)]
    rows[4]["labels"] = cell
    path = write_jsonl(tmp_path / "tags.jsonl", rows)
    cfg = load_config(None, {"task": "multi-label", "data.train": str(path), "data.label_column": "labels"})
    with pytest.raises(TextuneError, match=rf"^data\.train row 5 of {re.escape(str(path))}: label column 'labels' "
                                           rf"{match}.*; give each row's labels as a list of names"):
        load_multi_label_data(cfg.data, seed=0, task="multi-label")


def test_training_rows_that_all_have_the_same_labels_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"text": f"text {i}", "labels": ["a", "b"]} for i in range(8)])
    cfg = load_config(None, {"task": "multi-label", "data.train": str(path), "data.label_column": "labels"})
    with pytest.raises(TextuneError, match=r"^data\.train: every training row has the same labels \(a, b\); a "
                                           r"multi-label classifier .* add rows with other labels"):
        load_multi_label_data(cfg.data, seed=0, task="multi-label")


def test_a_text_column_holding_lists_is_refused_naming_file_row_and_column(tmp_path):
    rows = [{"text": f"text {i}", "labels": ["a"] if i % 2 else ["b"]} for i in range(8)]
    rows[2]["text"] = ["two", "pieces"]
    path = write_jsonl(tmp_path / "lists.jsonl", rows)
    cfg = load_config(None, {"task": "multi-label", "data.train": str(path), "data.label_column": "labels"})
    with pytest.raises(TextuneError, match=rf"^data\.train row 3 of {re.escape(str(path))}: column 'text' holds a "
                                           r"list \(\['two', 'pieces'\]\), not a text; write one string per row"):
        load_multi_label_data(cfg.data, seed=0, task="multi-label")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_label_lists_read_in_every_file_format(fmt, tmp_path):
    import pandas as pd

    rows = [{"text": "good film", "labels": ["pos"]}, {"text": "bad story", "labels": ["neg", "story"]},
            {"text": "the plot", "labels": []}, {"text": "good and bad", "labels": ["pos", "neg"]}]
    path = tmp_path / f"t.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        flat = [{"text": r["text"], "labels": "|".join(r["labels"])} for r in rows]
        write_csv(path, flat, delimiter="\t" if fmt == "tsv" else ",")
    cfg = load_config(None, {"task": "multi-label", "data.train": str(path), "data.validation": str(path),
                             "data.label_column": "labels"})
    data = load_multi_label_data(cfg.data, seed=0, task="multi-label")
    assert data.label_names == ["neg", "pos", "story"]
    by_text = {t: y for t, y in zip(data.validation["text"], data.validation["labels"])}
    assert by_text == {"good film": [0, 1, 0], "bad story": [1, 0, 1], "the plot": [0, 0, 0],
                       "good and bad": [1, 1, 0]}


def test_metrics_hand_case():
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.1, 0.7], [0.3, 0.8]])
    m = multi_label_metrics(probs, labels, np.array([0.5, 0.5]), ["a", "b"])
    # decisions: [1,0] [1,0] [0,1] [0,1] -> row 2 misses b, row 3 has a wrong b: 2 of 8 decisions wrong
    assert m["hamming_loss"] == pytest.approx(2 / 8) and m["subset_accuracy"] == pytest.approx(2 / 4)
    assert m["per_label"]["a"]["f1"] == pytest.approx(1.0) and m["per_label"]["b"]["f1"] == pytest.approx(0.5)
    assert m["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1)) and m["f1_macro"] == pytest.approx(0.75)


def test_best_thresholds_per_label():
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    probs = np.array([[0.30, 0.1, 0.2], [0.35, 0.2, 0.1], [0.10, 0.9, 0.3], [0.20, 0.8, 0.1]])
    cut = best_thresholds(probs, labels)
    assert 0.2 < cut[0] <= 0.3  # label a's positives score 0.30 and 0.35: a cut above 0.2 and at most 0.3 gets both
    assert cut[1] == 0.5  # label b is separated at 0.5 already: ties go to the one nearest 0.5
    assert cut[2] == 0.5  # no positive rows: the default


def test_config_keys():
    cfg = load_config(None, {"task": "multi-label", "data.train": "x.csv"})
    assert cfg.train.metric == "f1_micro" and cfg.data.label_separator == "|"
    assert load_config(None, {"task": "multi-label", "data.train": "x.csv",
                              "train.metric": "hamming_loss"}).train.greater_is_better is False
    with pytest.raises(ConfigError, match=r"train\.threshold: must be between 0 and 1"):
        load_config(None, {"task": "multi-label", "data.train": "x.csv", "train.threshold": 1.5})
    with pytest.raises(ConfigError, match=r"train\.threshold: is for task multi-label, not classification"):
        load_config(None, {"data.train": "x.csv", "train.threshold": 0.3})


# ---------------------------------------------------------------- a trained model


def test_thresholds_chosen_on_validation_saved_and_loaded(ml_run):
    metrics = json.loads((ml_run / "metrics.json").read_text())["validation"]
    assert metrics["f1_micro"] > 0.75 and {"f1_macro", "subset_accuracy", "hamming_loss", "per_label"} <= set(metrics)
    saved = json.loads((ml_run / "model" / "thresholds.json").read_text())
    assert set(saved["thresholds"]) == {"neg", "pos", "story"} and saved["chosen_by"] == "validation F1 per label"
    assert all(0.05 <= t <= 0.95 for t in saved["thresholds"].values())
    assert saved["validation_at_thresholds"]["f1_micro"] >= metrics["f1_micro"] - 1e-9  # chosen on these rows
    predictor = get_task("multi-label").load_predictor(ml_run)
    assert predictor.thresholds.tolist() == [saved["thresholds"][n] for n in predictor.label_names]
    config = json.loads((ml_run / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert task_of(ml_run) == "multi-label" and task_of(ml_run / "model") == "multi-label"
    rows = [json.loads(line) for line in (ml_run / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and {"labels", "pred", "probs"} <= set(rows[0])


def test_predict_lists_labels_above_threshold_and_pipeline_agrees(ml_run):
    from transformers import pipeline

    predictor = get_task("multi-label").load_predictor(ml_run)
    (row,) = predictor.predict(["good story and bad acting"])
    above = {n for n, t in zip(predictor.label_names, predictor.thresholds) if row["probabilities"][n] >= t}
    assert [x["label"] for x in row["labels"]] == sorted(above, key=lambda n: -row["probabilities"][n])
    assert "story" in above  # the label the toy model learns first
    pipe = pipeline("text-classification", model=str(ml_run / "model"), top_k=None)
    out = pipe(["good story and bad acting"])[0]
    theirs = {r["label"]: r["score"] for r in out}
    assert theirs == pytest.approx(row["probabilities"], abs=1e-5)  # sigmoid, as problem_type says


def test_fixed_threshold_is_saved(tiny_model, ml_data, tmp_path):
    from textune.train import train

    run = train(load_config(None, ml_overrides(tiny_model, ml_data, tmp_path / "fixed", **{
        "train.threshold": 0.3, "train.epochs": 1})))
    saved = json.loads((run / "model" / "thresholds.json").read_text())
    assert set(saved["thresholds"].values()) == {0.3} and saved["chosen_by"] == "train.threshold"


def test_serve_answers_label_sets(ml_run):
    from fastapi.testclient import TestClient

    from openapi_check import assert_matches_schema
    from textune.serving import ServeSettings, create_app

    predictor = get_task("multi-label").load_predictor(ml_run)
    with TestClient(create_app(predictor, ServeSettings(), "ml")) as client:
        r = client.post("/v1/classify", json={"texts": ["good film", "the plot"]})
        assert r.status_code == 200, r.text
        assert_matches_schema(client, "POST", "/v1/classify", r)
        assert client.get("/v1/models").json()["task"] == "multi-label"  # the registry's name, not classification
        results = r.json()["results"]
        assert results == predictor.predict(["good film", "the plot"])
        assert set(results[0]["probabilities"]) == {"neg", "pos", "story"} and isinstance(results[1]["labels"], list)


def test_report_has_per_label_table(ml_run):
    from textune.report import write_report

    page = write_report(ml_run).read_text()
    assert "Per label (validation)" in page and "saved threshold" in page and "micro F1" in page


# ---------------------------------------------------------------- bad input and the CLI


def test_label_training_never_saw_names_the_row(tiny_model, ml_data, tmp_path):
    rng = random.Random(9)
    rows = [toy_row(rng) for _ in range(6)]
    rows[4]["labels"] = "pos|funny"
    bad = write_csv(tmp_path / "v.csv", rows)
    cfg = load_config(None, ml_overrides(tiny_model, {**ml_data, "validation": bad}, tmp_path / "run"))
    with pytest.raises(TextuneError, match=r"data\.validation row 5: label 'funny' is not one training has"):
        get_task("multi-label").load_inputs(cfg)


def test_empty_label_stops_the_cli_before_anything_is_written(tiny_model, tmp_path, capsys):
    from textune.cli import main

    rows = [{"text": "good film", "labels": "pos"}, {"text": "bad film", "labels": "neg||pos"}] * 3
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"task": "multi-label", "output_dir": str(out), "model": {"name": str(tiny_model)},
                                  "data": {"train": str(write_csv(tmp_path / "t.csv", rows)),
                                           "label_column": "labels"}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.train row 2" in err[0] and "empty label" in err[0], err
    assert not out.exists()


def test_cli_train_evaluate_predict(tiny_model, ml_data, tmp_path):
    cfg = tmp_path / "ml.yaml"
    cfg.write_text(json.dumps({"task": "multi-label", "output_dir": str(tmp_path / "run"),
                               "model": {"name": str(tiny_model), "max_length": 32},
                               "data": {"train": str(ml_data["train"]), "validation": str(ml_data["validation"]),
                                        "label_column": "labels"},
                               "train": {"epochs": 1, "batch_size": 16, "mixed_precision": "no"}}))

    proc = run_textune("train", cfg)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "one per label chosen on validation" in proc.stdout and "f1_micro" in proc.stdout
    run = tmp_path / "run"
    proc = run_textune("evaluate", run, "--data", ml_data["validation"], "--output", tmp_path / "m.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threshold" in proc.stdout and "per_label" in json.loads((tmp_path / "m.json").read_text())
    texts = tmp_path / "in.txt"
    texts.write_text("good story\nbad acting\n")
    proc = run_textune("predict", run, "--input", texts, "--output", tmp_path / "p.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == "good story" and isinstance(rows[0]["labels"], list) and "probabilities" in rows[0]
