import json

import numpy as np
import pytest

from textune.evaluate import classification_metrics, headline


def test_binary_metrics_use_class_one_as_positive():
    labels = np.array([0, 0, 1, 1, 1])
    preds = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(labels, preds, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == {"labels": ["neg", "pos"], "matrix": [[1, 1], [1, 2]]}
    assert m["per_class"]["pos"]["support"] == 3 and m["examples"] == 5


def test_multiclass_f1_is_macro_and_absent_classes_count():
    labels = np.array([0, 1, 2, 2])
    preds = np.array([0, 1, 1, 2])
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["f1"] == m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    m = classification_metrics(np.array([0, 0]), np.array([0, 0]), ["a", "b", "c"])
    assert len(m["confusion_matrix"]["matrix"]) == 3  # classes missing from this split still get a row


def test_headline():
    assert headline({"loss": 0.5, "accuracy": 0.9, "f1": 0.8, "f1_macro": 0.7}) == \
        "loss 0.5000, accuracy 0.9000, f1 0.8000, f1_macro 0.7000"


# ---------------------------------------------------------------- printing many classes (issue 18 item 19)

LONG_NAMES = [f"category {i:02d}: a rather long descriptive class name" for i in range(20)]


def many_class_metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 10)
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 20, 200))
    preds[labels == 3] = 7  # class 3 is always taken for class 7: the largest confusion, F1 0
    return classification_metrics(labels, preds, LONG_NAMES)


def test_confusion_summary_past_the_terminal_width():
    from textune.evaluate import format_confusion

    text = format_confusion(many_class_metrics(), width=100)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].startswith("largest confusions (true -> predicted")
    true, pred = lines[1].strip().split(" -> ")  # names shortened to fit the width
    assert LONG_NAMES[3].startswith(true.rstrip("…")) and pred.endswith(": 10 (100% of its rows)")
    assert pred.startswith("category 07")
    f1_at = lines.index(next(line for line in lines if line.startswith("per-class F1")))
    assert lines[f1_at + 1].strip().startswith(LONG_NAMES[3][:40]) and " 0.0000  (support 10)" in lines[f1_at + 1]
    f1s = [float(line.split()[-3]) for line in lines[f1_at + 1:]]
    assert f1s == sorted(f1s) and len(f1s) == 20


def test_confusion_matrix_that_fits_is_printed_whole():
    from textune.evaluate import format_confusion

    m = classification_metrics(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["neg", "pos"])
    assert format_confusion(m, width=80).splitlines() == [
        "true \\ pred      neg      pos", "neg              1        1", "pos              1        2"]


def test_cli_evaluate_with_twenty_classes_fits_the_terminal(tiny_model, tmp_path, monkeypatch, capsys):
    from conftest import toy_rows, write_csv
    from textune.cli import main
    from textune.models import load_classifier, load_tokenizer

    folder = tmp_path / "model"
    load_classifier(str(tiny_model), LONG_NAMES).save_pretrained(folder)
    load_tokenizer(str(tiny_model)).save_pretrained(folder)
    rows = [{"text": r["text"], "label": LONG_NAMES[i % 20]} for i, r in enumerate(toy_rows(60, 0))]
    monkeypatch.setenv("COLUMNS", "120")
    assert main(["evaluate", str(folder), "--data", str(write_csv(tmp_path / "d.csv", rows)),
                 "--output", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out.splitlines()[1:-1]  # between the headline and "metrics written to"
    assert printed and max(map(len, printed)) <= 120
    assert len(json.loads((tmp_path / "m.json").read_text())["confusion_matrix"]["matrix"]) == 20
