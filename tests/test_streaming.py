"""data.streaming: the training file is read lazily, so memory does not grow with its size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import toy_rows, write_csv
from textune.config import load_config
from textune.data import STREAM_PREVIEW_ROWS, load_task_data
from textune.errors import ConfigError, TextuneError


def write_tsv_lines(path: Path, n: int) -> Path:
    """`n` labelled toy sentences, written as 2,000-line blocks (a 2M-line file in about a second)."""
    block = "".join(f"{r['label']}\t{r['text']}\n" for r in toy_rows(2000, seed=5))
    with path.open("w", encoding="utf-8") as f:
        f.write("label\ttext\n")
        for _ in range(n // 2000):
            f.write(block)
    return path


def start_run(config: Path, train: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "textune", "train", str(config), "--data.train", str(train), "--output_dir", str(out)]
    with out.with_suffix(".log").open("w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def peak_rss_mb(proc: subprocess.Popen, log: Path) -> float:
    """Wait for `proc`; its own peak resident memory (os.wait4 reports it for that child alone)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def test_peak_memory_does_not_grow_with_the_training_file(tiny_model, tmp_path):
    validation = write_csv(tmp_path / "validation.csv", toy_rows(40, seed=2))
    small = write_tsv_lines(tmp_path / "small.tsv", 20_000)
    big = write_tsv_lines(tmp_path / "big.tsv", 2_000_000)
    assert big.stat().st_size > 50e6
    config = tmp_path / "stream.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"name": str(tiny_model), "max_length": 32},
        "data": {"validation": str(validation), "streaming": True},
        "train": {"max_steps": 4, "batch_size": 16, "logging_steps": 1, "mixed_precision": "no",
                  "checkpoint_steps": None}}))
    # Both at once: half the wall time, and each child's peak is its own.
    procs = {name: start_run(config, path, tmp_path / name) for name, path in (("small", small), ("big", big))}
    peak = {name: peak_rss_mb(proc, tmp_path / f"{name}.log") for name, proc in procs.items()}
    for name in procs:
        steps = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
        assert [r["step"] for r in steps if r["type"] == "train"] == [1, 2, 3, 4]
    print(f"peak resident MB: {peak}")
    assert peak["big"] <= 1.2 * peak["small"], peak


def test_a_stream_yields_every_row_once_per_epoch_in_shuffled_order(tmp_path):
    rows = toy_rows(300, seed=7)
    train = write_csv(tmp_path / "train.csv", rows)
    cfg = load_config(None, {"data.train": str(train), "data.validation": str(train), "data.streaming": True,
                             "train.max_steps": 1, "data.shuffle_buffer": 100})
    data = load_task_data(cfg.data, seed=0)
    streamed = list(data.train_stream)
    assert Counter(r["text"] for r in streamed) == Counter(r["text"] for r in rows)
    assert [r["text"] for r in streamed] != [r["text"] for r in rows]  # the buffer shuffled it
    assert {data.label_names[r["labels"]] for r in streamed} == {"negative", "positive"}
    assert len(data.train) == min(len(rows), STREAM_PREVIEW_ROWS)


def test_a_label_the_preview_did_not_have_stops_with_the_key_to_set(tmp_path):
    rows = toy_rows(STREAM_PREVIEW_ROWS, seed=7) + [{"text": "a neutral film", "label": "neutral"}]
    train = write_csv(tmp_path / "train.csv", rows)
    validation = write_csv(tmp_path / "validation.csv", toy_rows(10, seed=2))
    cfg = load_config(None, {"data.train": str(train), "data.validation": str(validation), "data.streaming": True,
                             "train.max_steps": 1, "data.shuffle_buffer": 0})
    with pytest.raises(TextuneError, match="label 'neutral'.*data.label_names"):
        list(load_task_data(cfg.data, seed=0).train_stream)
    # Listing every label up front is the fix.
    cfg = load_config(None, {"data.train": str(train), "data.validation": str(validation), "data.streaming": True,
                             "train.max_steps": 1, "data.label_names": ["negative", "neutral", "positive"]})
    assert len(list(load_task_data(cfg.data, seed=0).train_stream)) == len(rows)


@pytest.mark.parametrize("overrides, key", [
    ({"data.validation": "v.csv"}, "train.max_steps: data.streaming needs a fixed number"),
    ({"train.max_steps": 5}, "data.streaming: needs a data.validation file"),
    ({"train.max_steps": 5, "data.validation": "v.csv", "data.shuffle_buffer": -1}, "data.shuffle_buffer: must be"),
    ({"train.max_steps": 5, "data.validation": "v.csv", "data.augment.methods": ["swap"]}, "data.augment.methods: "),
])
def test_streaming_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, {"data.train": "t.csv", "data.streaming": True, **overrides})
