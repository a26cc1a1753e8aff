"""Token classification (named-entity recognition): `task: token-classification`, the `run_ner.py` of the
transformers examples, top to bottom.

1. Reading. CoNLL files (`.conll`, `.bio`, or `data.format: conll`): one `token<TAB>tag` per line (or
   space-separated: the first column is the token, the last the tag), a blank line between sentences,
   `-DOCSTART-` lines skipped. Table files (.jsonl/.json/.parquet): a list-of-words column
   (`data.tokens_column`) and a list-of-tags column (`data.tags_column`), tags as strings or as ints named
   by `data.label_names`. Tags are BIO / IOB2 (`O`, `B-TYPE`, `I-TYPE`); the tag list is `O` then the
   training tags sorted by type, B before I. A tag that training never saw is an error, anywhere.
2. Tokenising. Words are split into sub-tokens by the fast tokenizer (`is_split_into_words`), truncated to
   `model.max_length`; `word_ids()` gives each sub-token's word. The first sub-token of a word carries the
   word's tag and the others -100 (ignored by the loss), or, in training with `data.label_all_tokens`, the
   word's tag too (B- turned into I-); evaluation splits are always labelled per word. Words cut by truncation
   are neither trained on nor scored (as in run_ner.py); their share is reported at start-up and by
   validate-data. The tokenizer pads on the right, and byte-level BPE tokenizers put a space before every word
   (`word_tokenizer`, as run_ner.py's add_prefix_space), so word lists and raw text get the same sub-tokens.
3. Model: `AutoModelForTokenClassification` with the tag names as `id2label`, so the saved folder loads in
   `transformers.pipeline("token-classification", aggregation_strategy="simple")`.
4. Metrics: entity-level precision, recall and F1 with seqeval (its default CoNLL evaluation, as run_ner.py:
   an entity counts only with exact span and type), micro over all entities and per type, plus token accuracy
   over the scored words (each word by its first sub-token); the headline is `f1`.
5. Prediction. Raw text: each word's tag is its first sub-token's (pipeline aggregation "first"), words are
   grouped into entities by `group_entities` (the pipeline's B/I grouping), with character offsets into the
   input and the mean score of the words. Pre-split words (a CoNLL/JSONL file): one tag per word. Texts
   longer than `model.max_length` sub-tokens are read in windows overlapping by a quarter (`words_of_windows`).
6. Serving: POST /v1/entities. Report: per-type table, type confusions, worst sentences with spans marked.
"""

from __future__ import annotations

import copy
import html
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from seqeval.metrics import accuracy_score, classification_report
from seqeval.metrics.sequence_labeling import get_entities
from tokenizers import pre_tokenizers
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from textune.data import length_stats, read_table, read_text_lines
from textune.data_checks import DataReport, Finding
from textune.errors import TextuneError
from textune.infer import ModelPredictor
from textune.models import load_classifier, load_tokenizer, resolve_model, set_attention
from textune.tasks.base import ExportSpec, PlaygroundSpec, Task, TaskInputs
from textune.tuning import apply_tuning

CONLL_EXTENSIONS = (".conll", ".bio")
TABLE_EXTENSIONS = (".jsonl", ".json", ".parquet")


# ---------------------------------------------------------------- 1. reading


@dataclass
class Sentences:
    """One split: sentences as word lists with one tag per word, and where each came from (for errors)."""

    tokens: list[list[str]]
    tags: list[list[str]]
    where: list[str]  # "FILE line N" or "FILE row N"

    def subset(self, indices) -> Sentences:
        return Sentences([self.tokens[i] for i in indices], [self.tags[i] for i in indices],
                         [self.where[i] for i in indices])

    def word_where(self, i: int, j: int) -> str:
        """Where word j of sentence i is: its own CoNLL line (a sentence's lines are consecutive), or its row
        and position in a table."""
        head, _, line = self.where[i].rpartition(" line ")
        return f"{head} line {int(line) + j}" if line.isdigit() else f"{self.where[i]}, word {j + 1}"


def read_conll(path: str | Path, what: str) -> Sentences:
    """Sentences of a CoNLL file. A line is `token<TAB>tag` (or whitespace-separated columns: first = token,
    last = tag); blank lines end sentences; `-DOCSTART-` lines are skipped.

    Raises:
        TextuneError: missing file, a line without a tag, or no sentence at all (naming the line).
    """
    path = Path(path)
    lines = read_text_lines(path, f"{what} file")
    out = Sentences([], [], [])
    words: list[str] = []
    tags: list[str] = []
    start = 0
    for n, line in enumerate(lines + [""], start=1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                out.tokens.append(words)
                out.tags.append(tags)
                out.where.append(f"{path} line {start}")
            words, tags = [], []
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        columns = [c.strip() for c in columns]
        check_conll_line(columns, line, f"{what} {path} line {n}")
        if not words:
            start = n
        words.append(columns[0])
        tags.append(columns[-1])
    if not out.tokens:
        raise TextuneError(f"{what} {path} holds no sentence (one `token<TAB>tag` per line expected)")
    return out


def check_conll_line(columns: list[str], line: str, where: str) -> None:
    """Raises where a CoNLL line is not one word and one tag (a tag without its word, a word without its tag, a
    tag column holding a space: `B-PER O` would become an entity type "PER O")."""
    fix = "a CoNLL line is `token<TAB>tag` (blank lines separate sentences)"
    one_tag = len(columns) == 1 and line[:1].isspace() and check_tag(columns[0])
    if (len(columns) >= 2 and not columns[0] and columns[-1]) or one_tag:
        raise TextuneError(f"{where}: the tag {columns[-1]!r} has no word before it; {fix}")
    if len(columns) < 2 or not columns[-1] or not columns[0]:
        raise TextuneError(f"{where}: {line.strip()!r} has no tag; {fix}")
    if len(columns[-1].split()) > 1:
        raise TextuneError(f"{where}: the tag {columns[-1]!r} holds a space; a tag is one word (O, B-TYPE, I-TYPE): "
                           f"give each token its own line, and separate token and tag by one tab")


def checked_row(words, tags, where: str, what: str, label_names: list[str] | None) -> tuple[list[str], list[str]]:
    """One table row's words and tags, checked: non-empty strings, and tags that are BIO strings or ids that
    data.label_names names.

    Raises:
        TextuneError: naming the row and the word's position.
    """
    for j, word in enumerate(words, start=1):
        if not isinstance(word, str):
            raise TextuneError(f"{what} {where}: word {j} is {word!r} ({type(word).__name__}); a sentence is a list of "
                               f"words as strings")
        if not word.strip():
            raise TextuneError(f"{what} {where}: word {j} is empty; every word needs a character (remove the empty "
                               f"word and its tag)")
    out = []
    for j, tag in enumerate(tags, start=1):
        if isinstance(tag, int) and not isinstance(tag, bool):
            if label_names is None:
                raise TextuneError(f"{what} {where}: tags are integers; name them with data.label_names "
                                   f"(e.g. [O, B-PER, I-PER, ...] in id order)")
            if not 0 <= tag < len(label_names):
                raise TextuneError(f"{what} {where}: tag id {tag} has no name in data.label_names "
                                   f"({len(label_names)} names)")
            tag = label_names[tag]
        elif not isinstance(tag, str) or len(tag.split()) != 1:
            raise TextuneError(f"{what} {where}: tag {j} is {tag!r}; a tag is one BIO/IOB2 word (O, B-TYPE, I-TYPE) or "
                               f"an integer id named by data.label_names")
        out.append(str(tag))
    return list(words), out


def read_tagged_table(path: str | Path, what: str, tokens_column: str, tags_column: str,
                      label_names: list[str] | None) -> Sentences:
    """Sentences of a .jsonl/.json/.parquet file with a list of words and a list of tags per row.

    Raises:
        TextuneError: a missing column, a cell that is not a list, lists of different lengths, an empty
            sentence, integer tags without data.label_names (naming the row).
    """
    table = read_table(path, what)
    for key, column in (("data.tokens_column", tokens_column), ("data.tags_column", tags_column)):
        if column not in table.column_names:
            raise TextuneError(f"{what} {path} has no column {column!r} ({key}); its columns are "
                               f"{', '.join(map(repr, table.column_names))}. A token-classification file holds a "
                               f"list of words and a list of tags per row, or is a CoNLL file (.conll)")
    out = Sentences([], [], [])
    for i, (words, tags) in enumerate(zip(table[tokens_column], table[tags_column]), start=1):
        where = f"{path} row {i}"
        if not isinstance(words, list) or not isinstance(tags, list):
            raise TextuneError(f"{what} {where}: {tokens_column!r} and {tags_column!r} must hold lists (a list of "
                               f"words and one tag per word), got {type(words).__name__} and {type(tags).__name__}; "
                               f"a file of sentences with one label each is for task: classification")
        if not words:
            raise TextuneError(f"{what} {where}: the sentence is empty; remove the row")
        if len(words) != len(tags):
            raise TextuneError(f"{what} {where}: {len(words)} tokens but {len(tags)} tags; give one tag per token")
        words, tags = checked_row(words, tags, where, what, label_names)
        out.tokens.append(words)
        out.tags.append(tags)
        out.where.append(where)
    return out


def is_conll(path: str | None, fmt: str) -> bool:
    return fmt == "conll" or (fmt == "auto" and str(path or "").lower().endswith(CONLL_EXTENSIONS))


def read_sentences(path: str, what: str, fmt: str = "auto", tokens_column: str = "tokens", tags_column: str = "tags",
                   label_names: list[str] | None = None) -> Sentences:
    """One file of tagged sentences, CoNLL or table, by `fmt` (`data.format`; auto: by extension)."""
    if is_conll(path, fmt):
        return read_conll(path, what)
    if not str(path).lower().endswith(TABLE_EXTENSIONS):
        raise TextuneError(f"{what} {path}: a token-classification run reads CoNLL files (.conll, .bio) or "
                           f"tables with list columns (.jsonl, .json, .parquet), not {Path(path).suffix or 'this file'}; "
                           f"a CSV/TSV of sentences with one label each is for task: classification")
    return read_tagged_table(path, what, tokens_column, tags_column, label_names)


def check_tag(tag: str) -> bool:
    """BIO / IOB2: `O`, or `B-TYPE` / `I-TYPE` (one word)."""
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2 and len(tag.split()) == 1)


def tag_names(train: Sentences, label_names: list[str] | None) -> list[str]:
    """The tag list in id order: data.label_names, or `O` then the training tags sorted by type, B before I.

    Raises:
        TextuneError: a tag outside BIO/IOB2, or only `O` in training (nothing to learn).
    """
    seen = Counter(t for tags in train.tags for t in tags)
    bad = sorted(t for t in seen if not check_tag(t))
    if bad:
        i, j = next((i, j) for i, tags in enumerate(train.tags) for j, t in enumerate(tags) if not check_tag(t))
        raise TextuneError(f"data.train: tags {bad[:5]} are not BIO/IOB2 tags (O, B-TYPE, I-TYPE); the first, "
                           f"{train.tags[i][j]!r}, is at {train.word_where(i, j)}; convert the file's tags to that "
                           f"scheme")
    if label_names is not None:
        extra = sorted(set(seen) - set(label_names))
        if extra:
            i, j = next((i, j) for i, tags in enumerate(train.tags) for j, t in enumerate(tags) if t not in label_names)
            raise TextuneError(f"data.train: tags {extra[:5]} are not in data.label_names {label_names} (the first at "
                               f"{train.word_where(i, j)})")
        return list(label_names)
    if set(seen) <= {"O"}:
        raise TextuneError("data.train: every tag is O; a token classifier needs tagged entities (B-TYPE/I-TYPE) "
                           "to learn from")
    # B- and I- of every type, even where training has only one of them: a prediction may need either.
    types = sorted({t[2:] for t in seen if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_known_tags(split: Sentences, what: str, names: list[str]) -> None:
    known = set(names)
    for i, tags in enumerate(split.tags):
        unknown = [j for j, t in enumerate(tags) if t not in known]
        if unknown:
            raise TextuneError(f"{what} {split.word_where(i, unknown[0])}: tag {tags[unknown[0]]!r} never occurs in "
                               f"training (training tags: {', '.join(names)}); fix the tag or add examples of it to "
                               f"data.train")


def orphan_positions(tags: list[str]) -> list[int]:
    """Positions of I-TYPE tags that do not continue a B-TYPE/I-TYPE of the same type (IOB1 files, or broken
    spans)."""
    out, previous = [], "O"
    for j, tag in enumerate(tags):
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            out.append(j)
        previous = tag
    return out


def orphan_inside_tags(tags: list[str]) -> int:
    """How many I-TYPE tags do not continue a B-TYPE/I-TYPE of the same type."""
    return len(orphan_positions(tags))


@dataclass
class TaggedDataReport(DataReport):
    """A DataReport whose label balance counts entities per type, with sentence-length lines beside it."""

    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join([super().format().replace("labels     ", "entities   "), *self.notes])


# ---------------------------------------------------------------- 2. tokenising


def word_tokenizer(tokenizer):
    """The tokenizer as token classification needs it (a copy where it differs; training saves it with the model
    and the predictor applies it again to any folder):
    - padding and truncation on the right: labels and predictions are read by position from the start of each
      row; a tokenizer that pads on the left (Llama, Mistral, Gemma by default) would shift the shorter rows.
    - byte-level BPE (GPT-2, RoBERTa, BART, DeBERTa v1, Longformer) with a space before every word, as run_ner.py
      loads them (`add_prefix_space=True`): a word given alone is then encoded as it is inside a text
      ("ĠParis", not "Paris"), so the words of a CoNLL file and of raw text get the same sub-tokens. Without it
      transformers 5 encodes each word as if it began the text, a tokenization the model never saw."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    needs_space = isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space
    if tokenizer.padding_side == "right" and tokenizer.truncation_side == "right" and not needs_space:
        return tokenizer
    out = copy.deepcopy(tokenizer)
    out.padding_side = out.truncation_side = "right"
    out.init_kwargs.update(padding_side="right", truncation_side="right")  # what save_pretrained writes
    if needs_space:
        out.backend_tokenizer.pre_tokenizer.add_prefix_space = True
        post = out.backend_tokenizer.post_processor
        if hasattr(post, "add_prefix_space"):  # RoBERTa's: offsets then skip the added space
            post.add_prefix_space = True
        out.add_prefix_space = out.init_kwargs["add_prefix_space"] = True
    return out


def align_labels(word_ids: list[int | None], word_tags: list[int], label_all_tokens: bool,
                 b_to_i: list[int]) -> list[int]:
    """Labels of one tokenised sentence: the first sub-token of each word carries the word's tag id, the
    others -100 (or, with `label_all_tokens`, the tag with B- turned into I-); special tokens -100."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(word_tags[word])
        else:
            labels.append(b_to_i[word_tags[word]] if label_all_tokens else -100)
        previous = word
    return labels


def tokenize_sentences(split: Sentences, tokenizer, names: list[str], max_length: int,
                       label_all_tokens: bool) -> Dataset:
    """input_ids, attention_mask, labels and `length` (sub-tokens before truncation) per sentence, and
    `words_cut`, the words that truncation removed. Evaluation splits are given `label_all_tokens=False`:
    metrics are per word (its first sub-token), whatever the training labels."""
    tag_id = {n: i for i, n in enumerate(names)}
    b_to_i = [tag_id.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        full = tokenizer(batch["tokens"], is_split_into_words=True, truncation=False, verbose=False)
        labels, cut = [], []
        for i, tags in enumerate(batch["tags"]):
            word_ids = enc.word_ids(i)
            labels.append(align_labels(word_ids, [tag_id[t] for t in tags], label_all_tokens, b_to_i))
            kept = {w for w in word_ids if w is not None}
            cut.append(len({w for w in full.word_ids(i) if w is not None} - kept))
        return {**enc, "labels": labels, "length": [len(ids) for ids in full["input_ids"]], "words_cut": cut}

    ds = Dataset.from_dict({"tokens": split.tokens, "tags": split.tags})
    return ds.map(encode, batched=True, remove_columns=["tokens", "tags"])


# ---------------------------------------------------------------- 4. metrics


def entity_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """seqeval's entity-level precision/recall/F1 (micro, and per type) and token accuracy."""
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0, "support": 0})
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])}
                for k, v in report.items() if k not in ("micro avg", "macro avg", "weighted avg")}
    return {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "accuracy": float(accuracy_score(gold, pred)) if gold else 0.0,
            "per_type": per_type, "entities": int(micro["support"]), "examples": len(gold)}


# ---------------------------------------------------------------- 5. prediction


def group_entities(words: list[tuple[str, float, int, int]]) -> list[dict]:
    """Entities from tagged words (tag, score, start, end) in order, as the token-classification pipeline
    groups them: a word continues the entity before it when it has the same type and is not tagged B-;
    `O` ends an entity. Score: the mean of the words' scores; offsets: first word's start, last word's end."""
    entities: list[dict] = []
    scores: list[float] = []
    previous_type = None
    for tag, score, start, end in words:
        if tag == "O":
            previous_type = None
            continue
        prefix, etype = (tag[0], tag[2:]) if tag[:2] in ("B-", "I-") else ("I", tag)
        if previous_type == etype and prefix != "B":
            entities[-1]["end"] = end
            scores.append(score)
        else:
            if entities:
                entities[-1]["score"] = float(np.mean(scores))
            entities.append({"entity": etype, "start": start, "end": end})
            scores = [score]
        previous_type = etype
    if entities:
        entities[-1]["score"] = float(np.mean(scores))
    return entities


def words_of_windows(windows: list[tuple[list, list, np.ndarray]], step: int) -> dict[int, tuple[np.ndarray, int, int]]:
    """word -> (tag probabilities, start, end) of one input from its windows in order, each (word ids, offsets,
    probabilities per sub-token). Window k's sub-token j (counting words' sub-tokens only) is sub-token
    `k * step + j` of the whole input: the tokenizer's windows move by `step`, room minus stride. A word takes
    the tag of its first sub-token, read in the window where that sub-token has the most context on the sides
    a window cuts; start: its first sub-token's, end: its last sub-token's."""
    best: dict[int, tuple] = {}  # word -> (index in the input, -context, window, position)
    ends: dict[int, int] = {}
    for k, (word_ids, offsets, _) in enumerate(windows):
        content = [t for t, w in enumerate(word_ids) if w is not None]
        for j, t in enumerate(content):
            left = j if k > 0 else len(content)
            right = len(content) - 1 - j if k < len(windows) - 1 else len(content)
            key = (k * step + j, -min(left, right), k, t)
            word = word_ids[t]
            best[word] = min(best.get(word, key), key)
            ends[word] = max(ends.get(word, 0), offsets[t][1])
    return {word: (windows[k][2][t], windows[k][1][t][0], ends[word]) for word, (_, _, k, t) in best.items()}


class TokenClassifierPredictor(ModelPredictor):
    """A loaded token classifier. `predict(["Empire State Building"])` ->
    `[{"entities": [{"entity": "facility", "text": ..., "start": 0, "end": 21, "score": ...}]}]`; given word
    lists instead of strings, `[{"tags": [...]}]`, one tag per word. Inputs longer than max_length sub-tokens
    are read in windows overlapping by a quarter (`words_of_windows` merges them), so no word goes unread."""

    task = "token-classification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._configure()

    @classmethod
    def around(cls, model, tokenizer, batch_size: int = 64, max_length: int | None = None, device=None, folder=None):
        self = super().around(model, tokenizer, batch_size, max_length, device, folder)
        self._configure()
        return self

    def _configure(self) -> None:
        """Refuse a model of another task or a slow tokenizer; set the tokenizer up as training did."""
        self.refuse_another_task()
        if not getattr(self.tokenizer, "is_fast", False):
            raise TextuneError("token classification needs a fast tokenizer (word ids and character offsets); this "
                               "model's tokenizer is a slow one")
        self.tokenizer = word_tokenizer(self.tokenizer)
        room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        self.stride = max(0, room // 4)
        self.step = room - self.stride

    @torch.inference_mode()
    def window_probabilities(self, inputs: list, split_into_words: bool):
        """The tokenizer's windows of the inputs (max_length sub-tokens, overlapping by `stride`) and the softmax
        over tags of every sub-token of each window."""
        enc = self.tokenizer(inputs, is_split_into_words=split_into_words, truncation=True, max_length=self.max_length,
                             stride=self.stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        probs: list = [None] * len(enc["input_ids"])
        keys = [k for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx], return_tensors="pt")
            p = torch.softmax(self.model(**batch.to(self.device)).logits.float(), dim=-1).cpu().numpy()
            for row, i in enumerate(idx):
                probs[i] = p[row, :len(enc["input_ids"][i])]
        return enc, probs

    def predict(self, inputs: list, text_pairs=None) -> list[dict]:
        if not inputs:
            return []
        split = isinstance(inputs[0], list)
        enc, probs = self.window_probabilities(inputs, split)
        windows: list[list] = [[] for _ in inputs]
        for w, i in enumerate(enc["overflow_to_sample_mapping"]):
            windows[i].append((enc.word_ids(w), enc["offset_mapping"][w], probs[w]))
        out = []
        for i, text in enumerate(inputs):
            words = {}  # word -> (tag, score, start, end)
            for word, (p, start, end) in words_of_windows(windows[i], self.step).items():
                best = int(p.argmax())
                if not split:  # byte-level BPE offsets may hold the space before a word (GPT-2's do)
                    start += len(text[start:end]) - len(text[start:end].lstrip())
                words[word] = (self.label_names[best], float(p[best]), start, end)
            if split:
                out.append({"tags": [words[w][0] if w in words else "O" for w in range(len(text))]})
                continue
            entities = group_entities([words[w] for w in sorted(words)])
            for e in entities:
                e["text"] = text[e["start"]:e["end"]]
                e["score"] = round(e["score"], 6)
            out.append({"entities": [{k: e[k] for k in ("entity", "text", "start", "end", "score")}
                                     for e in entities]})
        return out


# ---------------------------------------------------------------- a training run's inputs


@dataclass
class TokenClassificationInputs(TaskInputs):
    model_path: str
    tokenizer: object
    splits: dict  # split name -> Sentences
    names: list[str]
    tokenized: dict
    stats: dict
    model: torch.nn.Module
    report: DataReport

    def summary(self, cfg) -> str:
        s = self.stats["train"]
        sizes = " | ".join(f"{k} {len(v.tokens):,}" for k, v in self.splits.items())
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__})",
                 f"data       sentences: {sizes} | {len(self.names)} tags"]
        lines += [f"warning    {f.message}" for f in self.report.findings] + self.report.notes
        lines.append(f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | truncated at "
                     f"{cfg.model.max_length}: {s['truncated_share']:.1%} of sentences, "
                     f"{self.stats['words_cut']['train']:,} words")
        return "\n".join(lines)

    def data_stats(self, cfg) -> dict:
        return {"sizes": {k: len(v.tokens) for k, v in self.splits.items()}, "label_names": self.names,
                "entity_counts": self.report.label_balance, "token_lengths": {k: v for k, v in self.stats.items()
                                                                              if k != "words_cut"},
                "words_cut": self.stats["words_cut"],
                "checks": [{"kind": f.kind, "count": f.count, "message": f.message} for f in self.report.findings],
                "max_length": cfg.model.max_length}

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        return DataCollatorForTokenClassification(self.tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    @torch.inference_mode()
    def evaluate(self, model, loader, accelerator=None):
        """(metrics, (gold tags, predicted tags) per sentence) over the scored words of a labelled loader.
        The loss is the mean cross-entropy per scored sub-token, summed and counted over all processes."""
        model.eval()
        gold: list[list[str]] = []
        pred: list[list[str]] = []
        loss_sum = tokens = 0.0
        for batch in loader:
            logits = model(**batch).logits.float()
            labels = batch["labels"]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none",
                                                       ignore_index=-100)
            row_loss, row_tokens = losses.sum(1), (labels != -100).sum(1)
            predicted = logits.argmax(-1)
            if accelerator is not None:  # pad to one length across processes, then drop even-sharding padding
                predicted = accelerator.pad_across_processes(predicted, dim=1, pad_index=-100)
                labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
                predicted, labels, row_loss, row_tokens = accelerator.gather_for_metrics(
                    (predicted, labels, row_loss, row_tokens))
            loss_sum += float(row_loss.sum())
            tokens += float(row_tokens.sum())
            for p_row, l_row in zip(predicted.cpu().tolist(), labels.cpu().tolist()):
                kept = [(p, y) for p, y in zip(p_row, l_row) if y != -100]
                gold.append([self.names[y] for _, y in kept])
                pred.append([self.names[p] for p, _ in kept])
        model.train()
        metrics = entity_metrics(gold, pred)
        metrics["loss"] = loss_sum / tokens if tokens else float("nan")
        return metrics, (gold, pred)

    def write_predictions(self, predictions, path: Path) -> None:
        """Words, gold tags and predicted tags of every validation sentence (words cut by truncation left out)."""
        gold, pred = predictions
        with path.open("w", encoding="utf-8") as f:
            for words, g, p in zip(self.splits["validation"].tokens, gold, pred):
                f.write(json.dumps({"tokens": words[:len(g)], "tags": g, "pred": p}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the task


class TokenClassification(Task):
    name = "token-classification"
    serve_paths = ("/v1/entities",)
    serve_adapters = True

    def router(self, ctx):
        return entities_router(ctx)

    def serve_description(self, predictor) -> str:
        return "a token classifier (named-entity recognition)"
    predictor_class = TokenClassifierPredictor
    playground = PlaygroundSpec((("text", "text", False),), "spans")

    def read_splits(self, cfg) -> tuple[dict, list[str]]:
        """The configured files as sentences, tags checked: (split name -> Sentences, tag names)."""
        d = cfg.data
        unsupported = {"data.name (token classification reads local files; set data.train)": d.name is not None
                       and d.train is None, "data.streaming": d.streaming,
                       "data.augment": bool(d.augment.methods) or d.augment.mixup_alpha > 0,
                       "data.text_pair_column": d.text_pair_column is not None}
        for key, used in unsupported.items():
            if used:
                raise TextuneError(f"{key}: not supported for task: token-classification; remove it")
        read = lambda path, what: read_sentences(path, what, d.format, d.tokens_column, d.tags_column,  # noqa: E731
                                                 d.label_names)
        train = read(d.train, "data.train")
        names = tag_names(train, d.label_names)
        rng = np.random.default_rng(cfg.seed)
        if d.validation:
            splits = {"train": train, "validation": read(d.validation, "data.validation")}
        else:  # a seeded random split by sentence
            if len(train.tokens) < 4:
                raise TextuneError(f"data.train has {len(train.tokens)} sentences: too few to hold out a validation "
                                   f"split; give data.validation a file")
            order = rng.permutation(len(train.tokens))
            n_val = max(1, round(d.validation_split * len(order)))
            splits = {"train": train.subset(order[n_val:]), "validation": train.subset(order[:n_val])}
        if d.test:
            splits["test"] = read(d.test, "data.test")
        for split in ("validation", "test"):
            if split in splits:
                check_known_tags(splits[split], f"data.{split}", names)
        # seeded samples (not the first N sentences: a file sorted by anything would give a biased slice)
        for split, limit in (("train", d.max_train_samples), ("validation", d.max_eval_samples)):
            if limit and limit < len(splits[split].tokens):
                splits[split] = splits[split].subset(sorted(rng.choice(len(splits[split].tokens), limit, replace=False)))
        return splits, names

    def data_report(self, splits: dict, words_cut: dict | None = None) -> DataReport:
        """Entity counts per type, sentence lengths, I- tags without their B-, leakage, words cut."""
        balance = {k: dict(sorted(Counter(e[0] for tags in s.tags for e in get_entities(tags)).items()))
                   for k, s in splits.items()}
        findings, notes = [], []
        for split, s in splits.items():
            orphans = sum(orphan_inside_tags(tags) for tags in s.tags)
            if orphans:
                i, j = next((i, orphan_positions(tags)[0]) for i, tags in enumerate(s.tags) if orphan_positions(tags))
                first = s.word_where(i, j)
                findings.append(Finding("scheme", orphans, f"{split}: {orphans} I- tags do not continue a B- or I- of "
                                                           f"their type (first at {first}); IOB1 files need converting "
                                                           f"to IOB2, where every entity starts with B-"))
            lengths = [len(t) for t in s.tokens]
            notes.append(f"words      {split}: mean {np.mean(lengths):.1f} per sentence, p95 "
                         f"{int(np.percentile(lengths, 95))}, max {max(lengths)}")
            if words_cut and words_cut.get(split):
                total = sum(lengths)
                findings.append(Finding("truncation", words_cut[split], f"{split}: {words_cut[split]:,} of "
                                        f"{total:,} words ({words_cut[split] / total:.2%}) are cut by "
                                        f"model.max_length and not scored; raise model.max_length"))
        train_keys = {" ".join(t).lower() for t in splits["train"].tokens}
        for split in ("validation", "test"):
            if split in splits:
                leaked = [" ".join(t) for t in splits[split].tokens if " ".join(t).lower() in train_keys]
                if leaked:
                    findings.append(Finding("leakage", len(leaked), f"{split}: {len(leaked)} sentences also occur in "
                                            f"train", examples=leaked[:3], strict_error=True))
        return TaggedDataReport({k: len(s.tokens) for k, s in splits.items()}, balance, findings, notes)

    def _tokenizer(self, cfg, model_path: str):
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        if not getattr(tokenizer, "is_fast", False):
            raise TextuneError(f"model.name: {model_path} has no fast tokenizer, which token classification needs "
                               f"(word ids of sub-tokens)")
        return word_tokenizer(tokenizer)

    def check_data(self, cfg) -> DataReport:
        splits, names = self.read_splits(cfg)
        tokenizer = self._tokenizer(cfg, resolve_model(cfg.model.name))
        cut = {k: int(sum(tokenize_sentences(s, tokenizer, names, cfg.model.max_length, False)["words_cut"]))
               for k, s in splits.items()}
        return self.data_report(splits, cut)

    def load_inputs(self, cfg) -> TokenClassificationInputs:
        from textune.data_checks import enforce

        splits, names = self.read_splits(cfg)
        model_path = resolve_model(cfg.model.name)
        tokenizer = self._tokenizer(cfg, model_path)
        # Only training takes data.label_all_tokens: evaluation always scores words by their first sub-token.
        tokenized = {k: tokenize_sentences(s, tokenizer, names, cfg.model.max_length,
                                           cfg.data.label_all_tokens and k == "train")
                     for k, s in splits.items()}
        words_cut = {k: int(sum(ds["words_cut"])) for k, ds in tokenized.items()}
        tokenized = {k: ds.remove_columns("words_cut") for k, ds in tokenized.items()}
        stats = {k: length_stats(ds["length"], cfg.model.max_length) for k, ds in tokenized.items()}
        stats["words_cut"] = words_cut
        report = self.data_report(splits, words_cut)
        enforce(report, cfg.data.strict)
        model = load_classifier(model_path, names, cfg.model.trust_remote_code, auto_class=AutoModelForTokenClassification)
        model = apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)
        return TokenClassificationInputs(model_path, tokenizer, splits, names, tokenized, stats, model, report)

    # ------------------------------------------------------------ saved runs

    def read_inputs(self, source: str, columns: dict, predictor):
        """Raw texts (stdin, .txt, or a table's text column) -> entities; tagged files (CoNLL, or a table with a
        tokens column) -> a tag per word."""
        from textune.infer import read_inputs, text_echo

        tokens_column = columns.get("tokens_column") or "tokens"
        if is_conll(source, columns.get("format") or "auto"):
            words = read_conll(source, "input").tokens
            return (words,), [{"tokens": w} for w in words]
        if source != "-" and not source.endswith(".txt"):
            table = read_table(source, "input")
            if tokens_column in table.column_names:
                rows = table[tokens_column]
                bad = next((i for i, row in enumerate(rows, start=1) if not isinstance(row, list)), None)
                if bad is not None:
                    raise TextuneError(f"input {source} row {bad}: {tokens_column!r} must hold a list of words, got "
                                       f"{rows[bad - 1]!r}; give raw text in a 'text' column instead")
                words = [[str(w) for w in row] for row in rows]
                return (words,), [{"tokens": w} for w in words]
        texts, _ = read_inputs(source, columns.get("text_column") or "text", keep_blank_lines=True)
        return (texts,), text_echo(texts, source)  # a blank line: an empty output row (infer.BlankLine)

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Entity metrics of `predictor` on a tagged file (long sentences are read in windows, every word scored)."""
        gold = read_sentences(path, "--data", columns.get("format") or "auto", columns.get("tokens_column") or "tokens",
                              columns.get("tags_column") or "tags", columns.get("label_names"))
        check_known_tags(gold, "--data", predictor.label_names)
        predicted = [row["tags"] for row in predictor.predict(gold.tokens)]
        return entity_metrics(gold.tags, predicted)

    def format_metrics(self, metrics: dict) -> str:
        rows = [f"{'type':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for name, r in sorted(metrics["per_type"].items(), key=lambda item: item[1]["f1"]):
            rows.append(f"{name:<16}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['support']:>9}")
        rows.append(f"{'all (micro)':<16}{metrics['precision']:>10.4f}{metrics['recall']:>10.4f}{metrics['f1']:>10.4f}"
                    f"{metrics['entities']:>9}")
        return "\n".join(rows)

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        from textune import report_html as report

        v = (metrics or {}).get("validation") or {}
        cards = [("entity F1", report.fmt(v.get("f1"))), ("precision", report.fmt(v.get("precision"))),
                 ("recall", report.fmt(v.get("recall"))), ("token accuracy", report.fmt(v.get("accuracy"))),
                 ("validation loss", report.fmt(v.get("loss")))]
        rows = report.read_predictions(run / "validation_predictions.jsonl")
        out = ['<section id="metrics"><h2>Entities: validation metrics per type</h2>']
        if v.get("per_type"):
            out.append('<table><tr><th class="l">type</th><th>precision</th><th>recall</th><th>F1</th>'
                       "<th>support</th></tr>")
            for name, r in sorted(v["per_type"].items(), key=lambda item: item[1]["f1"]):
                out.append(f'<tr><td class="l">{report.esc(name)}</td><td>{r["precision"]:.3f}</td>'
                           f'<td>{r["recall"]:.3f}</td><td>{r["f1"]:.3f}</td><td>{r["support"]:,}</td></tr>')
            out.append(f'<tr><td class="l"><b>all (micro)</b></td><td>{v["precision"]:.3f}</td>'
                       f'<td>{v["recall"]:.3f}</td><td><b>{v["f1"]:.3f}</b></td><td>{v.get("entities", 0):,}</td></tr>'
                       "</table>")
        else:
            out.append(report.missing_html("metrics", "metrics.json is missing (the run has not finished)"))
        out.append("</section>")
        out.append(entity_balance_html((stats or {}).get("entity_counts") or {}))
        out.append(confusions_html(rows) + worst_sentences_html(rows))
        return cards, "".join(out)


def entity_balance_html(counts: dict[str, dict[str, int]]) -> str:
    """Entities per type in each split (data_stats.json's entity_counts), with each type's share."""
    from textune import report_html as report

    out = ['<section id="entity-balance"><h2>Label balance: entities per type</h2>']
    if not counts:
        return "".join(out) + report.missing_html("entity counts", "data_stats.json has no entity_counts") + "</section>"
    out.append('<table><tr><th class="l">split</th><th class="l">type</th><th>entities</th><th>share</th>'
               '<th class="l"></th></tr>')
    for split, types in counts.items():
        total = sum(types.values()) or 1
        for i, (name, n) in enumerate(sorted(types.items(), key=lambda item: -item[1])):
            out.append(f'<tr><td class="l">{report.esc(split) if i == 0 else ""}</td><td class="l">{report.esc(name)}'
                       f'</td><td>{n:,}</td><td>{n / total:.1%}</td><td class="l"><div class="bar"><span style="width:'
                       f'{100 * n / total:.1f}%"></span></div></td></tr>')
    out.append("</table></section>")
    return "".join(out)


def span_confusions(gold: list[str], pred: list[str]) -> Counter:
    """(gold type, predicted type) for each gold entity: the type of a predicted entity with the same span,
    or "(missed)"; spurious predicted entities count as ("(none)", type)."""
    g = {(s, e): t for t, s, e in get_entities(gold)}
    p = {(s, e): t for t, s, e in get_entities(pred)}
    out = Counter((t, p.get(span, "(missed)")) for span, t in g.items())
    out.update(("(none)", t) for span, t in p.items() if span not in g)
    return out


def confusions_html(rows: list[dict]) -> str:
    from textune import report_html as report

    out = ['<section id="confusions"><h2>Which types are confused with which</h2>']
    if not rows:
        return "".join(out) + report.missing_html("confusions", "validation_predictions.jsonl is missing") + "</section>"
    counts = Counter()
    for r in rows:
        counts.update(span_confusions(r["tags"], r["pred"]))
    wrong = [(k, n) for k, n in counts.most_common() if k[0] != k[1]]
    out.append('<p class="muted">Gold entities by the type predicted for exactly the same span; "(missed)": no '
               'entity predicted there (or one with other boundaries), "(none)": a predicted entity with no gold '
               "entity of that span.</p>")
    out.append('<table><tr><th class="l">gold</th><th class="l">predicted</th><th>count</th></tr>')
    for (g, p), n in wrong[:20]:
        out.append(f'<tr><td class="l">{report.esc(g)}</td><td class="l">{report.esc(p)}</td><td>{n:,}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


def marked_html(words: list[str], tags: list[str]) -> str:
    """The sentence with each entity in a <mark> labelled with its type."""
    out, i = [], 0
    spans = {s: (e, t) for t, s, e in get_entities(tags)}
    while i < len(words):
        if i in spans:
            end, etype = spans[i]
            text = html.escape(" ".join(words[i:end + 1]))
            out.append(f'<mark style="background:#ddf4ff">{text} <sup>{html.escape(etype)}</sup></mark>')
            i = end + 1
        else:
            out.append(html.escape(words[i]))
            i += 1
    return " ".join(out)


def worst_sentences_html(rows: list[dict], shown: int = 12) -> str:
    from textune import report_html as report

    out = ['<section id="errors"><h2>Validation sentences with the most entity errors</h2>']
    if not rows:
        return "".join(out) + report.missing_html("examples", "validation_predictions.jsonl is missing") + "</section>"
    scored = []
    for r in rows:
        errors = sum(n for (g, p), n in span_confusions(r["tags"], r["pred"]).items() if g != p)
        if errors:
            scored.append((errors, r))
    scored.sort(key=lambda item: -item[0])
    out.append(f'<p class="muted">{len(scored):,} of {len(rows):,} sentences have at least one wrong entity.</p>')
    out.append('<table class="wrong"><tr><th class="l">gold</th><th class="l">predicted</th><th>errors</th></tr>')
    for errors, r in scored[:shown]:
        out.append(f'<tr><td class="text">{marked_html(r["tokens"], r["tags"])}</td>'
                   f'<td class="text">{marked_html(r["tokens"], r["pred"])}</td><td>{errors}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


TASK = TokenClassification()


# ------------------------------ export


def token_tags(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The tag of each real token (padding is never read)."""
    return logits[mask].argmax(-1)


TokenClassification.export_spec = ExportSpec(per_token=True, decide=token_tags, decisions="token tags")


# ------------------------------ serving


def entities_models() -> tuple[type, type]:
    """(request, response) of POST /v1/entities; pydantic is imported here, so training never loads it."""
    from pydantic import BaseModel, ConfigDict, Field

    class EntitiesRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, description="texts to find entities in; read whole, however long "
                                                           "(in windows)",
                                 examples=[["Empire State Building in New York"]])
        adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")

    class Entity(BaseModel):
        entity: str = Field(description="entity type (the tag without its B-/I- prefix)")
        text: str = Field(description="the entity as it stands in the input: text[start:end]")
        start: int = Field(description="character offset of the first character")
        end: int = Field(description="character offset after the last character")
        score: float = Field(description="mean probability of the predicted tags of its words")

    class EntitiesResult(BaseModel):
        entities: list[Entity]

    class EntitiesResponse(BaseModel):
        model: str
        adapter: str | None
        results: list[EntitiesResult] = Field(description="one per input text, in the input order")

    return EntitiesRequest, EntitiesResponse


def entities_router(ctx):
    """POST /v1/entities: the entities of each text, micro-batched."""
    request, response = entities_models()
    router = ctx.router()

    async def entities(req) -> dict:
        """The entities of each text: type, text, character offsets and score."""
        # The predictor reads a long text whole, in windows (see words_of_windows), so --max-chars (what a
        # truncating model can read) does not apply: the request body limit bounds texts.
        ctx.check_texts(req.texts, texts_limited=False)
        ctx.check_adapter(req.adapter)
        results = await ctx.batched(req.texts, None, req.adapter)
        return {"model": ctx.model_name, "adapter": req.adapter, "results": results}

    ctx.post(router, "/v1/entities", entities, request, response)
    return router
