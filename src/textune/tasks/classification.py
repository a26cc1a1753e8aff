"""Sequence classification (single texts and pairs): the `task: classification` of textune, the `run_glue.py`
of the transformers examples.

Reading: a table file (or a named/Hub data set) with a text column, an optional second text column and a
label column (names or integer ids), checked and label-encoded by `textune.data`; validation is a stratified
split of the training rows unless a file is given. Tokenising: the text (and pair, truncated longest-first)
to `model.max_length`, padded per batch by `DataCollatorWithPadding`. Model: `AutoModelForSequenceClassification`
with the label names in its config. Metrics: accuracy, precision/recall/F1 (binary for two classes, else macro),
MCC, weighted F1, ROC-AUC and average precision (GLUE's metrics; STS-B is `task: regression`), the confusion
matrix and a per-class report. Loss: the model's cross-entropy, or `class_weighted_loss` (train.class_weights)
or mixup (data.augment.mixup_alpha) as `TaskInputs.loss_fn`. Prediction: a label, its probability and all probabilities per
text (`textune.infer.Predictor`). Serving: POST /v1/classify. Report: confusion matrix, per-class table,
calibration, the precision-recall curve (two classes) and the most confidently wrong examples.

Regression (`tasks/regression.py`) and multi-label classification (`tasks/multi_label.py`) read their tables
through the same `textune.data` functions, tokenise texts and pairs with `tokenize_splits` and load the same
`AutoModelForSequenceClassification` head (`load_sequence_model` here) with another `problem_type`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithPadding

from textune.augment import Mixup, augment_training_split
from textune.data import (TaskData, column_values, label_counts, length_stats, load_task_data, read_table,
                          tokenize_splits, tokenize_stream)
from textune.data_checks import DataReport, check_task_data, enforce
from textune.errors import TextuneError
from textune.evaluate import classification_metrics, evaluate_loader, format_confusion
from textune.infer import Predictor, read_inputs
from textune.models import apply_tuning, load_classifier, load_tokenizer, resolve_model, set_attention
from textune.tasks.base import Task, TaskInputs


@dataclass
class SequenceInputs(TaskInputs):
    """What the sequence-level tasks (classification, regression, multi-label) share: one text or pair per row,
    tokenised to `model.max_length` and padded per batch, validation rows written with their texts. A subclass
    says what its labels are (`label_stats`, the label part of `summary`) and how it scores them."""

    model_path: str
    tokenizer: object
    data: TaskData
    data_report: DataReport
    tokenized: dict
    stats: dict  # token-length statistics per split
    model: torch.nn.Module

    def label_stats(self) -> dict:
        """The labels' part of data.json (counts per split, or a numeric target's statistics)."""
        raise NotImplementedError

    def data_stats(self, cfg) -> dict:
        return {"sizes": {k: len(v) for k, v in self.tokenized.items()}, "label_names": self.data.label_names,
                **self.label_stats(), "token_lengths": self.stats,
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.data_report.findings],
                "max_length": cfg.model.max_length}

    def summary_footer(self, cfg) -> list[str]:
        """The data checks' warnings and the training split's token lengths: the last lines of `summary`."""
        s = self.stats["train"]
        return [*(f"warning    {finding.message}" for finding in self.data_report.findings),
                f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | "
                f"truncated at {cfg.model.max_length}: {s['truncated_share']:.1%}"]

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def write_validation_rows(self, rows, path: Path) -> None:
        """JSONL of the validation rows, in order: each of `rows` (labels and predictions) with its text and pair."""
        d = self.data
        texts = list(d.validation[d.text_column])
        pairs = list(d.validation[d.text_pair_column]) if d.text_pair_column else None
        with path.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = {"text": texts[i], **row}
                if pairs is not None:
                    row["text_pair"] = pairs[i]
                f.write(json.dumps(row) + "\n")


@dataclass
class ClassificationInputs(SequenceInputs):
    """What a classification run trains on, all loaded and checked before anything is written."""

    train_stream: object = None  # data.streaming: the training file, tokenised lazily as the loader reads it
    loss_fn: object = None  # Mixup, ClassWeightedLoss or None (the model's own cross-entropy)

    @property
    def train_data(self):
        return self.train_stream if self.train_stream is not None else self.tokenized["train"]

    def summary(self, cfg) -> str:
        d = self.data
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__})",
                 f"data       train {len(d.train):,} | validation {len(d.validation):,}"
                 + (f" | test {len(d.test):,}" if d.test is not None else "")
                 + f" | labels {', '.join(f'{k}={v}' for k, v in label_counts(d.train, d.label_names).items())}"]
        if d.train_stream is not None:
            lines.append(f"streaming  train read lazily from {cfg.data.train}; the counts, checks and token "
                         f"statistics here are of its first {len(d.train):,} rows")
            if cfg.train.group_by_length:
                lines.append("note       train.group_by_length is off for streamed data (it needs every row's "
                             "length up front)")
        if isinstance(self.loss_fn, ClassWeightedLoss):
            weights, setting = self.loss_fn.weights.tolist(), cfg.train.class_weights
            lines.append(f"loss       cross-entropy weighted by class ({setting if isinstance(setting, str) else 'given'}): "
                         + ", ".join(f"{n}={w:.3g}" for n, w in zip(self.data.label_names, weights)))
        return "\n".join(lines + self.summary_footer(cfg))

    def label_stats(self) -> dict:
        return {"label_counts": {k: label_counts(getattr(self.data, k), self.data.label_names) for k in self.tokenized}}

    def evaluate(self, model, loader, accelerator=None):
        """(metrics, (class probabilities, labels)) over a labelled loader. The `compute_metrics` hook gets the
        class probabilities (N x classes) and the label ids."""
        metrics, probs, labels = evaluate_loader(model, loader, self.data.label_names, accelerator)
        metrics.update(self.extra_metrics(probs, labels))
        return metrics, (probs, labels)

    def write_predictions(self, predictions, path: Path) -> None:
        """Text, true label, predicted label and probabilities of every validation example (for the report)."""
        probs, labels = predictions
        names = self.data.label_names
        self.write_validation_rows(({"label": names[y], "pred": names[int(p.argmax())],
                                     "probs": [round(float(x), 5) for x in p]} for p, y in zip(probs, labels)), path)

    def label_counts(self) -> dict[str, int]:
        return label_counts(self.data.validation, self.data.label_names)


class Classification(Task):
    name = "classification"
    serve_endpoint = "classify"
    serve_description = "Text classification"

    def read_data(self, cfg) -> TaskData:
        if cfg.data.format == "conll" or str(cfg.data.train or "").lower().endswith((".conll", ".bio")):
            raise TextuneError(f"data.train: {cfg.data.train} is a CoNLL file of tagged tokens, which a classifier "
                               f"cannot learn from; set task: token-classification, or give a table of texts and "
                               f"labels")
        return load_task_data(cfg.data, cfg.seed)

    def check_data(self, cfg) -> DataReport:
        return check_task_data(self.read_data(cfg))

    def load_inputs(self, cfg) -> ClassificationInputs:
        """Model, tokenizer and data: resolved, read, checked (`data.strict`), tokenised, measured, tuned."""
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        data = self.read_data(cfg)
        data_report = check_task_data(data)
        enforce(data_report, cfg.data.strict)
        data = augment_training_split(data, cfg.data.augment, cfg.seed)  # after the checks: they see the user's rows
        tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length, cache=cfg.data.cache)
        stats = {split: length_stats(ds["length"], cfg.model.max_length) for split, ds in tokenized.items()}
        model = load_sequence_model(cfg, model_path, data.label_names)
        stream = tokenize_stream(data, tokenizer, cfg.model.max_length) if data.train_stream is not None else None
        return ClassificationInputs(model_path, tokenizer, data, data_report, tokenized, stats, model, stream,
                                    classification_loss(cfg, data))

    # ------------------------------------------------------------ saved runs

    predictor_class = Predictor

    def read_inputs(self, source: str, columns: dict, predictor):
        return read_sequence_inputs(source, columns)

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        ds, texts, pairs, label_col = read_labelled_file(path, columns)
        names = predictor.label_names
        label_ids = labels_to_ids(column_values(ds, label_col), names, path)
        probs = predictor.predict_proba(texts, pairs)
        metrics = classification_metrics(label_ids, probs.argmax(-1), names, probs)
        metrics["loss"] = float(-np.log(np.clip(probs[np.arange(len(label_ids)), label_ids], 1e-12, None)).mean())
        return metrics

    def format_metrics(self, metrics: dict) -> str:
        """The confusion matrix where it fits the terminal, else the largest confusions and the worst classes
        (the whole matrix stays in metrics.json)."""
        return format_confusion(metrics, shutil.get_terminal_size().columns)

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        from textune import report

        rows = report.read_predictions(run / "validation_predictions.jsonl")
        label_names = (stats or {}).get("label_names") or ((metrics or {}).get("validation", {})
                                                           .get("confusion_matrix") or {}).get("labels") or []
        probs, labels = report.prediction_arrays(rows, label_names)
        calibration, ece = report.calibration_html(probs, labels)
        v = (metrics or {}).get("validation") or {}
        cards = [("accuracy", report.fmt(v.get("accuracy"))), ("F1", report.fmt(v.get("f1"))),
                 ("macro F1", report.fmt(v.get("f1_macro"))), ("validation loss", report.fmt(v.get("loss"))),
                 ("ECE", report.fmt(ece, 3))]
        pr_curve = precision_recall_html(probs, labels, label_names) if len(label_names) == 2 else ""
        return cards, report.metrics_html(metrics) + calibration + pr_curve + report.wrong_html(rows)


def precision_recall_html(probs: np.ndarray, labels: np.ndarray, label_names: list[str]) -> str:
    """The report's precision-recall curve of the positive class (id 1) of a binary classifier, with the
    precision and recall at the 0.5 cut the predictions use and the average precision."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from textune import report

    out = ['<section id="precision-recall"><h2>Precision-recall curve</h2>']
    if len(labels) == 0 or len(set(labels.tolist())) < 2:
        return "".join(out) + report.missing_html("curve", "validation predictions lack one of the classes") + "</section>"
    scores = probs[:, 1]
    precision, recall, _ = precision_recall_curve(labels, scores, pos_label=1)
    ap = average_precision_score(labels, scores)
    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.subplots()
    ax.plot(recall, precision, drawstyle="steps-post", color="#1f77b4")
    pred = scores >= 0.5
    tp = int((pred & (labels == 1)).sum())
    at_p, at_r = tp / max(int(pred.sum()), 1), tp / max(int((labels == 1).sum()), 1)
    ax.plot([at_r], [at_p], "o", color="#cf222e", label="at probability 0.5")
    ax.axhline(float((labels == 1).mean()), color="#888", lw=0.8, ls="--", label="chance (positive share)")
    ax.set(xlabel=f"recall of {label_names[1]}", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    out.append('<div class="grid2"><div>' + report.img_html(fig, "precision-recall curve") + "</div>")
    out.append(f"<div><p>Average precision <b>{ap:.3f}</b> for the positive class {report.esc(label_names[1])} over "
               f"{len(labels):,} validation examples. At the 0.5 cut the predictions use: precision {at_p:.3f}, "
               f"recall {at_r:.3f}.</p><p class=\"muted\">Each point is a probability threshold; where classes are "
               "imbalanced this curve says more than accuracy or ROC-AUC about how well the rare class is found."
               "</p></div></div></section>")
    return "".join(out)


class ClassWeightedLoss:
    """The training loss with train.class_weights: cross-entropy with one weight per class (the mean is
    weighted too, as in `torch.nn.CrossEntropyLoss(weight=...)`), in fp32 like the model's own loss."""

    def __init__(self, weights: list[float]):
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return F.cross_entropy(logits.float(), batch["labels"], weight=self.weights.to(logits.device))


def class_weights(setting, label_names: list[str], train_labels) -> list[float]:
    """One weight per class from train.class_weights: "balanced" = n / (classes * count), sklearn's rule (a class
    without training rows weighs 1); a mapping {label: weight} with unlisted labels at 1.

    Raises:
        TextuneError: the mapping names a label the data does not have.
    """
    if setting == "balanced":
        counts = np.bincount(np.asarray(train_labels), minlength=len(label_names))
        return [len(train_labels) / (len(label_names) * c) if c else 1.0 for c in counts]
    unknown = [k for k in setting if k not in label_names]
    if unknown:
        raise TextuneError(f"train.class_weights: {unknown[0]!r} is not a label of the data; its labels are "
                           f"{', '.join(label_names)}")
    return [float(setting.get(n, 1.0)) for n in label_names]


def classification_loss(cfg, data: TaskData):
    """`TaskInputs.loss_fn` of a classification run: mixup (data.augment.mixup_alpha > 0), class-weighted
    cross-entropy (train.class_weights; config validation refuses both at once) or None."""
    if cfg.data.augment.mixup_alpha > 0:
        return Mixup(cfg.data.augment.mixup_alpha)
    if cfg.train.class_weights != "none":
        train_labels = column_values(data.train, "labels")
        return ClassWeightedLoss(class_weights(cfg.train.class_weights, data.label_names, train_labels))
    return None


def load_sequence_model(cfg, model_path: str, label_names: list[str], problem_type: str | None = None):
    """The `AutoModelForSequenceClassification` of a run, one output per label name, tuned (cfg.tuning) and with
    cfg.model.attention. `problem_type` (regression, multi_label_classification) picks the model's own loss
    (MSE, BCE) and is saved in config.json, where `transformers.pipeline` reads it."""
    model = load_classifier(model_path, label_names, cfg.model.trust_remote_code)
    if problem_type is not None:
        model.config.problem_type = problem_type
    return apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)


def read_sequence_inputs(source: str, columns: dict) -> tuple[tuple[list, list | None], list[dict]]:
    """`Task.read_inputs` of the sequence-level tasks: ((texts, pairs or None), echo rows) from a file or stdin."""
    text_col, pair_col = columns.get("text_column") or "text", columns.get("text_pair_column")
    if pair_col and (source == "-" or source.endswith(".txt")):
        raise TextuneError(f"this model reads pairs of texts (columns {text_col!r} and {pair_col!r}); "
                           f"give --input a .csv/.tsv/.jsonl/.parquet file with both columns, not "
                           f"{'standard input' if source == '-' else 'a .txt file'}")
    texts, pairs = read_inputs(source, text_col, pair_col)
    echo = [{"text": t} if pairs is None else {"text": t, "text_pair": p} for t, p in zip(texts, pairs or texts)]
    return (texts, pairs), echo


@torch.inference_mode()
def sequence_logits(predictor, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
    """The raw outputs (N x outputs, input order) of a loaded sequence model (`infer.ModelPredictor`), batched
    like `Predictor.predict_proba` (tokenised once, sorted by length). Regression and multi-label predictors
    turn them into scores and label sets."""
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise TextuneError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
    width = predictor.model.config.num_labels
    if not texts:
        return np.zeros((0, width), dtype=np.float32)
    enc = predictor.tokenizer(texts, text_pairs, truncation=True, max_length=predictor.max_length)
    order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
    out = np.empty((len(texts), width), dtype=np.float32)
    for start in range(0, len(order), predictor.batch_size):
        idx = order[start:start + predictor.batch_size]
        batch = predictor.tokenizer.pad([{k: enc[k][i] for k in enc.keys()} for i in idx], return_tensors="pt")
        out[idx] = predictor.model(**batch.to(predictor.device)).logits.float().cpu().numpy()
    return out


def read_labelled_file(path: str, columns: dict) -> tuple[object, list[str], list[str] | None, str]:
    """`textune evaluate`'s file: (dataset, texts, pairs or None, label column name), every column checked."""
    text_col = columns.get("text_column") or "text"
    pair_col, label_col = columns.get("text_pair_column"), columns.get("label_column") or "label"
    ds = read_table(path, "--data")
    missing = [c for c in (text_col, pair_col, label_col) if c and c not in ds.column_names]
    if missing:
        raise TextuneError(f"{path} has no column {missing[0]!r}; its columns are: "
                           f"{', '.join(map(repr, ds.column_names))} (set --text-column/--label-column)")
    pairs = [str(t) for t in column_values(ds, pair_col)] if pair_col else None
    return ds, [str(t) for t in column_values(ds, text_col)], pairs, label_col


def target_data_report(data: TaskData, balance: dict[str, dict[str, int]]) -> DataReport:
    """`check_task_data`'s text checks (empty texts, duplicates, leakage, same text with different targets) for
    targets that are not class ids (scores, label sets): each distinct target stands in for a class. The class
    balance check does not apply; `balance` (split -> counts to show) replaces it."""
    import dataclasses

    splits = {k: getattr(data, k) for k in ("train", "validation", "test") if getattr(data, k) is not None}
    targets = {k: [json.dumps(v) for v in column_values(ds, "labels")] for k, ds in splits.items()}
    ids: dict[str, int] = {}
    for values in targets.values():
        for v in values:
            ids.setdefault(v, len(ids))
    keyed = {k: ds.remove_columns("labels").add_column("labels", [ids[v] for v in targets[k]])
             for k, ds in splits.items()}
    report = check_task_data(dataclasses.replace(data, label_names=[str(i) for i in range(len(ids))], **keyed))
    report.findings = [f for f in report.findings if f.kind != "imbalance"]
    report.label_balance = balance
    return report


def labels_to_ids(values: list, names: list[str], source: str) -> np.ndarray:
    """Map gold labels (names, or integer ids) onto the model's label ids."""
    by_name = {n: i for i, n in enumerate(names)}
    ids, unknown = [], set()
    for v in values:
        if str(v) in by_name:
            ids.append(by_name[str(v)])
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and 0 <= v < len(names):
            ids.append(int(v))
        else:
            unknown.add(v)
    if unknown:
        raise TextuneError(f"{source} has labels the model was not trained on: {sorted(map(str, unknown))[:5]}; "
                           f"the model knows {names}")
    return np.asarray(ids)


TASK = Classification()
