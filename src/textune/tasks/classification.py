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
text (`ClassifierPredictor`). Serving: POST /v1/classify. Report: confusion matrix, per-class table,
calibration, the precision-recall curve (two classes) and the most confidently wrong examples.

Regression (`tasks/regression.py`) and multi-label classification (`tasks/multi_label.py`) read their tables
through the same `textune.data` functions, tokenise texts and pairs with `tokenize_splits` and share the inputs,
head and predictor batching of `tasks/sequence.py` with this module, each with its own `problem_type`.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from textune.augment import Mixup, augment_training_split
from textune.chunking import LongText
from textune.data import (TaskData, column_values, label_counts, load_task_data, split_length_stats,
                          tokenize_splits, tokenize_stream)
from textune.data_checks import DataReport, check_task_data, enforce
from textune.errors import TextuneError
from textune.evaluate import predict_logits
from textune.models import load_tokenizer, resolve_model
from textune.report_html import (cards_html, esc, fmt, img_html, missing_html, read_predictions,
                                 text_cell_html)
from textune.tasks.base import ExportSpec, PlaygroundSpec, Task
from textune.tasks.contrastive import (CosineSimilarityLoss, PairCollator, contrastive_pairs, fit_head,
                                       load_contrastive_model, pairs_summary)
from textune.tasks.sequence import (COSINE_RULE, SequenceInputs, SequencePredictor, classify_router,
                                    load_sequence_model, pair_cosines, read_labelled_file, read_sequence_inputs,
                                    by_length_html, with_token_lengths)



# ------------------------------------------------------------ metrics


def classification_metrics(labels: np.ndarray, preds: np.ndarray, label_names: list[str],
                           probs: np.ndarray | None = None) -> dict:
    """Accuracy, macro precision/recall/F1, binary ones (positive class = id 1) for two classes, Matthews
    correlation (`mcc`, CoLA's metric), support-weighted F1, the confusion matrix (rows: true, columns: predicted)
    and the per-class report. With `probs` (N x classes) also `roc_auc` and `average_precision`: of the positive
    class for two classes, one-vs-rest macro averages with more (NaN where a class has no rows to rank).
    scikit-learn computes them all (`evaluate.load` would need the Hub)."""
    # Imported here, not at the top: loading sklearn takes ~1 s, and a predictor (predict, serve) never needs it.
    from sklearn.metrics import (accuracy_score, classification_report, confusion_matrix, f1_score,
                                 precision_recall_fscore_support)

    ids = list(range(len(label_names)))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average="macro", zero_division=0)
    out = {"accuracy": float(accuracy_score(labels, preds)),
           "precision_macro": float(p), "recall_macro": float(r), "f1_macro": float(f),
           "mcc": matthews(labels, preds),
           "f1_weighted": float(f1_score(labels, preds, labels=ids, average="weighted", zero_division=0))}
    if probs is not None:
        out.update(ranking_metrics(labels, probs))
    if len(label_names) == 2:
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average="binary", pos_label=1,
                                                     zero_division=0)
        out.update(precision=float(p), recall=float(r), f1=float(f))
    else:  # with more classes "f1" means macro F1, so train.metric: f1 works for any task
        out.update(precision=out["precision_macro"], recall=out["recall_macro"], f1=out["f1_macro"])
    out["confusion_matrix"] = {"labels": label_names,
                               "matrix": confusion_matrix(labels, preds, labels=ids).tolist()}
    out["per_class"] = classification_report(labels, preds, labels=ids, target_names=label_names,
                                             output_dict=True, zero_division=0)
    out["examples"] = int(len(labels))
    return out


def matthews(labels: np.ndarray, preds: np.ndarray) -> float:
    """Matthews correlation; 0.0 where it is undefined (one class in labels and predictions), without sklearn's
    warning about that case."""
    from sklearn.metrics import matthews_corrcoef

    if len(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(matthews_corrcoef(labels, preds))


def ranking_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """ROC-AUC and average precision of class probabilities: the positive class (id 1) for two classes,
    one-vs-rest macro averages with more. NaN where they are undefined (a class without rows, or only one class)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.asarray(labels)
    with warnings.catch_warnings():  # an undefined score is NaN here; sklearn would also warn about it
        warnings.simplefilter("ignore")
        try:
            if probs.shape[1] == 2:
                return {"roc_auc": float(roc_auc_score(labels, probs[:, 1])),
                        "average_precision": float(average_precision_score(labels, probs[:, 1]))}
            hot = np.eye(probs.shape[1])[labels]
            return {"roc_auc": float(roc_auc_score(hot, probs, average="macro")),
                    "average_precision": float(average_precision_score(hot, probs, average="macro"))}
        except ValueError:  # sklearn: "Only one class present in y_true"
            return {"roc_auc": float("nan"), "average_precision": float("nan")}


# The metrics of a zero-shot baseline's predictions (`ClassificationInputs.baselines`), as `train.metric` names them.
BASELINE_METRICS = ("accuracy", "f1", "f1_macro", "f1_weighted", "mcc")
# The cosine baseline of a pair task fits one threshold: a few hundred pairs pin it down, and each costs two
# forward passes at start-up.
COSINE_FIT_PAIRS = 500


def cosine_rule(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(threshold, side) of the best training accuracy for telling class 1 from class 0 by one score: side +1
    predicts class 1 above the threshold, -1 below it (so label ids in either order work). The threshold lies
    midway between neighbouring scores (or at +-inf: one class for every row)."""
    order = np.argsort(scores, kind="stable")
    s, y = np.asarray(scores, dtype=np.float64)[order], np.asarray(labels)[order]
    ones_below = np.concatenate([[0], np.cumsum(y == 1)])  # class-1 rows among the i lowest scores, i = 0..n
    zeros_below = np.arange(len(s) + 1) - ones_below
    right = {1: zeros_below + (ones_below[-1] - ones_below),  # class 0 below the cut, class 1 above
             -1: ones_below + (zeros_below[-1] - zeros_below)}
    cuts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1], [True]]))  # never between equal scores
    side = max((1, -1), key=lambda k: right[k][cuts].max())
    i = int(cuts[right[side][cuts].argmax()])
    threshold = -np.inf if i == 0 else np.inf if i == len(s) else (s[i - 1] + s[i]) / 2
    return float(threshold), side


def format_confusion(metrics: dict, width: int, top: int = 10) -> str:
    """The confusion matrix of `classification_metrics` for a terminal `width` characters wide.

    The whole matrix (rows: true, columns: predicted) where its lines fit; past that (many classes, long
    names) the `top` largest confusions (true -> predicted, count, share of the true class's rows) and the
    per-class F1, worst first (at most 2 * `top` classes). Names too long for the width are shortened with "…".
    The full matrix stays in metrics.json and the report.
    """
    names, matrix = metrics["confusion_matrix"]["labels"], np.asarray(metrics["confusion_matrix"]["matrix"])
    cell = max(8, *(len(n) for n in names)) + 1
    if cell * (len(names) + 1) <= width:
        head = "true \\ pred".ljust(cell) + "".join(n.rjust(cell) for n in names)
        rows = [n.ljust(cell) + "".join(str(v).rjust(cell) for v in row) for n, row in zip(names, matrix)]
        return "\n".join([head, *rows])
    support = matrix.sum(axis=1)
    confusions = sorted(((int(matrix[i, j]), i, j) for i in range(len(names)) for j in range(len(names))
                         if i != j and matrix[i, j]), key=lambda c: (-c[0], c[1], c[2]))
    lines = [_shorten(f"largest confusions (true -> predicted; all {len(names)} classes in metrics.json)", width)]
    for count, i, j in confusions[:top]:
        tail = f": {count} ({count / support[i]:.0%} of its rows)"
        room = (width - 2 - len(" -> ") - len(tail)) // 2
        lines.append(f"  {_shorten(names[i], room)} -> {_shorten(names[j], room)}{tail}")
    if not confusions:
        lines.append("  none: every example was predicted right")
    per_class = metrics["per_class"]
    worst = sorted(names, key=lambda n: per_class[n]["f1-score"])[:2 * top]
    room = width - 2 - len("  0.0000  (support 100000)")
    shown = [_shorten(n, room) for n in worst]
    pad = max(map(len, shown))
    lines.append("per-class F1, worst first" + (f" ({len(worst)} of {len(names)})" if len(worst) < len(names) else ""))
    lines += [f"  {s.ljust(pad)}  {per_class[n]['f1-score']:.4f}  (support {int(per_class[n]['support'])})"
              for s, n in zip(shown, worst)]
    return "\n".join(lines)


def _shorten(name: str, room: int) -> str:
    room = max(room, 8)
    return name if len(name) <= room else name[:room - 1] + "…"


@dataclass
class ClassificationInputs(SequenceInputs):
    """What a classification run trains on, all loaded and checked before anything is written."""

    rows_with_tokens = True  # the report shows metrics by text length
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
        logits, labels, loss = predict_logits(model, loader, accelerator, self.long_text.pooling)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        metrics = classification_metrics(labels, probs.argmax(-1), self.data.label_names, probs)
        metrics["loss"] = loss
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

    def baselines(self, cfg) -> dict:
        """The majority class of the training rows, predicted for every validation row, and, for pairs of two
        classes, a threshold on the untrained model's embedding cosine fitted on training pairs (`cosine_rule`)."""
        names = self.data.label_names
        train_y = np.asarray(column_values(self.data.train, "labels"))
        val_y = np.asarray(column_values(self.data.validation, "labels"))
        majority = int(np.bincount(train_y, minlength=len(names)).argmax())
        metrics = classification_metrics(val_y, np.full_like(val_y, majority), names)
        out = {"majority class": {"rule": f"the training rows' most frequent label, {names[majority]}, for every row",
                                  "metrics": {k: metrics[k] for k in BASELINE_METRICS}}}
        if self.data.text_pair_column:
            out["base-model cosine"] = self.cosine_baseline(cfg, train_y, val_y)
        return out

    def cosine_baseline(self, cfg, train_y: np.ndarray, val_y: np.ndarray) -> dict:
        """The untrained model's embedding cosine as a two-class pair classifier: the threshold (and which side is
        class 1) with the best accuracy on up to COSINE_FIT_PAIRS training pairs, applied to validation."""
        names = self.data.label_names
        if len(names) != 2:
            return {"rule": COSINE_RULE, "skipped": f"{len(names)} classes: one similarity score separates two, and "
                                                    f"a rule for more needs training"}
        rng = np.random.default_rng(cfg.seed)  # its own generator: training's random state stays as it was
        fit_rows = np.sort(rng.permutation(len(train_y))[:COSINE_FIT_PAIRS])
        cosines, how = pair_cosines(self, cfg, {"train": self.data.train.select(fit_rows),
                                                "validation": self.data.validation})
        if cosines is None:
            return {"rule": COSINE_RULE, "skipped": how}
        threshold, side = cosine_rule(cosines["train"], train_y[fit_rows])
        score = side * cosines["validation"]
        metrics = classification_metrics(val_y, (score > side * threshold).astype(int), names,
                                         np.stack([-score, score], axis=1))
        above = names[1] if side > 0 else names[0]
        return {"rule": f"{COSINE_RULE} ({how}) above {threshold:.3f} is {above}, the threshold fitted on "
                        f"{len(fit_rows):,} training pairs",
                "metrics": {k: metrics[k] for k in (*BASELINE_METRICS, "roc_auc", "average_precision")},
                "advice": "the untrained model's embedding cosine already separates these pairs better: train "
                          "longer or at another learning rate, or fine-tune embeddings (task: embedding) and keep "
                          "a cosine threshold"}


@dataclass
class ContrastiveInputs(ClassificationInputs):
    """A `train.method: contrastive` run (tasks/contrastive.py): the loop trains on pairs of training rows with
    the cosine-similarity loss; each evaluation first fits the logistic-regression head on the training rows'
    embeddings, then scores the validation rows like any classifier. It evaluates at step 0 too: the curve
    starts at the untouched encoder with a fitted head, the figure contrastive training has to beat."""

    evaluate_first = True
    seed: int = 0
    num_iterations: int | None = None

    def __post_init__(self):
        from datasets import Dataset

        first, second, target = contrastive_pairs(column_values(self.data.train, "labels"), self.data.label_names,
                                                  self.seed, self.num_iterations)
        self.pairs = Dataset.from_dict({"first": first, "second": second, "target": target})
        self.loss_fn = CosineSimilarityLoss()

    @property
    def train_data(self):
        return self.pairs

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        if split == "train":
            return PairCollator(self.tokenizer, self.tokenized["train"], pad_to_multiple_of)
        return super().collator(split, pad_to_multiple_of)

    def summary(self, cfg) -> str:
        return "\n".join([super().summary(cfg), f"pooling    {self.model.pooling_source}",
                          pairs_summary(np.asarray(self.pairs["target"]), len(self.data.train), self.num_iterations)])

    def evaluate(self, model, loader, accelerator=None):
        unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        fit_head(unwrapped, self.tokenized["train"], column_values(self.tokenized["train"], "labels"),
                 super().collator("train"))
        return super().evaluate(model, loader, accelerator)


class ClassifierPredictor(SequencePredictor):
    """A loaded classifier. `ClassifierPredictor("runs/sst2").predict(["great film"])` -> [{"label": ..., ...}];
    `textune.tasks.load_predictor` returns one for a classification run."""

    task = "classification"

    def predict_proba(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_labels), rows in input order."""
        return torch.softmax(torch.from_numpy(self.logits(texts, text_pairs)), dim=-1).numpy()

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        """One dict per input: `label`, `score` (its probability) and `probabilities` by label name."""
        logits, chunks = self.document_logits(texts, text_pairs)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        return self.with_chunks([{"label": self.label_names[int(p.argmax())], "score": round(float(p.max()), 6),
                                  "probabilities": {n: round(float(x), 6) for n, x in zip(self.label_names, p)}}
                                 for p in probs], chunks)


class Classification(Task):
    name = "classification"
    serve_paths = ("/v1/classify",)
    serve_adapters = True

    def router(self, ctx):
        return classify_router(ctx, prediction_model(), "ClassifyResponse", "classify")

    def serve_description(self, predictor) -> str:
        return "a text classifier"

    def read_data(self, cfg) -> TaskData:
        if cfg.data.format == "conll" or str(cfg.data.train or "").lower().endswith((".conll", ".bio")):
            raise TextuneError(f"data.train: {cfg.data.train} is a CoNLL file of tagged tokens, which a classifier "
                               f"cannot learn from; set task: token-classification, or give a table of texts and "
                               f"labels")
        return load_task_data(cfg.data, cfg.seed)

    def check_data(self, cfg) -> DataReport:
        data = self.read_data(cfg)
        return with_token_lengths(check_task_data(data), cfg, data)

    def load_inputs(self, cfg) -> ClassificationInputs:
        """Model, tokenizer and data: resolved, read, checked (`data.strict`), tokenised, measured, tuned."""
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        data = self.read_data(cfg)
        data_report = check_task_data(data)
        enforce(data_report, cfg.data.strict)
        data = augment_training_split(data, cfg.data.augment, cfg.seed)  # after the checks: they see the user's rows
        long_text = LongText.of(cfg.data, cfg.model.max_length)
        tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length, cache=cfg.data.cache, long_text=long_text)
        stats = {split: split_length_stats(ds, cfg.model.max_length) for split, ds in tokenized.items()}
        if cfg.train.method == "contrastive":  # SetFit's few-shot method (tasks/contrastive.py)
            return ContrastiveInputs(model_path, tokenizer, data, data_report, tokenized, stats,
                                     load_contrastive_model(cfg, model_path, data.label_names),
                                     seed=cfg.seed, num_iterations=cfg.train.num_iterations, long_text=long_text)
        model = load_sequence_model(cfg, model_path, data.label_names)
        stream = (tokenize_stream(data, tokenizer, cfg.model.max_length, long_text)
                  if data.train_stream is not None else None)
        return ClassificationInputs(model_path, tokenizer, data, data_report, tokenized, stats, model, stream,
                                    classification_loss(cfg, data), long_text=long_text)

    # ------------------------------------------------------------ saved runs

    predictor_class = ClassifierPredictor
    playground = PlaygroundSpec((("text", "text", False), ("pair", "second text (a model of pairs)", True)),
                                "probabilities")

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
        """Accuracy, F1 and ECE cards; final metrics with the confusion matrix as a heat map, calibration, the
        precision-recall curve (two classes) and the most confidently wrong validation examples."""
        rows = read_predictions(run / "validation_predictions.jsonl")
        label_names = (stats or {}).get("label_names") or ((metrics or {}).get("validation", {})
                                                           .get("confusion_matrix") or {}).get("labels") or []
        probs, labels = prediction_arrays(rows, label_names)
        calibration, ece = calibration_html(probs, labels)
        v = (metrics or {}).get("validation") or {}
        cards = [("accuracy", fmt(v.get("accuracy"))), ("F1", fmt(v.get("f1"))), ("macro F1", fmt(v.get("f1_macro"))),
                 ("validation loss", fmt(v.get("loss"))), ("ECE", fmt(ece, 3))]
        pr_curve = precision_recall_html(probs, labels, label_names) if len(label_names) == 2 else ""
        by_length = by_length_html(rows, row_scores, (stats or {}).get("max_length"))
        return cards, metrics_html(metrics) + calibration + pr_curve + by_length + wrong_html(rows)


# ------------------------------------------------------------ report

ECE_BINS = 10


def row_scores(rows: list[dict]) -> dict[str, float]:
    """Accuracy and macro F1 of validation rows (a group of the report's metrics by text length)."""
    from sklearn.metrics import f1_score

    labels, preds = [r["label"] for r in rows], [r["pred"] for r in rows]
    return {"accuracy": float(np.mean([a == b for a, b in zip(labels, preds)])),
            "macro F1": float(f1_score(labels, preds, average="macro", zero_division=0))}

WORST_EXAMPLES = 12


def prediction_arrays(rows: list[dict], label_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, true label ids) of the validation rows whose label the model knows."""
    ids = {n: i for i, n in enumerate(label_names)}
    rows = [r for r in rows if r.get("label") in ids and r.get("probs")]
    return np.array([r["probs"] for r in rows], dtype=float), np.array([ids[r["label"]] for r in rows])


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width confidence bins over [0, 1]: (count, mean confidence, accuracy) per bin.

    Bin b holds confidences in (b/n, (b+1)/n]; empty bins have mean confidence and accuracy 0.
    """
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    safe = np.maximum(count, 1)
    mean_conf = np.bincount(idx, weights=confidence, minlength=n_bins) / safe
    accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / safe
    return count, mean_conf, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (Guo et al., 2017) with equal-width bins.

        ECE = sum over bins b of  (n_b / N) * | accuracy(b) - mean confidence(b) |

    where confidence is the predicted class's probability, accuracy(b) the share of correct predictions
    among the n_b examples whose confidence falls in bin b, N all examples. 0 is perfectly calibrated.
    Written here because scikit-learn's `calibration_curve` is for one class's probability in binary
    tasks, not the top-label confidence of any number of classes.
    """
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    count, mean_conf, accuracy = reliability_bins(confidence, correct, n_bins)
    return float(np.sum(count / len(labels) * np.abs(accuracy - mean_conf)))


def reliability_figure(probs: np.ndarray, labels: np.ndarray, ece: float):
    """Accuracy per confidence bin against the diagonal of perfect calibration; counts underneath."""
    from matplotlib.figure import Figure

    confidence = probs.max(axis=1)
    count, mean_conf, accuracy = reliability_bins(confidence, probs.argmax(axis=1) == labels)
    width = 1.0 / ECE_BINS
    centers = np.arange(ECE_BINS) * width + width / 2
    full = count > 0
    fig = Figure(figsize=(5.2, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(centers[full], accuracy[full], width=width * 0.92, color="#1f77b4", alpha=0.85, label="accuracy")
    over = full & (mean_conf > accuracy)  # shade over-confidence above the bar; under-confidence shows as the tick
    if over.any():
        top.bar(centers[over], (mean_conf - accuracy)[over], bottom=accuracy[over], width=width * 0.92,
                color="#d62728", alpha=0.25, hatch="//", edgecolor="#d62728", linewidth=0, label="over-confidence")
    top.hlines(mean_conf[full], centers[full] - width * 0.46, centers[full] + width * 0.46, color="#d62728",
               linewidth=2, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability (ECE {ece:.3f}, {ECE_BINS} bins)", fontsize=11, loc="left")
    top.legend(fontsize=8, frameon=False, loc="upper left")
    bottom.bar(centers, count, width=width * 0.92, color="#888")
    bottom.set_ylabel("examples")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    # No prediction is less confident than 1/K: start the axis at the bin holding 1/K.
    bottom.set_xlim(np.floor(ECE_BINS / probs.shape[1]) / ECE_BINS, 1)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def confusion_html(cm: dict) -> str:
    """Rows: true label, columns: predicted. Shade = share of the row (recall), so classes of any size compare."""
    names, matrix = cm["labels"], np.asarray(cm["matrix"], dtype=float)
    rows = ['<table class="cm"><tr><th></th><th class="axis" colspan="%d">predicted</th></tr>' % len(names),
            "<tr><th>true \u2193</th>" + "".join(f'<th class="axis">{esc(n)}</th>' for n in names) + "</tr>"]
    for i, name in enumerate(names):
        total = matrix[i].sum() or 1.0
        cells = []
        for j, value in enumerate(matrix[i]):
            share = value / total
            ink = "#fff" if share > 0.55 else "#1f2328"
            diag = ' class="diag"' if i == j else ""
            cells.append(f'<td{diag} style="background:rgba(31,119,180,{0.06 + 0.94 * share:.3f});color:{ink}">'
                         f'{int(value):,}<span class="pct">{share:.0%}</span></td>')
        rows.append(f'<tr><th class="l">{esc(name)}</th>{"".join(cells)}</tr>')
    rows.append("</table>")
    return "".join(rows)


def per_class_html(per_class: dict, names: list[str]) -> str:
    rows = ['<table><tr><th class="l">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>']
    for name in [*names, "macro avg", "weighted avg"]:
        r = per_class.get(name)
        if isinstance(r, dict):
            rows.append(f'<tr><td class="l">{esc(name)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
                        f'<td>{r["f1-score"]:.3f}</td><td>{int(r["support"]):,}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def metrics_html(metrics: dict | None) -> str:
    """The final validation metrics: which model they are of, the confusion matrix, the per-class table, test."""
    out = ['<section id="metrics"><h2>Final validation metrics</h2>']
    if metrics is None:
        out.append(missing_html("metrics", "metrics.json is missing (the run has not finished)") + "</section>")
        return "".join(out)
    v = metrics.get("validation") or {}
    note = f"best model from step {metrics.get('best_step')}" if metrics.get("best_step") is not None else "last model"
    out.append(f'<p class="muted">{esc(note)}, picked by validation {esc(metrics.get("metric", "accuracy"))}'
               + (", stopped early" if metrics.get("stopped_early") else "") + ".</p>")
    cm = v.get("confusion_matrix")
    out.append('<div class="grid2"><div><h3>Confusion matrix</h3>'
               + (confusion_html(cm) if cm else missing_html("confusion matrix", "not in metrics.json")) + "</div>")
    out.append("<div><h3>Per class</h3>" + (per_class_html(v.get("per_class") or {}, cm["labels"]) if cm else "")
               + "</div></div>")
    if metrics.get("test"):
        t = metrics["test"]
        out.append("<h3>Test</h3>" + cards_html([("test " + k, fmt(t.get(k))) for k in ("loss", "accuracy", "f1", "f1_macro")
                                             if t.get(k) is not None]))
    out.append("</section>")
    return "".join(out)


def calibration_html(probs: np.ndarray, labels: np.ndarray) -> tuple[str, float | None]:
    """The calibration section (reliability plot, ECE, over- or under-confidence) and the ECE (None without rows)."""
    out = ['<section id="calibration"><h2>Calibration</h2>']
    if len(labels) == 0:
        out.append(missing_html("calibration", "validation_predictions.jsonl is missing") + "</section>")
        return "".join(out), None
    ece = expected_calibration_error(probs, labels)
    confidence = probs.max(axis=1)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    over = "over-confident" if confidence.mean() > accuracy else "under-confident"
    out.append('<div class="grid2"><div>' + img_html(reliability_figure(probs, labels, ece), "reliability plot") + "</div>")
    out.append(f"<div><p>Expected calibration error <b>{ece:.3f}</b> over {len(labels):,} validation examples "
               f"({ECE_BINS} equal-width bins).</p><p>Mean confidence {confidence.mean():.3f} against accuracy "
               f"{accuracy:.3f}: on average the model is <b>{over}</b> by {abs(confidence.mean() - accuracy):.3f}.</p>"
               '<p class="muted">ECE = &Sigma;<sub>b</sub> (n<sub>b</sub>/N) &middot; |accuracy(b) &minus; '
               "confidence(b)|, the gap between how sure the model is and how often it is right, weighted by how "
               "many predictions fall in each confidence bin. A bar below its red tick: the model is more sure than "
               "it should be there; above it: less sure.</p></div></div></section>")
    return "".join(out), ece


def wrong_html(rows: list[dict]) -> str:
    """The validation examples the model was surest about and got wrong."""
    out = ['<section id="errors"><h2>Most confidently wrong validation examples</h2>']
    if not rows:
        out.append(missing_html("examples", "validation_predictions.jsonl is missing") + "</section>")
        return "".join(out)
    wrong = [r for r in rows if r.get("label") != r.get("pred") and r.get("probs")]
    wrong.sort(key=lambda r: max(r["probs"]), reverse=True)
    if not wrong:
        out.append('<p class="note">Every validation example is predicted correctly.</p></section>')
        return "".join(out)
    out.append(f'<p class="muted">{len(wrong):,} of {len(rows):,} validation examples are wrong; the '
               f"{min(WORST_EXAMPLES, len(wrong))} below are the ones the model was surest about, often label noise "
               "or a pattern the model has not learnt.</p>")
    out.append('<table class="wrong"><tr><th class="l">text</th><th class="l">true</th><th class="l">predicted</th>'
               "<th>confidence</th></tr>")
    for r in wrong[:WORST_EXAMPLES]:
        out.append(f'<tr><td class="text">{text_cell_html(r)}</td><td class="l">{esc(r["label"])}</td>'
                   f'<td class="l">{esc(r["pred"])}</td><td class="conf">{max(r["probs"]):.1%}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


def precision_recall_html(probs: np.ndarray, labels: np.ndarray, label_names: list[str]) -> str:
    """The report's precision-recall curve of the positive class (id 1) of a binary classifier, with the
    precision and recall at the 0.5 cut the predictions use and the average precision."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    out = ['<section id="precision-recall"><h2>Precision-recall curve</h2>']
    if len(labels) == 0 or len(set(labels.tolist())) < 2:
        return "".join(out) + missing_html("curve", "validation predictions lack one of the classes") + "</section>"
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
    out.append('<div class="grid2"><div>' + img_html(fig, "precision-recall curve") + "</div>")
    out.append(f"<div><p>Average precision <b>{ap:.3f}</b> for the positive class {esc(label_names[1])} over "
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


# ------------------------------ export


def predicted_labels(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The label each row's logits choose: what an int8 export must agree on with PyTorch."""
    return logits.argmax(-1)


Classification.export_spec = ExportSpec(decide=predicted_labels, decisions="predicted labels")


# ------------------------------ serving


def prediction_model() -> type:
    """One text's answer of POST /v1/classify (pydantic is imported here, so training never loads it)."""
    from pydantic import BaseModel, Field

    class Prediction(BaseModel):
        label: str
        score: float = Field(description="probability of the predicted label")
        probabilities: dict[str, float]

    return Prediction
