"""Zero-shot baselines (issue 31): what a rule that needs no training scores on validation (the majority class, the
mean target, the untrained model's embedding cosine of a text pair), measured at start-up, said in the summary,
kept in RUN/data_stats.json, and a run below one flagged by the diagnosis, the report and `textune diagnose`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, build_tiny_lm, write_csv
from textune.cli import main
from textune.config import load_config
from textune.diagnose import diagnose_curves, diagnose_run, format_baselines, format_diagnosis
from textune.tasks.classification import cosine_rule

STEPS = {"train.max_steps": 4, "train.logging_steps": 1, "train.batch_size": 16, "train.lr": 1e-3,
         "train.warmup_ratio": 0.0, "train.mixed_precision": "no", "model.max_length": 32}


def pair_rows(n: int, seed: int) -> list[dict]:
    """Two short texts with one sentiment word each; `score` counts the positive ones (0, 1, 2) and `same` says
    whether both texts have the same sentiment."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        row, signs = {}, []
        for column in ("text", "text_b"):
            positive = rng.random() < 0.5
            signs.append(positive)
            words = rng.sample(FILLER, rng.randint(1, 3))
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
            row[column] = " ".join(words)
        rows.append({**row, "score": float(sum(signs)), "same": "same" if signs[0] == signs[1] else "different"})
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pairs")
    train, validation = pair_rows(120, 1), pair_rows(40, 2)
    return {"train": write_csv(d / "train.csv", train), "validation": write_csv(d / "validation.csv", validation),
            "train_rows": train, "validation_rows": validation}


def pair_overrides(tiny_model, data: dict, out, task: str, label: str, **extra) -> dict:
    return {"task": task, "model.name": str(tiny_model), "data.train": str(data["train"]),
            "data.validation": str(data["validation"]), "data.text_pair_column": "text_b",
            "data.label_column": label, "output_dir": str(out), **STEPS, **extra}


def untrained_cosines(tiny_model, rows: list[dict]) -> np.ndarray:
    """The cosine of each row's two texts by the tiny BERT as saved, mean-pooled: computed apart from textune's
    loop, from the model folder."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model, tokenizer = AutoModel.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return (embed([r["text"] for r in rows]) * embed([r["text_b"] for r in rows])).sum(axis=1)


# ---------------------------------------------------------------- measured at start-up


def test_regression_pairs_measure_the_mean_target_and_the_untrained_cosine(tiny_model, pair_data, tmp_path, capsys):
    from scipy.stats import pearsonr, spearmanr

    from textune.train import train

    run = train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "run", "regression", "score")))
    baselines = json.loads((run / "data_stats.json").read_text())["baselines"]
    train_y = np.array([r["score"] for r in pair_data["train_rows"]])
    val_y = np.array([r["score"] for r in pair_data["validation_rows"]])
    mean = baselines["mean target"]
    assert mean["metrics"]["mse"] == pytest.approx(((val_y - train_y.mean()) ** 2).mean())
    assert mean["metrics"]["mae"] == pytest.approx(np.abs(val_y - train_y.mean()).mean())
    assert f"{train_y.mean():.4g}" in mean["rule"]
    cosine = baselines["base-model cosine"]
    expected = untrained_cosines(tiny_model, pair_data["validation_rows"])
    assert cosine["metrics"]["pearson"] == pytest.approx(pearsonr(expected, val_y)[0], abs=1e-4)
    assert cosine["metrics"]["spearman"] == pytest.approx(spearmanr(expected, val_y)[0], abs=1e-4)
    assert "mean pooling (the model folder states none)" in cosine["rule"]
    out = capsys.readouterr().out
    assert "baseline   mean target: mse " in out and "(the training mean" in out
    assert "baseline   base-model cosine: pearson " in out


def test_the_baseline_leaves_training_as_it_was(tiny_model, pair_data, tmp_path, monkeypatch):
    """Measuring the cosine draws nothing from the random generators training uses: the same losses without it."""
    from textune.tasks.regression import RegressionInputs
    from textune.train import train

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    with_baseline = losses(train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "a",
                                                                   "regression", "score"))))
    monkeypatch.setattr(RegressionInputs, "baselines", lambda self, cfg: {})
    without = losses(train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "b",
                                                            "regression", "score"))))
    assert with_baseline == without


def test_pair_classification_measures_the_majority_class_and_a_fitted_cosine_threshold(tiny_model, pair_data,
                                                                                       tmp_path):
    from textune.train import train

    run = train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "run", "classification", "same")))
    baselines = json.loads((run / "data_stats.json").read_text())["baselines"]
    names = sorted({r["same"] for r in pair_data["train_rows"]})
    train_y = [names.index(r["same"]) for r in pair_data["train_rows"]]
    val_y = np.array([names.index(r["same"]) for r in pair_data["validation_rows"]])
    majority = int(np.bincount(train_y).argmax())
    assert baselines["majority class"]["metrics"]["accuracy"] == pytest.approx((val_y == majority).mean())
    assert names[majority] in baselines["majority class"]["rule"]
    # The threshold is fitted on the training pairs (all 120: fewer than COSINE_FIT_PAIRS), then applied.
    threshold, side = cosine_rule(untrained_cosines(tiny_model, pair_data["train_rows"]), np.array(train_y))
    scores = side * untrained_cosines(tiny_model, pair_data["validation_rows"])
    cosine = baselines["base-model cosine"]
    assert cosine["metrics"]["accuracy"] == pytest.approx(((scores > side * threshold) == val_y).mean())
    assert "fitted on 120 training pairs" in cosine["rule"]
    assert set(cosine["metrics"]) >= {"accuracy", "f1", "mcc", "roc_auc"}


def test_single_texts_get_no_cosine_baseline(trained_run):
    baselines = json.loads((trained_run / "data_stats.json").read_text())["baselines"]
    assert list(baselines) == ["majority class"]


def test_too_many_validation_texts_skip_the_cosine_saying_why(tiny_model, pair_data, tmp_path, monkeypatch, capsys):
    from textune.tasks import sequence
    from textune.train import train

    monkeypatch.setattr(sequence, "COSINE_BASELINE_MAX_TEXTS", 50)
    run = train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "run", "regression", "score")))
    skipped = json.loads((run / "data_stats.json").read_text())["baselines"]["base-model cosine"]
    assert skipped["skipped"] == "validation has 80 texts, over 50: embedding them would slow start-up by minutes"
    assert "baseline   base-model cosine: not measured: validation has 80 texts" in capsys.readouterr().out


def test_a_causal_lm_has_no_pooling_to_compare_with(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from textune.tasks.sequence import baseline_pooling

    folder = build_tiny_lm(tmp_path / "clm", "clm")
    spec, why = baseline_pooling(str(folder), AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1))
    assert spec is None and why.startswith("the gpt2 model states no sentence pooling and is not a masked-LM encoder")


@pytest.mark.parametrize("scores, labels, expected", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], (0.5, 1)),      # class 1 above
    ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], (0.5, -1)),     # class 1 below: the side is fitted too
    ([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1], (0.3, 1)),      # never cut between equal scores
    ([0.5, 0.5, 0.5], [1, 1, 0], (-np.inf, 1)),          # no cut helps: every row gets the majority
])
def test_cosine_rule_fits_the_best_training_threshold(scores, labels, expected):
    assert cosine_rule(np.array(scores), np.array(labels)) == expected


# ---------------------------------------------------------------- the flag in the diagnosis and the report

LEE_BASELINES = {"mean target": {"rule": "the training mean, 0.4, for every row", "metrics": {"mse": 0.05}},
                 "base-model cosine": {"rule": "cosine of the untrained model's vectors", "advice": "try task: embedding",
                                       "metrics": {"pearson": 0.689, "spearman": 0.61}}}


def history(pearsons: list[float], mses: list[float] | None = None) -> list[dict]:
    train = [{"type": "train", "step": s, "epoch": s / 10, "loss": 0.1 / s, "lr": 1e-5} for s in range(1, 41)]
    evals = [{"type": "eval", "step": 10 * (i + 1), "epoch": i + 1, "eval_loss": 0.05, "eval_pearson": p,
              "eval_mse": (mses or [0.04] * len(pearsons))[i]} for i, p in enumerate(pearsons)]
    return train + evals


def test_a_run_below_its_zero_shot_baseline_is_flagged_with_both_figures_and_what_to_try():
    d = diagnose_curves(history([0.2, 0.274, 0.25]), metric="pearson", baselines=LEE_BASELINES)
    assert d.warnings == ["below its zero-shot baseline: the best validation pearson, 0.2740, is worse than the "
                          "base-model cosine's 0.6890 (cosine of the untrained model's vectors; no training)"]
    assert d.remedies[0] == "try task: embedding"
    assert format_diagnosis(d).splitlines()[1].startswith("  ! below its zero-shot baseline")
    assert d.to_dict()["warnings"] == d.warnings


def test_a_run_above_its_baselines_or_selecting_another_metric_is_not_flagged():
    assert diagnose_curves(history([0.5, 0.7]), metric="pearson", baselines=LEE_BASELINES).warnings == []
    assert diagnose_curves(history([0.2]), metric="loss", greater_is_better=False,
                           baselines=LEE_BASELINES).warnings == []
    assert diagnose_curves(history([0.2]), metric="pearson").warnings == []


def test_a_lower_is_better_metric_is_flagged_when_higher_than_the_baseline():
    d = diagnose_curves(history([0.5, 0.5], mses=[0.09, 0.06]), metric="mse", greater_is_better=False,
                        baselines=LEE_BASELINES)
    assert d.warnings and "mse, 0.0600, is worse than the mean target's 0.0500" in d.warnings[0]
    assert "check the data and the learning rate" in d.remedies[0]  # no advice given: the generic one


def test_format_baselines_says_figures_and_skips():
    lines = format_baselines({**LEE_BASELINES, "other": {"rule": "x", "skipped": "too many texts"}})
    assert lines[1] == ("baseline   base-model cosine: pearson 0.6890 | spearman 0.6100 on validation without "
                        "training, for fine-tuning to beat (cosine of the untrained model's vectors)")
    assert lines[2] == "baseline   other: not measured: too many texts"


def test_diagnose_report_and_model_card_of_a_run_below_its_baseline(trained_run, tmp_path, capsys):
    import shutil

    from textune.model_card import write_model_card
    from textune.report import build_report

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    stats = json.loads((run / "data_stats.json").read_text())
    stats["baselines"] = {"majority class": {"rule": "always positive", "metrics": {"accuracy": 1.01}}}
    (run / "data_stats.json").write_text(json.dumps(stats))
    assert diagnose_run(run).warnings
    assert main(["diagnose", str(run)]) == 0
    assert "  ! below its zero-shot baseline: the best validation accuracy" in capsys.readouterr().out
    page = build_report(run)
    assert "<b>Warning:</b> below its zero-shot baseline" in page and 'id="baselines"' in page
    assert "always positive" in page and "1.0100" in page
    write_model_card(run)
    assert "**Warning:** below its zero-shot baseline" in (run / "model" / "README.md").read_text()


def test_the_cosine_of_a_lora_run_is_the_base_models(tiny_model, pair_data, tmp_path):
    """The baseline embeds with the run's own model before training: a PEFT wrapper (whose adapters start as no
    change) must give the base model's figure."""
    from scipy.stats import pearsonr

    from textune.train import train

    run = train(load_config(None, pair_overrides(tiny_model, pair_data, tmp_path / "run", "regression", "score",
                                                 **{"tuning.method": "lora", "train.max_steps": 1})))
    cosine = json.loads((run / "data_stats.json").read_text())["baselines"]["base-model cosine"]
    val_y = np.array([r["score"] for r in pair_data["validation_rows"]])
    expected = pearsonr(untrained_cosines(tiny_model, pair_data["validation_rows"]), val_y)[0]
    assert cosine["metrics"]["pearson"] == pytest.approx(expected, abs=1e-4)
