"""Sequence classification (single texts and pairs): the `task: classification` of textune, the `run_glue.py`
of the transformers examples.

Reading: a table file (or a named/Hub data set) with a text column, an optional second text column and a
label column (names or integer ids), checked and label-encoded by `textune.data`; validation is a stratified
split of the training rows unless a file is given. Tokenising: the text (and pair, truncated longest-first)
to `model.max_length`, padded per batch by `DataCollatorWithPadding`. Model: `AutoModelForSequenceClassification`
with the label names in its config. Metrics: accuracy, precision/recall/F1 (binary for two classes, else macro),
the confusion matrix and a per-class report. Prediction: a label, its probability and all probabilities per
text (`textune.infer.Predictor`). Serving: POST /v1/classify. Report: confusion matrix, per-class table,
calibration and the most confidently wrong examples.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from textune.augment import augment_training_split
from textune.data import (TaskData, label_counts, length_stats, load_task_data, read_table, tokenize_splits,
                          tokenize_stream)
from textune.data_checks import DataReport, check_task_data, enforce
from textune.errors import TextuneError
from textune.evaluate import classification_metrics, evaluate_loader, format_confusion
from textune.infer import Predictor, read_inputs
from textune.models import apply_tuning, load_classifier, load_tokenizer, resolve_model, set_attention
from textune.tasks.base import Task, TaskInputs


@dataclass
class ClassificationInputs(TaskInputs):
    """What a classification run trains on, all loaded and checked before anything is written."""

    model_path: str
    tokenizer: object
    data: TaskData
    data_report: DataReport
    tokenized: dict
    stats: dict  # token-length statistics per split
    model: torch.nn.Module
    train_stream: object = None  # data.streaming: the training file, tokenised lazily as the loader reads it

    @property
    def train_data(self):
        return self.train_stream if self.train_stream is not None else self.tokenized["train"]

    def summary(self, cfg) -> str:
        d, s = self.data, self.stats["train"]
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
        lines += [f"warning    {finding.message}" for finding in self.data_report.findings]
        lines.append(f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | "
                     f"truncated at {cfg.model.max_length}: {s['truncated_share']:.1%}")
        return "\n".join(lines)

    def data_stats(self, cfg) -> dict:
        data, tokenized = self.data, self.tokenized
        return {"sizes": {k: len(v) for k, v in tokenized.items()},
                "label_names": data.label_names,
                "label_counts": {k: label_counts(getattr(data, k), data.label_names) for k in tokenized},
                "token_lengths": self.stats,
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.data_report.findings],
                "max_length": cfg.model.max_length}

    def collator(self, split: str):
        return DataCollatorWithPadding(self.tokenizer)

    def evaluate(self, model, loader, accelerator=None):
        """(metrics, (class probabilities, labels)) over a labelled loader."""
        metrics, probs, labels = evaluate_loader(model, loader, self.data.label_names, accelerator)
        return metrics, (probs, labels)

    def write_predictions(self, predictions, path: Path) -> None:
        """Text, true label, predicted label and probabilities of every validation example (for the report)."""
        probs, labels = predictions
        data = self.data
        texts = list(data.validation[data.text_column])
        pairs = list(data.validation[data.text_pair_column]) if data.text_pair_column else None
        with path.open("w", encoding="utf-8") as f:
            for i, (p, y) in enumerate(zip(probs, labels)):
                row = {"text": texts[i], "label": data.label_names[y], "pred": data.label_names[int(p.argmax())],
                       "probs": [round(float(x), 5) for x in p]}
                if pairs is not None:
                    row["text_pair"] = pairs[i]
                f.write(json.dumps(row) + "\n")

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
        model = load_classifier(model_path, data.label_names, cfg.model.trust_remote_code)
        model = apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)
        stream = tokenize_stream(data, tokenizer, cfg.model.max_length) if data.train_stream is not None else None
        return ClassificationInputs(model_path, tokenizer, data, data_report, tokenized, stats, model, stream)

    # ------------------------------------------------------------ saved runs

    predictor_class = Predictor

    def read_inputs(self, source: str, columns: dict, predictor):
        text_col, pair_col = columns.get("text_column") or "text", columns.get("text_pair_column")
        if pair_col and (source == "-" or source.endswith(".txt")):
            raise TextuneError(f"this model classifies pairs of texts (columns {text_col!r} and {pair_col!r}); "
                               f"give --input a .csv/.tsv/.jsonl/.parquet file with both columns, not "
                               f"{'standard input' if source == '-' else 'a .txt file'}")
        texts, pairs = read_inputs(source, text_col, pair_col)
        echo = [{"text": t} if pairs is None else {"text": t, "text_pair": p} for t, p in zip(texts, pairs or texts)]
        return (texts, pairs), echo

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        text_col = columns.get("text_column") or "text"
        pair_col, label_col = columns.get("text_pair_column"), columns.get("label_column") or "label"
        ds = read_table(path, "--data")
        missing = [c for c in (text_col, pair_col, label_col) if c and c not in ds.column_names]
        if missing:
            raise TextuneError(f"{path} has no column {missing[0]!r}; its columns are: "
                               f"{', '.join(map(repr, ds.column_names))} (set --text-column/--label-column)")
        names = predictor.label_names
        label_ids = labels_to_ids(ds[label_col], names, path)
        probs = predictor.predict_proba([str(t) for t in ds[text_col]],
                                        [str(t) for t in ds[pair_col]] if pair_col else None)
        metrics = classification_metrics(label_ids, probs.argmax(-1), names)
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
        return cards, report.metrics_html(metrics) + calibration + report.wrong_html(rows)


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
