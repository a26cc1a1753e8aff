"""The task registry: config resolution of task and metric, and what a saved folder says its task is."""

from __future__ import annotations

import json

import pytest

from textune.config import load_config
from textune.errors import ConfigError, TextuneError
from textune.tasks import TASKS, get_task, task_of
from textune.tasks.base import Task


def test_every_registered_task_has_a_module_filling_the_contract():
    for name, spec in TASKS.items():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and spec.default_metric in spec.metrics


@pytest.mark.parametrize("overrides, task, metric, greater", [
    ({"data.train": "x.csv"}, "classification", "accuracy", True),
    ({"data.train": "x.conll", "task": "token-classification"}, "token-classification", "f1", True),
    ({"pretrain.corpus": "c.txt"}, "language-modeling", "loss", False),
    ({"data.train": "x.csv", "train.metric": "loss"}, "classification", "loss", False),
])
def test_task_and_headline_metric_are_filled_in(overrides, task, metric, greater):
    cfg = load_config(None, overrides)
    assert (cfg.task, cfg.train.metric, cfg.train.greater_is_better) == (task, metric, greater)


@pytest.mark.parametrize("overrides, message", [
    ({"data.train": "x.csv", "train.metric": "perplexity"},
     "train.metric: 'perplexity' is not a metric of task classification"),
    ({"data.train": "x.conll", "task": "token-classification", "train.metric": "f1_macro"},
     "train.metric: 'f1_macro' is not a metric of task token-classification"),
    ({"data.train": "x.csv", "task": "ner"}, "task: 'ner' is not a task"),
    ({"pretrain.corpus": "c.txt", "task": "classification"}, "task: classification trains on labelled data, but "
                                                             "pretrain.corpus is set"),
    ({"data.train": "x.csv", "train.metric": "loss", "train.greater_is_better": True},
     "train.greater_is_better: must be false when train.metric is loss"),
])
def test_a_metric_the_task_never_computes_is_refused_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_task_of_reads_the_run_config_then_the_architecture(tmp_path, trained_run):
    assert task_of(trained_run) == "classification"
    assert task_of(trained_run / "model") == "classification"
    folder = tmp_path / "ner-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForTokenClassification"]}))
    assert task_of(folder) == "token-classification"
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("task: token-classification\n")
    assert task_of(run) == task_of(run / "model") == "token-classification"


@pytest.mark.parametrize("task", ["classification", "regression", "multi-label"])
@pytest.mark.parametrize("source, where", [("-", "standard input"), ("texts.txt", "a .txt file")])
def test_a_pair_model_refuses_one_text_per_line(task, source, where):
    # a .txt line or stdin carries one text: predicting on it would silently drop the second text of the pair
    with pytest.raises(TextuneError, match=f"reads pairs of texts \\(columns 'q' and 'a'\\).* not {where}"):
        get_task(task).read_inputs(source, {"text_column": "q", "text_pair_column": "a"}, predictor=None)
