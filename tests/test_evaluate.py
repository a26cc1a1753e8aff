import json

import pytest

from textune.evaluate import headline


def test_headline():
    assert headline({"loss": 0.5, "accuracy": 0.9, "f1": 0.8, "f1_macro": 0.7}) == \
        "loss 0.5000, accuracy 0.9000, f1 0.8000, f1_macro 0.7000"


def test_headline_shows_the_runs_metric_where_the_usual_ones_miss_it():
    metrics = {"loss": 0.5, "accuracy": 0.9, "mcc": 0.25}
    assert headline(metrics, "mcc") == "loss 0.5000, accuracy 0.9000, mcc 0.2500"
    assert headline(metrics, "accuracy") == headline(metrics) == "loss 0.5000, accuracy 0.9000"


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
