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
