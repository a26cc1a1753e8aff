"""What the sequence-level tasks share: classification, regression and multi-label each read one text (or text
pair) per row from a table, tokenise it to `model.max_length`, pad per batch and put one
`AutoModelForSequenceClassification` head on top; they differ in their labels (`problem_type`), metrics,
predictions and report. This module holds the shared parts, so those three task modules import it and never
each other:

- `SequenceInputs`: the `TaskInputs` of a sequence task (collator, data_stats, the validation rows it writes);
- `load_sequence_model`: the tuned head with one output per label name and the task's `problem_type`;
- `SequencePredictor`: a loaded sequence model's raw outputs, batched by length, in input order;
- `read_sequence_inputs`, `read_labelled_file`: texts (and pairs) to predict or evaluate from a file or stdin;
- `target_data_report`: the data checks of classification for targets that are not class ids;
- `pair_cosines`: the untrained model's embedding cosine of each text pair, the zero-shot baseline of pair tasks.

Reading and checking the table itself (columns, empty texts, label encoding) is `textune.data`'s, which every
sequence task calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from transformers import DataCollatorWithPadding

from textune.chunking import (LongText, chunk_counts, chunk_rows, encode_long_texts, head_tail_split, pool_documents,
                              special_token_ends)
from textune.data import TaskData, check_text_cells, column_values, document_lengths, read_table
from textune.data_checks import DataReport, check_task_data
from textune.errors import TextuneError
from textune.evaluate import DOCUMENT_KEY
from textune.infer import ModelPredictor, read_inputs, text_echo
from textune.models import load_classifier, saved_run_config, set_attention
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
    # data.long_text: how texts longer than model.max_length were read (keyword-only: subclasses add positional
    # fields after it)
    long_text: LongText = field(default=LongText(), kw_only=True)
    # Validation rows carry each text's tokens before any cut (`tokens`), which the report's metrics by text length
    # read (`by_length_html`); a task that shows no such section keeps its rows as they were.
    rows_with_tokens: ClassVar[bool] = False

    def label_stats(self) -> dict:
        """The labels' part of data.json (counts per split, or a numeric target's statistics)."""
        raise NotImplementedError

    def data_stats(self, cfg) -> dict:
        # sizes count texts (documents), also where data.long_text chunks reads one as several rows
        lt = self.long_text
        return {"sizes": {k: self.stats[k].get("examples", len(v)) for k, v in self.tokenized.items()},
                "label_names": self.data.label_names, **self.label_stats(), "token_lengths": self.stats,
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.data_report.findings],
                "max_length": cfg.model.max_length,
                **({"long_text": {"mode": lt.mode, "chunk_stride": lt.stride, "max_chunks": lt.max_chunks,
                                  "chunk_pooling": lt.pooling}} if lt.mode != "truncate" else {})}

    def summary_footer(self, cfg) -> list[str]:
        """The data checks' warnings and the training split's token lengths: the last lines of `summary`."""
        s = self.stats["train"]
        return [*(f"warning    {finding.message}" for finding in self.data_report.findings),
                f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | "
                + (f"truncated at {cfg.model.max_length}: {s['truncated_share']:.1%}" if self.long_text.mode == "truncate"
                   else f"longer than {cfg.model.max_length}: {s['truncated_share']:.1%}"),
                *long_text_lines(self.long_text, s, cfg.model.max_length, self.tokenizer)]

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        if self.long_text.mode != "truncate":
            return LongTextCollator(self.tokenizer, pad_to_multiple_of, keep_documents=split != "train")
        return DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def write_validation_rows(self, rows, path: Path) -> None:
        """JSONL of the validation rows, in order: each of `rows` (labels and predictions) with its text and pair."""
        d = self.data
        texts = list(d.validation[d.text_column])
        pairs = list(d.validation[d.text_pair_column]) if d.text_pair_column else None
        # each text's tokens before any cut: the report's metrics by document length read them
        lengths = (document_lengths(self.tokenized["validation"])
                   if self.rows_with_tokens and "validation" in self.tokenized else None)
        with path.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = {"text": texts[i], **row, **({"tokens": int(lengths[i])} if lengths is not None else {})}
                if pairs is not None:
                    row["text_pair"] = pairs[i]
                f.write(json.dumps(row) + "\n")


class LongTextCollator:
    """`DataCollatorWithPadding` for rows of data.long_text head_tail or chunks: their statistics columns
    (`length`, `document_length`) never reach the model; evaluation batches (`keep_documents`) carry each window's
    document as `evaluate.DOCUMENT_KEY`, which evaluation pools the windows' logits by."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None, keep_documents: bool):
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.keep_documents = keep_documents

    def __call__(self, features: list[dict]) -> dict:
        dropped = ("document", "document_length", "length")
        batch = self.pad([{k: v for k, v in f.items() if k not in dropped} for f in features])
        if self.keep_documents and "document" in features[0]:
            batch[DOCUMENT_KEY] = torch.tensor([f["document"] for f in features])
        return batch


def long_text_lines(long_text: LongText, stats: dict, max_length: int, tokenizer) -> list[str]:
    """The start-up summary's lines about data.long_text: what is kept of a long text, and for chunks the windows
    per text and what they do to an epoch's length."""
    if long_text.mode == "head_tail":
        head, tail = head_tail_split(max_length - sum(special_token_ends(tokenizer)))
        return [f"long text  head_tail: the {stats['truncated_share']:.1%} of training texts longer than {max_length} "
                f"tokens keep their first {head} and last {tail}"]
    if not long_text.chunked:
        return []
    c = stats["chunks"]
    ratio = c["chunks"] / max(c["documents"], 1)
    return [f"long text  chunks of {max_length} tokens sharing {long_text.stride}, at most {long_text.max_chunks} per "
            f"text (spread over it), logits pooled by {long_text.pooling}: per training text mean {c['mean']:g} | p95 "
            f"{c['p95']} | max {c['max']}",
            f"epoch      {c['chunks']:,} windows of {c['documents']:,} texts: {ratio:.2f}x the rows (and steps) of "
            f"data.long_text truncate; metrics count texts"]


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
    come back in the input order. A run trained with data.long_text head_tail or chunks reads its texts the same
    way (its saved config says so): chunks' windows are scored and pooled into one row per text, so predict,
    evaluate, serve, the Python API and an ONNX export all score a text as training's evaluation did.
    """

    def _setup(self, *args) -> None:
        super()._setup(*args)
        self.long_text = LongText.of(saved_run_config(self.run_dir).get("data") or {}, self.max_length)

    def logits(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        """The raw outputs, shape (len(texts), outputs), rows in input order."""
        return self.document_logits(texts, text_pairs)[0]

    @torch.inference_mode()
    def document_logits(self, texts: list[str], text_pairs: list[str] | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None]:
        """(the raw outputs, shape (len(texts), outputs), rows in input order; for data.long_text chunks the
        windows each text was read as, else None).

        Raises:
            TextuneError: `text_pairs` given, but not one per text.
        """
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise TextuneError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
        width = len(self.label_names)
        if not texts:
            return np.zeros((0, width), dtype=np.float32), (np.zeros(0, dtype=int) if self.long_text.chunked else None)
        documents = None
        if text_pairs is None and self.long_text.mode != "truncate":  # pairs are always truncated (longest first)
            enc = encode_long_texts(self.tokenizer, texts, self.max_length, self.long_text, lengths=False)
            documents = np.asarray(enc.pop("document"))
        else:
            enc = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length)
        rows = self.row_logits(enc, width)
        if documents is None or not self.long_text.chunked:
            return rows, None
        return pool_documents(rows, documents, self.long_text.pooling)[0], chunk_counts(documents)

    def row_logits(self, enc, width: int) -> np.ndarray:
        """The model's outputs for each row of an encoding, batched by length, in row order."""
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        out = np.empty((len(order), width), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([{k: enc[k][i] for k in enc.keys()} for i in idx], return_tensors="pt")
            out[idx] = self.model(**batch.to(self.device)).logits.float().cpu().numpy()
        return out

    def with_chunks(self, rows: list[dict], chunks: np.ndarray | None) -> list[dict]:
        """Prediction rows with the windows each text was read as (`chunks`), for data.long_text chunks runs;
        other runs' rows are unchanged."""
        if chunks is None:
            return rows
        return [{**row, "chunks": int(n)} for row, n in zip(rows, chunks)]


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


def with_token_lengths(report: DataReport, cfg, data: TaskData) -> DataReport:
    """`report` with the lines `textune validate-data` prints about what the model reads: per split, the texts
    longer than model.max_length and what data.long_text does with them; for chunks, windows per text and the
    epoch's length. Nothing where the tokenizer cannot be loaded (the data checks still stand): it says why."""
    from textune.chunking import count_summary
    from textune.models import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(cfg.model.name), cfg.model.trust_remote_code, for_classifier=True)
    except TextuneError as e:
        report.lengths.append(f"tokens     not measured: {e}")
        return report
    max_length, long_text = cfg.model.max_length, LongText.of(cfg.data, cfg.model.max_length)
    kept = {"truncate": f"truncate reads their first {max_length} tokens (data.long_text head_tail or chunks read "
                        f"the rest)", "head_tail": "head_tail keeps their first and last tokens",
            "chunks": "chunks reads them in windows"}[long_text.mode if not data.text_pair_column else "truncate"]
    for split in ("train", "validation", "test"):
        ds = getattr(data, split)
        if ds is None or not len(ds):
            continue
        texts = [str(t) for t in column_values(ds, data.text_column)]
        pairs = [str(t) for t in column_values(ds, data.text_pair_column)] if data.text_pair_column else None
        lengths = np.array([len(ids) for ids in tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]])
        cut = int((lengths > max_length).sum())
        report.lengths.append(f"tokens     {split}: {cut:,} of {len(texts):,} texts ({cut / len(texts):.1%}) are longer "
                              f"than model.max_length {max_length} (mean {lengths.mean():.0f} | p95 "
                              f"{int(np.percentile(lengths, 95))} | max {lengths.max()}); {kept}")
        if long_text.chunked and pairs is None:
            c = count_summary(chunk_counts(np.asarray(chunk_rows(tokenizer, texts, max_length, long_text)["document"])))
            report.lengths.append(f"chunks     {split}: {c['chunks']:,} windows for {c['documents']:,} texts, per text "
                                  f"mean {c['mean']:g} | p95 {c['p95']} | max {c['max']} (data.max_chunks "
                                  f"{long_text.max_chunks}): {c['chunks'] / c['documents']:.2f}x the rows"
                                  + (" (and steps) of an epoch" if split == "train" else " to score"))
    return report


def length_quartiles(rows: list[dict]) -> list[list[dict]]:
    """The validation rows that know their text's token length (`tokens`) in four groups of (near) equal size,
    shortest first; [] where the rows do not say (a run saved before they did)."""
    rows = [r for r in rows if isinstance(r.get("tokens"), int)]
    if len(rows) < 4:
        return []
    order = np.argsort([r["tokens"] for r in rows], kind="stable")
    return [[rows[i] for i in part] for part in np.array_split(order, 4)]


def by_length_html(rows: list[dict], score, max_length: int | None) -> str:
    """The report's section of metrics by document length: the validation rows in quartiles of token length,
    each with `score(rows) -> {metric: value}` (the task's), so a user sees where a model loses (often: on the
    texts longer than it reads)."""
    from textune.report_html import esc, fmt

    quartiles = length_quartiles(rows)
    if not quartiles:
        return ""
    scores = [score(q) for q in quartiles]
    names = list(scores[0])
    out = ['<section id="by-length"><h2>Metrics by text length (validation)</h2>',
           '<p class="muted">Validation texts in four groups of equal size by their length in tokens before any cut'
           + (f" (the model reads {max_length} at a time)" if max_length else "") + ".</p>",
           '<table><tr><th class="l">quartile</th><th>tokens</th><th>texts</th><th>longer than max_length</th>'
           + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for i, (q, s) in enumerate(zip(quartiles, scores)):
        tokens = [r["tokens"] for r in q]
        cut = sum(t > max_length for t in tokens) / len(q) if max_length else None
        out.append(f'<tr><td class="l">{["shortest", "second", "third", "longest"][i]}</td>'
                   f"<td>{min(tokens):,} to {max(tokens):,}</td><td>{len(q):,}</td><td>{fmt(cut, 2)}</td>"
                   + "".join(f"<td>{fmt(s[n], 3)}</td>" for n in names) + "</tr>")
    return "".join(out) + "</table></section>"


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


# ------------------------------ zero-shot baselines

# The base model's embedding cosine of a text pair is a baseline of every pair task, at one forward pass per text.
# Above this many validation texts, start-up would wait minutes for it on a CPU (~100-300 texts/s at 128 tokens
# for MiniLM), so it is skipped, saying so.
COSINE_BASELINE_MAX_TEXTS = 4000
COSINE_RULE = "cosine of the untrained model's vectors of the two texts"


def baseline_pooling(model_path: str, model) -> tuple[object | None, str]:
    """(the `pooling.PoolingSpec` to embed texts with for the cosine baseline, how it pools), or (None, why there is
    none). A folder that states its pooling (sentence-transformers) is followed; otherwise an encoder pretrained
    with masked language modelling (BERT, RoBERTa, ...) is mean-pooled, as sentence-transformers would; a causal
    LM's untrained vectors are no sentence embeddings, so it gets none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from textune.pooling import NO_POOLING_INFO, read_pooling

    try:
        spec = read_pooling(model_path)
    except TextuneError as e:  # a pooling config textune cannot follow: no baseline, not a failed run
        return None, str(e)
    if spec.source != NO_POOLING_INFO:
        return spec, f"{spec.mode} pooling, from {spec.source}"
    if model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return spec, "mean pooling (the model folder states none)"
    return None, (f"the {model.config.model_type} model states no sentence pooling and is not a masked-LM encoder, "
                  f"so its untrained vectors are no sentence embeddings")


def encoder_body(model):
    """The encoder under a sequence head (and a PEFT wrapper, whose adapters change nothing before training):
    what the cosine baseline embeds with, so it needs no second copy of the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "base_model", base)


def pair_cosines(inputs: SequenceInputs, cfg, splits: dict) -> tuple[dict[str, np.ndarray] | None, str]:
    """({split: cosine of each row's two texts}, how they were pooled) for the datasets in `splits`, embedded by the
    run's model before training (each text alone, truncated at model.max_length); (None, why not) where it is not
    measured: a randomly initialised model, no sentence pooling, or more than COSINE_BASELINE_MAX_TEXTS
    validation texts. Draws nothing from torch's random generator (evaluation mode: no dropout)."""
    from textune.pooling import encode

    if cfg.model.init == "scratch":
        return None, "model.init scratch: a randomly initialised model has no embeddings to compare"
    texts = 2 * len(splits.get("validation", ()))
    if texts > COSINE_BASELINE_MAX_TEXTS:
        return None, (f"validation has {texts:,} texts, over {COSINE_BASELINE_MAX_TEXTS:,}: embedding them would "
                      f"slow start-up by minutes")
    spec, how = baseline_pooling(inputs.model_path, inputs.model)
    if spec is None:
        return None, how
    d, out = inputs.data, {}
    for name, ds in splits.items():
        firsts = [str(t) for t in column_values(ds, d.text_column)]
        seconds = [str(t) for t in column_values(ds, d.text_pair_column)]
        vectors = encode(encoder_body(inputs.model), inputs.tokenizer, firsts + seconds, spec,
                         max_length=cfg.model.max_length)
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        out[name] = (vectors[:len(firsts)] * vectors[len(firsts):]).sum(axis=1)
    return out, how


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

    long_text = getattr(ctx.predictor, "long_text", None) or LongText()
    if long_text.chunked:  # the field exists only for such runs: other runs' schema is unchanged
        result = create_model(result.__name__, __base__=result, chunks=(int, Field(
            description="windows of the model's max_length the text was read as (data.long_text chunks)")))
    response = create_model(response_name, model=(str, ...), adapter=(str | None, ...),
                            results=(list[result], Field(description="one per input text, in the input order")))
    router = ctx.router()
    # A run that reads long texts to their end (head_tail, chunks) accepts up to max_chunks times --max-chars.
    chars_scale = long_text.max_chunks if long_text.mode != "truncate" else 1

    async def classify(req) -> dict:
        """The prediction of each text (or text pair), in the input order."""
        ctx.check_texts(req.texts, req.text_pairs, chars_scale=chars_scale)
        ctx.check_adapter(req.adapter)
        results = await ctx.batched(req.texts, req.text_pairs, req.adapter)
        return {"model": ctx.model_name, "adapter": req.adapter, "results": results}

    ctx.post(router, "/v1/classify", classify, ClassifyRequest, response)
    return router
