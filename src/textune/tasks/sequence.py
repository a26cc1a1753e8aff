"""What the sequence-level tasks share: classification, regression and multi-label each read one text (or text
pair) per row from a table, tokenise it to `model.max_length`, pad per batch and put one
`AutoModelForSequenceClassification` head on top; they differ in their labels (`problem_type`), metrics,
predictions and report. This module holds the shared parts, so those three task modules import it and never
each other:

- `SequenceInputs`: the `TaskInputs` of a sequence task (collator, data_stats, the validation rows it writes);
- `load_sequence_model`: the tuned head with one output per label name and the task's `problem_type`;
- `SequencePredictor`: a loaded sequence model's raw outputs, batched by length, in input order;
- `read_sequence_inputs`, `read_labelled_file`: texts (and pairs) to predict or evaluate from a file or stdin;
- `target_data_report`: the data checks of classification for targets that are not class ids.

Reading and checking the table itself (columns, empty texts, label encoding) is `textune.data`'s, which every
sequence task calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from textune.data import TaskData, check_text_cells, column_values, read_table
from textune.data_checks import DataReport, check_task_data
from textune.errors import TextuneError
from textune.infer import ModelPredictor, read_inputs, text_echo
from textune.models import load_classifier, set_attention
from textune.tasks.base import TaskInputs
from textune.tuning import apply_tuning


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


def load_sequence_model(cfg, model_path: str, label_names: list[str], problem_type: str | None = None):
    """The `AutoModelForSequenceClassification` of a run, one output per label name, tuned (cfg.tuning) and with
    cfg.model.attention. `problem_type` (regression, multi_label_classification) picks the model's own loss
    (MSE, BCE) and is saved in config.json, where `transformers.pipeline` reads it."""
    model = load_classifier(model_path, label_names, cfg.model.trust_remote_code)
    if problem_type is not None:
        model.config.problem_type = problem_type
    return apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)


class SequencePredictor(ModelPredictor):
    """A loaded sequence model. Each task's predictor turns `logits` into its predictions (class probabilities,
    scores, label sets).

    Inputs are tokenised once, sorted by length and batched, so each batch pads to a similar length; results
    come back in the input order.
    """

    @torch.inference_mode()
    def logits(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        """The raw outputs, shape (len(texts), outputs), rows in input order.

        Raises:
            TextuneError: `text_pairs` given, but not one per text.
        """
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise TextuneError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
        width = len(self.label_names)
        if not texts:
            return np.zeros((0, width), dtype=np.float32)
        enc = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        out = np.empty((len(texts), width), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([{k: enc[k][i] for k in enc.keys()} for i in idx], return_tensors="pt")
            out[idx] = self.model(**batch.to(self.device)).logits.float().cpu().numpy()
        return out


def read_sequence_inputs(source: str, columns: dict) -> tuple[tuple[list, list | None], list[dict]]:
    """`Task.read_inputs` of the sequence-level tasks: ((texts, pairs or None), echo rows) from a file or stdin."""
    text_col, pair_col = columns.get("text_column") or "text", columns.get("text_pair_column")
    if pair_col and (source == "-" or source.endswith(".txt")):
        raise TextuneError(f"this model reads pairs of texts (columns {text_col!r} and {pair_col!r}); "
                           f"give --input a .csv/.tsv/.jsonl/.parquet file with both columns, not "
                           f"{'standard input' if source == '-' else 'a .txt file'}")
    texts, pairs = read_inputs(source, text_col, pair_col, keep_blank_lines=True)
    if pairs is None:  # a blank line of text echoes as a BlankLine: an empty output row, not a prediction
        return (texts, pairs), text_echo(texts, source)
    return (texts, pairs), [{"text": t, "text_pair": p} for t, p in zip(texts, pairs)]


def read_labelled_file(path: str, columns: dict) -> tuple[object, list[str], list[str] | None, str]:
    """`textune evaluate`'s file: (dataset, texts, pairs or None, label column name), every column checked.

    Raises:
        TextuneError: a column is missing, or a text cell is a list or an object.
    """
    text_col = columns.get("text_column") or "text"
    pair_col, label_col = columns.get("text_pair_column"), columns.get("label_column") or "label"
    ds = read_table(path, "--data")
    missing = [c for c in (text_col, pair_col, label_col) if c and c not in ds.column_names]
    if missing:
        raise TextuneError(f"{path} has no column {missing[0]!r}; its columns are: "
                           f"{', '.join(map(repr, ds.column_names))} (set --text-column/--label-column)")
    texts, pairs = column_values(ds, text_col), column_values(ds, pair_col) if pair_col else None
    for col, values in ((text_col, texts), (pair_col, pairs)):
        if values is not None:
            check_text_cells(values, path, col)
    return ds, [str(t) for t in texts], [str(t) for t in pairs] if pairs is not None else None, label_col


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


# ------------------------------ serving


def classify_router(ctx, result: type, response_name: str, verb: str):
    """POST /v1/classify, the URL every sequence task answers at: texts (and pairs, and an adapter) in, one
    `result` per text out, micro-batched. Classification, regression and multi-label differ only in `result`
    (label + probabilities, a score, a label set); `response_name` names the response in the OpenAPI schema so a
    client sees which it gets. pydantic is imported here, so training never loads it."""
    from pydantic import BaseModel, ConfigDict, Field, create_model

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, description=f"texts to {verb}", examples=[["a great film"]])
        text_pairs: list[str] | None = Field(None, description="second texts of a sentence-pair task, one per text")
        adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")

    response = create_model(response_name, model=(str, ...), adapter=(str | None, ...),
                            results=(list[result], Field(description="one per input text, in the input order")))
    router = ctx.router()

    async def classify(req) -> dict:
        """The prediction of each text (or text pair), in the input order."""
        ctx.check_texts(req.texts, req.text_pairs)
        ctx.check_adapter(req.adapter)
        results = await ctx.batched(req.texts, req.text_pairs, req.adapter)
        return {"model": ctx.model_name, "adapter": req.adapter, "results": results}

    ctx.post(router, "/v1/classify", classify, ClassifyRequest, response)
    return router
