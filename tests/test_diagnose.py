"""diagnose_curves on synthetic histories of each shape, too-short histories, and a real tiny run."""

import json
import math

import pytest

from textune.cli import main
from textune.diagnose import VERDICTS, diagnose_curves, diagnose_run, format_diagnosis, load_history
from textune.errors import TextuneError

BALANCED = {"negative": 500, "positive": 500}


def make_history(train_losses, eval_losses=(), eval_accuracy=None, log_every=10):
    """History records: a training loss every `log_every` steps, evaluations spread evenly over the run."""
    records = [{"type": "train", "step": (i + 1) * log_every, "epoch": 0.0, "loss": loss, "lr": 5e-5}
               for i, loss in enumerate(train_losses)]
    total = len(train_losses) * log_every
    evals = []
    for i, loss in enumerate(eval_losses):
        step = round(total * (i + 1) / len(eval_losses))
        rec = {"type": "eval", "step": step, "epoch": float(i + 1), "eval_loss": loss}
        if eval_accuracy is not None:
            rec["eval_accuracy"] = eval_accuracy[i]
        evals.append(rec)
    return sorted(records + evals, key=lambda r: (r["step"], r["type"] == "eval"))


def decaying(n, start=0.69, end=0.2, rate=0.15, wiggle=0.01):
    """A falling, levelling-off loss with a little deterministic noise."""
    return [end + (start - end) * math.exp(-rate * i) + wiggle * math.sin(3 * i) for i in range(n)]


def test_healthy_run_falls_levels_off_with_small_gap():
    d = diagnose_curves(make_history(decaying(60), [0.45, 0.32, 0.28, 0.27, 0.265], [0.8, 0.87, 0.89, 0.9, 0.9]),
                        BALANCED)
    assert d.verdict == "healthy", d
    assert any("fell from 0.69" in e for e in d.evidence)
    assert any("levelled off" in e for e in d.evidence)
    assert d.best_epoch == 5.0


def test_a_run_stopped_while_the_loss_still_falls_is_still_learning_not_healthy():
    train = [0.69 - 0.008 * i for i in range(60)]  # straight down to 0.22, no levelling off
    d = diagnose_curves(make_history(train, [0.5, 0.4, 0.33], [0.8, 0.85, 0.88]), BALANCED)
    assert d.verdict == "still-learning", d
    assert any("still falling at the end: by 17% of its start in the last quarter" in e for e in d.evidence)
    assert "train longer: more train.epochs (or a higher train.max_steps)" in d.remedies
    assert format_diagnosis(d).splitlines()[0] == "diagnosis  still-learning"


# Issue 30: a barely trained model was "healthy" while a classifier in the same state was "inconclusive".
FIVE_STEPS = [2.10, 1.95, 1.70, 1.45, 1.20]  # NER after 5 steps, logged every step: still falling fast


def five_step_history(metric: str, value: float, step_zero: bool = False) -> list[dict]:
    history = [{"type": "train", "step": i + 1, "epoch": (i + 1) / 5, "loss": v} for i, v in enumerate(FIVE_STEPS)]
    evals = [{"type": "eval", "step": 5, "epoch": 1.0, "eval_loss": 1.3, f"eval_{metric}": value}]
    if step_zero:  # instruction tuning and pretraining evaluate the base model first
        evals.insert(0, {"type": "eval", "step": 0, "epoch": 0.0, "eval_loss": 2.2, f"eval_{metric}": 0.0})
    return sorted(history + evals, key=lambda r: (r["step"], r["type"] == "eval"))


@pytest.mark.parametrize("metric, value, step_zero, counts", [
    ("f1", 0.09, False, None),  # token classification
    ("accuracy", 0.55, False, BALANCED),  # classification
    ("exact_match", 0.0, True, None),  # instruction tuning, evaluated at step 0 too
    ("f1", 0.1, True, None),
])
def test_one_rule_for_every_task_a_loss_still_falling_is_still_learning(metric, value, step_zero, counts):
    d = diagnose_curves(five_step_history(metric, value, step_zero), counts, metric=metric)
    assert d.verdict == "still-learning", d


@pytest.mark.parametrize("evaluations", [1, 2, 5])
def test_one_training_loss_point_is_inconclusive_however_many_evaluations(evaluations):
    # QA and instruction runs with one logged loss (and a step-0 evaluation) were called healthy.
    history = [{"type": "train", "step": 5, "epoch": 1.0, "loss": 1.2}]
    history += [{"type": "eval", "step": 5 * i, "epoch": float(i), "eval_loss": 2.0 - 0.1 * i}
                for i in range(evaluations)]
    d = diagnose_curves(history, None)
    assert d.verdict == "inconclusive" and "too few to judge" in d.evidence[0], d
    assert "train longer" in d.remedies[0]


def test_three_levelled_points_are_too_few_to_call_healthy():
    d = diagnose_curves(make_history([0.5, 0.45, 0.45], [0.4, 0.4]), BALANCED)
    assert d.verdict == "inconclusive" and any("whether the loss levelled off" in e for e in d.evidence), d


def test_overfitting_names_best_epoch_and_suggests_stopping_there():
    train = decaying(60, end=0.01, rate=0.1)
    d = diagnose_curves(make_history(train, [0.40, 0.31, 0.30, 0.36, 0.45, 0.55],
                                     [0.85, 0.88, 0.89, 0.88, 0.88, 0.87]), BALANCED)
    assert d.verdict == "overfitting", d
    assert d.best_epoch == 3.0 and d.best_step == 300
    assert "lowest at epoch 3" in d.evidence[0] and "rose over the 3 evaluation" in d.evidence[0]
    assert any("training loss kept falling" in e for e in d.evidence)
    remedies = " ".join(d.remedies)
    assert "epoch 3" in remedies and "early_stopping_patience" in remedies and "weight decay" in remedies
    assert "dropout" in remedies and "more training data" in remedies


def test_validation_loss_rising_once_is_not_overfitting():
    train = decaying(60, end=0.05, rate=0.1)
    d = diagnose_curves(make_history(train, [0.40, 0.31, 0.30, 0.29, 0.33], [0.85, 0.88, 0.89, 0.9, 0.9]), BALANCED)
    assert d.verdict != "overfitting", d


def test_underfitting_when_losses_stay_high_and_accuracy_is_near_majority():
    counts = {"negative": 550, "positive": 450}
    d = diagnose_curves(make_history(decaying(40, start=0.70, end=0.67, rate=0.05), [0.69, 0.685, 0.68],
                                     [0.55, 0.56, 0.565]), counts)
    assert d.verdict == "underfitting", d
    assert any("majority class (0.5500)" in e for e in d.evidence)
    assert any("label frequencies" in e for e in d.evidence)
    remedies = " ".join(d.remedies)
    assert "train.epochs" in remedies and "train.lr" in remedies and "tuning.method full" in remedies
    assert "bigger model" in remedies
    assert any("0.5650 is within 3% of always predicting" in e for e in d.evidence)


def test_accuracy_below_the_majority_rate_is_said_so():
    counts = {"negative": 600, "positive": 400}
    d = diagnose_curves(make_history(decaying(40, start=0.70, end=0.67, rate=0.05), [0.69, 0.685, 0.68],
                                     [0.46, 0.47, 0.48]), counts)
    assert d.verdict == "underfitting", d
    assert any("0.4800 is below always predicting the majority class (0.6000)" in e for e in d.evidence)


def test_underfitting_without_label_counts_uses_the_starting_loss():
    d = diagnose_curves(make_history(decaying(40, start=0.70, end=0.66, rate=0.05), [0.69, 0.68]))
    assert d.verdict == "underfitting", d
    assert any("starting loss" in e for e in d.evidence)


def test_unstable_when_training_loss_spikes():
    train = decaying(60)
    for i in (15, 30, 45):
        train[i] += 0.5
    d = diagnose_curves(make_history(train, [0.4, 0.35, 0.33]), BALANCED)
    assert d.verdict == "unstable", d
    assert "3 training-loss spikes" in d.evidence[0] and "160, 310, 460" in d.evidence[0]
    assert any("learning rate" in r for r in d.remedies)


def test_unstable_when_training_loss_swings():
    train = [0.69, 0.6, 0.5] + [0.25 if i % 2 else 0.55 for i in range(30)]
    d = diagnose_curves(make_history(train, [0.4, 0.38]), BALANCED)
    assert d.verdict == "unstable", d
    assert any("swings" in e for e in d.evidence)


def test_one_spike_that_recovers_is_noted_not_a_verdict():
    train = decaying(60)
    train[30] += 0.5
    d = diagnose_curves(make_history(train, [0.45, 0.32, 0.28, 0.27]), BALANCED)
    assert d.verdict == "healthy"
    assert any("one loss spike at step 310" in e for e in d.evidence)


@pytest.mark.parametrize("loss, match", [(float("nan"), "not a finite number"), (float("inf"), "not a finite number")])
def test_diverged_on_non_finite_loss(loss, match):
    train = decaying(20) + [loss, loss]
    d = diagnose_curves(make_history(train, [0.4, 0.5]), BALANCED)
    assert d.verdict == "diverged"
    assert match in d.evidence[0] and "step 210" in d.evidence[0]
    assert any("lower the learning rate" in r for r in d.remedies)


def test_diverged_when_loss_explodes():
    train = [0.69, 0.6, 0.9, 1.8, 3.5, 6.0, 9.0]
    d = diagnose_curves(make_history(train, [4.0, 8.0]), BALANCED)
    assert d.verdict == "diverged"
    assert "exploded" in d.evidence[0]


def test_diverged_when_loss_collapses_back_to_chance():
    train = decaying(20, end=0.2) + [0.5, 0.69, 0.70, 0.69, 0.70, 0.69]
    d = diagnose_curves(make_history(train, [0.3, 0.7]), BALANCED)
    assert d.verdict == "diverged", d
    assert "collapsed" in d.evidence[0]


@pytest.mark.parametrize("history", [[], make_history([0.69]), make_history([0.69, 0.5], [0.6])])
def test_too_few_points_is_inconclusive_not_a_crash(history):
    d = diagnose_curves(history, BALANCED)
    assert d.verdict == "inconclusive"
    assert "too few to judge" in d.evidence[0]
    assert "inconclusive" in format_diagnosis(d)


def test_one_evaluation_judges_the_rest_and_says_overfitting_was_not_judged():
    d = diagnose_curves(make_history(decaying(40), [0.3], [0.9]), BALANCED)
    assert d.verdict == "healthy"
    assert any("overfitting cannot be judged" in e for e in d.evidence)


def test_format_diagnosis_lists_evidence_and_remedies():
    d = diagnose_curves(make_history(decaying(40, start=0.70, end=0.67, rate=0.05), [0.69, 0.685]), BALANCED)
    text = format_diagnosis(d)
    assert text.splitlines()[0] == "diagnosis  underfitting"
    assert "  try:" in text and "  - train longer (train.epochs)" in text


def test_load_history_errors_name_the_problem(tmp_path):
    with pytest.raises(TextuneError, match="has no history.jsonl; pass a run folder"):
        load_history(tmp_path)
    (tmp_path / "history.jsonl").write_text('{"type": "train"\n{"type": "train", "step": 1, "loss": 0.5}\n')
    with pytest.raises(TextuneError, match="line 1 is not JSON"):
        load_history(tmp_path)
    # A run killed mid-write leaves a half line at the end: ignored.
    (tmp_path / "history.jsonl").write_text('{"type": "train", "step": 1, "loss": 0.5}\n{"type": "tr')
    assert load_history(tmp_path) == [{"type": "train", "step": 1, "loss": 0.5}]


def test_real_tiny_run_gets_a_verdict(trained_run):
    d = diagnose_run(trained_run)
    assert d.verdict in VERDICTS and d.verdict != "inconclusive"
    assert d.evidence and d.best_step is not None


def test_cli_diagnose(trained_run, tmp_path, capsys):
    assert main(["diagnose", str(trained_run)]) == 0
    assert capsys.readouterr().out.startswith("diagnosis  ")
    assert main(["diagnose", str(trained_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] in VERDICTS and out["evidence"]
    assert main(["diagnose", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textune: error: ") and "has no history.jsonl" in err and "\n" not in err


# ---------------------------------------------------------------- the selection metric (issue 18 item 17)

# MRPC as measured: validation loss lowest at epoch 2, validation F1 still rising to epoch 4 (the kept checkpoint).
MRPC_LOSSES = [0.40, 0.36, 0.42, 0.50]
MRPC_F1 = [0.80, 0.843, 0.86, 0.874]


def mrpc_history(f1=MRPC_F1):
    history = make_history(decaying(60, end=0.01, rate=0.1), MRPC_LOSSES, [0.78, 0.81, 0.82, 0.83])
    for rec in (r for r in history if r["type"] == "eval"):
        rec["eval_f1"] = f1[int(rec["epoch"]) - 1]
    return history


def test_rising_loss_with_a_rising_selection_metric_is_overconfidence_not_overfitting():
    d = diagnose_curves(mrpc_history(), BALANCED, metric="f1", greater_is_better=True)
    assert d.verdict != "overfitting", d
    evidence, remedies = " ".join(d.evidence), " ".join(d.remedies)
    assert "f1, which selects the checkpoint, kept improving: 0.8430 at epoch 2 -> 0.8740 at epoch 4" in evidence
    assert "overconfidence" in evidence and "not a reason to stop" in evidence
    assert "stop at epoch 2" not in remedies and "epoch 4" in remedies and "calibrat" in remedies
    # A run that selects on the loss keeps the loss-based verdict and advice.
    for kwargs in ({}, {"metric": "loss", "greater_is_better": False}):
        d = diagnose_curves(mrpc_history(), BALANCED, **kwargs)
        assert d.verdict == "overfitting" and "stop at epoch 2" in " ".join(d.remedies)


def test_selection_metric_that_peaked_with_the_loss_is_overfitting_and_names_its_best_epoch():
    d = diagnose_curves(mrpc_history(f1=[0.80, 0.85, 0.83, 0.82]), BALANCED, metric="f1", greater_is_better=True)
    assert d.verdict == "overfitting", d
    assert any("f1, which selects the checkpoint, was best at epoch 2 (0.8500) and fell to 0.8200" in e
               for e in d.evidence)
    assert "stop at epoch 2" in " ".join(d.remedies)


def test_diagnose_run_reads_the_selection_metric_from_the_run_config(tmp_path, capsys):
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mrpc_history()))
    (tmp_path / "config.yaml").write_text("train:\n  metric: f1\n  greater_is_better: true\n")
    assert diagnose_run(tmp_path).verdict != "overfitting"
    assert main(["diagnose", str(tmp_path)]) == 0
    assert "overconfidence" in capsys.readouterr().out
    (tmp_path / "config.yaml").write_text("train:\n  metric: loss\n  greater_is_better: false\n")
    assert diagnose_run(tmp_path).verdict == "overfitting"
