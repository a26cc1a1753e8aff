"""Multi-label classification: the `task: multi-label` of textune, each text (or pair) with any number of labels
(topics, tags, emotions).

Reading: the table of `classification` (same files, columns, pairs and checks, `textune.data`), the label column a
list (JSONL/Parquet) or a string of labels joined by `data.label_separator` (CSV/TSV), parsed by
`data.parse_label_lists` into a multi-hot vector over the label names; an empty label ("a||b") or a label training
never saw stops the run naming the row. Model: `AutoModelForSequenceClassification` with one output per label and
`problem_type: multi_label_classification` (its own loss is binary cross-entropy over sigmoid outputs; `pipeline(
"text-classification", top_k=None)` gives every label's probability). Thresholds: during training each label is
predicted where its probability reaches `train.threshold` (0.5 when empty), which is what picks the best
checkpoint; at the end, unless `train.threshold` is set, one threshold per label is chosen on validation for the
best F1 (`best_thresholds`) and saved as RUN/model/thresholds.json, which predict, evaluate and serve use.
Metrics: micro and macro F1, subset accuracy, Hamming loss and a per-label table. Prediction: every label at or
above its threshold with its probability, and all probabilities. Serving: POST /v1/classify answers label sets.
Report: the per-label table with thresholds, and the validation rows with the most wrong label decisions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

from textune.chunking import LongText
from textune.data import (TaskData, column_values, load_multi_label_data, parse_label_lists, split_length_stats,
                          tokenize_splits)
from textune.data_checks import DataReport, enforce
from textune.errors import TextuneError
from textune.evaluate import predict_logits
from textune.models import load_tokenizer, resolve_model
from textune.report_html import esc, fmt, missing_html, read_predictions, text_cell_html
from textune.tasks.base import ExportSpec, PlaygroundSpec, Task
from textune.tasks.sequence import (SequenceInputs, SequencePredictor, classify_router, load_sequence_model,
                                    read_labelled_file, read_sequence_inputs, target_data_report,
                                    by_length_html, with_token_lengths)

THRESHOLDS_FILE = "thresholds.json"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def multi_label_metrics(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, label_names: list[str]) -> dict:
    """Micro and macro F1, subset accuracy (every label of a row right), Hamming loss (share of wrong label
    decisions) and a per-label table (precision, recall, F1, support, threshold) of label probabilities
    (N x labels) cut at `thresholds` (one per label) against multi-hot `labels`."""
    preds = (probs >= thresholds).astype(int)
    labels = np.asarray(labels).astype(int)
    p, r, f, support = precision_recall_fscore_support(labels, preds, average=None, zero_division=0)
    return {"f1_micro": float(f1_score(labels, preds, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0)),
            "subset_accuracy": float(accuracy_score(labels, preds)),
            "hamming_loss": float(hamming_loss(labels, preds)),
            "per_label": {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(support[i]), "threshold": float(thresholds[i])}
                          for i, n in enumerate(label_names)},
            "examples": int(len(labels))}


def best_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per label, the probability threshold with the best F1 on these rows (candidates: 0.05, 0.10, ..., 0.95;
    ties go to the one nearest `default`); `default` for a label without positive rows, where F1 says nothing."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    labels = np.asarray(labels).astype(bool)
    out = np.full(probs.shape[1], default)
    for j in range(probs.shape[1]):
        if not labels[:, j].any():
            continue
        pred = probs[:, j][None, :] >= grid[:, None]  # (thresholds, rows)
        tp = (pred & labels[:, j]).sum(1)
        f1 = 2 * tp / np.maximum(pred.sum(1) + labels[:, j].sum(), 1)
        best = np.flatnonzero(f1 == f1.max())
        out[j] = grid[best[np.argmin(np.abs(grid[best] - default))]]
    return out


def label_balance(data: TaskData) -> dict[str, dict[str, int]]:
    """Rows holding each label, per split."""
    return {k: {n: int(c) for n, c in zip(data.label_names, np.asarray(getattr(data, k)["labels"]).sum(0))}
            for k in ("train", "validation", "test") if getattr(data, k) is not None}


@dataclass
class MultiLabelInputs(SequenceInputs):
    """What a multi-label run trains on, all loaded and checked before anything is written."""

    rows_with_tokens = True  # the report shows metrics by text length
    threshold: float | None  # train.threshold: one for all labels, kept at the end; None = chosen per label

    def summary(self, cfg) -> str:
        d = self.data
        counts = label_balance(d)["train"]
        per_row = float(np.asarray(column_values(d.train, "labels")).sum(1).mean())
        shown = ", ".join(f"{k}={v}" for k, v in list(counts.items())[:12]) + (" ..." if len(counts) > 12 else "")
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__}, {len(d.label_names)} "
                 f"labels, multi-label)",
                 f"data       train {len(d.train):,} | validation {len(d.validation):,}"
                 + (f" | test {len(d.test):,}" if d.test is not None else "")
                 + f" | {per_row:.2f} labels per row | rows per label {shown}",
                 "threshold  " + (f"{self.threshold:g} for every label (train.threshold)" if self.threshold is not None
                                  else "0.5 while training; one per label chosen on validation at the end")]
        return "\n".join(lines + self.summary_footer(cfg))

    def label_stats(self) -> dict:
        return {"label_counts": label_balance(self.data)}

    def evaluate(self, model, loader, accelerator=None):
        """(metrics at train.threshold or 0.5, (probabilities, multi-hot labels)). The `compute_metrics` hook
        gets the label probabilities (N x labels) and the multi-hot labels."""
        logits, labels, loss = predict_logits(model, loader, accelerator, self.long_text.pooling)
        probs = sigmoid(logits)
        cut = np.full(probs.shape[1], 0.5 if self.threshold is None else self.threshold)
        metrics = multi_label_metrics(probs, labels, cut, self.data.label_names)
        metrics["loss"] = loss
        metrics.update(self.extra_metrics(probs, labels))
        return metrics, (probs, labels)

    def write_predictions(self, predictions, path: Path) -> None:
        """Choose the thresholds (unless train.threshold is set) on these final validation predictions of the
        saved model and write them to RUN/model/thresholds.json, then the validation rows with the labels
        predicted at them. Training calls this once, at the end, on the main process."""
        probs, labels = predictions
        names = self.data.label_names
        cut = best_thresholds(probs, labels) if self.threshold is None else np.full(len(names), self.threshold)
        tuned = multi_label_metrics(probs, labels, cut, names)
        model_dir = path.parent / "model"
        if model_dir.is_dir():
            save_thresholds(model_dir, names, cut, "validation F1 per label" if self.threshold is None
                            else "train.threshold", {k: tuned[k] for k in ("f1_micro", "f1_macro", "subset_accuracy",
                                                                          "hamming_loss")})
        self.write_validation_rows(({"labels": [n for n, v in zip(names, y) if v],
                                     "pred": [n for n, x, c in zip(names, p, cut) if x >= c],
                                     "probs": [round(float(x), 5) for x in p]} for p, y in zip(probs, labels)), path)


def save_thresholds(model_dir: Path, names: list[str], thresholds, chosen_by: str, validation: dict) -> None:
    (model_dir / THRESHOLDS_FILE).write_text(json.dumps(
        {"thresholds": {n: float(t) for n, t in zip(names, thresholds)}, "chosen_by": chosen_by,
         "validation_at_thresholds": validation}, indent=2))


def load_thresholds(model_dir: Path, names: list[str]) -> np.ndarray:
    """The saved per-label thresholds of a model folder; 0.5 for a label (or a folder) without one."""
    path = Path(model_dir) / THRESHOLDS_FILE
    saved = json.loads(path.read_text()).get("thresholds", {}) if path.is_file() else {}
    return np.array([float(saved.get(n, 0.5)) for n in names])


class MultiLabelPredictor(SequencePredictor):
    """A loaded multi-label classifier with its thresholds: `predict(texts)` -> [{"labels": [{"label", "score"},
    ...] (every label at or above its threshold, most probable first), "probabilities": {label: p}}]."""

    task = "multi-label"

    def _setup(self, *args) -> None:
        super()._setup(*args)
        # 0.5 only for a model in memory without its saved folder (`around` without one)
        self.thresholds = (load_thresholds(self.model_dir, self.label_names) if self.model_dir is not None
                           else np.full(len(self.label_names), 0.5))

    def predict_proba(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        return sigmoid(self.logits(texts, text_pairs))

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        logits, chunks = self.document_logits(texts, text_pairs)
        out = []
        for p in sigmoid(logits):
            above = sorted((i for i in range(len(p)) if p[i] >= self.thresholds[i]), key=lambda i: -p[i])
            out.append({"labels": [{"label": self.label_names[i], "score": round(float(p[i]), 6)} for i in above],
                        "probabilities": {n: round(float(x), 6) for n, x in zip(self.label_names, p)}})
        return self.with_chunks(out, chunks)


class MultiLabel(Task):
    name = "multi-label"
    serve_paths = ("/v1/classify",)
    serve_adapters = True

    def router(self, ctx):
        return classify_router(ctx, label_set_model(), "LabelSetResponse", "label")

    def serve_description(self, predictor) -> str:
        return "a multi-label classifier (the set of labels of each text)"
    predictor_class = MultiLabelPredictor
    playground = PlaygroundSpec((("text", "text", False), ("pair", "second text (a model of pairs)", True)),
                                "probabilities")

    def check_data(self, cfg) -> DataReport:
        data = load_multi_label_data(cfg.data, cfg.seed, self.name)
        return with_token_lengths(target_data_report(data, label_balance(data)), cfg, data)

    def load_inputs(self, cfg) -> MultiLabelInputs:
        """Model, tokenizer and data: resolved, read, checked (`data.strict`), tokenised, measured, tuned."""
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        data = load_multi_label_data(cfg.data, cfg.seed, self.name)
        report = target_data_report(data, label_balance(data))
        enforce(report, cfg.data.strict)
        long_text = LongText.of(cfg.data, cfg.model.max_length)
        tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length, cache=cfg.data.cache, long_text=long_text)
        stats = {split: split_length_stats(ds, cfg.model.max_length) for split, ds in tokenized.items()}
        model = load_sequence_model(cfg, model_path, data.label_names, "multi_label_classification")
        return MultiLabelInputs(model_path, tokenizer, data, report, tokenized, stats, model, cfg.train.threshold,
                                long_text=long_text)

    def read_inputs(self, source: str, columns: dict, predictor):
        return read_sequence_inputs(source, columns)

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        ds, texts, pairs, label_col = read_labelled_file(path, columns)
        separator = columns.get("label_separator") or "|"
        rows = parse_label_lists(column_values(ds, label_col), path, label_col, separator)
        index = {n: i for i, n in enumerate(predictor.label_names)}
        labels = np.zeros((len(rows), len(index)), dtype=np.float32)
        for i, row in enumerate(rows):
            unknown = [label for label in row if label not in index]
            if unknown:
                raise TextuneError(f"{path} row {i + 1}: label {unknown[0]!r} is not one the model was trained on; "
                                   f"it knows {', '.join(predictor.label_names)}")
            labels[i, [index[label] for label in row]] = 1.0
        probs = predictor.predict_proba(texts, pairs)
        metrics = multi_label_metrics(probs, labels, predictor.thresholds, predictor.label_names)
        clipped = np.clip(probs, 1e-7, 1 - 1e-7)
        metrics["loss"] = float(-(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)).mean())
        return metrics

    def format_metrics(self, metrics: dict) -> str:
        return per_label_text(metrics.get("per_label") or {})

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        v = (metrics or {}).get("validation") or {}
        saved = run / "model" / THRESHOLDS_FILE
        tuned = json.loads(saved.read_text()) if saved.is_file() else None
        at = (tuned or {}).get("validation_at_thresholds") or {}
        cards = [("micro F1", fmt(at.get("f1_micro", v.get("f1_micro")))),
                 ("macro F1", fmt(at.get("f1_macro", v.get("f1_macro")))),
                 ("subset accuracy", fmt(at.get("subset_accuracy", v.get("subset_accuracy")))),
                 ("Hamming loss", fmt(at.get("hamming_loss", v.get("hamming_loss"))))]
        rows = read_predictions(run / "validation_predictions.jsonl")
        by_length = by_length_html(rows, row_scores, (stats or {}).get("max_length"))
        return cards, per_label_html(v, tuned) + by_length + wrong_sets_html(rows)


def row_scores(rows: list[dict]) -> dict[str, float]:
    """Micro F1 and subset accuracy of validation rows' label sets (a group of the report's metrics by length)."""
    hits = sum(len(set(r["labels"]) & set(r["pred"])) for r in rows)
    wanted, given = sum(len(r["labels"]) for r in rows), sum(len(r["pred"]) for r in rows)
    return {"micro F1": 2 * hits / (wanted + given) if wanted + given else 1.0,
            "subset accuracy": float(np.mean([set(r["labels"]) == set(r["pred"]) for r in rows]))}


def per_label_text(per_label: dict) -> str:
    width = max([len(n) for n in per_label] + [5])
    lines = [f"{'label'.ljust(width)}  precision  recall      F1  support  threshold"]
    lines += [f"{n.ljust(width)}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:6.4f}  {r['support']:7,}  "
              f"{r['threshold']:9.2f}" for n, r in sorted(per_label.items(), key=lambda kv: kv[1]["f1"])]
    return "\n".join(lines)


def per_label_html(validation: dict, tuned: dict | None) -> str:
    out = ['<section id="per-label"><h2>Per label (validation)</h2>']
    per_label = validation.get("per_label")
    if not per_label:
        return "".join(out) + missing_html("per-label table", "metrics.json is missing") + "</section>"
    thresholds = (tuned or {}).get("thresholds") or {}
    out.append('<p class="muted">Precision, recall and F1 of each label at the threshold training used (train.threshold '
               "or 0.5), worst first; the last column is the threshold saved with the model "
               f"({esc((tuned or {}).get('chosen_by', 'none saved'))}), which predict and serve use.</p>")
    out.append('<table><tr><th class="l">label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>'
               "<th>saved threshold</th></tr>")
    for name, r in sorted(per_label.items(), key=lambda kv: kv[1]["f1"]):
        out.append(f'<tr><td class="l">{esc(name)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
                   f'<td>{r["f1"]:.3f}</td><td>{r["support"]:,}</td><td>{fmt(thresholds.get(name), 2)}</td></tr>')
    return "".join(out) + "</table></section>"


def wrong_sets_html(rows: list[dict], shown: int = 12) -> str:
    wrong = [r for r in rows if set(r["labels"]) != set(r["pred"])]
    if not rows:
        return ""
    wrong.sort(key=lambda r: -len(set(r["labels"]) ^ set(r["pred"])))
    out = ['<section id="errors"><h2>Validation rows with the most wrong label decisions</h2>',
           f'<p class="muted">{len(wrong):,} of {len(rows):,} rows have a label set that is not exactly right.</p>',
           '<table class="wrong"><tr><th class="l">text</th><th class="l">true</th><th class="l">predicted</th></tr>']
    for r in wrong[:shown]:
        out.append(f'<tr><td class="text">{text_cell_html(r)}</td><td class="l">{esc(", ".join(r["labels"]))}</td>'
                   f'<td class="l">{esc(", ".join(r["pred"]))}</td></tr>')
    return "".join(out) + "</table></section>"


TASK = MultiLabel()


# ------------------------------ export


def label_decisions(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each label in or out at probability 0.5 (logit 0): the saved thresholds are compared elsewhere."""
    return (logits > 0).ravel()


MultiLabel.export_spec = ExportSpec(decide=label_decisions, decisions="label decisions at 0.5")
# The per-label thresholds turn probabilities into labels: they travel with every saved form.
MultiLabel.prediction_files = Task.prediction_files + (f"model/{THRESHOLDS_FILE}",)


# ------------------------------ serving


def label_set_model() -> type:
    """One text's answer of POST /v1/classify (pydantic is imported here, so training never loads it)."""
    from pydantic import BaseModel, Field

    class LabelScore(BaseModel):
        label: str
        score: float = Field(description="probability of the label")

    class LabelSet(BaseModel):
        labels: list[LabelScore] = Field(description="every label at or above its threshold, most probable first "
                                                     "(empty when none is)")
        probabilities: dict[str, float]

    return LabelSet
