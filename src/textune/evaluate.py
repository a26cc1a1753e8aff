"""Evaluation that every task shares: running a model over a labelled loader, gathering its outputs over all
processes with the split's mean loss, and the one-line headline of a task's metrics. Each task computes its own
metrics from the gathered outputs (`TaskInputs.evaluate`, in its module under `textune.tasks`)."""

from __future__ import annotations

import numpy as np
import torch


def loss_per_row(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed loss and its number of loss terms, so rows can be gathered without the padding rows
    and averaged over the whole split.

    For integer labels (one per row, or one per token with -100 ignored) the cross-entropy is recomputed from
    the logits, for float labels of the logits' size binary cross-entropy (multi-label) or squared error
    (regression), each used when its mean reproduces the model's own loss. Otherwise (a custom loss) each row
    carries the batch mean: exact for every batch but a padded last one, whose repeated rows (several
    processes) then weigh in.
    """
    rows, functional = logits.shape[0], torch.nn.functional
    if labels is not None and not labels.is_floating_point() and logits.ndim == labels.ndim + 1:
        terms = functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         ignore_index=-100, reduction="none").view(rows, -1)
        counts = (labels != -100).view(rows, -1).sum(1)
        sums = terms.sum(1)
        if torch.isclose(sums.sum() / counts.sum().clamp(min=1), loss, rtol=1e-4, atol=1e-6):
            return sums, counts.float()
    if labels is not None and labels.is_floating_point() and labels.numel() == logits.numel():
        x, y = logits.reshape(rows, -1), labels.reshape(rows, -1).to(logits.dtype)
        for terms in (functional.binary_cross_entropy_with_logits(x, y, reduction="none"),
                      functional.mse_loss(x, y, reduction="none")):
            if torch.isclose(terms.mean(), loss, rtol=1e-4, atol=1e-6):
                return terms.sum(1), torch.full((rows,), float(x.shape[1]), device=logits.device)
    return loss.expand(rows), torch.ones(rows, device=logits.device)


# A batch key that is never a model input: the document (the text's row in its split) each row of a batch belongs
# to, where a long text is read as several rows (data.long_text chunks). Evaluation pools those rows into one per
# document, so every metric counts documents; the loaders of tasks without it are unchanged.
DOCUMENT_KEY = "document"


@torch.inference_mode()
def predict_logits(model, loader, accelerator=None, pooling: str = "mean"
                   ) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """Run `model` over `loader`; return (logits, labels or None, mean loss or None).

    With Accelerate, predictions from all processes are gathered without the padding duplicates that even
    sharding adds, and so is the loss: every process returns the same mean over every example once.

    Batches that carry `DOCUMENT_KEY` hold several rows per document: their logits are pooled (`pooling`: mean or
    max, `chunking.pool_documents`) into one row per document, in the order documents come, with its label, and
    the loss is the mean over documents of each one's own loss over its rows (the model's loss, every document
    weighing the same however many rows it made).
    """
    model.eval()
    logits, labels, loss_sum, n = [], [], 0.0, 0.0
    sums_all, counts_all, documents = [], [], []  # per row, for rows grouped by document
    for batch in loader:
        batch_documents = batch.pop(DOCUMENT_KEY, None)
        out = model(**batch)
        batch_labels = batch.get("labels")
        lg = out.logits.float()
        sums, counts = loss_per_row(out.loss.float(), lg, batch_labels) if out.loss is not None else (None, None)
        if accelerator is not None:
            lg, batch_labels, sums, counts, batch_documents = gather_present(
                accelerator, (lg, batch_labels, sums, counts, batch_documents))
        if sums is not None:
            loss_sum += sums.double().sum().item()
            n += counts.double().sum().item()
            if batch_documents is not None:
                sums_all.append(sums.double().cpu())
                counts_all.append(counts.double().cpu())
        logits.append(lg.cpu())
        if batch_labels is not None:
            labels.append(batch_labels.cpu())
        if batch_documents is not None:
            documents.append(batch_documents.cpu())
    model.train()
    all_logits = torch.cat(logits).numpy()
    all_labels = torch.cat(labels).numpy() if labels else None
    if documents:
        sums = torch.cat(sums_all).numpy() if sums_all else None
        counts = torch.cat(counts_all).numpy() if counts_all else None
        return pooled_by_document(all_logits, all_labels, sums, counts, torch.cat(documents).numpy(), pooling)
    return all_logits, all_labels, (loss_sum / n if n else None)


def gather_present(accelerator, values: tuple) -> tuple:
    """`accelerator.gather_for_metrics` of the tensors among `values`, the Nones left in place: given a None it would
    fall back to gathering Python objects, which concatenates the processes' tuples instead of their tensors."""
    present = [v for v in values if v is not None]
    gathered = iter(accelerator.gather_for_metrics(tuple(present)) if present else ())
    return tuple(None if v is None else next(gathered) for v in values)


def pooled_by_document(logits: np.ndarray, labels: np.ndarray | None, sums: np.ndarray | None,
                       counts: np.ndarray | None, documents: np.ndarray, pooling: str
                       ) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """`predict_logits`' result of rows grouped by document: pooled logits, each document's label (its first
    row's: every row of a document carries it) and the mean over documents of each one's loss over its rows."""
    from textune.chunking import pool_documents

    pooled, first = pool_documents(logits, documents, pooling)
    loss = None
    if sums is not None:
        per_document_sums, _ = pool_documents(sums.reshape(-1, 1), documents, "mean")
        per_document_counts, _ = pool_documents(counts.reshape(-1, 1), documents, "mean")
        nonzero = per_document_counts[:, 0] > 0
        loss = float((per_document_sums[nonzero, 0] / per_document_counts[nonzero, 0]).mean()) if nonzero.any() else None
    return pooled, (labels[first] if labels is not None else None), loss


HEADLINE = ("loss", "perplexity", "accuracy", "f1", "f1_micro", "f1_macro", "pearson", "spearman", "mae")


def headline(metrics: dict, metric: str | None = None) -> str:
    """One line: loss, accuracy, F1 (binary where there are two classes, else macro), macro F1; perplexity
    for a language model; micro F1 for multi-label; Pearson, Spearman and MAE for regression; and `metric` (the
    run's train.metric, or its task's headline) last where it is none of those, so any task's own metric shows."""
    keys = HEADLINE if metric is None or metric in HEADLINE else (*HEADLINE, metric)
    parts = [f"{k} {metrics[k]:.4f}" for k in keys if metrics.get(k) is not None]
    return ", ".join(parts)
