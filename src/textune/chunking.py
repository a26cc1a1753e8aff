"""Long documents (`data.long_text`): how a text longer than `model.max_length` becomes the rows a sequence model
reads, and how the rows of one document are pooled back into its one prediction.

- `truncate` (the default): the first `model.max_length` tokens, the rest is dropped.
- `head_tail`: the first and the last tokens (`head_tail_rows`), the best of the truncation schemes of Sun et
  al. 2019, "How to Fine-Tune BERT for Text Classification?" (128 head + 382 tail tokens at 512).
- `chunks`: windows of `model.max_length` overlapping by `data.chunk_stride` tokens (the fast tokenizer's
  `return_overflowing_tokens` + `stride`), at most `data.max_chunks` per document (`select_chunks`); each window
  is a row that carries its document's label, and the windows' logits are pooled (`pool_documents`: mean or max)
  into one row per document for metrics and predictions.

Training (`textune.data.tokenize_splits`), evaluation (`textune.evaluate.predict_logits`) and every predictor
(`tasks.sequence.SequencePredictor`: predict, evaluate, serve, the Python API and ONNX exports) encode and pool
with these functions, so a document is scored the same way everywhere. Pure functions of a tokenizer and numpy:
no torch, no task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from textune.errors import TextuneError

LONG_TEXT_MODES = ("truncate", "head_tail", "chunks")
CHUNK_POOLINGS = ("mean", "max")
# Sun et al. 2019 keep 128 head + 382 tail tokens of the 510 a 512-token BERT input has for text: a quarter of
# the room goes to the head, the rest to the tail (the ending of a review or post says most about it).
HEAD_SHARE = 128 / 510
DEFAULT_MAX_CHUNKS = 8


@dataclass(frozen=True)
class LongText:
    """A run's `data.long_text` settings, resolved: `stride` in tokens (empty in the config: a quarter of
    `model.max_length`, as QA's doc_stride)."""

    mode: str = "truncate"
    stride: int = 0
    max_chunks: int = DEFAULT_MAX_CHUNKS
    pooling: str = "mean"

    @classmethod
    def of(cls, data: Any, max_length: int) -> LongText:
        """From a run's data settings: a `DataConfig`, or the `data:` mapping of a saved config.yaml (a run saved
        before these keys existed truncates, as it was trained)."""
        get = data.get if isinstance(data, Mapping) else lambda key, default=None: getattr(data, key, default)
        stride = get("chunk_stride")
        return cls(get("long_text") or "truncate", max_length // 4 if stride is None else int(stride),
                   int(get("max_chunks") or DEFAULT_MAX_CHUNKS), get("chunk_pooling") or "mean")

    @property
    def chunked(self) -> bool:
        """Several rows per document, pooled back into one prediction."""
        return self.mode == "chunks"


def special_token_ends(tokenizer) -> tuple[int, int]:
    """(special tokens before the text, after it) of one encoded single text: BERT [CLS] ... [SEP] is (1, 1)."""
    mask = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
    head = next((i for i, m in enumerate(mask) if not m), len(mask))
    tail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
    return head, tail


def head_tail_split(room: int) -> tuple[int, int]:
    """(head, tail) tokens of text kept where `room` tokens fit: Sun et al.'s 128 + 382 of 510, scaled (at
    model.max_length 128 with two special tokens: 32 + 94)."""
    head = round(room * HEAD_SHARE)
    return head, room - head


def head_tail_rows(encoded: Mapping[str, list], max_length: int, ends: tuple[int, int]) -> dict[str, list]:
    """Each row of an untruncated encoding cut to its first and last tokens, `max_length` in all with the special
    tokens kept at both ends; rows that fit are unchanged. Written here because tokenizers truncate at one end only.
    """
    before, after = ends
    head, tail = head_tail_split(max_length - before - after)
    out: dict[str, list] = {k: [] for k in encoded if k != "special_tokens_mask"}
    for i, ids in enumerate(encoded["input_ids"]):
        n = len(ids)
        keep = None if n <= max_length else [*range(before + head), *range(n - after - tail, n)]
        for key in out:
            row = encoded[key][i]
            out[key].append(list(row) if keep is None else [row[j] for j in keep])
    return out


def select_chunks(n: int, max_chunks: int) -> list[int]:
    """Which of a document's `n` windows are read, at most `max_chunks`: all when they fit, else spread evenly
    from the first to the last. Spread rather than the first N: the first N would be a longer truncation, blind
    to the ending that head_tail shows matters; spread windows cover the whole text at the same cost."""
    if n <= max_chunks:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_chunks).round().astype(int).tolist()))


def chunk_rows(tokenizer, texts: list[str], max_length: int, long_text: LongText,
               offsets: bool = False) -> dict[str, list]:
    """Windows of `max_length` tokens over each text, overlapping by `long_text.stride` tokens, at most
    `long_text.max_chunks` per text (`select_chunks`), as the tokenizer's own rows (special tokens in each), with
    `document`: the index in `texts` of each row's text. `offsets`: also each token's character span.

    Raises:
        TextuneError: the tokenizer is not a fast one, or the stride leaves no new tokens in a window.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TextuneError("data.long_text: chunks needs a fast (Rust) tokenizer, which this model does not have; "
                           "use data.long_text: head_tail")
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if not 0 <= long_text.stride < room:
        raise TextuneError(f"data.chunk_stride: {long_text.stride} leaves no new tokens in a window: at "
                           f"model.max_length {max_length} a window holds {room} tokens of text; set "
                           f"data.chunk_stride below {room}, e.g. {room // 4}")
    enc = tokenizer(texts, truncation=True, max_length=max_length, stride=long_text.stride,
                    return_overflowing_tokens=True, return_offsets_mapping=offsets)
    mapping = list(enc["overflow_to_sample_mapping"])
    keys = [k for k in enc.keys() if k != "overflow_to_sample_mapping"]
    out: dict[str, list] = {k: [] for k in keys}
    out["document"] = []
    start = 0
    while start < len(mapping):  # a text's windows are consecutive rows
        end = start
        while end < len(mapping) and mapping[end] == mapping[start]:
            end += 1
        for j in select_chunks(end - start, long_text.max_chunks):
            for k in keys:
                out[k].append(enc[k][start + j])
            out["document"].append(mapping[start])
        start = end
    return out


def encode_long_texts(tokenizer, texts: list[str], max_length: int, long_text: LongText,
                      lengths: bool = True) -> dict[str, list]:
    """The model's rows for single `texts` read as `long_text` says (truncate: the first tokens; head_tail; chunks),
    with `document`, the index in `texts` of each row's text, and (`lengths`) `document_length`, that text's
    tokens before any cut."""
    cut_both_ends = long_text.mode == "head_tail"
    full = (tokenizer(texts, truncation=False, verbose=False, return_special_tokens_mask=cut_both_ends)
            if lengths or cut_both_ends else None)
    if long_text.chunked:
        out = chunk_rows(tokenizer, texts, max_length, long_text)
    else:
        if cut_both_ends:
            out = head_tail_rows(full, max_length, special_token_ends(tokenizer))
        else:
            enc = tokenizer(texts, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in enc.keys()}
        out["document"] = list(range(len(texts)))
    if lengths:
        out["document_length"] = [len(full["input_ids"][d]) for d in out["document"]]
    return out


def pool_documents(values: np.ndarray, documents: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """One row per document from rows of several documents: the mean (or max) of each document's rows, documents
    in the order they first appear. Returns (pooled rows, the index of each document's first row)."""
    values, documents = np.asarray(values), np.asarray(documents)
    if how not in CHUNK_POOLINGS:
        raise TextuneError(f"data.chunk_pooling: {how!r} is not one of {', '.join(CHUNK_POOLINGS)}")
    ids, first, inverse = np.unique(documents, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # np.unique sorts by id; keep the order documents came in
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse.reshape(-1)]
    shape = (len(ids), *values.shape[1:])
    if how == "max":
        pooled = np.full(shape, -np.inf, dtype=np.float64)
        np.maximum.at(pooled, group, values)
    else:
        pooled = np.zeros(shape, dtype=np.float64)
        np.add.at(pooled, group, values)
        pooled /= np.bincount(group, minlength=len(ids)).reshape(-1, *([1] * (values.ndim - 1)))
    return pooled.astype(values.dtype if values.dtype.kind == "f" else np.float64), first[order]


def chunk_counts(documents: np.ndarray) -> np.ndarray:
    """Rows per document, documents in the order they first appear."""
    _, first, counts = np.unique(np.asarray(documents), return_index=True, return_counts=True)
    return counts[np.argsort(first, kind="stable")]


def count_summary(counts) -> dict[str, float]:
    """Mean, 95th percentile and max of chunks per document."""
    arr = np.asarray(counts)
    if arr.size == 0:
        return {"documents": 0, "chunks": 0, "mean": 0.0, "p95": 0, "max": 0}
    return {"documents": int(arr.size), "chunks": int(arr.sum()), "mean": round(float(arr.mean()), 2),
            "p95": int(np.percentile(arr, 95)), "max": int(arr.max())}
