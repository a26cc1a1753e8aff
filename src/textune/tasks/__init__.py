"""Tasks: what a run learns to do. One module per task, each owning everything task-specific (see
`textune.tasks.base.Task`); the training loop, checkpoints, curves, diagnosis and serving plumbing know the
contract, never a task name.

This registry maps the config's `task:` name to its module and the metrics the task computes. It imports no
ML library, so the config can be validated without loading torch.

Adding a task: write `tasks/<name>.py` with a `TASK` object implementing `Task` (token_classification.py
is the example to copy), add one line here, and ship a config under configs/.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textune.tasks.base import Task


@dataclass(frozen=True)
class TaskSpec:
    module: str
    metrics: tuple[str, ...]  # what train.metric may select; all are in every evaluation's metrics
    default_metric: str  # the headline, selected when train.metric is empty
    pipeline_tag: str  # transformers' pipeline task name for the saved model


# GLUE's metrics: mcc (CoLA), accuracy and f1 (MRPC, QQP), accuracy (the rest); STS-B is task regression.
# roc_auc and average_precision read the positive class's probability (one-vs-rest macro with more classes).
CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "precision", "recall", "precision_macro", "recall_macro",
                          "mcc", "f1_weighted", "roc_auc", "average_precision", "loss")
TASKS = {
    "classification": TaskSpec("textune.tasks.classification", CLASSIFICATION_METRICS, "accuracy",
                               "text-classification"),
    "token-classification": TaskSpec("textune.tasks.token_classification",
                                     ("f1", "precision", "recall", "accuracy", "loss"), "f1", "token-classification"),
    "question-answering": TaskSpec("textune.tasks.question_answering", ("f1", "exact_match", "loss"), "f1",
                                   "question-answering"),
    "language-modeling": TaskSpec("textune.tasks.language_modeling", ("loss", "perplexity"), "loss",
                                  "text-generation"),
    "regression": TaskSpec("textune.tasks.regression", ("pearson", "spearman", "mse", "mae", "loss"), "pearson",
                           "text-classification"),
    "multi-label": TaskSpec("textune.tasks.multi_label", ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss",
                                                          "loss"), "f1_micro", "text-classification"),
    # Held-out loss picks the best checkpoint: exact match and ROUGE-L come from a small generated sample.
    "instruction": TaskSpec("textune.tasks.instruction", ("loss", "perplexity", "rougeL", "exact_match"), "loss",
                            "text-generation"),
}


def get_task(name: str) -> Task:
    """The task object of a config's `task:` name (its module is imported on first use)."""
    return importlib.import_module(TASKS[name].module).TASK


# A sequence classifier's config.problem_type -> task, and model classes' name endings -> task, for model
# folders that were not written by a textune run.
PROBLEM_TYPE_TASKS = {"regression": "regression", "multi_label_classification": "multi-label"}
ARCHITECTURE_TASKS = (("ForTokenClassification", "token-classification"), ("ForQuestionAnswering", "question-answering"),
                      ("ForSequenceClassification", "classification"))


def task_of(run_or_model: str | Path) -> str:
    """The task of a run folder (its saved config's `task:`), or of a model folder (from its architecture or,
    for an adapter folder, the architecture textune saved beside it); classification when neither says."""
    import json

    from textune.errors import is_onnx_export

    path = Path(run_or_model).expanduser()
    for run in (path, path.parent):
        config = run / "config.yaml"  # an ONNX export carries its run's config.yaml beside the model
        if config.is_file() and ((run / "model").is_dir() or is_onnx_export(run)):
            import yaml

            saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            if saved.get("task"):
                return saved["task"]
            return "language-modeling" if (saved.get("pretrain") or {}).get("corpus") else "classification"
    model_config = path / "model" / "config.json" if (path / "model").is_dir() else path / "config.json"
    if model_config.is_file():
        saved = json.loads(model_config.read_text())
        if saved.get("problem_type") in PROBLEM_TYPE_TASKS:
            return PROBLEM_TYPE_TASKS[saved["problem_type"]]
        architectures = saved.get("architectures") or []
        for suffix, task in ARCHITECTURE_TASKS:
            if any(a.endswith(suffix) for a in architectures):
                return task
    return "classification"


def load_predictor(run_or_model: str | Path, batch_size: int = 64, precision: str = "fp32"):
    """The predictor of whatever task a run or model folder was trained for, e.g.
    `load_predictor("runs/wnut16-minilm-ner").predict(["Empire State Building"])` -> entities."""
    return get_task(task_of(run_or_model)).load_predictor(run_or_model, batch_size=batch_size, precision=precision)
