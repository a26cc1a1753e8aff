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


# ---------------------------------------------------------------- GLUE metrics, class weights, compute_metrics


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


def test_glue_metrics_are_selectable():
    from textune.config import load_config

    for metric in ("mcc", "f1_weighted", "roc_auc", "average_precision"):
        cfg = load_config(None, {"data.train": "x.csv", "train.metric": metric})
        assert cfg.train.greater_is_better


def test_class_weights_change_the_loss_as_expected():
    import torch

    from textune.tasks.classification import ClassWeightedLoss, class_weights

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, **batch):
            return type("Out", (), {"logits": self.logits})()

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    per_row = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    model, batch = Fixed(logits), {"input_ids": torch.zeros(3, 2), "labels": labels}
    assert ClassWeightedLoss([1.0, 1.0])(model, batch) == pytest.approx(per_row.mean().item())
    # weighted mean: sum w_y * loss / sum w_y
    expected = (1 * per_row[0] + 4 * per_row[1] + 4 * per_row[2]) / 9
    assert ClassWeightedLoss([1.0, 4.0])(model, batch) == pytest.approx(expected.item())
    # balanced: n / (classes * count); a class without rows weighs 1
    assert class_weights("balanced", ["a", "b"], [0, 0, 0, 1]) == pytest.approx([4 / 6, 4 / 2])
    assert class_weights({"b": 3.0}, ["a", "b"], [0, 1]) == [1.0, 3.0]
    from textune.errors import TextuneError

    with pytest.raises(TextuneError, match=r"train\.class_weights: 'c' is not a label of the data"):
        class_weights({"c": 2.0}, ["a", "b"], [0, 1])


def test_class_weights_config_and_loss_choice(tiny_model, toy_data, tmp_path):
    from textune.augment import Mixup
    from textune.config import load_config
    from textune.errors import ConfigError
    from textune.tasks import get_task
    from textune.tasks.classification import ClassWeightedLoss

    base = {"model.name": str(tiny_model), "data.train": str(toy_data["train"]),
            "data.validation": str(toy_data["validation"]), "model.max_length": 32}
    with pytest.raises(ConfigError, match=r"train\.class_weights: cannot be combined with data\.augment\.mixup_alpha"):
        load_config(None, {**base, "train.class_weights": "balanced", "data.augment.mixup_alpha": 0.2})
    with pytest.raises(ConfigError, match=r"train\.class_weights: is for task classification, not regression"):
        load_config(None, {**base, "task": "regression", "train.class_weights": "balanced"})
    with pytest.raises(ConfigError, match=r"train\.class_weights: expected one of none, balanced or a mapping"):
        load_config(None, {**base, "train.class_weights": "heavy"})
    task = get_task("classification")
    assert task.load_inputs(load_config(None, base)).loss_fn is None
    assert isinstance(task.load_inputs(load_config(None, {**base, "data.augment.mixup_alpha": 0.2})).loss_fn, Mixup)
    inputs = task.load_inputs(load_config(None, {**base, "train.class_weights": {"positive": 2}}))
    assert isinstance(inputs.loss_fn, ClassWeightedLoss) and inputs.loss_fn.weights.tolist() == [1.0, 2.0]
    assert "loss       cross-entropy weighted by class (given): negative=1, positive=2" in \
        inputs.summary(load_config(None, {**base, "train.class_weights": {"positive": 2}}))


def test_compute_metrics_hook_reaches_classification_metrics(tiny_model, toy_data, tmp_path):
    from textune.config import load_config
    from textune.train import train

    calls = []

    def hook(probs, labels):
        calls.append(probs.shape)
        return {"positive_share": float((probs.argmax(-1) == 1).mean())}

    run = train(load_config(None, {"model.name": str(tiny_model), "data.train": str(toy_data["train"]),
                                   "data.validation": str(toy_data["validation"]), "model.max_length": 32,
                                   "train.max_steps": 4, "train.batch_size": 16, "train.mixed_precision": "no",
                                   "train.class_weights": "balanced", "output_dir": str(tmp_path / "run")}),
                compute_metrics=hook)
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    assert calls[-1] == (64, 2) and "positive_share" in metrics and "mcc" in metrics and "roc_auc" in metrics
