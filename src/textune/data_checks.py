"""Data checks run by `textune validate-data` and at the start of `textune train`.

They catch what silently spoils a fine-tuning result: empty texts, duplicates, the same text in training
and evaluation splits (leakage: the validation score then measures memory, not generalisation), the same
text with different labels (conflicts), and lopsided label balance. Leakage and conflicts are warnings
unless `strict`, when they are errors. (Labels that training never saw are always an error, raised while
loading the data.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from textune.data import TaskData, column_values, label_counts
from textune.errors import TextuneError

# A class under this share of the training rows is flagged: with so few examples a classifier can score
# well overall while never predicting it...
MINORITY_SHARE_WARNING = 0.05
# ... or, with many classes, under this share of its balanced share 1/K (with 25 balanced classes each has
# 4%: under a fixed 5% every one of them would be "rare"). The lower of the two thresholds applies.
RARE_SHARE_OF_BALANCED = 0.25
EXAMPLES_SHOWN = 3


@dataclass
class Finding:
    kind: str  # loading, empty, duplicate, leakage, conflict, imbalance
    count: int
    message: str
    examples: list[str] = field(default_factory=list)
    strict_error: bool = False  # an error under --strict


@dataclass
class DataReport:
    rows: dict[str, int]
    label_balance: dict[str, dict[str, int]]
    findings: list[Finding]
    # What the model will read of the texts (their token lengths, how many are cut, windows per text for
    # data.long_text chunks): lines a task that tokenises its texts adds, printed after the label balance.
    # Keyword-only: a subclass's own fields come after the three positional ones (QA's QuestionDataReport).
    lengths: list[str] = field(default_factory=list, kw_only=True)

    def format(self) -> str:
        lines = ["rows       " + " | ".join(f"{k} {v:,}" for k, v in self.rows.items())]
        for split, counts in self.label_balance.items():
            total = sum(counts.values()) or 1
            lines.append(f"labels     {split}: " + ", ".join(f"{k} {v:,} ({v / total:.0%})" for k, v in counts.items()))
        lines += self.lengths
        if not self.findings:
            lines.append("checks     no empty texts, duplicates, leakage or conflicting labels found")
        for f in self.findings:
            shown = "; e.g. " + " | ".join(repr(e[:80]) for e in f.examples) if f.examples else ""
            lines.append(f"warning    {f.message}{shown}")
        return "\n".join(lines)


def normalise(text: str) -> str:
    """Case and whitespace do not make two texts different for leakage and duplicate checks."""
    return " ".join(str(text).lower().split())


def _keys(texts: list[str], ds, pair_col: str | None) -> list[str]:
    if pair_col is None:
        return [normalise(t) for t in texts]
    return [normalise(a) + " [PAIR] " + normalise(b) for a, b in zip(texts, column_values(ds, pair_col))]


def check_task_data(data: TaskData) -> DataReport:
    """Run every check on loaded splits; return the findings (raises nothing)."""
    splits = {"train": data.train, "validation": data.validation}
    if data.test is not None:
        splits["test"] = data.test
    raw_texts = {name: column_values(ds, data.text_column) for name, ds in splits.items()}
    keys = {name: _keys(raw_texts[name], ds, data.text_pair_column) for name, ds in splits.items()}
    # What loading decided for the user (fallback split, labels without rows, unlabelled rows dropped).
    findings = [Finding("loading", 1, note) for note in data.notes]

    for name, ks in keys.items():
        empty = [raw_texts[name][i] for i, k in enumerate(ks) if not k.replace("[PAIR]", "").strip()]
        if empty:
            findings.append(Finding("empty", len(empty), f"{name}: {len(empty)} empty or whitespace-only texts"))

    counts = Counter(keys["train"])
    dup_rows = sum(c - 1 for c in counts.values() if c > 1)
    if dup_rows:
        examples = [k for k, c in counts.most_common(EXAMPLES_SHOWN) if c > 1]
        findings.append(Finding("duplicate", dup_rows, f"train: {dup_rows} duplicate rows "
                                f"({sum(1 for c in counts.values() if c > 1)} texts occur more than once)", examples))

    train_set = set(keys["train"])
    for name in ("validation", "test"):
        if name not in keys:
            continue
        leaked = [k for k in keys[name] if k in train_set]
        if leaked:
            share = len(leaked) / len(keys[name])
            findings.append(Finding(
                "leakage", len(leaked), f"leakage: {len(leaked)} of {len(keys[name])} {name} rows ({share:.0%}) "
                f"also appear in train (after normalising case and whitespace); their {name} score measures "
                f"memory, not generalisation", list(dict.fromkeys(leaked))[:EXAMPLES_SHOWN], strict_error=True))

    labels_by_text: dict[str, set[int]] = defaultdict(set)
    for k, y in zip(keys["train"], column_values(data.train, "labels")):
        labels_by_text[k].add(y)
    conflicting = [k for k, ys in labels_by_text.items() if len(ys) > 1]
    if conflicting:
        findings.append(Finding("conflict", len(conflicting), f"train: {len(conflicting)} texts appear with "
                                f"different labels", conflicting[:EXAMPLES_SHOWN], strict_error=True))

    balance = {name: label_counts(ds, data.label_names) for name, ds in splits.items()}
    total = sum(balance["train"].values())
    threshold = min(MINORITY_SHARE_WARNING, RARE_SHARE_OF_BALANCED / len(data.label_names))
    rare = [f"{label} ({n})" for label, n in balance["train"].items() if total and n / total < threshold]
    if rare:
        findings.append(Finding("imbalance", len(rare), f"train: classes under {threshold * 100:.3g}% of the rows: "
                                f"{', '.join(rare)}; consider macro F1 as train.metric"))
    return DataReport({k: len(v) for k, v in splits.items()}, balance, findings)


def enforce(report: DataReport, strict: bool) -> None:
    """Under `strict`, leakage and conflicting labels stop the run with one line naming both counts."""
    errors = [f for f in report.findings if f.strict_error]
    if strict and errors:
        raise TextuneError("data check failed (--strict): " + "; ".join(f.message for f in errors))
