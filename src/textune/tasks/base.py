"""The contract every task fills: what the training loop, `evaluate`, `predict`, `serve` and the report ask of
a task. A task module defines one `Task` object, `TASK`; `textune.tasks.get_task(cfg.task)` finds it through
the registry (`textune.tasks.TASKS`; a module outside textune is added with `textune.tasks.register_task`).
Nothing else in textune names a task, so a new task is that one module (tests/test_new_task.py shows one).

Two objects per task:
- `Task`: the stateless part, used by commands on saved runs (evaluate a file, load a predictor, read inputs
  to predict, serve, report sections).
- `TaskInputs`: what one training run trains on, returned by `Task.load_inputs(cfg)` after everything that can
  fail on user input (data, tokenizer, model) has been checked, and before the run folder is written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from textune.errors import TextuneError

# Texts `textune export` checks an export on where the run's validation rows cannot be read.
SAMPLE_TEXTS = ("a great film", "the plot was boring and the acting was poor, I would not watch it again",
                "Ada Lovelace wrote the first program in London.", "ok", "What a superb story, really moving.",
                "The service was slow but the food was nice.", "hate it", "Paris is the capital of France.")


def sample_texts(data: dict) -> tuple[list, list | None]:
    """The built-in texts to check an export of a text (or text-pair) model on; `data`: the run's data.*."""
    return list(SAMPLE_TEXTS), (list(SAMPLE_TEXTS[::-1]) if data.get("text_pair_column") else None)


@dataclass(frozen=True)
class ExportSpec:
    """How `textune export` writes a task's model to ONNX and checks it against PyTorch.

    Attributes:
        outputs: the model outputs the graph returns, by name (`logits`; QA: `start_logits`, `end_logits`).
        per_token: the outputs hold one value per token (a sequence axis), so they are compared on real tokens
            only: what padding positions hold is never read.
        truncation: how check batches are truncated: as the task's predictor truncates (`tokenizer(...,
            truncation=)`: True, or QA's "only_second", the context only).
        samples: `samples(data) -> (first texts, second texts or None)`, the built-in inputs the check uses
            where the run's validation rows cannot be read (`data`: the run's data.* settings, maybe empty).
        samples_name: what those are called in the check's message ("built-in sample texts").
        decide: `decide(output, mask) -> array` of the decisions a prediction is made of, from one output on a
            padded batch (`mask`: its attention mask, as booleans); an int8 export reports the share of them
            that agree with PyTorch's. None where no decision is made (a regression's score).
        decisions: what `decide` returns, in that report ("predicted labels").
        wrap: `wrap(model, model_dir) -> torch.nn.Module`, what is traced instead of the loaded model where the
            outputs are computed from it (the embedding task: its hidden states pooled into `sentence_embedding`);
            the module takes the model's inputs by name, returns the outputs by name, and has its `config`.
            None: the model itself.
    """

    outputs: tuple[str, ...] = ("logits",)
    per_token: bool = False
    truncation: bool | str = True
    samples: Callable[[dict], tuple[list, list | None]] = sample_texts
    samples_name: str = "built-in sample texts"
    decide: Callable[[Any, Any], Any] | None = None
    decisions: str = ""
    wrap: Callable[[Any, Path], Any] | None = None


@dataclass(frozen=True)
class PlaygroundSpec:
    """How `textune ui`'s playground tries a model of the task (the UI names no task: it shows this).

    Attributes:
        inputs: (name, label, optional) of each text box, in the order `Task.playground_predict` passes them to
            the predictor's `predict` (each as a one-item list; an empty optional box as None).
        render: how the page shows the prediction row: "probabilities" (its `label` and `probabilities` as
            bars), "spans" (its `entities`' start/end marked in the first box's text), "answer" (its `start`/`end`
            marked in the last box's text), "text" (its `response`), "json" (the row as it is).
        chat: the page also offers a multi-turn chat with a system prompt, streamed through the predictor's
            `chat(messages, on_text=, cancel=)` (`LanguageModelPredictor.chat`), for models with a chat template.
    """

    inputs: tuple[tuple[str, str, bool], ...] = (("text", "text", False),)
    render: str = "json"
    chat: bool = False


class TaskInputs(ABC):
    """What a run trains on, all loaded and checked before anything is written.

    Attributes the loop reads: `model` (tuned: PEFT-wrapped or partly frozen), `tokenizer`, `tokenized`
    (split name -> tokenised `datasets.Dataset`, with a `length` column where batches may be grouped by
    length), `train_data` (what the training loader reads: `tokenized["train"]` or a lazily tokenised stream)
    and `evaluate_first` (evaluate at step 0 too, where the curve's starting point matters).

    `loss_fn`: the training loss `train_step` calls as `loss_fn(model, batch)`, or None for the model's own loss
    (`outputs.loss`). The task chooses it (classification: mixup or class-weighted cross-entropy), so the loop
    never asks which task it runs. Evaluation always reports the model's own loss. It returns either a mean
    per example (a scalar tensor: every example of a step weighs the same), or, for a loss per token, the pair
    `(loss summed over the batch's tokens, their number)`: the loop adds both up over the step's micro-batches
    and processes and divides once, so every token of the step weighs the same, however they were shared out
    (transformers' `num_items_in_batch`; instruction: answer tokens, language modeling: predicted tokens).

    `compute_metrics`: the user's hook, `compute_metrics(predictions, labels) -> dict`, set by
    `textune.train.train(cfg, compute_metrics=...)`; tasks that support it call `extra_metrics` in `evaluate`
    and merge the result into their metrics (what each task passes as predictions is in its docstring).
    """

    model: Any
    tokenizer: Any
    tokenized: dict
    evaluate_first: ClassVar[bool] = False
    # The one sequence length of every training batch, where the task makes its rows so (packed language-modelling
    # blocks); None where batches are padded per batch. `train.compile: auto` reads it: one length, few compiles.
    fixed_length: int | None = None
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
        of fixed-length blocks can ignore it. Where one text is read as several rows (data.long_text chunks), an
        evaluation batch carries each row's document as `textune.evaluate.DOCUMENT_KEY` (never a model input):
        `evaluate.predict_logits` then pools the rows into one per document, gathered over all processes."""

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

    # What `baselines` measured at start-up; train.py sets it and stores it in RUN/data_stats.json.
    measured_baselines: dict | None = None

    def baselines(self, cfg) -> dict[str, dict]:
        """Zero-shot baselines: what a rule that needs no training scores on the validation split, which a
        fine-tuned model must beat. Name -> {"rule": how it predicts (one line), "metrics": {name: value}, named
        as `evaluate`'s metrics so the two compare, "advice": what to try when a run scores below it (optional)},
        or {"rule": ..., "skipped": why it was not measured (too costly, no pooling)}. Measured once at start-up
        (train.py prints them and keeps them in RUN/data_stats.json for the diagnosis and the report); {} where no
        such rule exists (the default). Must not draw from torch's random generator: training's dropout and
        order come after it."""
        return {}


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
        `columns` holds the run's data.* column settings overridden by the command line. One echo row per input
        line or row: a blank line of text input echoes as an `infer.BlankLine` (`infer.text_echo`), which
        `infer.predict_rows` writes as an empty row and drops from every input list that has one entry per row."""
        raise TextuneError(f"textune predict does not support {self.name} models")

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Metrics of `predictor` on a labelled file (`textune evaluate`)."""
        raise TextuneError(f"textune evaluate does not support {self.name} models")

    def write_output(self, rows: list[dict], path: str | None) -> bool:
        """Write `textune predict`'s rows to `path` in a format of the task's own, chosen by its extension (the
        embedding task: `.npy`); False where the task has none for it, and the rows are written as JSONL."""
        return False

    def format_metrics(self, metrics: dict) -> str:
        """The lines `textune evaluate` prints after the headline."""
        return ""

    # What `textune serve` exposes. Each task module builds its routes in a serving section at its end; FastAPI
    # and pydantic are imported there inside functions, so training never pays for them.
    # serve_paths: every POST path the task's router may hold; a server of another task answers them with a 404
    # that says what its model does instead. serve_adapters: requests may name an adapter (--adapters REGISTRY).
    serve_paths: ClassVar[tuple[str, ...]] = ()
    serve_adapters: ClassVar[bool] = False

    def router(self, ctx):
        """The task's `fastapi.APIRouter` serving `ctx.predictor` (`ctx`: a `textune.serving.context.ServeContext`:
        limits, micro-batching, adapters, model name), with one typed request and response model per endpoint;
        None where the task serves nothing. Its routes are added to it directly (`ctx.post`,
        `ctx.add_chat_route`), not through included routers, so the app reads its paths off `router.routes`."""
        return None

    def serve_description(self, predictor) -> str:
        """What a served model of this task is, for the docs and the 404s of other tasks' paths ("a token
        classifier")."""
        return f"a {self.name} model"

    # How `textune export` writes this task's model to ONNX; None: not exportable, and export says so.
    # Each task module sets it in its export section.
    export_spec: ClassVar[ExportSpec | None] = None
    # What the task's predictor reads besides the weights, as paths in a run folder ("model/..." for files of
    # its model folder): every saved form (a run, a merged folder, an adapter registry's copy, an ONNX export)
    # carries them, so each predicts as the run does. A folder holding the model and these files together is
    # both model and run folder (`models.resolve_run_model`).
    prediction_files: ClassVar[tuple[str, ...]] = ("config.yaml", "metrics.json", "data_stats.json")

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None) -> tuple[list[tuple[str, str]], str]:
        """(summary cards as (name, HTML value) pairs, HTML sections) for the report page."""
        return [], ""

    # What `textune ui`'s playground shows for this task's models; None: the playground says the task has none.
    playground: ClassVar[PlaygroundSpec | None] = None

    def playground_predict(self, predictor, fields: dict[str, str]) -> dict:
        """The prediction row for the playground's text boxes (`fields`, by `playground.inputs` name): by default
        the predictor's `predict` on one-item lists of the boxes' texts, in order."""
        spec = self.playground or PlaygroundSpec()
        args = [[fields[name]] if (fields.get(name) or "").strip() else None for name, _, _ in spec.inputs]
        if args and args[0] is None:
            raise TextuneError(f"{spec.inputs[0][1]}: write something to predict on")
        return predictor.predict(*args)[0]
