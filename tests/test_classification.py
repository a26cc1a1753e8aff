"""The classification task's own parts: its metrics (scikit-learn's, GLUE's), the confusion matrix printed for a
terminal, and the calibration maths of its report section."""

import json

import numpy as np
import pytest

from textune.tasks.classification import (classification_metrics, expected_calibration_error, format_confusion,
                                          reliability_bins)


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


def test_mcc_weighted_f1_and_ranking_metrics_hand_case():
    labels = np.array([0, 0, 0, 1, 1, 1])
    preds = np.array([0, 0, 1, 1, 1, 0])
    # tp 2, tn 2, fp 1, fn 1: MCC = (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.65, 0.35]])
    m = classification_metrics(labels, preds, ["neg", "pos"], probs)
    assert m["mcc"] == pytest.approx(1 / 3)
    assert m["f1_weighted"] == pytest.approx(2 / 3)  # both classes' F1 are 2/3
    # positive scores 0.7, 0.8, 0.35 against negative 0.1, 0.2, 0.6: 8 of 9 pairs ranked right (0.35 < 0.6)
    assert m["roc_auc"] == pytest.approx(8 / 9)
    # ranked 0.8 P, 0.7 P, 0.6 N, 0.35 P: precision 1, 1, 3/4 at the three positives
    assert m["average_precision"] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert {"accuracy", "f1", "f1_macro", "precision", "recall", "confusion_matrix"} <= set(m)  # kept
    assert "roc_auc" not in classification_metrics(labels, preds, ["neg", "pos"])  # without probabilities


def test_mcc_of_a_perfect_and_an_inverted_classifier():
    labels = np.array([0, 1, 2, 0, 1, 2])
    assert classification_metrics(labels, labels, ["a", "b", "c"])["mcc"] == pytest.approx(1.0)
    assert classification_metrics(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0]), ["a", "b"])["mcc"] == \
        pytest.approx(-1.0)


def test_multiclass_ranking_metrics_are_one_vs_rest_and_nan_when_undefined():
    probs = np.eye(3)[[0, 1, 2, 2]] * 0.7 + 0.1
    m = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2]), ["a", "b", "c"], probs)
    assert m["roc_auc"] == pytest.approx(1.0) and m["average_precision"] == pytest.approx(1.0)
    one_class = classification_metrics(np.array([1, 1]), np.array([1, 1]), ["a", "b"], np.array([[0.2, 0.8]] * 2))
    assert np.isnan(one_class["roc_auc"])


# ---------------------------------------------------------------- printing many classes (issue 18 item 19)

LONG_NAMES = [f"category {i:02d}: a rather long descriptive class name" for i in range(20)]


def many_class_metrics():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 10)
    preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 20, 200))
    preds[labels == 3] = 7  # class 3 is always taken for class 7: the largest confusion, F1 0
    return classification_metrics(labels, preds, LONG_NAMES)


def test_confusion_summary_past_the_terminal_width():
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


# ---------------------------------------------------------------- GLUE metrics, class weights, compute_metrics


def test_ece_of_a_calibrated_and_an_overconfident_model():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    labels = (rng.uniform(size=conf.size) >= conf).astype(int)  # class 0 is right with probability conf
    probs = np.stack([conf, 1 - conf], axis=1)
    assert expected_calibration_error(probs, labels) < 0.01
    # Always 90% sure, right 60% of the time: one bin, ECE = |0.6 - 0.9| = 0.3.
    probs = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3)


def test_reliability_bins_put_edges_in_the_lower_bin():
    count, mean_conf, acc = reliability_bins(np.array([0.1, 0.55, 0.6, 1.0]), np.array([1, 0, 1, 1]), 10)
    assert count.tolist() == [1, 0, 0, 0, 0, 2, 0, 0, 0, 1]
    assert mean_conf[5] == pytest.approx(0.575) and acc[5] == pytest.approx(0.5)
