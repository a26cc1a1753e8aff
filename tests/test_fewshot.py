"""Few-shot classification: data.max_train_per_class and train.method contrastive (SetFit's method,
tasks/contrastive.py) on the tiny random BERT: pair sampling, per-class sampling, a run that trains, saves,
predicts, evaluates, exports and serves like any classifier, and the bad inputs."""

import json

import numpy as np
import pytest
import yaml
from conftest import nested, toy_overrides, write_csv

from textune.config import ConfigError, load_config
from textune.data import sample_per_class
from textune.errors import TextuneError
from textune.tasks.contrastive import contrastive_pairs


# ------------------------------------------------------------ pair sampling


def test_pairs_are_balanced_alternating_and_seeded():
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]  # 6 + 3 + 10 = 19 same-label pairs (a row with itself included), 26 not
    first, second, target = contrastive_pairs(labels, ["a", "b", "c"], seed=3)
    assert len(target) == 2 * 26  # oversampling: the rarer kind (same label) repeated to the other's count
    assert target[0::2].tolist() == [1.0] * 26 and target[1::2].tolist() == [0.0] * 26
    lab = np.asarray(labels)
    assert ((lab[first] == lab[second]) == target.astype(bool)).all()
    assert len({(a, b) for a, b, t in zip(first, second, target) if t == 0}) == 26  # every negative pair once
    again = contrastive_pairs(labels, ["a", "b", "c"], seed=3)
    other = contrastive_pairs(labels, ["a", "b", "c"], seed=4)
    assert all((x == y).all() for x, y in zip((first, second, target), again))
    assert not (first == other[0]).all() or not (second == other[1]).all()


def test_num_iterations_fixes_the_pair_count():
    first, _, target = contrastive_pairs([0, 0, 1, 1, 1], ["a", "b"], seed=0, num_iterations=3)
    assert len(first) == 2 * 3 * 5 and target.sum() == 15


def test_a_label_with_one_row_is_refused():
    with pytest.raises(TextuneError, match=r"'b' has one training row; give each label 2 or more rows"):
        contrastive_pairs([0, 0, 1], ["a", "b"], seed=0)


# ------------------------------------------------------------ per-class sampling


def test_per_class_sampling_is_stratified_seeded_and_says_who_is_short():
    from datasets import Dataset

    labels = [0] * 30 + [1] * 20 + [2] * 3
    ds = Dataset.from_dict({"labels": labels, "i": list(range(len(labels)))})
    notes = []
    got = sample_per_class(ds, 8, ["a", "b", "c"], seed=1, notes=notes)
    assert np.bincount(got["labels"]).tolist() == [8, 8, 3]
    assert got["i"] == sample_per_class(ds, 8, ["a", "b", "c"], seed=1, notes=[])["i"]
    assert got["i"] != sample_per_class(ds, 8, ["a", "b", "c"], seed=2, notes=[])["i"]
    assert notes == ["data.max_train_per_class 8: 'c' (3) has fewer training rows than that and keeps all of them"]


# ------------------------------------------------------------ config


def test_config_refuses_what_contrastive_cannot_do(tmp_path):
    base = {"data.train": "x.csv", "output_dir": str(tmp_path / "r")}
    with pytest.raises(ConfigError, match=r"train.method: contrastive is for task classification, not regression"):
        load_config(None, {**base, "task": "regression", "train.method": "contrastive"})
    with pytest.raises(ConfigError, match=r"data.max_train_per_class: is for task classification, not regression"):
        load_config(None, {**base, "task": "regression", "data.max_train_per_class": 8})
    with pytest.raises(ConfigError, match=r"tuning.method: cannot be used with train.method contrastive"):
        load_config(None, {**base, "train.method": "contrastive", "tuning.method": "lora"})
    with pytest.raises(ConfigError, match=r"data.long_text: cannot be used with train.method contrastive: a pair"):
        load_config(None, {**base, "train.method": "contrastive", "data.long_text": "chunks"})
    with pytest.raises(ConfigError, match=r"train.num_iterations: counts the pairs of train.method contrastive"):
        load_config(None, {**base, "train.num_iterations": 5})
    with pytest.raises(ConfigError, match=r"data.max_train_per_class: must be greater than 0"):
        load_config(None, {**base, "data.max_train_per_class": 0})


# ------------------------------------------------------------ a contrastive run end to end


@pytest.fixture(scope="module")
def fewshot_run(tiny_model, toy_data, tmp_path_factory):
    from textune.train import train

    out = tmp_path_factory.mktemp("runs") / "fewshot"
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, out, **{
        "train.method": "contrastive", "data.max_train_per_class": 16, "train.epochs": 2, "train.lr": 3e-3}))
    return train(cfg)


def test_trains_saves_and_fits_a_head(fewshot_run):
    from textune.tasks import load_predictor

    saved = json.loads((fewshot_run / "model" / "config.json").read_text())
    assert saved["architectures"] == ["SentenceEncoderForSequenceClassification"]
    assert not list((fewshot_run / "model").glob("*.bin")) and not list((fewshot_run / "model").glob("*.pkl"))
    metrics = json.loads((fewshot_run / "metrics.json").read_text())
    assert sum(json.loads((fewshot_run / "data_stats.json").read_text())["label_counts"]["train"].values()) == 32
    assert metrics["validation"]["accuracy"] > 0.8  # 16 rows per class of the toy task, fitted head
    predictor = load_predictor(fewshot_run)
    rows = predictor.predict(["a great film", "the plot was boring"])
    assert [r["label"] for r in rows] == ["positive", "negative"]
    history = [json.loads(line) for line in (fewshot_run / "history.jsonl").read_text().splitlines()]
    assert (history[0]["type"], history[0]["step"]) == ("eval", 0)  # the base encoder with a fitted head
    assert history[1]["type"] == "train" and history[1]["loss"] < 0.5  # squared error of cosines


def test_evaluates_and_predicts_through_the_cli(fewshot_run, toy_data, tmp_path, capsys):
    from textune.cli import main

    assert main(["evaluate", str(fewshot_run), "--data", str(toy_data["test"]), "--output",
                 str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] > 0.8
    (tmp_path / "in.txt").write_text("a great film\nthe plot was boring\n")
    assert main(["predict", str(fewshot_run), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]


def test_exports_to_onnx_and_agrees(fewshot_run, tmp_path):
    from textune.cli import main
    from textune.tasks import load_predictor

    assert main(["export", str(fewshot_run), "--output", str(tmp_path / "onnx")]) == 0
    texts = ["a great film", "the plot was boring", "it was nice and the acting was poor"]
    on_export = load_predictor(tmp_path / "onnx")
    assert np.allclose(on_export.predict_proba(texts), load_predictor(fewshot_run).predict_proba(texts), atol=1e-5)


def test_serves_v1_classify(fewshot_run):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app
    from textune.tasks import load_predictor

    with TestClient(create_app(load_predictor(fewshot_run), ServeSettings(), "fewshot")) as client:
        r = client.post("/v1/classify", json={"texts": ["a great film", "the plot was boring"]})
        assert r.status_code == 200, r.text
        assert [x["label"] for x in r.json()["results"]] == ["positive", "negative"]


# ------------------------------------------------------------ bad input through the CLI


def write_config(folder, overrides: dict):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(nested(overrides)))
    return path


def test_one_row_of_a_class_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys):
    from textune.cli import main

    rows = [{"text": "a great film", "label": "positive"}, {"text": "good and nice", "label": "positive"},
            {"text": "the plot was boring", "label": "negative"}]
    train = write_csv(tmp_path / "train.csv", rows)
    out = tmp_path / "run"
    config = write_config(tmp_path, {"model.name": str(tiny_model), "data.train": str(train),
                                     "data.validation": str(train), "train.method": "contrastive"})
    code = main(["train", str(config), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "'negative' has one training row" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_contrastive_for_another_task_is_one_line(tmp_path, capsys):
    from textune.cli import main

    config = write_config(tmp_path, {"task": "regression", "data.train": "x.csv", "train.method": "contrastive"})
    code = main(["train", str(config), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train.method: contrastive is for task classification, not regression" in err, err
    assert not (tmp_path / "run").exists()
