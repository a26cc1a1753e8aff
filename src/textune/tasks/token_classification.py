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
   word's tag and the others -100 (ignored by the loss), or, with `data.label_all_tokens`, the word's tag
   too (B- turned into I-). Words cut by truncation are neither trained on nor scored (as in run_ner.py);
   their share is reported at start-up and by validate-data.
3. Model: `AutoModelForTokenClassification` with the tag names as `id2label`, so the saved folder loads in
   `transformers.pipeline("token-classification", aggregation_strategy="simple")`.
4. Metrics: entity-level precision, recall and F1 with seqeval (its default CoNLL evaluation, as run_ner.py:
   an entity counts only with exact span and type), micro over all entities and per type, plus token accuracy
   over the scored words; the headline is `f1`.
5. Prediction. Raw text: each word's tag is its first sub-token's (pipeline aggregation "first"), words are
   grouped into entities by `group_entities` (the pipeline's B/I grouping), with character offsets into the
   input and the mean score of the words. Pre-split words (a CoNLL/JSONL file): one tag per word.
6. Serving: POST /v1/entities. Report: per-type table, type confusions, worst sentences with spans marked.
"""

from __future__ import annotations

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
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from textune.data import length_stats, read_table, read_text_lines
from textune.data_checks import DataReport, Finding
from textune.errors import TextuneError
from textune.infer import ModelPredictor
from textune.models import apply_tuning, load_classifier, load_tokenizer, resolve_model, set_attention
from textune.tasks.base import Task, TaskInputs

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
        if len(columns) < 2 or not columns[-1] or not columns[0]:
            raise TextuneError(f"{what} {path} line {n}: {line.strip()!r} has no tag; a CoNLL line is "
                               f"`token<TAB>tag` (blank lines separate sentences)")
        if not words:
            start = n
        words.append(columns[0])
        tags.append(columns[-1])
    if not out.tokens:
        raise TextuneError(f"{what} {path} holds no sentence (one `token<TAB>tag` per line expected)")
    return out


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
        if any(isinstance(t, int) for t in tags):
            if label_names is None:
                raise TextuneError(f"{what} {where}: tags are integers; name them with data.label_names "
                                   f"(e.g. [O, B-PER, I-PER, ...] in id order)")
            bad = [t for t in tags if not 0 <= t < len(label_names)]
            if bad:
                raise TextuneError(f"{what} {where}: tag id {bad[0]} has no name in data.label_names "
                                   f"({len(label_names)} names)")
            tags = [label_names[t] for t in tags]
        out.tokens.append([str(w) for w in words])
        out.tags.append([str(t) for t in tags])
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
    """BIO / IOB2: `O`, or `B-TYPE` / `I-TYPE`."""
    return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)


def tag_names(train: Sentences, label_names: list[str] | None) -> list[str]:
    """The tag list in id order: data.label_names, or `O` then the training tags sorted by type, B before I.

    Raises:
        TextuneError: a tag outside BIO/IOB2, or only `O` in training (nothing to learn).
    """
    seen = Counter(t for tags in train.tags for t in tags)
    bad = sorted(t for t in seen if not check_tag(t))
    if bad:
        raise TextuneError(f"data.train: tags {bad[:5]} are not BIO/IOB2 tags (O, B-TYPE, I-TYPE); convert the "
                           f"file's tags to that scheme")
    if label_names is not None:
        extra = sorted(set(seen) - set(label_names))
        if extra:
            raise TextuneError(f"data.train: tags {extra[:5]} are not in data.label_names {label_names}")
        return list(label_names)
    if set(seen) <= {"O"}:
        raise TextuneError("data.train: every tag is O; a token classifier needs tagged entities (B-TYPE/I-TYPE) "
                           "to learn from")
    # B- and I- of every type, even where training has only one of them: a prediction may need either.
    types = sorted({t[2:] for t in seen if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_known_tags(split: Sentences, what: str, names: list[str]) -> None:
    known = set(names)
    for tags, where in zip(split.tags, split.where):
        unknown = [t for t in tags if t not in known]
        if unknown:
            raise TextuneError(f"{what} {where}: tag {unknown[0]!r} never occurs in training (training tags: "
                               f"{', '.join(names)}); fix the tag or add examples of it to data.train")


def orphan_inside_tags(tags: list[str]) -> int:
    """I-TYPE tags that do not continue a B-TYPE/I-TYPE of the same type (IOB1 files, or broken spans)."""
    count, previous = 0, "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            count += 1
        previous = tag
    return count


@dataclass
class TaggedDataReport(DataReport):
    """A DataReport whose label balance counts entities per type, with sentence-length lines beside it."""

    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        return "\n".join([super().format().replace("labels     ", "entities   "), *self.notes])


# ---------------------------------------------------------------- 2. tokenising


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
    `words_cut`, the words that truncation removed."""
    tag_id = {n: i for i, n in enumerate(names)}
    b_to_i = [tag_id.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]

    def encode(batch: dict) -> dict:
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        full = tokenizer(batch["tokens"], is_split_into_words=True, truncation=False, verbose=False)
        labels, cut = [], []
        for i, tags in enumerate(batch["tags"]):
            word_ids = enc.word_ids(i)
            labels.append(align_labels(word_ids, [tag_id[t] for t in tags], label_all_tokens, b_to_i))
            kept = len({w for w in word_ids if w is not None})
            cut.append(len(tags) - kept)
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


class TokenClassifierPredictor(ModelPredictor):
    """A loaded token classifier. `predict(["Empire State Building"])` ->
    `[{"entities": [{"entity": "facility", "text": ..., "start": 0, "end": 21, "score": ...}]}]`; given word
    lists instead of strings, `[{"tags": [...]}]`, one tag per word (words cut by truncation get `O`)."""

    task = "token-classification"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_fast()

    def _check_fast(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise TextuneError("token classification needs a fast tokenizer (word ids and character offsets); this "
                               "model's tokenizer is a slow one")

    @torch.inference_mode()
    def word_probabilities(self, inputs: list, split_into_words: bool):
        """Per input: the tokenizer's encoding and the softmax over tags of every sub-token."""
        enc = self.tokenizer(inputs, is_split_into_words=split_into_words, truncation=True,
                             max_length=self.max_length, return_offsets_mapping=True)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        probs: list = [None] * len(inputs)
        keys = [k for k in enc.keys() if k != "offset_mapping"]
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
        enc, probs = self.word_probabilities(inputs, split)
        out = []
        for i, p in enumerate(probs):
            words: dict[int, list] = {}  # word -> [tag, score, start, end], from its first sub-token
            for t, word in enumerate(enc.word_ids(i)):
                if word is None:
                    continue
                start, end = enc["offset_mapping"][i][t]
                if word not in words:
                    best = int(p[t].argmax())
                    words[word] = [self.label_names[best], float(p[t, best]), start, end]
                else:
                    words[word][3] = end
            if split:
                out.append({"tags": [words[w][0] if w in words else "O" for w in range(len(inputs[i]))]})
                continue
            entities = group_entities([tuple(words[w]) for w in sorted(words)])
            for e in entities:
                e["text"] = inputs[i][e["start"]:e["end"]]
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
    serve_endpoint = "entities"
    serve_description = "Named-entity recognition"
    predictor_class = TokenClassifierPredictor

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
                first = next(w for tags, w in zip(s.tags, s.where) if orphan_inside_tags(tags))
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

    def check_data(self, cfg) -> DataReport:
        splits, names = self.read_splits(cfg)
        tokenizer = load_tokenizer(resolve_model(cfg.model.name), cfg.model.trust_remote_code)
        cut = {k: int(sum(tokenize_sentences(s, tokenizer, names, cfg.model.max_length, False)["words_cut"]))
               for k, s in splits.items()}
        return self.data_report(splits, cut)

    def load_inputs(self, cfg) -> TokenClassificationInputs:
        from textune.data_checks import enforce

        splits, names = self.read_splits(cfg)
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        if not getattr(tokenizer, "is_fast", False):
            raise TextuneError(f"model.name: {model_path} has no fast tokenizer, which token classification needs "
                               f"(word ids of sub-tokens)")
        tokenized = {k: tokenize_sentences(s, tokenizer, names, cfg.model.max_length, cfg.data.label_all_tokens)
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
        from textune.infer import read_inputs

        tokens_column = columns.get("tokens_column") or "tokens"
        if is_conll(source, columns.get("format") or "auto"):
            words = read_conll(source, "input").tokens
            return (words,), [{"tokens": w} for w in words]
        if source != "-" and not source.endswith(".txt"):
            table = read_table(source, "input")
            if tokens_column in table.column_names:
                words = [[str(w) for w in row] for row in table[tokens_column]]
                return (words,), [{"tokens": w} for w in words]
        texts, _ = read_inputs(source, columns.get("text_column") or "text")
        return (texts,), [{"text": t} for t in texts]

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Entity metrics of `predictor` on a tagged file (words cut by truncation count as predicted O)."""
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
        from textune import report

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
        out.append(confusions_html(rows) + worst_sentences_html(rows))
        return cards, "".join(out)


def span_confusions(gold: list[str], pred: list[str]) -> Counter:
    """(gold type, predicted type) for each gold entity: the type of a predicted entity with the same span,
    or "(missed)"; spurious predicted entities count as ("(none)", type)."""
    g = {(s, e): t for t, s, e in get_entities(gold)}
    p = {(s, e): t for t, s, e in get_entities(pred)}
    out = Counter((t, p.get(span, "(missed)")) for span, t in g.items())
    out.update(("(none)", t) for span, t in p.items() if span not in g)
    return out


def confusions_html(rows: list[dict]) -> str:
    from textune import report

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
    from textune import report

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
