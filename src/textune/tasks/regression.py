"""Regression on texts and text pairs: the `task: regression` of textune (STS-B in `run_glue.py`, document
similarity, ratings).

Reading: the table of `classification` (same files, columns, pairs and checks, `textune.data`), the label column
parsed as numbers (`data.parse_numeric_labels`: a cell that is not a number stops the run naming its row);
validation is a random split of training unless a file is given. Scale: the model learns
(y - low) / (high - low), with [low, high] from `data.label_scale` or the training labels' range, saved in the
model's config.json as `label_scale`, so predictions come back on the user's scale and a target of 0-5 or
0-100 trains with the same learning rate as one of 0-1. Model: `AutoModelForSequenceClassification` with one
output and `problem_type: regression` (its own loss is MSE, on the normalised scale; `pipeline(
"text-classification", function_to_apply="none")` returns the normalised score). Metrics: Pearson and Spearman
correlation, MSE and MAE on the user's scale, and `loss` (MSE on the normalised scale). Prediction: one number
per text (`{"score": ...}`). Serving: POST /v1/classify answers scores. Report: predicted against true, and
the largest errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import mean_absolute_error, mean_squared_error

from textune.chunking import LongText
from textune.data import (column_values, load_regression_data, parse_numeric_labels, split_length_stats,
                          tokenize_splits)
from textune.data_checks import DataReport, enforce
from textune.errors import TextuneError
from textune.evaluate import predict_logits
from textune.models import load_tokenizer, resolve_model
from textune.report_html import fmt, img_html, missing_html, read_predictions, text_cell_html
from textune.tasks.base import ExportSpec, PlaygroundSpec, Task
from textune.tasks.sequence import (COSINE_RULE, SequenceInputs, SequencePredictor, classify_router,
                                    load_sequence_model, pair_cosines, read_labelled_file, read_sequence_inputs,
                                    target_data_report, by_length_html, with_token_lengths)


def target_scale(cfg, train_labels) -> tuple[float, float]:
    """[low, high] the model's target is normalised by: data.label_scale, else the training labels' range.

    Raises:
        TextuneError: every training label is the same number (nothing to learn, nothing to scale by).
    """
    if cfg.data.label_scale is not None:
        return float(cfg.data.label_scale[0]), float(cfg.data.label_scale[1])
    low, high = float(np.min(train_labels)), float(np.max(train_labels))
    if low == high:
        raise TextuneError(f"data.train: every training label is {low:g}; regression needs targets that vary (check "
                           f"data.label_column {cfg.data.label_column!r})")
    return low, high


def regression_metrics(preds: np.ndarray, labels: np.ndarray) -> dict:
    """Pearson and Spearman correlation (STS-B's metrics), mean squared and absolute error, on whatever scale the
    arguments are on. A constant prediction has no correlation: 0.0 then (scipy would say NaN), so a run whose
    model has not started to rank yet still compares as the worst."""
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    constant = len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(labels) == 0
    return {"pearson": 0.0 if constant else float(pearsonr(preds, labels)[0]),
            "spearman": 0.0 if constant else float(spearmanr(preds, labels)[0]),
            "mse": float(mean_squared_error(labels, preds)), "mae": float(mean_absolute_error(labels, preds)),
            "examples": int(len(labels))}


def target_stats(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"min": float(arr.min()), "max": float(arr.max()), "mean": round(float(arr.mean()), 4),
            "std": round(float(arr.std()), 4), "examples": int(arr.size)}


@dataclass
class RegressionInputs(SequenceInputs):
    """What a regression run trains on, all loaded and checked before anything is written. Its `tokenized`
    labels are normalised to [0, 1] by `scale`."""

    rows_with_tokens = True  # the report shows metrics by text length
    scale: tuple[float, float]

    def summary(self, cfg) -> str:
        d, t = self.data, target_stats(column_values(self.data.train, "labels"))
        low, high = self.scale
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__}, 1 output, regression)",
                 f"data       train {len(d.train):,} | validation {len(d.validation):,}"
                 + (f" | test {len(d.test):,}" if d.test is not None else "")
                 + f" | {d.label_names[0]}: mean {t['mean']:g}, std {t['std']:g}, range {t['min']:g} to {t['max']:g}",
                 f"target     learnt as (y - {low:g}) / {high - low:g}, "
                 f"{'data.label_scale' if cfg.data.label_scale else 'the training range'}; predictions on your scale"]
        return "\n".join(lines + self.summary_footer(cfg))

    def baselines(self, cfg) -> dict:
        """The mean target (the training mean predicted for every validation row: its MSE and MAE; a constant has
        no correlation) and, for text pairs, the untrained model's embedding cosine, whose Pearson and Spearman
        need no scale, so they compare with the fine-tuned model's as they are."""
        train_y = np.asarray(column_values(self.data.train, "labels"), dtype=np.float64)
        val_y = np.asarray(column_values(self.data.validation, "labels"), dtype=np.float64)
        mean = float(train_y.mean())
        m = regression_metrics(np.full(len(val_y), mean), val_y)
        out = {"mean target": {"rule": f"the training mean, {mean:.4g}, for every row",
                               "metrics": {"mse": m["mse"], "mae": m["mae"]}}}
        if self.data.text_pair_column:
            cosines, how = pair_cosines(self, cfg, {"validation": self.data.validation})
            if cosines is None:
                out["base-model cosine"] = {"rule": COSINE_RULE, "skipped": how}
            else:
                m = regression_metrics(cosines["validation"], val_y)
                out["base-model cosine"] = {
                    "rule": f"{COSINE_RULE}, {how}", "metrics": {"pearson": m["pearson"], "spearman": m["spearman"]},
                    "advice": "the untrained model's embeddings already rank these pairs better: fine-tune them as "
                              "embeddings (task: embedding on the scored pairs, as configs/lee-minilm-embedding.yaml "
                              "does) instead of a new regression head, or use the base model's cosine as it is"}
        return out

    def label_stats(self) -> dict:
        return {"label_stats": {k: target_stats(getattr(self.data, k)["labels"]) for k in self.tokenized},
                "label_scale": list(self.scale)}

    def evaluate(self, model, loader, accelerator=None):
        """(metrics, (predictions, labels)) on the user's scale; `loss` is the training loss (MSE of the
        normalised target). The `compute_metrics` hook gets the predictions and labels on the user's scale."""
        outputs, labels, loss = predict_logits(model, loader, accelerator, self.long_text.pooling)
        low, high = self.scale
        preds, labels = low + outputs[:, 0] * (high - low), low + labels * (high - low)
        metrics = regression_metrics(preds, labels)
        metrics["loss"] = loss
        metrics.update(self.extra_metrics(preds, labels))
        return metrics, (preds, labels)

    def write_predictions(self, predictions, path: Path) -> None:
        preds, labels = predictions
        self.write_validation_rows(({"label": round(float(y), 6), "pred": round(float(p), 6)}
                                    for p, y in zip(preds, labels)), path)


class RegressionPredictor(SequencePredictor):
    """A loaded regression model: `predict(texts, pairs)` -> [{"score": number on the training labels' scale}]."""

    task = "regression"

    def _setup(self, *args) -> None:
        super()._setup(*args)
        scale = getattr(self.config, "label_scale", None)
        if scale is None and self.run_dir is not None:  # adapters saved before their config kept it
            stats = self.run_dir / "data_stats.json"
            scale = json.loads(stats.read_text()).get("label_scale") if stats.is_file() else None
        self.scale = tuple(scale) if scale else (0.0, 1.0)

    def predict_scores(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        low, high = self.scale
        return low + self.logits(texts, text_pairs)[:, 0] * (high - low)

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        outputs, chunks = self.document_logits(texts, text_pairs)
        low, high = self.scale
        return self.with_chunks([{"score": round(float(low + s * (high - low)), 6)} for s in outputs[:, 0]], chunks)


class Regression(Task):
    name = "regression"
    serve_paths = ("/v1/classify",)
    serve_adapters = True

    def router(self, ctx):
        return classify_router(ctx, score_model(), "ScoreResponse", "score")

    def serve_description(self, predictor) -> str:
        return "a regression model (one score per text)"
    predictor_class = RegressionPredictor
    playground = PlaygroundSpec((("text", "text", False), ("pair", "second text (a model of pairs)", True)))

    def check_data(self, cfg) -> DataReport:
        data = load_regression_data(cfg.data, cfg.seed, self.name)
        return with_token_lengths(target_data_report(data, {}), cfg, data)

    def load_inputs(self, cfg) -> RegressionInputs:
        """Model, tokenizer and data: resolved, read, checked (`data.strict`), tokenised with normalised targets."""
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        data = load_regression_data(cfg.data, cfg.seed, self.name)
        report = target_data_report(data, {})
        enforce(report, cfg.data.strict)
        low, high = target_scale(cfg, column_values(data.train, "labels"))
        long_text = LongText.of(cfg.data, cfg.model.max_length)
        tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length, cache=cfg.data.cache, long_text=long_text)
        tokenized = {k: ds.map(lambda b: {"labels": [(y - low) / (high - low) for y in b["labels"]]}, batched=True,
                               load_from_cache_file=cfg.data.cache) for k, ds in tokenized.items()}
        stats = {split: split_length_stats(ds, cfg.model.max_length) for split, ds in tokenized.items()}
        model = load_sequence_model(cfg, model_path, data.label_names, "regression")
        model.config.label_scale = [low, high]  # saved in config.json: predictions are scaled back with it
        return RegressionInputs(model_path, tokenizer, data, report, tokenized, stats, model, (low, high),
                                long_text=long_text)

    def read_inputs(self, source: str, columns: dict, predictor):
        return read_sequence_inputs(source, columns)

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        ds, texts, pairs, label_col = read_labelled_file(path, columns)
        labels = parse_numeric_labels(column_values(ds, label_col), path, label_col)
        preds = predictor.predict_scores(texts, pairs)
        metrics = regression_metrics(preds, labels)
        low, high = predictor.scale
        metrics["loss"] = float((((preds - labels) / (high - low)) ** 2).mean())
        return metrics

    def format_metrics(self, metrics: dict) -> str:
        return (f"pearson {metrics['pearson']:.4f} | spearman {metrics['spearman']:.4f} | mse {metrics['mse']:.4g} | "
                f"mae {metrics['mae']:.4g} | {metrics['examples']:,} examples")

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        v = (metrics or {}).get("validation") or {}
        cards = [("Pearson", fmt(v.get("pearson"))), ("Spearman", fmt(v.get("spearman"))), ("MSE", fmt(v.get("mse"))),
                 ("MAE", fmt(v.get("mae")))]
        rows = read_predictions(run / "validation_predictions.jsonl")
        by_length = by_length_html(rows, row_scores, (stats or {}).get("max_length"))
        return cards, scatter_html(rows, v) + by_length + largest_errors_html(rows)


def row_scores(rows: list[dict]) -> dict[str, float]:
    """MAE and Pearson correlation of validation rows (a group of the report's metrics by text length)."""
    true, pred = np.array([r["label"] for r in rows]), np.array([r["pred"] for r in rows])
    return {"MAE": float(np.abs(pred - true).mean()), "Pearson": regression_metrics(pred, true)["pearson"]}


def scatter_html(rows: list[dict], metrics: dict) -> str:
    """Predicted against true on the validation rows, with the diagonal a perfect model would lie on."""
    from matplotlib.figure import Figure

    out = ['<section id="regression"><h2>Predicted against true (validation)</h2>']
    if not rows:
        return "".join(out) + missing_html("scatter plot", "validation_predictions.jsonl is missing") + "</section>"
    true, pred = np.array([r["label"] for r in rows]), np.array([r["pred"] for r in rows])
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.scatter(true, pred, s=12, alpha=0.6, color="#1f77b4")
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="#cf222e", lw=1, label="predicted = true")
    ax.set(xlabel="true", ylabel="predicted")
    ax.legend(loc="upper left", fontsize=8)
    bias = float((pred - true).mean())
    out.append('<div class="grid2"><div>' + img_html(fig, "predicted against true") + "</div>")
    out.append(f"<div><p>{len(rows):,} validation examples: Pearson <b>{fmt(metrics.get('pearson'), 3)}</b>, "
               f"Spearman <b>{fmt(metrics.get('spearman'), 3)}</b>, MAE {fmt(metrics.get('mae'), 3)}. "
               f"Mean error (predicted - true) {bias:+.3f}.</p><p class=\"muted\">Points on the red line are exact. A "
               "cloud flatter than the line (predictions bunched near the mean) is a model that has not learnt to "
               "tell the examples apart yet; a shifted cloud is a bias.</p></div></div></section>")
    return "".join(out)


def largest_errors_html(rows: list[dict], shown: int = 12) -> str:
    if not rows:
        return ""
    worst = sorted(rows, key=lambda r: -abs(r["pred"] - r["label"]))[:shown]
    out = ['<section id="errors"><h2>Largest validation errors</h2><table class="wrong"><tr><th class="l">text</th>'
           "<th>true</th><th>predicted</th></tr>"]
    for r in worst:
        out.append(f'<tr><td class="text">{text_cell_html(r)}</td><td>{r["label"]:.3f}</td><td>{r["pred"]:.3f}</td></tr>')
    return "".join(out) + "</table></section>"


TASK = Regression()


# ------------------------------ export

# A score is no decision: an int8 export reports only its difference from PyTorch.
Regression.export_spec = ExportSpec()


# ------------------------------ serving


def score_model() -> type:
    """One text's answer of POST /v1/classify (pydantic is imported here, so training never loads it)."""
    from pydantic import BaseModel, Field

    class Score(BaseModel):
        score: float = Field(description="the predicted value, on the scale of the training labels")

    return Score
