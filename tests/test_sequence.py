"""What the sequence-level tasks share (tasks/sequence.py): reading texts and pairs for training and `evaluate`,
and every predictor naming its registry task."""

import re

import pytest

from conftest import write_jsonl
from textune.config import load_config
from textune.data import load_task_data
from textune.errors import TextuneError
from textune.tasks import TASKS, get_task
from textune.tasks.sequence import read_labelled_file


def rows_with(column: str, row: int, cell) -> list[dict]:
    rows = [{"text": f"text {i}", "pair": f"pair {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    rows[row - 1][column] = cell
    return rows


@pytest.mark.parametrize("column, cell, kind", [
    ("text", ["a", "list"], r"a list \(\['a', 'list'\]\)"),
    ("pair", {"an": "object"}, r"an object \(\{'an': 'object'\}\)"),
])
def test_training_texts_that_are_lists_or_objects_name_file_row_and_column(column, cell, kind, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows_with(column, 4, cell))
    cfg = load_config(None, {"data.train": str(path), "data.text_pair_column": "pair"})
    with pytest.raises(TextuneError, match=rf"^data\.train row 4 of {re.escape(str(path))}: column '{column}' holds "
                                           rf"{kind}, not a text; write one string per row"):
        load_task_data(cfg.data, seed=0)


def test_a_whole_column_of_lists_is_one_line_not_a_cast_traceback(tmp_path):
    rows = [{"text": ["word", str(i)], "label": "pos" if i % 2 else "neg"} for i in range(8)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(None, {"data.train": str(path)})
    with pytest.raises(TextuneError, match=r"data\.train row 1 of .*train\.jsonl: column 'text' holds a list"):
        load_task_data(cfg.data, seed=0)


def test_evaluate_file_with_list_texts_names_its_row(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", rows_with("text", 2, ["x", "y"]))
    with pytest.raises(TextuneError, match=rf"^{re.escape(str(path))} row 2: column 'text' holds a list"):
        read_labelled_file(str(path), {})


def test_read_labelled_file_reads_texts_and_pairs(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", rows_with("text", 1, "first"))
    _, texts, pairs, label_col = read_labelled_file(str(path), {"text_pair_column": "pair"})
    assert texts[:2] == ["first", "text 1"] and pairs[:2] == ["pair 0", "pair 1"] and label_col == "label"


@pytest.mark.parametrize("name", [n for n in TASKS if get_task(n).predictor_class is not None])
def test_every_predictor_names_its_registry_task(name):
    # /v1/models and `textune predict` read the task from the predictor: regression and multi-label are not
    # "classification" there.
    assert get_task(name).predictor_class.task == name
