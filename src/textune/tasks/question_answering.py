"""Extractive question answering: `task: question-answering`, the `run_qa.py` + `utils_qa.py` of the
transformers examples, top to bottom.

1. Reading. SQuAD's nested JSON (`data[].paragraphs[].context`, `qas[].question`, `answers[].text` /
   `answer_start`, v1.1 and v2.0 with `is_impossible`), or a flat table (.jsonl/.json/.parquet/.csv/.tsv) in
   the HF `squad` layout: `context`, `question`, `answers: {text: [...], answer_start: [...]}` (column names:
   `data.context_column`, `data.question_column`, `data.answers_column`). Every answer is checked against its
   context: text not at its `answer_start` is an error naming the row, or, with `data.fix_answer_starts`, moved
   to the nearest exact occurrence (counted). Questions without an answer need `data.allow_unanswerable`.
2. Tokenising. Question first, context second, only the context truncated (`truncation="only_second"`): a
   long context becomes overlapping windows of `model.max_length` tokens sharing `data.doc_stride` tokens (a
   quarter of `model.max_length` when empty), padded on the right whatever the tokenizer's default. The
   offset mapping of each window (None outside the context) is kept for post-processing. A window holding
   the (first) answer is labelled with its start and end token; the others, and unanswerable questions,
   point at [CLS].
3. Model: `AutoModelForQuestionAnswering` (`qa_outputs`: a start and an end logit per token).
4. Post-processing (`best_spans`, `answer_question`, `best_null_threshold`): as `utils_qa.postprocess_qa_
   predictions`, the n best start and end logits of every window of a question, spans inside the context of
   at most `data.max_answer_length` tokens, the best by start + end logit over all windows. With unanswerable
   questions the null score ([CLS] start + end, lowest over the windows) competes with the best span through a
   threshold chosen on validation (the one of best F1, as the official SQuAD v2.0 script does).
5. Metrics: SQuAD exact match and F1 (official normalisation, best over the reference answers), as
   fractions (0-1) like every textune metric; the headline is `f1`.
6. Prediction: `answer`, `score`, `start`, `end` (character offsets into the context) per question; `top_k`
   answers on request. Serving: POST /v1/answer. Report: worst misses with the context around both spans.
"""

from __future__ import annotations

import copy
import html
import json
import numbers
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

from textune.data import length_stats, read_table
from textune.data_checks import DataReport, Finding
from textune.errors import TextuneError
from textune.infer import ModelPredictor, read_inputs as read_text_inputs
from textune.models import load_classifier, load_tokenizer, resolve_model, saved_run_config, set_attention
from textune.tasks.base import SAMPLE_TEXTS, ExportSpec, PlaygroundSpec, Task, TaskInputs
from textune.tuning import apply_tuning

TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
N_BEST = 20  # start and end candidates per window, as utils_qa's n_best_size


# ---------------------------------------------------------------- 1. reading


@dataclass
class Questions:
    """One split: a question per entry, its context, its answers as (text, answer_start) and where it came
    from (for errors). `moved`: answers whose answer_start was corrected (data.fix_answer_starts)."""

    ids: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    answers: list[list[tuple[str, int]]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    moved: int = 0

    def pick(self, idx) -> Questions:
        return Questions(*([getattr(self, f)[i] for i in idx] for f in ("ids", "questions", "contexts", "answers",
                                                                          "where")), moved=self.moved)


def nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Start of the exact occurrence of `text` in `context` nearest to `start`, or None."""
    found = [m.start() for m in re.finditer(re.escape(text), context)] if text else []
    return min(found, key=lambda s: abs(s - start)) if found else None


def checked_answers(context: str, texts: list, starts: list, where: str, what: str, fix: bool) -> tuple[list, int]:
    """(answers as (text, start), how many were moved) after checking each text is at its start.

    Raises:
        TextuneError: text and start lists of different lengths, an empty answer text, or an answer not at its
            answer_start (without `fix`), or not in its context at all.
    """
    if len(texts) != len(starts):
        raise TextuneError(f"{what} {where}: {len(texts)} answer texts but {len(starts)} answer_start values; "
                           f"give one start per answer")
    out, moved = [], 0
    for text, start in zip(texts, starts):
        if not isinstance(text, str):
            raise TextuneError(f"{what} {where}: the answer text {text!r} is a {type(text).__name__}, not a string; "
                               f"write it as it reads in the context, in quotes (\"1843\")")
        start = answer_start(start, where, what)
        if not text.strip():
            raise TextuneError(f"{what} {where}: an answer text is empty; an unanswerable question has no answers "
                               f"(answers: {{text: [], answer_start: []}})")
        if context[start:start + len(text)] != text:
            near = nearest_occurrence(context, text, start)
            if near is None:
                raise TextuneError(f"{what} {where}: the answer {text[:60]!r} does not occur in its context; an "
                                   f"extractive answer must be a span of the context")
            if not fix:
                raise TextuneError(f"{what} {where}: the answer {text[:60]!r} is not at answer_start {start} (the "
                                   f"context there reads {context[start:start + len(text)][:60]!r}; it occurs at "
                                   f"{near}); fix the offset, or set data.fix_answer_starts: true to move answers "
                                   f"to their nearest exact occurrence")
            start, moved = near, moved + 1
        out.append((text, start))
    return out, moved


def answer_start(start, where: str, what: str) -> int:
    """A checked answer_start: a whole number of characters from the context's start (0 or more).

    Raises:
        TextuneError: null, text, a fraction or a negative number (Python would read -5 as 5 characters from
            the end, and the answer would silently train as unanswerable).
    """
    whole = isinstance(start, numbers.Integral) or (isinstance(start, float) and start.is_integer())
    if isinstance(start, bool) or not whole:
        raise TextuneError(f"{what} {where}: answer_start {start!r} is not a whole number; answer_start is the "
                           f"character offset of the answer in its context (0 = its first character)")
    if start < 0:
        raise TextuneError(f"{what} {where}: answer_start {int(start)} is negative; answer_start counts characters "
                           f"from the start of the context (0 = its first character)")
    return int(start)


def add_question(out: Questions, qid, question, context, texts, starts, where, what, d) -> None:
    """Check one question and append it to `out` (see `checked_answers`)."""
    if not isinstance(context, str) or not context.strip():
        raise TextuneError(f"{what} {where}: the question has no context; every question needs the passage its "
                           f"answer is taken from")
    if not isinstance(question, str) or not question.strip():
        raise TextuneError(f"{what} {where}: the question is empty; remove the row")
    answers, moved = checked_answers(context, texts, starts, where, what, d.fix_answer_starts)
    if not answers and not d.allow_unanswerable:
        raise TextuneError(f"{what} {where}: the question has no answer; for SQuAD v2.0-style unanswerable "
                           f"questions set data.allow_unanswerable: true")
    out.ids.append(str(qid) if qid is not None else str(len(out.ids)))
    out.questions.append(question.lstrip())  # leading blanks only waste window room (as run_qa.py strips them)
    out.contexts.append(context)
    out.answers.append(answers)
    out.where.append(where)
    out.moved += moved


def read_squad_json(squad: dict, path: Path, what: str, d) -> Questions:
    """Questions of SQuAD's nested JSON (v1.1 or v2.0)."""
    out = Questions()
    for a, article in enumerate(squad["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise TextuneError(f"{what} {path}: data[{a}] has no 'paragraphs' list; a SQuAD file is "
                               f'{{"data": [{{"paragraphs": [{{"context": ..., "qas": [...]}}]}}]}}')
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise TextuneError(f"{what} {path} data[{a}].paragraphs[{p}]: expected an object with a 'context' "
                                   f"and a 'qas' list, got {json.dumps(paragraph)[:80]}")
            for q, qa in enumerate(qas):
                where = f"{path} data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise TextuneError(f"{what} {where}: expected an object with 'id', 'question' and 'answers', got "
                                       f"{json.dumps(qa)[:80]}")
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                if not isinstance(answers, list) or not all(isinstance(x, dict) and "text" in x and "answer_start" in x
                                                            for x in answers):
                    raise TextuneError(f"{what} {where}: answers must be a list of objects with 'text' and "
                                       f"'answer_start' ([] for no answer)")
                add_question(out, qa.get("id"), qa.get("question"), paragraph.get("context"),
                             [x["text"] for x in answers], [x["answer_start"] for x in answers], where, what, d)
    return out


def answer_lists(cell, where: str, what: str, column: str) -> tuple[list, list]:
    """(texts, starts) of one `answers` cell: {text: [...], answer_start: [...]} (a JSON string in CSV files)."""
    layout = '{"text": ["1843"], "answer_start": [16]} (the HF squad layout; empty lists for no answer)'
    if isinstance(cell, str):
        try:
            cell = json.loads(cell) if cell.strip() else {}
        except json.JSONDecodeError:
            raise TextuneError(f"{what} {where}: {column!r} holds {cell[:80]!r}, which is not JSON; write each "
                               f"answers cell as JSON: {layout}") from None
    if cell is None:
        return [], []
    if not isinstance(cell, dict) or "text" not in cell or "answer_start" not in cell:
        raise TextuneError(f"{what} {where}: {column!r} must hold {layout}, got {str(cell)[:80]!r}")
    for key in ("text", "answer_start"):
        if not isinstance(cell[key], list):
            raise TextuneError(f"{what} {where}: {column}.{key} must be a list, got {type(cell[key]).__name__} "
                               f"{cell[key]!r}; write {layout}")
    return list(cell["text"]), list(cell["answer_start"])


def read_questions(path: str, what: str, d) -> Questions:
    """One file of questions: SQuAD nested JSON or a flat table (see the module docstring).

    Raises:
        TextuneError: a JSON file that is neither SQuAD-shaped nor a list of rows, missing columns (a
            classification file), or any question `add_question` refuses (naming the row).
    """
    path_ = Path(path)
    suffix = path_.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        raise TextuneError(f"{what} {path}: a question-answering run reads SQuAD JSON or tables with context, "
                           f"question and answers columns (.jsonl, .json, .parquet, .csv), not "
                           f"{suffix or 'this file'}")
    if suffix == ".json":
        if not path_.is_file():
            raise TextuneError(f"{what} file not found: {path}")
        try:
            raw = json.loads(path_.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = None  # JSON lines under a .json name: read as a table below
        if isinstance(raw, dict):
            if not isinstance(raw.get("data"), list):
                raise TextuneError(f"{what} {path} is not SQuAD-shaped: expected {{\"data\": [{{\"paragraphs\": "
                                   f"[{{\"context\": ..., \"qas\": [...]}}]}}]}}, got an object with keys "
                                   f"{sorted(raw)[:5]}")
            out = read_squad_json(raw, path_, what, d)
            if not out.questions:
                raise no_question_error(path, what)
            return out
    table = read_table(path, what)
    columns = (("data.context_column", d.context_column), ("data.question_column", d.question_column),
               ("data.answers_column", d.answers_column))
    for key, column in columns:
        if column not in table.column_names:
            raise TextuneError(f"{what} {path} has no column {column!r} ({key}); its columns are "
                               f"{', '.join(map(repr, table.column_names))}. A question-answering file holds a "
                               f"context, a question and answers per row (or is SQuAD JSON); a file of texts with "
                               f"labels is for task: classification")
    out = Questions()
    ids = table["id"] if "id" in table.column_names else [None] * len(table)
    for i, (qid, context, question, cell) in enumerate(zip(ids, table[d.context_column], table[d.question_column],
                                                           table[d.answers_column]), start=1):
        where = f"{path} row {i}"
        texts, starts = answer_lists(cell, where, what, d.answers_column)
        add_question(out, qid if qid is not None else f"row{i}", question, context, texts, starts, where, what, d)
    if not out.questions:
        raise no_question_error(path, what)
    return out


def no_question_error(path, what: str) -> TextuneError:
    return TextuneError(f"{what} {path} holds no question; a question-answering file holds a context, a question "
                        f"and answers per row, or SQuAD JSON with questions under data[].paragraphs[].qas")


# ---------------------------------------------------------------- 2. tokenising


def answer_token_span(offsets: list, start_char: int | None, end_char: int | None, cls_index: int = 0
                      ) -> tuple[int, int]:
    """(start token, end token) of the answer characters [start_char, end_char) in one window, whose
    `offsets` are (start, end) per token or None outside the context; (cls, cls) where the window does not
    hold the whole answer, or for no answer (start_char None). As run_qa.py's prepare_train_features."""
    context = [i for i, o in enumerate(offsets) if o is not None]
    if start_char is None or not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


@dataclass
class Windows:
    """The windows of a split: the tokenised dataset the loader reads (with a `window` column, its index, so an
    evaluation maps gathered logits back whatever the batching), and per window its question's index and its
    offsets (None outside the context), in dataset order."""

    dataset: Dataset
    example: list[int]
    offsets: list[list]
    cls: list[int]  # the [CLS] position, where "no answer in this window" points


def check_room(qs: Questions, tokenizer, max_length: int, stride: int, what: str) -> list[int]:
    """Question lengths in tokens; raises where a question leaves no room for more than `stride` context tokens
    (the tokenizer could not make windows that move forward)."""
    lengths = [len(ids) for ids in tokenizer(qs.questions, add_special_tokens=False)["input_ids"]]
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    for n, where in zip(lengths, qs.where):
        if n + stride >= room:
            raise TextuneError(f"{what} {where}: the question is {n} tokens, which with data.doc_stride {stride} "
                               f"leaves no room for a window of context in model.max_length {max_length}; shorten "
                               f"the question, lower data.doc_stride or raise model.max_length")
    return lengths


def doc_stride(stride: int | None, max_length: int) -> int:
    """data.doc_stride, or where it is empty a quarter of model.max_length (run_qa.py's 128 of 384 is a third; a
    quarter leaves longer questions room), so the defaults of both always work together."""
    return stride if stride is not None else max(1, max_length // 4)


def right_padded(tokenizer):
    """The tokenizer with padding and truncation on the right (a copy where it differs). Answer positions are
    token indices counted from the start of each window and logits are read as `[:n]`: a tokenizer that pads
    on the left (Llama, Mistral, Gemma and XLNet tokenizers do by default) would shift every shorter window of
    a batch. Training saves this tokenizer with the model; the predictor applies it again to any folder."""
    if tokenizer.padding_side == "right" and tokenizer.truncation_side == "right":
        return tokenizer
    out = copy.deepcopy(tokenizer)
    out.padding_side = out.truncation_side = "right"
    out.init_kwargs.update(padding_side="right", truncation_side="right")  # what save_pretrained writes
    return out


def tokenize_windows(qs: Questions, tokenizer, max_length: int, stride: int, labelled: bool = True) -> Windows:
    """Question + context windows (see the module docstring); `labelled`: with start/end positions."""
    enc = tokenizer(qs.questions, qs.contexts, truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    example = list(enc["overflow_to_sample_mapping"])
    offsets = []
    for w in range(len(example)):
        seq = enc.sequence_ids(w)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq)])
    columns = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    columns["length"] = [len(ids) for ids in enc["input_ids"]]
    columns["window"] = list(range(len(example)))
    cls = [cls_position(ids, tokenizer) for ids in enc["input_ids"]]
    if labelled:
        positions = []
        for w, i in enumerate(example):
            answer = qs.answers[i][0] if qs.answers[i] else None
            span = (answer[1], answer[1] + len(answer[0])) if answer else (None, None)
            positions.append(answer_token_span(offsets[w], *span, cls_index=cls[w]))
        columns["start_positions"] = [p[0] for p in positions]
        columns["end_positions"] = [p[1] for p in positions]
    return Windows(Dataset.from_dict(columns), example, offsets, cls)


class WindowCollator:
    """Dynamic padding; keeps the `window` index of evaluation batches (`evaluate` pops it before the model
    call) and drops it from training batches. `split` tells `evaluate` which split's windows it reads."""

    def __init__(self, tokenizer, split: str, pad_to_multiple_of: int | None = None):
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.split = split

    def __call__(self, features: list[dict]):
        batch = self.pad(features)
        if self.split == "train":
            batch.pop("window", None)
        return batch


# ---------------------------------------------------------------- 4. post-processing and metrics


def best_spans(start_logits, end_logits, offsets: list, max_answer_length: int, n_best: int = N_BEST) -> list[tuple]:
    """Candidate answers of one window: (start logit + end logit, start char, end char) for the `n_best` best
    start and end tokens, spans inside the context only, end not before start, at most `max_answer_length`
    tokens. As utils_qa.postprocess_qa_predictions, except that the n best are drawn from the context's tokens
    only (utils_qa draws them from the whole window and may find no valid span when an undertrained model's best
    logits sit on the question)."""
    outside = np.array([o is None for o in offsets] + [True] * max(0, len(start_logits) - len(offsets)))
    start_logits = np.where(outside[:len(start_logits)], -np.inf, np.asarray(start_logits, dtype=float))
    end_logits = np.where(outside[:len(end_logits)], -np.inf, np.asarray(end_logits, dtype=float))
    n_context = int((~outside[:len(start_logits)]).sum())
    starts = np.argsort(start_logits)[::-1][:min(n_best, n_context)]
    ends = np.argsort(end_logits)[::-1][:min(n_best, n_context)]
    out = []
    for s in starts:
        for e in ends:
            if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                continue
            if e < s or e - s + 1 > max_answer_length:
                continue
            out.append((float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1]))
    return out


def answer_question(windows: list[tuple], context: str, max_answer_length: int, top_k: int = 1,
                    null_threshold: float | None = None, n_best: int = N_BEST) -> tuple[list[dict], float]:
    """(the `top_k` answers, null score minus best span score) of one question from its windows, each
    (start logits, end logits, offsets, cls index). Answers: {answer, score, start, end}, best first; score is
    the softmax over the candidates' logit sums (utils_qa's probability). With `null_threshold` (unanswerable
    questions allowed) the empty answer "" competes: it wins where null score - best span score exceeds it.
    The difference is +inf where no window has a span (an answer is then "")."""
    candidates, null = [], None
    for start_logits, end_logits, offsets, cls in windows:
        candidates += best_spans(start_logits, end_logits, offsets, max_answer_length, n_best)
        window_null = float(start_logits[cls] + end_logits[cls])
        null = window_null if null is None else min(null, window_null)
    best: dict[tuple, float] = {}
    for score, s, e in candidates:  # the same characters from two overlapping windows: keep the better
        best[(s, e)] = max(score, best.get((s, e), -np.inf))
    ranked = sorted(best.items(), key=lambda item: -item[1])[:max(top_k, n_best)]
    diff = (null - ranked[0][1]) if ranked and null is not None else float("inf")
    entries = [(score, s, e, context[s:e]) for (s, e), score in ranked]
    if null_threshold is not None and null is not None:
        entries.append((null - null_threshold, 0, 0, ""))  # the empty answer scored against the spans
        entries.sort(key=lambda x: -x[0])
    if not entries:
        return [{"answer": "", "score": 0.0, "start": 0, "end": 0}], diff
    scores = np.array([x[0] for x in entries])
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    return [{"answer": a, "score": round(float(p), 6), "start": int(s), "end": int(e)}
            for (_, s, e, a), p in zip(entries[:top_k], probs)], diff


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised texts; two empty answers agree (1), one empty one does not (0)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) against the best of the reference answers; no reference means "" is right."""
    golds = golds or [""]
    return max(exact_match(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match and F1 (fractions, averaged over questions)."""
    scores = [answer_scores(p, g) for p, g in zip(predictions, references)]
    n = len(scores) or 1
    return {"exact_match": sum(s[0] for s in scores) / n, "f1": sum(s[1] for s in scores) / n,
            "questions": len(scores)}


def best_null_threshold(diffs: list[float], span_f1: list[float], has_answer: list[bool]) -> float:
    """The threshold on (null score - best span score) of best F1: a question is answered "" where its
    difference exceeds the threshold. `span_f1`: the F1 of the best span. As the official v2.0 evaluation's
    find_best_thresh: tried are +inf (never null) and just below each difference; ties keep the higher."""
    def total(t: float) -> float:
        return sum((0.0 if h else 1.0) if d > t else f for d, f, h in zip(diffs, span_f1, has_answer))

    candidates = [float("inf")] + [d - 1e-6 for d in sorted({d for d in diffs if np.isfinite(d)}, reverse=True)]
    return max(candidates, key=lambda t: (total(t), t))


# ---------------------------------------------------------------- 5. prediction


def window_logits(model, windows: Windows, tokenizer, batch_size: int, device) -> list[tuple[np.ndarray, np.ndarray]]:
    """(start logits, end logits) of every window, batched by similar length, in window order."""
    ds = windows.dataset
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in ds.column_names]
    rows = ds.select_columns(keys).to_dict()
    lengths = ds["length"]
    order = np.argsort(lengths, kind="stable")
    out: list = [None] * len(lengths)
    with torch.inference_mode():
        for at in range(0, len(order), batch_size):
            idx = order[at:at + batch_size]
            batch = tokenizer.pad([{k: rows[k][i] for k in keys} for i in idx], return_tensors="pt").to(device)
            result = model(**batch)
            starts, ends = result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = (starts[row, :lengths[i]], ends[row, :lengths[i]])
    return out


def cls_position(input_ids: list[int], tokenizer) -> int:
    return input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0


class QuestionAnswererPredictor(ModelPredictor):
    """A loaded extractive question answerer. `predict(["Who?"], ["Ada wrote it."])` ->
    `[{"answer": "Ada", "score": ..., "start": 0, "end": 3}]`; with `top_k` > 1 each row also holds `answers`,
    the `top_k` best. Windows, `max_answer_length` and unanswerable questions as the run was trained (its
    config.yaml), the null threshold from its metrics.json."""

    task = "question-answering"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure()

    def _configure(self) -> None:
        self.refuse_another_task()
        if not getattr(self.tokenizer, "is_fast", False):
            raise TextuneError("question answering needs a fast tokenizer (character offsets of tokens); this "
                               "model's tokenizer is a slow one")
        self.tokenizer = right_padded(self.tokenizer)
        data = saved_run_config(self.run_dir).get("data") or {}
        stride = int(data["doc_stride"]) if data.get("doc_stride") is not None else None
        self.doc_stride = min(doc_stride(stride, self.max_length), self.max_length // 2)
        self.max_answer_length = int(data.get("max_answer_length") or 30)
        self.null_threshold = None
        if data.get("allow_unanswerable"):
            metrics = Path(self.run_dir or ".") / "metrics.json"
            saved = json.loads(metrics.read_text()).get("validation", {}) if metrics.is_file() else {}
            self.null_threshold = float(saved.get("null_threshold", 0.0))

    @classmethod
    def around(cls, model, tokenizer, batch_size: int = 64, max_length: int | None = None, device=None, folder=None):
        self = super().around(model, tokenizer, batch_size, max_length, device, folder)
        self._configure()
        return self

    def predict(self, questions: list[str], contexts: list[str] | None = None, top_k: int = 1) -> list[dict]:
        """One row per question (see the class docstring).

        Raises:
            TextuneError: no contexts, a count that differs from the questions', an empty question or context.
        """
        if contexts is None or len(contexts) != len(questions):
            got = "no contexts" if contexts is None else f"{len(contexts)} contexts"
            raise TextuneError(f"got {len(questions)} questions but {got}; give one context per question")
        if top_k < 1:
            raise TextuneError(f"top_k must be 1 or more, got {top_k}")
        if not questions:
            return []
        qs = Questions()
        for i, (q, c) in enumerate(zip(questions, contexts), start=1):
            if not isinstance(c, str) or not c.strip():
                raise TextuneError(f"question {i} ({str(q)[:60]!r}) has no context; give the passage to answer from")
            if not isinstance(q, str) or not q.strip():
                raise TextuneError(f"question {i} is empty")
            qs.questions.append(q.lstrip())
            qs.contexts.append(c)
            qs.answers.append([])
            qs.where.append(f"question {i}")
        check_room(qs, self.tokenizer, self.max_length, self.doc_stride, "input")
        windows = tokenize_windows(qs, self.tokenizer, self.max_length, self.doc_stride, labelled=False)
        logits = window_logits(self.model, windows, self.tokenizer, self.batch_size, self.device)
        per_question: list[list] = [[] for _ in questions]
        for w, i in enumerate(windows.example):
            per_question[i].append((*logits[w], windows.offsets[w], windows.cls[w]))
        out = []
        for i, wins in enumerate(per_question):
            answers, _ = answer_question(wins, contexts[i], self.max_answer_length, top_k, self.null_threshold)
            row = dict(answers[0])
            if top_k > 1:
                row["answers"] = answers
            out.append(row)
        return out


# ---------------------------------------------------------------- a training run's inputs


def answers_of(qs: Questions, i: int) -> list[str]:
    return [text for text, _ in qs.answers[i]]


def post_process(qs: Questions, windows: Windows, logits: list, max_answer_length: int,
                 allow_unanswerable: bool) -> tuple[dict, list[dict]]:
    """(metrics, one prediction row per question) from the (start, end) logits of every window, in window order."""
    per_question: list[list] = [[] for _ in qs.questions]
    for w, i in enumerate(windows.example):
        per_question[i].append((*logits[w], windows.offsets[w], windows.cls[w]))
    best, diffs = [], []
    for i, wins in enumerate(per_question):
        answers, diff = answer_question(wins, qs.contexts[i], max_answer_length)
        best.append(answers[0])
        diffs.append(diff)
    golds = [answers_of(qs, i) for i in range(len(qs.questions))]
    threshold = None
    if allow_unanswerable:
        span_f1 = [answer_scores(b["answer"], g)[1] for b, g in zip(best, golds)]
        threshold = best_null_threshold(diffs, span_f1, [bool(g) for g in golds])
        best = [{"answer": "", "score": b["score"], "start": 0, "end": 0} if d > threshold else b
                for b, d in zip(best, diffs)]
    metrics = squad_metrics([b["answer"] for b in best], golds)
    if threshold is not None:
        metrics["null_threshold"] = threshold if np.isfinite(threshold) else 1e9
    rows = []
    for i, b in enumerate(best):
        em, f1 = answer_scores(b["answer"], golds[i])
        rows.append({"id": qs.ids[i], "question": qs.questions[i], "context": qs.contexts[i],
                     "answers": golds[i], "answer_starts": [s for _, s in qs.answers[i]], "pred": b["answer"],
                     "pred_start": b["start"], "exact_match": em, "f1": round(f1, 4)})
    return metrics, rows


@dataclass
class QuestionAnsweringInputs(TaskInputs):
    model_path: str
    tokenizer: object
    splits: dict  # split name -> Questions
    windows: dict  # split name -> Windows
    stats: dict
    model: torch.nn.Module
    report: DataReport
    max_answer_length: int
    allow_unanswerable: bool

    @property
    def tokenized(self) -> dict:
        return {k: w.dataset for k, w in self.windows.items()}

    def summary(self, cfg) -> str:
        s = self.stats["context_tokens"]["train"]
        sizes = " | ".join(f"{k} {len(q.questions):,} ({len(self.windows[k].example):,} windows)"
                           for k, q in self.splits.items())
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__})",
                 f"data       questions: {sizes}"]
        lines += [f"warning    {f.message}" for f in self.report.findings] + self.report.notes
        lines.append(f"tokens     context mean {s['mean']} | p95 {s['p95']} | max {s['max']}; windows of "
                     f"{cfg.model.max_length} tokens overlapping by "
                     f"{doc_stride(cfg.data.doc_stride, cfg.model.max_length)}")
        return "\n".join(lines)

    def data_stats(self, cfg) -> dict:
        return {"sizes": {k: len(q.questions) for k, q in self.splits.items()},
                "windows": {k: len(w.example) for k, w in self.windows.items()},
                "answers": self.report.label_balance, **self.stats,
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.report.findings],
                "max_length": cfg.model.max_length, "doc_stride": doc_stride(cfg.data.doc_stride, cfg.model.max_length)}

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        return WindowCollator(self.tokenizer, split, pad_to_multiple_of)

    @torch.inference_mode()
    def evaluate(self, model, loader, accelerator=None):
        """(metrics, prediction rows) of the questions of the loader's split (its `WindowCollator` says which):
        the start/end logits of every window gathered over all processes, put back in place by the batches'
        `window` index, mapped to their questions and post-processed. The loss is the mean of the start and
        end cross-entropies per window."""
        model.eval()
        split = getattr(loader.collate_fn, "split", "validation")
        windows = self.windows[split]
        logits: list = [None] * len(windows.example)
        loss_sum, count = 0.0, 0
        for batch in loader:
            index = batch.pop("window")
            out = model(**batch)
            s, e = out.start_logits.float(), out.end_logits.float()
            ce = torch.nn.functional.cross_entropy
            row_loss = (ce(s, batch["start_positions"], reduction="none")
                        + ce(e, batch["end_positions"], reduction="none")) / 2
            if accelerator is not None:  # pad to one length across processes, then drop even-sharding padding
                s = accelerator.pad_across_processes(s, dim=1, pad_index=-1e4)
                e = accelerator.pad_across_processes(e, dim=1, pad_index=-1e4)
                s, e, row_loss, index = accelerator.gather_for_metrics((s, e, row_loss, index))
            loss_sum += float(row_loss.sum())
            count += len(row_loss)
            for w, s_row, e_row in zip(index.tolist(), s.cpu().numpy(), e.cpu().numpy()):
                n = len(windows.offsets[w])
                logits[w] = (s_row[:n], e_row[:n])
        model.train()
        metrics, rows = post_process(self.splits[split], windows, logits, self.max_answer_length,
                                     self.allow_unanswerable)
        metrics["loss"] = loss_sum / count if count else float("nan")
        return metrics, rows

    def write_predictions(self, predictions, path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the task


@dataclass
class QuestionDataReport(DataReport):
    """A DataReport whose label balance counts answerable and unanswerable questions, with token-length
    lines beside it."""

    notes: list[str] = None

    def format(self) -> str:
        return "\n".join([super().format().replace("labels     ", "questions  ").replace("rows       ",
                                                                                          "questions  "), *self.notes])


class QuestionAnswering(Task):
    name = "question-answering"
    serve_paths = ("/v1/answer",)
    serve_adapters = True

    def router(self, ctx):
        return answer_router(ctx)

    def serve_description(self, predictor) -> str:
        return "a question-answering model (extractive)"
    predictor_class = QuestionAnswererPredictor
    playground = PlaygroundSpec((("question", "question", False), ("context", "context", False)), "answer")

    def read_splits(self, cfg) -> dict:
        """The configured files as checked questions: split name -> Questions."""
        d = cfg.data
        problems = [key for key, on in (("data.name (question answering reads local files; set data.train)",
                                         d.name is not None and d.train is None),
                                        ("data.streaming", d.streaming),
                                        ("data.augment", bool(d.augment.methods) or d.augment.mixup_alpha > 0),
                                        ("data.text_pair_column", d.text_pair_column is not None)) if on]
        if problems:
            raise TextuneError(f"{problems[0]}: not supported for task: question-answering; remove it")
        splits = {"train": read_questions(d.train, "data.train", d)}
        if d.validation:
            splits["validation"] = read_questions(d.validation, "data.validation", d)
        else:  # a seeded random split by context, so no passage is in both splits
            contexts = sorted(set(splits["train"].contexts))
            if len(contexts) < 2:
                raise TextuneError("data.train has one context: too few to hold out a validation split by context; "
                                   "give data.validation a file")
            rng = np.random.default_rng(cfg.seed)
            held = set(rng.choice(contexts, max(1, round(d.validation_split * len(contexts))), replace=False))
            train = splits["train"]
            splits = {"train": train.pick([i for i, c in enumerate(train.contexts) if c not in held]),
                      "validation": train.pick([i for i, c in enumerate(train.contexts) if c in held])}
        if d.test:
            splits["test"] = read_questions(d.test, "data.test", d)
        rng = np.random.default_rng(cfg.seed)
        for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples)):
            if limit and limit < len(splits[split].questions):
                splits[split] = splits[split].pick(sorted(rng.choice(len(splits[split].questions), limit,
                                                                     replace=False)))
        return splits

    def data_report(self, splits: dict, tokenizer, cfg, windows: dict | None = None) -> QuestionDataReport:
        """Answerable/unanswerable counts, context and question lengths in tokens, windows per question,
        questions asked twice about one context, answers moved, contexts shared between splits."""
        findings, notes = [], []
        stride = doc_stride(cfg.data.doc_stride, cfg.model.max_length)
        balance = {k: {"answerable": sum(bool(a) for a in q.answers),
                       "unanswerable": sum(not a for a in q.answers)} for k, q in splits.items()}
        for split, q in splits.items():
            context_tokens = [len(ids) for ids in tokenizer(q.contexts, add_special_tokens=False)["input_ids"]]
            question_tokens = check_room(q, tokenizer, cfg.model.max_length, stride, f"data.{split}")
            n_windows = Counter((windows[split].example if windows else
                                 tokenize_windows(q, tokenizer, cfg.model.max_length, stride, labelled=False).example))
            per_q = [n_windows[i] for i in range(len(q.questions))]
            notes.append(f"tokens     {split}: context mean {np.mean(context_tokens):.0f}, p95 "
                         f"{int(np.percentile(context_tokens, 95))}, max {max(context_tokens)} | question mean "
                         f"{np.mean(question_tokens):.1f}, max {max(question_tokens)}")
            several = sum(n > 1 for n in per_q)
            notes.append(f"windows    {split}: {sum(per_q):,} for {len(per_q):,} questions; {several:,} questions "
                         f"({several / len(per_q):.1%}) need more than one (at most {max(per_q)})")
            if q.moved:
                findings.append(Finding("answer_start", q.moved, f"{split}: {q.moved:,} answers were not at their "
                                        f"answer_start and were moved to the nearest exact occurrence"))
            asked = Counter((normalise_question(x), c) for x, c in zip(q.questions, q.contexts))
            twice = [k[0] for k, n in asked.items() if n > 1]
            if twice:
                findings.append(Finding("duplicate", len(twice), f"{split}: {len(twice):,} questions are asked more "
                                        f"than once about the same context", examples=twice[:3]))
        train_contexts = set(splits["train"].contexts)
        for split in ("validation", "test"):
            if split in splits:
                shared = {c for c in splits[split].contexts if c in train_contexts}
                if shared:
                    findings.append(Finding("leakage", len(shared), f"{split}: {len(shared):,} contexts also occur "
                                            f"in train", examples=sorted(shared)[:3], strict_error=True))
        return QuestionDataReport({k: len(q.questions) for k, q in splits.items()}, balance, findings, notes)

    def _tokenizer(self, cfg):
        tokenizer = load_tokenizer(resolve_model(cfg.model.name), cfg.model.trust_remote_code, for_classifier=True)
        if not getattr(tokenizer, "is_fast", False):
            raise TextuneError(f"model.name: {cfg.model.name} has no fast tokenizer, which question answering needs "
                               f"(character offsets of tokens)")
        return right_padded(tokenizer)

    def check_data(self, cfg) -> DataReport:
        return self.data_report(self.read_splits(cfg), self._tokenizer(cfg), cfg)

    def load_inputs(self, cfg) -> QuestionAnsweringInputs:
        from textune.data_checks import enforce

        splits = self.read_splits(cfg)
        model_path = resolve_model(cfg.model.name)
        tokenizer = self._tokenizer(cfg)
        stride = doc_stride(cfg.data.doc_stride, cfg.model.max_length)
        for k, q in splits.items():
            check_room(q, tokenizer, cfg.model.max_length, stride, f"data.{k}")
        windows = {k: tokenize_windows(q, tokenizer, cfg.model.max_length, stride) for k, q in splits.items()}
        report = self.data_report(splits, tokenizer, cfg, windows)
        enforce(report, cfg.data.strict)
        stats = {"context_tokens": {k: length_stats([len(ids) for ids in tokenizer(q.contexts, add_special_tokens=False)
                                                     ["input_ids"]], cfg.model.max_length) for k, q in splits.items()},
                 "answers_moved": {k: q.moved for k, q in splits.items()}}
        model = load_classifier(model_path, ["start", "end"], cfg.model.trust_remote_code,
                                auto_class=AutoModelForQuestionAnswering)
        model = apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)
        return QuestionAnsweringInputs(model_path, tokenizer, splits, windows, stats, model, report,
                                       cfg.data.max_answer_length, cfg.data.allow_unanswerable)

    # ------------------------------------------------------------ saved runs

    def read_inputs(self, source: str, columns: dict, predictor):
        """Questions and contexts of a table (`question`, `context` columns, or the run's data.* names);
        `columns["top_k"]` (predict --top-k) answers per question."""
        question_column = columns.get("question_column") or "question"
        context_column = columns.get("context_column") or "context"
        if source == "-" or source.endswith(".txt"):
            raise TextuneError("question answering reads a table with a question and a context per row "
                               "(.jsonl, .csv, .parquet), not plain text lines")
        questions, contexts = read_text_inputs(source, question_column, context_column)
        top_k = int(columns.get("top_k") or 1)
        echo = [{"question": q} for q in questions]
        if top_k == 1:  # (questions, contexts): what every predictor's predict takes, the adapter registry's too
            return (questions, contexts), echo
        if not isinstance(predictor, QuestionAnswererPredictor):
            raise TextuneError("--top-k works with a run or model folder, not with --adapter; leave one out")
        return (questions, contexts, top_k), echo

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Exact match and F1 of `predictor` on a labelled file (SQuAD JSON or table)."""
        class Columns:  # read_questions reads these data.* settings
            context_column = columns.get("context_column") or "context"
            question_column = columns.get("question_column") or "question"
            answers_column = columns.get("answers_column") or "answers"
            fix_answer_starts = bool(columns.get("fix_answer_starts"))
            allow_unanswerable = bool(columns.get("allow_unanswerable"))

        gold = read_questions(path, "--data", Columns)
        rows = predictor.predict(gold.questions, gold.contexts)
        return squad_metrics([r["answer"] for r in rows], [answers_of(gold, i) for i in range(len(rows))])

    def format_metrics(self, metrics: dict) -> str:
        return (f"exact match {metrics['exact_match']:.4f} | F1 {metrics['f1']:.4f} over "
                f"{metrics['questions']:,} questions")

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        from textune import report_html as report

        v = (metrics or {}).get("validation") or {}
        cards = [("F1", report.fmt(v.get("f1"))), ("exact match", report.fmt(v.get("exact_match"))),
                 ("validation loss", report.fmt(v.get("loss")))]
        rows = report.read_predictions(run / "validation_predictions.jsonl")
        return cards, worst_misses_html(rows)


def normalise_question(text: str) -> str:
    return " ".join(text.lower().split())


def snippet_html(context: str, spans: list[tuple[int, int, str]], around: int = 80) -> str:
    """The context from `around` characters before the first span to as many after the last, each span in a
    <mark> of its colour."""
    spans = sorted((s, e, c) for s, e, c in spans if e > s)
    if not spans:
        return html.escape(context[:2 * around]) + ("…" if len(context) > 2 * around else "")
    lo, hi = max(0, spans[0][0] - around), min(len(context), max(e for _, e, _ in spans) + around)
    out, at = ["…" if lo else ""], lo
    for s, e, colour in spans:
        if s < at:  # overlapping spans: mark from where the previous one ended
            s = at
        out.append(html.escape(context[at:s]))
        out.append(f'<mark style="background:{colour}">{html.escape(context[s:e])}</mark>')
        at = max(at, e)
    out.append(html.escape(context[at:hi]) + ("…" if hi < len(context) else ""))
    return "".join(out)


def worst_misses_html(rows: list[dict], shown: int = 12) -> str:
    from textune import report_html as report

    out = ['<section id="errors"><h2>Validation questions answered worst</h2>']
    if not rows:
        return "".join(out) + report.missing_html("examples", "validation_predictions.jsonl is missing") + "</section>"
    missed = sorted((r for r in rows if r["f1"] < 1), key=lambda r: r["f1"])
    out.append(f'<p class="muted">{len(missed):,} of {len(rows):,} questions are not answered exactly (F1 below 1); '
               'the lowest F1 first. <mark style="background:#ddf4ff">gold</mark> '
               '<mark style="background:#ffd8d8">predicted</mark></p>')
    out.append('<table class="wrong"><tr><th class="l">question</th><th class="l">context</th>'
               '<th class="l">predicted</th><th>F1</th></tr>')
    for r in missed[:shown]:
        gold = [(s, s + len(t), "#ddf4ff") for t, s in zip(r["answers"][:1], r["answer_starts"][:1])]
        pred = [(r["pred_start"], r["pred_start"] + len(r["pred"]), "#ffd8d8")] if r["pred"] else []
        out.append(f'<tr><td class="text">{report.esc(r["question"])}</td>'
                   f'<td class="text">{snippet_html(r["context"], gold + pred)}</td>'
                   f'<td class="text">{report.esc(r["pred"] or "(no answer)")}</td><td>{r["f1"]:.2f}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


TASK = QuestionAnswering()


# ------------------------------ export

SAMPLE_QUESTIONS = ("Who wrote the first program?", "What is the capital of France?")


def sample_questions(data: dict) -> tuple[list, list]:
    """Built-in questions, each with a context, to check an export on."""
    return [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(len(SAMPLE_TEXTS))], list(SAMPLE_TEXTS)


def best_tokens(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The real token each row's start (or end) logits choose: where the answer starts (or ends)."""
    return np.where(mask, logits, -np.inf).argmax(-1)


# Contexts are truncated, never questions, as the predictor's windows do.
QuestionAnswering.export_spec = ExportSpec(
    outputs=("start_logits", "end_logits"), per_token=True, truncation="only_second", samples=sample_questions,
    samples_name="built-in sample questions", decide=best_tokens, decisions="answer start and end tokens")


# ------------------------------ serving


def answer_models() -> tuple[type, type]:
    """(request, response) of POST /v1/answer; pydantic is imported here, so training never loads it."""
    from pydantic import BaseModel, ConfigDict, Field

    class AnswerRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        questions: list[str] = Field(min_length=1, description="questions, each answered from its context",
                                     examples=[["Who wrote it?"]])
        contexts: list[str] = Field(min_length=1, description="one passage per question, in the same order; read "
                                                              "whole, however long (in windows)",
                                    examples=[["Ada Lovelace wrote it in 1843."]])
        adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")

    class Answer(BaseModel):
        answer: str = Field(description="the span of the context: context[start:end]; empty for no answer (models "
                                        "trained with unanswerable questions)")
        score: float = Field(description="probability of this span among the best candidate spans")
        start: int = Field(description="character offset of the answer's first character in the context")
        end: int = Field(description="character offset after the answer's last character")

    class AnswerResponse(BaseModel):
        model: str
        adapter: str | None
        results: list[Answer] = Field(description="one per question, in the input order")

    return AnswerRequest, AnswerResponse


def answer_router(ctx):
    """POST /v1/answer: the best answer to each question in its context, micro-batched."""
    request, response = answer_models()
    router = ctx.router()

    async def answer(req) -> dict:
        """The best answer to each question in its context: the span, its score and character offsets.
        Questions ride the batcher as texts and contexts as their pairs; the predictor batches their windows."""
        # The predictor windows the whole context, so --max-chars (what a truncating model can read) does not
        # apply to contexts: the request body limit bounds them.
        ctx.check_texts(req.questions, req.contexts, name="questions", pair_name="contexts", pairs_limited=False)
        ctx.check_adapter(req.adapter)
        results = await ctx.batched(req.questions, req.contexts, req.adapter)
        return {"model": ctx.model_name, "adapter": req.adapter, "results": results}

    ctx.post(router, "/v1/answer", answer, request, response)
    return router
