"""Sentence embeddings: the `task: embedding` of textune (what sentence-transformers' trainer fine-tunes: retrieval
for search and RAG, semantic similarity, deduplication, clustering).

Data, in sentence-transformers' shapes, from CSV/TSV/JSONL/Parquet files:
- pairs: (anchor, positive) in `data.text_column` and `data.text_pair_column` (question -> passage);
- triplets: pairs plus a hard negative in `data.negative_column`;
- scored pairs: (text1, text2, score): a file that has `data.label_column` (any numbers; learnt as
  (y - low) / (high - low), with [low, high] from `data.label_scale` or the training scores' range).
An empty text, a score that is not a number, a file of one row, or anchors that are all the same text stop the
run naming the row or column; duplicate anchors and anchors seen in both splits are reported by the checks.

Model: the encoder body (`AutoModel`) of `model.name`, pooled as the base model's sentence-transformers files say
(`textune.pooling`: mean pooling where it says nothing, and the start-up summary says so). `SentenceEncoder`
wraps it for training: its forward takes a collated batch and returns the loss, so the loop (and torch.compile)
see one model with its own loss; its state dict is the body's, and `save_pretrained` writes the body plus
modules.json and 1_Pooling, so RUN/model loads with `SentenceTransformer("RUN/model")` to the same vectors.

Losses: sentence-transformers' own (`train.loss`): `mnrl` (MultipleNegativesRankingLoss, in-batch negatives,
for pairs and triplets), `cosent` (CoSENTLoss) or `cosine` (CosineSimilarityLoss) for scored pairs. textune
computes the embeddings and calls each loss's `compute_loss_from_embeddings`. In-batch negatives are made
duplicate-aware by the similarity function handed to MNRL: a candidate that is the anchor's own positive text,
or the positive of a row with the same anchor, scores -inf, so it is never a negative (sentence-transformers
gets the same from its NoDuplicatesBatchSampler; textune's loader is shared by every task, so the mask does it).

Metrics at every evaluation (and at step 0, the base model's figure): pairs -> retrieval of each distinct
validation anchor against every distinct validation positive, by cosine: MRR@10 (the headline), Recall@1,
Recall@10, NDCG@10 (`rank_metrics`, the definitions of sentence-transformers' InformationRetrievalEvaluator);
scored pairs -> Spearman (the headline) and Pearson of the cosine against the score. `loss`: the training loss
on validation. Prediction: one vector per text. Serving: OpenAI's POST /v1/embeddings. Export: ONNX whose
output is the pooled, normalised vector.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from textune.data import check_text_cells, column_values, length_stats, read_table
from textune.data_checks import DataReport, Finding, enforce, normalise
from textune.errors import TextuneError
from textune.infer import ModelPredictor, read_inputs, text_echo
from textune.pooling import PoolingSpec, hidden_states, pool, read_pooling, write_pooling
from textune.tasks.base import ExportSpec, PlaygroundSpec, Task, TaskInputs

NAME = "embedding"
RETRIEVAL_METRICS = ("mrr_at_10", "recall_at_1", "recall_at_10", "ndcg_at_10")
SIMILARITY_METRICS = ("spearman", "pearson")
PAIR_LOSSES, SCORE_LOSSES = ("mnrl",), ("cosent", "cosine")
TOP_K = 10
EVAL_SPLITS = ("validation", "test")


# ---------------------------------------------------------------- data


@dataclass
class PairData:
    """One split as texts: anchors, positives (second texts), hard negatives or None, scores or None."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None = None
    scores: np.ndarray | None = None

    @property
    def scored(self) -> bool:
        return self.scores is not None

    def __len__(self) -> int:
        return len(self.anchors)


def _texts(ds, split: str, column: str, key: str, path) -> list[str]:
    """A text column, every cell a non-empty string.

    Raises:
        TextuneError: a missing column, a list/object cell, or an empty cell (its row named).
    """
    if column not in ds.column_names:
        raise TextuneError(f"{split} file {path} has no column {column!r} (set {key}); its columns are: "
                           f"{', '.join(map(repr, ds.column_names))}")
    values = column_values(ds, column)
    check_text_cells(values, split, column, path)
    for i, v in enumerate(values):
        if v is None or not str(v).strip():
            raise TextuneError(f"{split} row {i + 1} of {path}: column {column!r} is empty; every pair needs both "
                               f"texts: fill it or remove the row")
    return [str(v) for v in values]


def parse_scores(values: list, split: str, column: str) -> np.ndarray:
    """Scores as float64; the first cell that is not a finite number stops the run with its row."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            x = float(v.strip() if isinstance(v, str) else v) if not isinstance(v, bool) and v is not None else None
        except (TypeError, ValueError):
            x = None
        if x is None or not math.isfinite(x):
            what = "is empty" if v is None or v == "" else f"holds {v!r}, not a number"
            raise TextuneError(f"{split} row {i + 1}: score column {column!r} {what}; a scored pair's score must be a "
                               f"finite number: fix or remove the row (or set data.label_column)")
        out[i] = x
    return out


def read_pairs(path: str, split: str, columns: dict) -> PairData:
    """One file of pairs, triplets or scored pairs. `columns`: text_column, text_pair_column, negative_column,
    label_column (the config's data.* names; a file holding the label column is scored pairs).

    Raises:
        TextuneError: a column missing or not text, an empty text, a score that is not a number.
    """
    ds = read_table(path, split)
    pair_col = columns.get("text_pair_column")
    if not pair_col:
        raise TextuneError(f"data.text_pair_column (--text-pair-column) is empty; task embedding reads pairs: set it "
                           f"to the column of positives (or second texts), one of {', '.join(map(repr, ds.column_names))}")
    anchors = _texts(ds, split, columns.get("text_column") or "text", "data.text_column", path)
    positives = _texts(ds, split, pair_col, "data.text_pair_column", path)
    negative_col, label_col = columns.get("negative_column"), columns.get("label_column") or "label"
    negatives = _texts(ds, split, negative_col, "data.negative_column", path) if negative_col else None
    scores = parse_scores(column_values(ds, label_col), split, label_col) if label_col in ds.column_names else None
    if negatives is not None and scores is not None:
        raise TextuneError(f"{split} file {path} has both a negative column {negative_col!r} and a score column "
                           f"{label_col!r}; a file holds triplets or scored pairs: drop data.negative_column or "
                           f"set data.label_column to a column the file lacks")
    return PairData(anchors, positives, negatives, scores)


def check_pairs(data: PairData, split: str) -> None:
    """Refuse what no embedding model can learn from or be scored on: one row, or one anchor text for all.

    Raises:
        TextuneError: naming the split and the fix.
    """
    if len(data) < 2:
        raise TextuneError(f"data.{split}: only {len(data)} row; embedding training and its metrics compare pairs "
                           f"with each other, so give 2 or more (in practice hundreds)")
    if len({normalise(a) for a in data.anchors}) == 1:
        raise TextuneError(f"data.{split}: every anchor is the same text ({data.anchors[0][:60]!r}); the model "
                           f"learns by telling anchors apart: check data.text_column")


def split_validation(train: PairData, share: float, seed: int) -> tuple[PairData, PairData]:
    """Hold out `share` of the distinct anchors (all rows of an anchor on one side, so none leaks)."""
    keys = sorted({normalise(a) for a in train.anchors})
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(keys)[:max(1, math.ceil(share * len(keys)))].tolist())
    in_val = np.array([normalise(a) in held for a in train.anchors])
    return select(train, np.flatnonzero(~in_val)), select(train, np.flatnonzero(in_val))


def select(data: PairData, rows) -> PairData:
    rows = list(rows)
    pick = lambda xs: None if xs is None else [xs[i] for i in rows]
    return PairData(pick(data.anchors), pick(data.positives), pick(data.negatives),
                    None if data.scores is None else data.scores[rows])


def load_splits(cfg) -> dict[str, PairData]:
    """train, validation (a file, or a share of training's anchors) and test (None where absent), checked.

    Raises:
        TextuneError: data.name or data.streaming (files only), splits of different shapes, and read_pairs's.
    """
    d = cfg.data
    if d.train is None or d.streaming:
        key = "data.streaming" if d.streaming else "data.name"
        raise TextuneError(f"{key}: task embedding reads its pairs from files held in memory; set data.train (and "
                           f"data.validation) to .csv/.tsv/.jsonl/.parquet files" + (" and data.streaming: false"
                                                                                    if d.streaming else ""))
    columns = {k: getattr(d, k) for k in ("text_column", "text_pair_column", "negative_column", "label_column")}
    splits = {"train": read_pairs(d.train, "data.train", columns)}
    rng = np.random.default_rng(cfg.seed)
    splits["train"] = select(splits["train"], rng.permutation(len(splits["train"])))
    check_pairs(splits["train"], "train")
    held_out = {**columns, "negative_column": None}  # hard negatives only train: evaluation ranks positives
    if d.validation:
        splits["validation"] = read_pairs(d.validation, "data.validation", held_out)
    else:
        splits["train"], splits["validation"] = split_validation(splits["train"], d.validation_split, cfg.seed)
    splits["test"] = read_pairs(d.test, "data.test", held_out) if d.test else None
    for split in ("validation", "test"):
        part = splits[split]
        if part is not None and part.scored != splits["train"].scored:
            has = "scores" if part.scored else "no scores"
            raise TextuneError(f"data.{split} has {has} in column {d.label_column!r} but data.train "
                               f"{'does not' if part.scored else 'does'}; give every split the same shape")
        if part is not None:
            check_pairs(part, split)
    if d.max_train_samples:
        splits["train"] = select(splits["train"], range(min(d.max_train_samples, len(splits["train"]))))
    if d.max_eval_samples and d.max_eval_samples < len(splits["validation"]):
        rows = np.sort(rng.permutation(len(splits["validation"]))[:d.max_eval_samples])
        splits["validation"] = select(splits["validation"], rows)
    return splits


def pairs_report(splits: dict[str, PairData]) -> DataReport:
    """What `textune validate-data` and the start-up summary say about the pairs: duplicate anchors (their
    in-batch negatives are masked, and retrieval scores each distinct anchor once) and anchors in two splits."""
    findings, present = [], {k: v for k, v in splits.items() if v is not None}
    for split, data in present.items():
        keys = [normalise(a) for a in data.anchors]
        repeats = len(keys) - len(set(keys))
        # Scored pairs repeat their first texts by design (each document scored against several others).
        if repeats and not data.scored:
            findings.append(Finding("duplicate", repeats, f"{split}: {repeats:,} rows repeat the anchor of another row "
                                    f"(never each other's negatives; counted once in retrieval)",
                                    [a for a, n in _counts(data.anchors).items() if n > 1][:3]))
    train = {normalise(a) for a in present["train"].anchors}
    for split in EVAL_SPLITS:
        if split in present:
            leaked = sorted({a for a in present[split].anchors if normalise(a) in train})
            if leaked:
                findings.append(Finding("leakage", len(leaked), f"{split}: {len(leaked):,} anchors are also training "
                                        f"anchors; its figures then measure memory", leaked[:3], strict_error=True))
    return DataReport({k: len(v) for k, v in present.items()}, {}, findings)


def _counts(texts: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in texts:
        out[t] = out.get(t, 0) + 1
    return out


def choose_loss(requested: str, scored: bool, batch_size: int) -> str:
    """train.loss for this data's shape (auto: mnrl for pairs, cosent for scored pairs).

    Raises:
        TextuneError: a loss for the other shape, or in-batch negatives with batches of one pair.
    """
    loss = requested if requested != "auto" else ("cosent" if scored else "mnrl")
    fits = SCORE_LOSSES if scored else PAIR_LOSSES
    if loss not in fits:
        shape = "scored pairs" if scored else "pairs without scores"
        raise TextuneError(f"train.loss: {loss} does not fit {shape}; use {' or '.join(fits)} (or auto)")
    if loss == "mnrl" and batch_size < 2:
        raise TextuneError("train.batch_size: 1 leaves in-batch negatives (train.loss mnrl) with no negatives: each "
                           "pair's negatives are the other pairs of its batch; use 16 or more")
    return loss


# ---------------------------------------------------------------- retrieval and similarity metrics


def rank_metrics(scores: np.ndarray, relevant: list[set[int]], k: int = TOP_K) -> dict:
    """MRR@k, Recall@1, Recall@k and NDCG@k (binary relevance) of queries ranking a corpus by `scores`
    (queries x corpus); `relevant[q]`: the corpus indices that answer query q. Ties rank in corpus order.
    The definitions are those of sentence-transformers' InformationRetrievalEvaluator."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    mrr, r1, rk, ndcg = [], [], [], []
    for q, hits in enumerate(relevant):
        found = [int(c) in hits for c in top[q]]
        first = next((i for i, f in enumerate(found) if f), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
        r1.append(sum(found[:1]) / len(hits))
        rk.append(sum(found) / len(hits))
        dcg = sum(1.0 / math.log2(i + 2) for i, f in enumerate(found) if f)
        ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(hits), k)))
        ndcg.append(dcg / ideal)
    return {f"mrr_at_{k}": float(np.mean(mrr)), "recall_at_1": float(np.mean(r1)), f"recall_at_{k}": float(np.mean(rk)),
            f"ndcg_at_{k}": float(np.mean(ndcg)), "queries": len(relevant), "corpus": int(scores.shape[1])}


def retrieval_setup(data: PairData) -> tuple[list[str], list[str], list[set[int]], list[int]]:
    """(distinct anchors, distinct positives, each anchor's relevant positives, each row's anchor index)."""
    queries, corpus, relevant, row_query = {}, {}, [], []
    for anchor, positive in zip(data.anchors, data.positives):
        q = queries.setdefault(anchor, len(queries))
        c = corpus.setdefault(positive, len(corpus))
        if q == len(relevant):
            relevant.append(set())
        relevant[q].add(c)
        row_query.append(q)
    return list(queries), list(corpus), relevant, row_query


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return unit(a) @ unit(b).T


def pair_metrics(data: PairData, embed) -> tuple[dict, list[dict]]:
    """(metrics, one row per pair for validation_predictions.jsonl) with `embed(texts) -> vectors`."""
    if data.scored:
        first, second = unit(embed(data.anchors)), unit(embed(data.positives))
        cos = np.sum(first * second, axis=1)
        metrics = similarity_metrics(cos, data.scores)
        rows = [{"text": a, "text_pair": p, "label": float(s), "cosine": round(float(c), 6)}
                for a, p, s, c in zip(data.anchors, data.positives, data.scores, cos)]
        return metrics, rows
    queries, corpus, relevant, row_query = retrieval_setup(data)
    scores = cosine_matrix(embed(queries), embed(corpus))
    metrics = rank_metrics(scores, relevant)
    best = scores.argmax(axis=1)
    ranks = [(int((scores[q] > scores[q, list(relevant[q])].max()).sum()) + 1) for q in range(len(queries))]
    rows = [{"text": a, "text_pair": p, "rank": ranks[q], "top": corpus[int(best[q])]}
            for a, p, q in zip(data.anchors, data.positives, row_query)]
    return metrics, rows


def similarity_metrics(cosine: np.ndarray, scores: np.ndarray) -> dict:
    """Spearman and Pearson of the cosine against the scores (0.0 where either is constant, as regression)."""
    from scipy.stats import pearsonr, spearmanr

    constant = len(cosine) < 2 or np.ptp(cosine) == 0 or np.ptp(scores) == 0
    return {"spearman": 0.0 if constant else float(spearmanr(cosine, scores)[0]),
            "pearson": 0.0 if constant else float(pearsonr(cosine, scores)[0]), "examples": int(len(scores))}


# ---------------------------------------------------------------- the model and its losses


class DuplicateMaskedCosine:
    """MNRL's similarity function with false negatives removed: `mask` (queries x candidates, set per batch) marks
    candidates that answer the query too, whose scores become -inf so the softmax never counts them."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from sentence_transformers.util import cos_sim

        scores = cos_sim(a, b)
        return scores if self.mask is None else scores.masked_fill(self.mask, float("-inf"))


def false_negatives(anchor_id: torch.Tensor, positive_id: torch.Tensor, negative_id: torch.Tensor | None) -> torch.Tensor:
    """(batch x candidates) True where a candidate (the batch's positives, then its negatives) is another row's text
    that answers this row's anchor: its own positive text, or any positive of a row with the same anchor."""
    candidates = positive_id if negative_id is None else torch.cat([positive_id, negative_id])
    mask = candidates[None, :] == positive_id[:, None]
    n = len(anchor_id)
    mask[:, :n] |= anchor_id[None, :] == anchor_id[:, None]
    mask[torch.arange(n), torch.arange(n)] = False  # the row's own positive is the target
    return mask


def make_loss(name: str):
    """sentence-transformers' loss object; textune calls its `compute_loss_from_embeddings` (no model needed)."""
    from sentence_transformers import losses

    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(None, similarity_fct=DuplicateMaskedCosine())
    return losses.CoSENTLoss(None) if name == "cosent" else losses.CosineSimilarityLoss(None)


def loss_from_embeddings(loss, embeddings: list[torch.Tensor], labels: torch.Tensor | None,
                         mask: torch.Tensor | None) -> torch.Tensor:
    similarity = getattr(loss, "similarity_fct", None)
    if isinstance(similarity, DuplicateMaskedCosine):
        similarity.mask = mask
    return loss.compute_loss_from_embeddings(embeddings, labels if labels is not None else torch.zeros(0))


@dataclass
class EncoderOutput:
    loss: torch.Tensor


class SentenceEncoder(torch.nn.Module):
    """The encoder body being trained, with its pooling and loss.

    forward(batch) -> EncoderOutput(loss): the anchors are `input_ids`/`attention_mask`, the positives and
    negatives `positive_*`/`negative_*`, scores `labels`, text ids `anchor_id`/`positive_id`/`negative_id` (for
    the duplicate mask). Its state dict is the body's (checkpoints and RUN/model hold a plain AutoModel's
    weights); `save_pretrained` adds sentence-transformers' module files.
    """

    def __init__(self, body, spec: PoolingSpec, loss_name: str, max_seq_length: int):
        super().__init__()
        self.body, self.spec, self.loss_name, self.max_seq_length = body, spec, loss_name, max_seq_length
        self.loss = make_loss(loss_name)

    @property
    def config(self):
        return self.body.config

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return getattr(self.body, "supports_gradient_checkpointing", False)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.body.gradient_checkpointing_enable(**kwargs)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.spec)

    def forward(self, input_ids, attention_mask, positive_input_ids, positive_attention_mask, negative_input_ids=None,
                negative_attention_mask=None, labels=None, anchor_id=None, positive_id=None, negative_id=None,
                **_) -> EncoderOutput:
        embeddings = [self.embed(input_ids, attention_mask), self.embed(positive_input_ids, positive_attention_mask)]
        if negative_input_ids is not None:
            embeddings.append(self.embed(negative_input_ids, negative_attention_mask))
        mask = false_negatives(anchor_id, positive_id, negative_id) if anchor_id is not None else None
        return EncoderOutput(loss_from_embeddings(self.loss, embeddings, labels, mask))

    def state_dict(self, *args, **kwargs):
        return self.body.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.body.load_state_dict(state_dict, strict=strict, assign=assign)

    def save_pretrained(self, folder, **kwargs) -> None:
        self.body.save_pretrained(folder, **kwargs)
        write_pooling(folder, self.spec, self.body.config.hidden_size, self.max_seq_length)


def load_encoder(cfg, model_path: str):
    """The AutoModel body of `model_path` with cfg.model.attention and cfg.tuning applied."""
    from transformers import AutoModel

    from textune.models import safetensors_only, set_attention
    from textune.tuning import apply_tuning

    try:
        body = AutoModel.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code,
                                         **safetensors_only())
    except (OSError, ValueError) as e:
        raise TextuneError(f"model.name: could not load an encoder from {model_path}: {str(e).splitlines()[0]}") from None
    return apply_tuning(set_attention(body, cfg.model.attention), cfg.tuning)


# ---------------------------------------------------------------- tokenising and batching


def text_ids(splits: dict[str, PairData]) -> dict[str, int]:
    """One id per distinct text of every split: equal ids are equal texts (the duplicate mask compares them)."""
    ids: dict[str, int] = {}
    for data in splits.values():
        if data is not None:
            for column in (data.anchors, data.positives, data.negatives or []):
                for t in column:
                    ids.setdefault(t, len(ids))
    return ids


def tokenize_train(data: PairData, tokenizer, max_length: int, ids: dict[str, int], scale: tuple[float, float]):
    """The training rows: anchor as input_ids/attention_mask, positive_* and negative_* beside it, text ids, a
    normalised score in `labels`, and `length` (the longest text of the row, for length-grouped batches)."""
    from datasets import Dataset

    columns = {"": data.anchors, "positive_": data.positives}
    if data.negatives is not None:
        columns["negative_"] = data.negatives
    rows: dict[str, list] = {}
    lengths = np.zeros(len(data), dtype=np.int64)
    for prefix, texts in columns.items():
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        rows[prefix + "input_ids"], rows[prefix + "attention_mask"] = enc["input_ids"], enc["attention_mask"]
        lengths = np.maximum(lengths, [len(x) for x in enc["input_ids"]])
        rows[(prefix or "anchor_") + "id"] = [ids[t] for t in texts]
    if data.scored:
        low, high = scale
        rows["labels"] = ((data.scores - low) / (high - low)).astype(np.float32).tolist()
    rows["length"] = lengths.tolist()
    return Dataset.from_dict(rows)


def tokenize_texts(texts: list[str], tokenizer, max_length: int, split: int):
    """An evaluation split as its distinct texts (each encoded once): input_ids, attention_mask, text_id (index into
    `texts`), split (0 validation, 1 test) and length."""
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "text_id": list(range(len(texts))), "split": [split] * len(texts),
                              "length": [len(x) for x in enc["input_ids"]]})


def token_lengths(texts: list[str], tokenizer) -> list[int]:
    """Tokens per text before truncation (what the summary's truncated share counts)."""
    return [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]


def distinct_texts(data: PairData) -> list[str]:
    seen: dict[str, None] = {}
    for t in [*data.anchors, *data.positives]:
        seen.setdefault(t, None)
    return list(seen)


class PairCollator:
    """Pads each text group of a batch (anchors, positives, negatives) on its own; ids and scores as tensors."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.tokenizer, self.pad_to_multiple_of = tokenizer, pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        out = {}
        for prefix in ("", "positive_", "negative_"):
            if prefix + "input_ids" in rows[0]:
                padded = self.tokenizer.pad([{"input_ids": r[prefix + "input_ids"],
                                              "attention_mask": r[prefix + "attention_mask"]} for r in rows],
                                            pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
                out[prefix + "input_ids"], out[prefix + "attention_mask"] = padded["input_ids"], padded["attention_mask"]
        for key in ("anchor_id", "positive_id", "negative_id", "text_id", "split"):
            if key in rows[0]:
                out[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        if "labels" in rows[0]:
            out["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float32)
        return out


# ---------------------------------------------------------------- a training run's inputs


@dataclass
class EmbeddingInputs(TaskInputs):
    model_path: str
    tokenizer: object
    splits: dict  # split -> PairData (test may be None)
    report: DataReport
    tokenized: dict
    model: SentenceEncoder
    loss_name: str
    scale: tuple[float, float]
    stats: dict = field(default_factory=dict)
    batch_size: int = 32  # train.batch_size: the validation loss is computed in batches of this size
    evaluate_first = True  # the curve starts at the base model's figure: what fine-tuning bought

    def summary(self, cfg) -> str:
        train = self.splits["train"]
        shape = ("scored pairs" if train.scored else "triplets" if train.negatives is not None else "pairs")
        sizes = " | ".join(f"{k} {len(v):,}" for k, v in self.splits.items() if v is not None)
        s = self.stats["train"]
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model.body).__name__}, sentence "
                 f"embeddings of {self.model.config.hidden_size})",
                 f"data       {shape}: {sizes}",
                 f"loss       {self.loss_name} ({type(self.model.loss).__name__})"
                 + (", false negatives masked" if self.loss_name == "mnrl" else ""),
                 f"pooling    {self.model.spec.mode}{', normalised' if self.model.spec.normalize else ''}: "
                 f"{self.model.spec.source}",
                 *(f"warning    {f.message}" for f in self.report.findings),
                 f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | "
                 f"truncated at {cfg.model.max_length}: {s['truncated_share']:.1%}"]
        return "\n".join(lines)

    def data_stats(self, cfg) -> dict:
        train = self.splits["train"]
        return {"sizes": {k: len(v) for k, v in self.splits.items() if v is not None},
                "shape": "scored" if train.scored else "triplets" if train.negatives is not None else "pairs",
                "loss": self.loss_name, "pooling": vars(self.model.spec), "token_lengths": self.stats,
                "label_scale": list(self.scale) if train.scored else None,
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.report.findings],
                "max_length": cfg.model.max_length}

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        return PairCollator(self.tokenizer, pad_to_multiple_of)

    def evaluate(self, model, loader, accelerator=None):
        """(metrics, validation rows): every distinct text of the split embedded once (gathered over processes),
        then retrieval or similarity metrics and the training loss over the split's pairs."""
        encoder = accelerator.unwrap_model(model) if accelerator is not None else model
        vectors, split = embed_loader(encoder, loader, accelerator)
        data = self.splits[EVAL_SPLITS[split]]
        index = {t: i for i, t in enumerate(distinct_texts(data))}
        embed = lambda texts: vectors[[index[t] for t in texts]]
        metrics, rows = pair_metrics(data, embed)
        metrics["loss"] = self.eval_loss(encoder, data, embed)
        return metrics, rows

    def eval_loss(self, encoder: SentenceEncoder, data: PairData, embed) -> float:
        """The training loss over the split's pairs in batches of train.batch_size, from the vectors at hand
        (hard negatives play no part: validation vectors are of anchors and positives)."""
        ids = {t: i for i, t in enumerate(distinct_texts(data))}
        size, total, n = max(2, self.batch_size), 0.0, 0
        with torch.no_grad():
            for start in range(0, len(data), size):
                part = select(data, range(start, min(start + size, len(data))))
                if len(part) < 2:
                    continue
                emb = [torch.from_numpy(embed(part.anchors)), torch.from_numpy(embed(part.positives))]
                a = torch.tensor([ids[t] for t in part.anchors])
                p = torch.tensor([ids[t] for t in part.positives])
                labels = None if not part.scored else torch.tensor(
                    (part.scores - self.scale[0]) / (self.scale[1] - self.scale[0]), dtype=torch.float32)
                total += float(loss_from_embeddings(encoder.loss, emb, labels, false_negatives(a, p, None))) * len(part)
                n += len(part)
        return total / max(n, 1)

    def write_predictions(self, predictions, path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def embed_loader(encoder: SentenceEncoder, loader, accelerator=None) -> tuple[np.ndarray, int]:
    """(vectors of a tokenize_texts loader in text_id order, the split's number), gathered over processes."""
    was_training = encoder.training
    encoder.eval()
    chunks, ids, split = [], [], 0
    for batch in loader:
        vectors = encoder.embed(batch["input_ids"], batch["attention_mask"]).float()
        text_id = batch["text_id"]
        if accelerator is not None:
            vectors, text_id = accelerator.gather_for_metrics((vectors, text_id))
        chunks.append(vectors.cpu())
        ids.append(text_id.cpu())
        split = int(batch["split"][0])
    encoder.train(was_training)
    vectors, ids = torch.cat(chunks).numpy(), torch.cat(ids).numpy()
    out = np.zeros_like(vectors)
    out[ids] = vectors
    return out, split


def score_scale(cfg, train: PairData) -> tuple[float, float]:
    """[low, high] scores are normalised by: data.label_scale, else the training scores' range; (0, 1) for pairs.

    Raises:
        TextuneError: every training score is the same number.
    """
    if not train.scored:
        return 0.0, 1.0
    if cfg.data.label_scale is not None:
        return float(cfg.data.label_scale[0]), float(cfg.data.label_scale[1])
    low, high = float(train.scores.min()), float(train.scores.max())
    if low == high:
        raise TextuneError(f"data.train: every score is {low:g}; scored pairs need scores that vary (check "
                           f"data.label_column {cfg.data.label_column!r})")
    return low, high


# ---------------------------------------------------------------- prediction


class EmbeddingPredictor(ModelPredictor):
    """A loaded encoder: `embed(texts)` -> float32 vectors (pooled and normalised as its sentence-transformers
    files say), `predict(texts)` -> [{"embedding": [...]}]. Any model folder works: a run's, a base model's, or an
    ONNX export (whose output is already the pooled vector)."""

    task = NAME

    def _setup(self, model, tokenizer, run_dir, batch_size, max_length, device, precision) -> None:
        folder = getattr(self, "model_dir", None) or run_dir
        config = Path(folder) / "sentence_bert_config.json" if folder is not None else None
        if max_length is None and config is not None and config.is_file():  # sentence-transformers' own limit
            max_length = json.loads(config.read_text()).get("max_seq_length")
        super()._setup(model, tokenizer, run_dir, batch_size, max_length, device, precision)
        self.spec = read_pooling(folder) if folder is not None else PoolingSpec()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        out = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([{k: enc[k][i] for k in enc.keys()} for i in idx],
                                       return_tensors="pt").to(self.device)
            result = self.model(**batch)
            if "sentence_embedding" in result:  # an ONNX export pooled already
                vectors = result["sentence_embedding"]
            else:
                vectors = pool(hidden_states(self.model, batch) if getattr(result, "last_hidden_state", None) is None
                               else result.last_hidden_state, batch["attention_mask"], self.spec)
            vectors = vectors.float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[idx] = vectors
        return out

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"])

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        return [{"embedding": [round(float(x), 7) for x in v]} for v in self.embed(texts)]


# ---------------------------------------------------------------- the task


class Embedding(Task):
    name = NAME
    predictor_class = EmbeddingPredictor
    serve_paths = ("/v1/embeddings",)

    def check_data(self, cfg) -> DataReport:
        return pairs_report(load_splits(cfg))

    def load_inputs(self, cfg) -> EmbeddingInputs:
        """Pairs read and checked, the loss chosen for their shape, the body loaded with its pooling, every split
        tokenised (training as pairs; evaluation splits as their distinct texts)."""
        from textune.models import load_tokenizer, resolve_model

        model_path = resolve_model(cfg.model.name)
        splits = load_splits(cfg)
        report = pairs_report(splits)
        enforce(report, cfg.data.strict)
        train = splits["train"]
        loss_name = choose_loss(cfg.train.loss, train.scored, cfg.train.batch_size)
        if train.scored and cfg.train.metric in RETRIEVAL_METRICS:  # retrieval needs pairs: score by correlation
            cfg.train.metric = "spearman"
        elif not train.scored and cfg.train.metric in SIMILARITY_METRICS:
            raise TextuneError(f"train.metric: {cfg.train.metric} scores scored pairs, and data.train has no "
                               f"{cfg.data.label_column!r} column; choose one of {', '.join(RETRIEVAL_METRICS)}, loss")
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        scale = score_scale(cfg, train)
        ids = text_ids(splits)
        tokenized = {"train": tokenize_train(train, tokenizer, cfg.model.max_length, ids, scale)}
        for number, split in enumerate(EVAL_SPLITS):
            if splits.get(split) is not None:
                tokenized[split] = tokenize_texts(distinct_texts(splits[split]), tokenizer, cfg.model.max_length, number)
        texts = {"train": [*train.anchors, *train.positives, *(train.negatives or [])],
                 **{k: distinct_texts(splits[k]) for k in EVAL_SPLITS if splits.get(k) is not None}}
        stats = {k: length_stats(token_lengths(v, tokenizer), cfg.model.max_length) for k, v in texts.items()}
        model = SentenceEncoder(load_encoder(cfg, model_path), read_pooling(model_path), loss_name, cfg.model.max_length)
        return EmbeddingInputs(model_path, tokenizer, splits, report, tokenized, model, loss_name, scale, stats,
                               cfg.train.batch_size)

    def read_inputs(self, source: str, columns: dict, predictor):
        texts, _ = read_inputs(source, columns.get("text_column") or "text", keep_blank_lines=True)
        return (texts, None), text_echo(texts, source)

    def write_output(self, rows: list[dict], path: str | None) -> bool:
        """`--output x.npy`: the vectors as one float32 array, row N for input line N."""
        if not path or not str(path).endswith(".npy"):
            return False
        blank = next((i for i, r in enumerate(rows) if "embedding" not in r), None)
        if blank is not None:
            raise TextuneError(f"input line {blank + 1} is blank; a .npy file holds one vector per text, so remove "
                               f"the blank lines or write JSONL (--output x.jsonl)")
        from textune.atomic import replace_atomically

        with replace_atomically(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray([r["embedding"] for r in rows], dtype=np.float32))
        return True

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        data = read_pairs(path, "--data", {**columns, "negative_column": columns.get("negative_column")})
        check_pairs(data, "--data")
        cache: dict[str, np.ndarray] = {}

        def embed(texts: list[str]) -> np.ndarray:
            todo = [t for t in dict.fromkeys(texts) if t not in cache]
            cache.update(zip(todo, predictor.embed(todo)) if todo else ())
            return np.stack([cache[t] for t in texts])

        metrics, _ = pair_metrics(data, embed)
        return {**metrics, "pooling": predictor.spec.source}

    def format_metrics(self, metrics: dict) -> str:
        if "mrr_at_10" in metrics:
            line = (f"MRR@10 {metrics['mrr_at_10']:.4f} | Recall@1 {metrics['recall_at_1']:.4f} | Recall@10 "
                    f"{metrics['recall_at_10']:.4f} | NDCG@10 {metrics['ndcg_at_10']:.4f} | {metrics['queries']:,} "
                    f"queries over {metrics['corpus']:,} texts")
        else:
            line = (f"spearman {metrics['spearman']:.4f} | pearson {metrics['pearson']:.4f} | "
                    f"{metrics['examples']:,} pairs")
        return line + (f"\npooling    {metrics['pooling']}" if metrics.get("pooling") else "")

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        from textune.report_html import esc, fmt, read_predictions, text_cell_html

        v = (metrics or {}).get("validation") or {}
        keys = RETRIEVAL_METRICS if "mrr_at_10" in v else SIMILARITY_METRICS
        cards = [(k.replace("_at_", "@").upper() if k != "spearman" and k != "pearson" else k.title(), fmt(v.get(k)))
                 for k in keys]
        rows = [r for r in read_predictions(run / "validation_predictions.jsonl") if "rank" in r]
        worst = sorted(rows, key=lambda r: -r["rank"])[:10]
        table = "".join(f'<tr><td class="text">{text_cell_html(r)}</td><td>{r["rank"]}</td>'
                        f'<td class="text">{esc(str(r["top"])[:120])}</td></tr>' for r in worst)
        section = ("" if not worst else '<section id="embedding"><h2>Retrieval: the anchors whose positive ranked '
                   'lowest</h2><table class="wrong"><tr><th class="l">anchor / positive</th><th>rank</th>'
                   f'<th class="l">retrieved first</th></tr>{table}</table></section>')
        return cards, section

    def serve_description(self, predictor) -> str:
        return "a sentence embedding model (one vector per text)"

    # textune ui: a text's vector, and with a second text the cosine of the two (what retrieval ranks by)
    playground = PlaygroundSpec((("text", "text", False), ("other", "second text: their cosine similarity", True)),
                                "json")

    def playground_predict(self, predictor, fields: dict[str, str]) -> dict:
        texts = [t for t in (fields.get("text"), fields.get("other")) if (t or "").strip()]
        if not (fields.get("text") or "").strip():
            raise TextuneError("text: write something to embed")
        vectors = predictor.embed(texts)
        row = {"dimensions": int(vectors.shape[1]), "embedding_start": [round(float(x), 4) for x in vectors[0][:8]]}
        if len(texts) == 2:
            row["cosine"] = round(float(cosine_matrix(vectors[:1], vectors[1:])[0, 0]), 4)
        return row

    def router(self, ctx):
        return embeddings_router(ctx)


TASK = Embedding()


# ---------------------------------------------------------------- export


class PooledEncoder(torch.nn.Module):
    """What `textune export` traces: the saved body, pooled (and normalised) as its sentence-transformers files
    say, returning `sentence_embedding`."""

    def __init__(self, model, spec: PoolingSpec):
        super().__init__()
        self.model, self.spec, self.config = model, spec, model.config

    def set_attn_implementation(self, attention: str) -> None:  # export picks the kernel its fusions match
        self.model.set_attn_implementation(attention)

    def forward(self, input_ids, attention_mask, token_type_ids=None, return_dict=True):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return {"sentence_embedding": pool(hidden, attention_mask, self.spec)}


def pooled_encoder(model, model_dir) -> PooledEncoder:
    return PooledEncoder(model, read_pooling(model_dir)).eval()


# A vector is no decision: an int8 export reports only its difference from PyTorch.
Embedding.export_spec = ExportSpec(outputs=("sentence_embedding",), wrap=pooled_encoder)


# ---------------------------------------------------------------- serving: OpenAI's POST /v1/embeddings


def embeddings_router(ctx):
    """POST /v1/embeddings in OpenAI's shape (the `openai` client's `embeddings.create`): `input` a string or a
    list of strings, vectors as floats or base64 (float32 little-endian, what the client asks for by default),
    usage in tokens; errors in OpenAI's shape (serving.errors). Micro-batched with other requests."""
    import base64

    from pydantic import BaseModel, ConfigDict, Field

    from textune.serving.errors import APIError

    class EmbeddingsRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI's `user` and the like: accepted, unused
        input: str | list[str] = Field(description="a text or a list of texts to embed", examples=[["a great film"]])
        model: str | None = Field(None, description="the served model's name (any value is accepted)")
        encoding_format: str = Field("float", description="float, or base64 (float32 little-endian)")
        dimensions: int | None = Field(None, description="must be the model's dimension where given")

    class EmbeddingItem(BaseModel):
        object: str = "embedding"
        index: int
        embedding: list[float] | str

    class Usage(BaseModel):
        prompt_tokens: int
        total_tokens: int

    class EmbeddingsResponse(BaseModel):
        object: str = "list"
        data: list[EmbeddingItem]
        model: str
        usage: Usage

    router = ctx.router()

    async def embeddings(req) -> dict:
        """One vector per input text, in order (OpenAI's embeddings API)."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be a non-empty string or a list of non-empty strings", "input")
        if req.encoding_format not in ("float", "base64"):
            raise APIError(400, f"encoding_format {req.encoding_format!r}: use float or base64", "encoding_format")
        ctx.check_texts(texts, name="input")
        rows = await ctx.batched(texts, None, None)
        if req.dimensions is not None and req.dimensions != len(rows[0]["embedding"]):
            raise APIError(400, f"dimensions {req.dimensions}: this model's vectors have {len(rows[0]['embedding'])}; "
                                f"leave dimensions out", "dimensions")
        as_b64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(
            np.asarray(r["embedding"], dtype="<f4").tobytes()).decode() if as_b64 else r["embedding"]}
            for i, r in enumerate(rows)]
        tokens = ctx.predictor.count_tokens(texts)
        return {"object": "list", "data": data, "model": ctx.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    from textune.serving.errors import CHAT_ERROR_RESPONSES

    ctx.post(router, "/v1/embeddings", embeddings, EmbeddingsRequest, EmbeddingsResponse,
             responses=CHAT_ERROR_RESPONSES, summary="Embeddings (OpenAI's API)")
    return router
