"""Evaluation: classification, regression and multi-label metrics with scikit-learn and scipy (`evaluate.load`
needs the Hub) and the eval loop."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    hamming_loss,
    matthews_corrcoef,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, label_names: list[str],
                           probs: np.ndarray | None = None) -> dict:
    """Accuracy, macro precision/recall/F1, binary ones (positive class = id 1) for two classes, Matthews
    correlation (`mcc`, CoLA's metric), support-weighted F1, the confusion matrix (rows: true, columns: predicted)
    and the per-class report. With `probs` (N x classes) also `roc_auc` and `average_precision`: of the positive
    class for two classes, one-vs-rest macro averages with more (NaN where a class has no rows to rank)."""
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


def loss_per_row(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed loss and its number of loss terms, so rows can be gathered without the padding rows
    and averaged over the whole split.

    For integer labels (one per row, or one per token with -100 ignored) the cross-entropy is recomputed from
    the logits, and used when its mean reproduces the model's own loss. Otherwise (regression, a custom loss)
    each row carries the batch mean: exact for every batch but a padded last one.
    """
    rows = logits.shape[0]
    if labels is not None and not labels.is_floating_point() and logits.ndim == labels.ndim + 1:
        terms = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  ignore_index=-100, reduction="none").view(rows, -1)
        counts = (labels != -100).view(rows, -1).sum(1)
        sums = terms.sum(1)
        if torch.isclose(sums.sum() / counts.sum().clamp(min=1), loss, rtol=1e-4, atol=1e-6):
            return sums, counts.float()
    return loss.expand(rows), torch.ones(rows, device=logits.device)


def matthews(labels: np.ndarray, preds: np.ndarray) -> float:
    """Matthews correlation; 0.0 where it is undefined (one class in labels and predictions), without sklearn's
    warning about that case."""
    import warnings

    if len(labels) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(matthews_corrcoef(labels, preds))


def ranking_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """ROC-AUC and average precision of class probabilities: the positive class (id 1) for two classes,
    one-vs-rest macro averages with more. NaN where they are undefined (a class without rows, or only one class)."""
    import warnings

    labels = np.asarray(labels)
    with warnings.catch_warnings():  # an undefined score is NaN here; sklearn would also warn about it
        warnings.simplefilter("ignore")
        return _ranking_metrics(labels, probs)


def _ranking_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    try:
        if probs.shape[1] == 2:
            return {"roc_auc": float(roc_auc_score(labels, probs[:, 1])),
                    "average_precision": float(average_precision_score(labels, probs[:, 1]))}
        hot = np.eye(probs.shape[1])[labels]
        return {"roc_auc": float(roc_auc_score(hot, probs, average="macro")),
                "average_precision": float(average_precision_score(hot, probs, average="macro"))}
    except ValueError:  # sklearn: "Only one class present in y_true"
        return {"roc_auc": float("nan"), "average_precision": float("nan")}


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


@torch.inference_mode()
def predict_logits(model, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Run `model` over `loader`; return (logits, labels or None, mean loss or None).

    With Accelerate, predictions from all processes are gathered without the padding duplicates that even
    sharding adds, and so is the loss: every process returns the same mean over every example once.
    """
    model.eval()
    logits, labels, loss_sum, n = [], [], 0.0, 0.0
    for batch in loader:
        out = model(**batch)
        batch_labels = batch.get("labels")
        lg = out.logits.float()
        sums, counts = loss_per_row(out.loss.float(), lg, batch_labels) if out.loss is not None else (None, None)
        if accelerator is not None:
            lg, batch_labels, sums, counts = accelerator.gather_for_metrics((lg, batch_labels, sums, counts))
        if sums is not None:
            loss_sum += sums.double().sum().item()
            n += counts.double().sum().item()
        logits.append(lg.cpu())
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
    model.train()
    all_logits = torch.cat(logits).numpy()
    all_labels = torch.cat(labels).numpy() if labels else None
    return all_logits, all_labels, (loss_sum / n if n else None)


def evaluate_loader(model, loader, label_names: list[str], accelerator=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics (with `loss`) over a labelled loader; also returns class probabilities and labels."""
    logits, labels, loss = predict_logits(model, loader, accelerator)
    probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    metrics = classification_metrics(labels, probs.argmax(-1), label_names, probs)
    metrics["loss"] = loss
    return metrics, probs, labels


def headline(metrics: dict) -> str:
    """One line: loss, accuracy, F1 (binary where there are two classes, else macro), macro F1; perplexity
    for a language model; micro F1 for multi-label; Pearson, Spearman and MAE for regression."""
    keys = ("loss", "perplexity", "accuracy", "f1", "f1_micro", "f1_macro", "pearson", "spearman", "mae")
    parts = [f"{k} {metrics[k]:.4f}" for k in keys if metrics.get(k) is not None]
    return ", ".join(parts)


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

    def fit(name: str, room: int) -> str:
        room = max(room, 8)
        return name if len(name) <= room else name[:room - 1] + "…"

    support = matrix.sum(axis=1)
    confusions = sorted(((int(matrix[i, j]), i, j) for i in range(len(names)) for j in range(len(names))
                         if i != j and matrix[i, j]), key=lambda c: (-c[0], c[1], c[2]))
    lines = [fit(f"largest confusions (true -> predicted; all {len(names)} classes in metrics.json)", width)]
    for count, i, j in confusions[:top]:
        tail = f": {count} ({count / support[i]:.0%} of its rows)"
        room = (width - 2 - len(" -> ") - len(tail)) // 2
        lines.append(f"  {fit(names[i], room)} -> {fit(names[j], room)}{tail}")
    if not confusions:
        lines.append("  none: every example was predicted right")
    per_class = metrics["per_class"]
    worst = sorted(names, key=lambda n: per_class[n]["f1-score"])[:2 * top]
    room = width - 2 - len("  0.0000  (support 100000)")
    shown = [fit(n, room) for n in worst]
    pad = max(map(len, shown))
    lines.append("per-class F1, worst first" + (f" ({len(worst)} of {len(names)})" if len(worst) < len(names) else ""))
    lines += [f"  {s.ljust(pad)}  {per_class[n]['f1-score']:.4f}  (support {int(per_class[n]['support'])})"
              for s, n in zip(shown, worst)]
    return "\n".join(lines)
