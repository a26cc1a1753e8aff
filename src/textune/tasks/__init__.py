"""Tasks: what a run learns to do. One module per task, each owning everything task-specific (see
`textune.tasks.base.Task`); the training loop, checkpoints, curves, diagnosis and serving plumbing know the
contract, never a task name.

This registry maps the config's `task:` name to its module and the metrics the task computes. It imports no
ML library, so the config can be validated without loading torch.

Adding a task: write `tasks/<name>.py` with a `TASK` object implementing `Task` (token_classification.py
is the example to copy), add one line here, and ship a config under configs/. A task kept outside textune (a
plugin, a test: tests/test_new_task.py) is one module too, added at run time with `register_task`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from textune.tasks.base import Task


@dataclass(frozen=True)
class Architecture:
    """One kind of saved model: how its class name ends, the transformers Auto class that loads it, PEFT's task
    type for it, and the pipeline tag the Hub and `transformers.pipeline` know it by."""

    suffixes: tuple[str, ...]  # endings of `config.architectures` names (BertForTokenClassification, ...)
    auto_class: str  # transformers' AutoModelFor... class name
    peft_task_type: str  # peft.TaskType member name
    pipeline_tag: str


SEQUENCE_HEAD = Architecture(("ForSequenceClassification",), "AutoModelForSequenceClassification", "SEQ_CLS",
                             "text-classification")
TOKEN_HEAD = Architecture(("ForTokenClassification",), "AutoModelForTokenClassification", "TOKEN_CLS",
                          "token-classification")
SPAN_HEAD = Architecture(("ForQuestionAnswering",), "AutoModelForQuestionAnswering", "QUESTION_ANS",
                         "question-answering")
CAUSAL_LM = Architecture(("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM", "CAUSAL_LM", "text-generation")
# BertForPreTraining = MLM + NSP heads. PEFT has no masked-LM task type: FEATURE_EXTRACTION wraps it generically.
MASKED_LM = Architecture(("ForMaskedLM", "ForPreTraining"), "AutoModelForMaskedLM", "FEATURE_EXTRACTION",
                         "fill-mask")
# The bare encoder (BertModel, MPNetModel): what sentence-transformers folders hold. Last in the registry, so a
# `...LMHeadModel` is read as the causal LM it is before this suffix matches.
ENCODER_BODY = Architecture(("Model",), "AutoModel", "FEATURE_EXTRACTION", "feature-extraction")


@dataclass(frozen=True)
class TaskSpec:
    """A task's registry entry: what config validation, curves, the model card and export read without importing
    the task's module (which loads torch)."""

    module: str  # the importable module holding the task's `TASK`
    metrics: tuple[str, ...]  # what train.metric may select; all are in every evaluation's metrics
    default_metric: str  # the headline, selected when train.metric is empty
    # The saved model kinds a run of this task writes, the one it builds by default first.
    architectures: tuple[Architecture, ...]
    problem_type: str | None = None  # a sequence classifier's config.problem_type that names this task
    # One prediction per text, pooled from the rows a long text is read as (data.long_text head_tail and chunks;
    # its evaluation groups rows by document, `textune.evaluate.DOCUMENT_KEY`). Tasks that window long texts
    # their own way (QA's doc_stride, NER's windows) leave it False, and config validation refuses the keys.
    document_pooling: bool = False

    @property
    def pipeline_tag(self) -> str:
        return self.architectures[0].pipeline_tag


# GLUE's metrics: mcc (CoLA), accuracy and f1 (MRPC, QQP), accuracy (the rest); STS-B is task regression.
# roc_auc and average_precision read the positive class's probability (one-vs-rest macro with more classes).
CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "precision", "recall", "precision_macro", "recall_macro",
                          "mcc", "f1_weighted", "roc_auc", "average_precision", "loss")
TASKS = {
    "classification": TaskSpec("textune.tasks.classification", CLASSIFICATION_METRICS, "accuracy", (SEQUENCE_HEAD,),
                                 document_pooling=True),
    "token-classification": TaskSpec("textune.tasks.token_classification",
                                     ("f1", "precision", "recall", "accuracy", "loss"), "f1", (TOKEN_HEAD,)),
    "question-answering": TaskSpec("textune.tasks.question_answering", ("f1", "exact_match", "loss"), "f1",
                                   (SPAN_HEAD,)),
    "language-modeling": TaskSpec("textune.tasks.language_modeling", ("loss", "perplexity"), "loss",
                                  (MASKED_LM, CAUSAL_LM)),
    "regression": TaskSpec("textune.tasks.regression", ("pearson", "spearman", "mse", "mae", "loss"), "pearson",
                           (SEQUENCE_HEAD,), "regression", document_pooling=True),
    "multi-label": TaskSpec("textune.tasks.multi_label", ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss",
                                                          "loss"), "f1_micro", (SEQUENCE_HEAD,),
                            "multi_label_classification", document_pooling=True),
    # Held-out loss picks the best checkpoint: exact match and ROUGE-L come from a small generated sample.
    "instruction": TaskSpec("textune.tasks.instruction", ("loss", "perplexity", "rougeL", "exact_match"), "loss",
                            (CAUSAL_LM,)),
    # Retrieval for pairs (MRR@10 the headline), correlation of the cosine for scored pairs (spearman).
    "embedding": TaskSpec("textune.tasks.embedding", ("mrr_at_10", "recall_at_1", "recall_at_10", "ndcg_at_10",
                                                      "spearman", "pearson", "loss"), "mrr_at_10", (ENCODER_BODY,)),
}
DEFAULT_TASK = "classification"


def get_task(name: str) -> Task:
    """The task object of a config's `task:` name (its module is imported on first use).

    Raises:
        TextuneError: no task of that name is registered (a run of a task defined outside textune, read
            before `register_task` was called for it).
    """
    if name not in TASKS:
        from textune.errors import TextuneError

        raise TextuneError(f"task {name!r} is not registered; the tasks are {', '.join(TASKS)} (a task defined "
                           f"outside textune is added with textune.tasks.register_task before its runs are read)")
    return importlib.import_module(TASKS[name].module).TASK


def register_task(name: str, spec: TaskSpec) -> None:
    """Add a task defined outside textune (a plugin package, a test) under the config's `task: name`.
    `spec.module` is the importable module holding its `TASK` (a `Task` whose `name` is `name`); from then on
    config validation, training, evaluate, predict, serve, report and `task_of` know it as they know the
    built-in tasks.

    Raises:
        TextuneError: the name is taken, the spec's default metric is not among its metrics, or it names no
            architecture.
    """
    from textune.errors import TextuneError

    if name in TASKS:
        raise TextuneError(f"task {name!r} is already registered (by {TASKS[name].module}); choose another name "
                           f"or unregister_task it first")
    if spec.default_metric not in spec.metrics:
        raise TextuneError(f"task {name!r}: default_metric {spec.default_metric!r} must be one of its metrics "
                           f"({', '.join(spec.metrics)})")
    if not spec.architectures:
        raise TextuneError(f"task {name!r}: name the saved model kinds it builds in architectures "
                           f"(e.g. textune.tasks.SEQUENCE_HEAD)")
    TASKS[name] = spec


def unregister_task(name: str) -> None:
    """Remove a task `register_task` added (a built-in task stays: configs and saved runs name it)."""
    if name in TASKS and TASKS[name].module.startswith("textune.tasks."):
        from textune.errors import TextuneError

        raise TextuneError(f"task {name!r} is built into textune and cannot be unregistered")
    TASKS.pop(name, None)


# Model folders not written by a textune run are read by their architecture: the first task (in registry order)
# that builds it, refined by a sequence classifier's problem_type. An instruction-tuned model is a causal LM
# like any other, so a bare folder of one reads as language-modeling; its run folder says instruction.
def architecture_of(architectures: list[str] | None) -> Architecture | None:
    """The registry's entry for a model's `config.architectures` names, or None where none matches."""
    for spec in TASKS.values():
        for arch in spec.architectures:
            if any(name.endswith(arch.suffixes) for name in architectures or ()):
                return arch
    return None


def task_of_architecture(architectures: list[str] | None, problem_type: str | None = None) -> str | None:
    """The task a model of these architectures was trained for; None where no task builds it."""
    arch = architecture_of(architectures)
    if arch is None:
        return None
    matches = [name for name, spec in TASKS.items() if arch in spec.architectures]
    return next((name for name in matches if TASKS[name].problem_type == problem_type and problem_type), matches[0])


def task_of(run_or_model: str | Path) -> str:
    """The task of a run folder (its saved config's `task:`), or of a model folder (from its architecture or,
    for an adapter folder, the architecture textune saved beside it); classification when neither says."""
    import json

    from textune.errors import is_onnx_export

    path = Path(run_or_model).expanduser()
    for run in (path, path.parent):
        # a merged folder, an adapter registry's copy and an ONNX export carry their run's config.yaml beside
        # the model's config.json
        config = run / "config.yaml"
        if config.is_file() and ((run / "model").is_dir() or is_onnx_export(run) or (run / "config.json").is_file()):
            import yaml

            saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            if saved.get("task"):
                return saved["task"]
            return "language-modeling" if (saved.get("pretrain") or {}).get("corpus") else "classification"
    model_config = path / "model" / "config.json" if (path / "model").is_dir() else path / "config.json"
    if model_config.is_file():
        saved = json.loads(model_config.read_text())
        task = task_of_architecture(saved.get("architectures"), saved.get("problem_type"))
        if task is not None:
            return task
    return DEFAULT_TASK


def load_predictor(run_or_model: str | Path, batch_size: int = 64, precision: str = "fp32"):
    """The predictor of whatever task a run or model folder was trained for, e.g.
    `load_predictor("runs/wnut16-minilm-ner").predict(["Empire State Building"])` -> entities."""
    return get_task(task_of(run_or_model)).load_predictor(run_or_model, batch_size=batch_size, precision=precision)
