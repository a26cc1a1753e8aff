"""The contract every task fills: what the training loop, `evaluate`, `predict`, `serve` and the report ask of
a task. A task module defines one `Task` object, `TASK`; `textune.tasks.get_task(cfg.task)` finds it.

Two objects per task:
- `Task`: the stateless part, used by commands on saved runs (evaluate a file, load a predictor, read inputs
  to predict, serve, report sections).
- `TaskInputs`: what one training run trains on, returned by `Task.load_inputs(cfg)` after everything that can
  fail on user input (data, tokenizer, model) has been checked, and before the run folder is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

from textune.errors import TextuneError


class TaskInputs(ABC):
    """What a run trains on, all loaded and checked before anything is written.

    Attributes the loop reads: `model` (tuned: PEFT-wrapped or partly frozen), `tokenizer`, `tokenized`
    (split name -> tokenised `datasets.Dataset`, with a `length` column where batches may be grouped by
    length), `train_data` (what the training loader reads: `tokenized["train"]` or a lazily tokenised stream)
    and `evaluate_first` (evaluate at step 0 too, where the curve's starting point matters).

    `loss_fn`: the training loss `train_step` calls as `loss_fn(model, batch)`, or None for the model's own loss
    (`outputs.loss`). The task chooses it (classification: mixup or class-weighted cross-entropy), so the loop
    never asks which task it runs. Evaluation always reports the model's own loss.

    `compute_metrics`: the user's hook, `compute_metrics(predictions, labels) -> dict`, set by
    `textune.train.train(cfg, compute_metrics=...)`; tasks that support it call `extra_metrics` in `evaluate`
    and merge the result into their metrics (what each task passes as predictions is in its docstring).
    """

    model: Any
    tokenizer: Any
    tokenized: dict
    evaluate_first: ClassVar[bool] = False
    loss_fn: Callable | None = None
    compute_metrics: Callable | None = None

    def extra_metrics(self, predictions, labels) -> dict:
        """What the user's `compute_metrics` hook returns for these predictions ({} without a hook).

        Raises:
            TextuneError: the hook did not return a mapping of metric names.
        """
        if self.compute_metrics is None:
            return {}
        out = self.compute_metrics(predictions, labels)
        if not isinstance(out, dict) or not all(isinstance(k, str) for k in out):
            raise TextuneError(f"compute_metrics must return a dict of metric name -> value, got "
                               f"{type(out).__name__}")
        return out

    @property
    def train_data(self):
        return self.tokenized["train"]

    @abstractmethod
    def summary(self, cfg) -> str:
        """Lines printed at start-up: model, data sizes, warnings about the data, token lengths."""

    @abstractmethod
    def data_stats(self, cfg) -> dict:
        """What RUN/data_stats.json records about the data."""

    @abstractmethod
    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        """The DataLoader collate function for `split` (train, validation or test). `pad_to_multiple_of` rounds
        padded lengths up to a multiple of N (`train.compile` bounds the shapes it compiles with it); collators
        of fixed-length blocks can ignore it."""

    @abstractmethod
    def evaluate(self, model, loader, accelerator=None) -> tuple[dict, Any]:
        """(metrics, predictions) over a labelled loader, gathered over all processes. `metrics` holds the
        task's `train.metric` choices as floats (and anything else JSON can hold); `predictions` is whatever
        `write_predictions` needs, or None."""

    def write_predictions(self, predictions: Any, path: Path) -> None:
        """Write RUN/validation_predictions.jsonl (the report reads it) from `evaluate`'s predictions."""

    def label_counts(self) -> dict[str, int] | None:
        """Validation label counts, for the diagnosis's majority-class baseline; None where that means nothing."""
        return None


class Task(ABC):
    """Everything a task owns outside a training run."""

    name: ClassVar[str]

    @abstractmethod
    def load_inputs(self, cfg) -> TaskInputs:
        """Model, tokenizer and data of `cfg`: read, checked, tokenised, measured, tuned.

        Raises:
            TextuneError: anything wrong with the data, the model or their fit.
        """

    @abstractmethod
    def check_data(self, cfg):
        """`textune validate-data`: the data of `cfg` read and checked; a `data_checks.DataReport`."""

    # A `textune.infer.ModelPredictor` subclass whose `.predict(...)` returns one JSON-able row per input.
    predictor_class: ClassVar[type | None] = None

    def load_predictor(self, run_or_model: str | Path, batch_size: int = 64, precision: str = "fp32"):
        """The task's predictor with the model of a run or model folder loaded."""
        if self.predictor_class is None:
            raise TextuneError(f"textune predict and evaluate do not support {self.name} models")
        return self.predictor_class(run_or_model, batch_size=batch_size, precision=precision)

    def read_inputs(self, source: str, columns: dict, predictor) -> tuple[list, list[dict]]:
        """(inputs for `predictor.predict`, the input fields to echo in each output row) from a file or stdin.
        `columns` holds the run's data.* column settings overridden by the command line."""
        raise TextuneError(f"textune predict does not support {self.name} models")

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Metrics of `predictor` on a labelled file (`textune evaluate`)."""
        raise TextuneError(f"textune evaluate does not support {self.name} models")

    def format_metrics(self, metrics: dict) -> str:
        """The lines `textune evaluate` prints after the headline."""
        return ""

    # What `textune serve` exposes: POST /v1/<serve_endpoint>, a request with `texts` (and whatever else the
    # request model holds), answered by `predictor.predict` in micro-batches.
    serve_endpoint: ClassVar[str | None] = None
    serve_description: ClassVar[str] = ""

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None) -> tuple[list[tuple[str, str]], str]:
        """(summary cards as (name, HTML value) pairs, HTML sections) for the report page."""
        return [], ""
