"""Inference: what every task's predictor shares (`ModelPredictor`: the model loaded at a precision on a device)
and the inputs and outputs of `textune predict`. The predictors themselves live with their tasks
(`textune.tasks.load_predictor` finds the one for a run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import torch

from textune.data import column_values, read_table, read_text_lines
from textune.atomic import replace_atomically
from textune.errors import TextuneError, is_onnx_export
from textune.models import (inference_device, inference_max_length, load_saved_model, resolve_model,
                            resolve_run_model, saved_run_config)


class ModelPredictor:
    """A fine-tuned model loaded for prediction: model, tokenizer, device, precision and the run's max_length.
    Each task's predictor (`tasks.classification.ClassifierPredictor`, `tasks.token_classification.
    TokenClassifierPredictor`, ...) adds its `predict` and sets `task`, the registry's name of its task;
    `around` wraps a model already in memory (the adapter registry's active adapter)."""

    task: str  # the registry's task name ("classification", "regression", ...): /v1/models reports it

    def __init__(self, run_or_model: str | Path, batch_size: int = 64, max_length: int | None = None,
                 device: str | None = None, precision: str = "fp32"):
        """`precision`: fp32 (exact), bf16 (weights and activations in bfloat16) or int8 (dynamic
        quantisation of the Linear layers, CPU only); see `benchmarks/bench_predict.py` for speed and
        agreement with fp32. An ONNX export (`textune export`) runs on ONNX Runtime's CPU provider: `device`
        does not apply to it, and a precision other than fp32 is refused (quantise at export instead)."""
        model_dir, run_dir = resolve_run_model(run_or_model, onnx_ok=True)
        model, tokenizer = load_trained_model(model_dir)
        self.model_dir, self.config = model_dir, model.config
        max_length = max_length or (saved_run_config(run_dir).get("model") or {}).get("max_length")
        self._setup(model, tokenizer, run_dir, batch_size, max_length, device, precision)

    @classmethod
    def around(cls, model, tokenizer, batch_size: int = 64, max_length: int | None = None, device=None,
               folder: str | Path | None = None):
        """A predictor for a model already loaded (and already on its device).

        `folder`: the saved form its weights came from (the adapter registry's copy of a run), read as a run
        folder for what the task needs besides the weights: its config.json (`self.config`: labels, a
        regression's scale) and run files (`Task.prediction_files`). None: the model's own config, no run.
        """
        from transformers import AutoConfig

        self = cls.__new__(cls)
        self.model_dir = Path(folder) if folder is not None else None
        self.config = AutoConfig.from_pretrained(folder) if folder is not None else model.config
        self._setup(model, tokenizer, self.model_dir, batch_size, max_length, device, "fp32")
        return self

    def _setup(self, model, tokenizer, run_dir, batch_size, max_length, device, precision) -> None:
        self.run_dir, self.tokenizer, self.batch_size, self.precision = run_dir, tokenizer, batch_size, precision
        # An ONNX export runs on its ONNX Runtime session's device (the CPU); only PyTorch models move.
        self.device = inference_device(device) if isinstance(model, torch.nn.Module) else model.device
        self.model = with_precision(model.to(self.device), precision, self.device)
        self.max_length = inference_max_length(tokenizer, max_length, config=getattr(model, "config", None))
        # `config`: the saved model's, which the model in memory may share with other adapters (`around`)
        self.label_names = [self.config.id2label[i] for i in range(self.config.num_labels)]

    def refuse_another_task(self) -> None:
        """Raise where the saved model was built for another task than this predictor's (a QA folder given to the
        NER predictor would otherwise fail deep inside with a shape error).

        Raises:
            TextuneError: the model's architecture belongs to another task; names it and `load_predictor`.
        """
        from textune.tasks import TASKS, architecture_of, task_of_architecture  # the registry: no ML imports

        config = self.config  # the saved model's (a registry's model in memory may hold another adapter's)
        architectures = getattr(config, "architectures", None)
        if architecture_of(architectures) not in (None, *TASKS[self.task].architectures):
            other = task_of_architecture(architectures, getattr(config, "problem_type", None))
            raise TextuneError(f"{self.run_dir or getattr(self, 'model_dir', 'the model')} holds a {other} model, not "
                               f"a {self.task} one; load it with textune.tasks.load_predictor(path), which picks the "
                               f"predictor of its task")


def load_trained_model(model_dir: str | Path):
    """(model in eval mode, tokenizer) of a fine-tuned model folder as `textune train` saves it: a full model,
    or an adapter, which is loaded on its base model and merged where PEFT can; or an ONNX export, run by
    ONNX Runtime behind the same call (see `textune.onnx_model.OnnxModel`)."""
    if is_onnx_export(model_dir):
        from textune.onnx_model import load_onnx_model  # onnxruntime: imported only for exports

        return load_onnx_model(model_dir)
    model_dir = resolve_model(str(model_dir))
    if (Path(model_dir) / "adapter_config.json").is_file():
        from textune.adapters import load_adapter_classifier  # PEFT: imported only for adapter folders

        return load_adapter_classifier(model_dir)
    return load_saved_model(model_dir)


PRECISIONS = ("fp32", "bf16", "int8")


def with_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """The model converted for faster inference at `precision` (fp32 returns it unchanged).

    Raises:
        TextuneError: unknown precision, or int8 asked for on a GPU.
    """
    if precision not in PRECISIONS:
        raise TextuneError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and not isinstance(model, torch.nn.Module):
        raise TextuneError(f"{precision} prediction converts a PyTorch model; an ONNX export is quantised when "
                           f"exported (textune export RUN --quantize int8): drop --quantize")
    if precision == "bf16":
        # A cast, not autocast: autocast would convert every weight again on every call.
        return model.to(torch.bfloat16)
    if precision == "int8":
        if device.type != "cpu":
            raise TextuneError(f"int8 prediction runs on CPU only, not {device.type}; use bf16 on a GPU")
        import warnings

        from torch.ao.quantization import quantize_dynamic

        # torch.ao's dynamic quantisation is deprecated in favour of torchao's `quantize_`, but on CPU
        # torchao's int8 path is only fast under torch.compile; this one calls fbgemm/oneDNN int8 kernels
        # directly, so it is the fast one for an eager encoder. Only nn.Linear layers are quantised.
        with warnings.catch_warnings():  # its deprecation notices are ours to act on, not the user's
            warnings.simplefilter("ignore")
            return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model



def is_text_lines(source: str) -> bool:
    """Whether `--input` is read as one text per line (stdin or a .txt file) rather than as a data file."""
    return source == "-" or source.endswith(".txt")


def read_inputs(source: str, text_column: str = "text", text_pair_column: str | None = None,
                keep_blank_lines: bool = False) -> tuple[list[str], list[str] | None]:
    """Texts to predict from `-` (stdin, one text per line), a .txt file (one per line), or a data file.
    Blank lines are dropped, or with `keep_blank_lines` kept as they are (see `BlankLine`)."""
    if is_text_lines(source):
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = read_text_lines(Path(source), "input file")
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise TextuneError(f"no texts to predict in {'standard input' if source == '-' else source}")
        return (lines if keep_blank_lines else texts), None
    ds = read_table(source, "input")
    for col in [text_column] + ([text_pair_column] if text_pair_column else []):
        if col not in ds.column_names:
            raise TextuneError(f"input {source} has no column {col!r}; its columns are: "
                               f"{', '.join(map(repr, ds.column_names))} (set --text-column)")
    texts = [str(t) if t is not None else "" for t in column_values(ds, text_column)]
    pairs = ([str(t) if t is not None else "" for t in column_values(ds, text_pair_column)]
             if text_pair_column else None)
    return texts, pairs


class BlankLine(dict):
    """The echo row of a blank line of text input (`Task.read_inputs`): `textune predict` writes it as it is, an
    empty result, without asking the model, so output line N still belongs to input line N."""


def text_echo(texts: list[str], source: str, key: str = "text") -> list[dict]:
    """Echo rows `{key: text}` for `texts` read from `source`; a blank line of a text source is a `BlankLine`."""
    lines = is_text_lines(source)
    return [BlankLine({key: t}) if lines and not t.strip() else {key: t} for t in texts]


def predict_rows(predictor, inputs: tuple, echo: list[dict]) -> list[dict]:
    """One output row per echo row: the echo merged with its prediction; a `BlankLine` as it is.

    `inputs` are `predictor.predict`'s arguments as `Task.read_inputs` returns them: lists with one entry per echo
    row (blank lines drop out of them before the model sees them) and settings (anything else), passed on."""
    keep = [i for i, row in enumerate(echo) if not isinstance(row, BlankLine)]
    if len(keep) < len(echo):
        inputs = tuple([x[i] for i in keep] if isinstance(x, list) and len(x) == len(echo) else x for x in inputs)
    predicted = iter(predictor.predict(*inputs))
    return [dict(row) if isinstance(row, BlankLine) else {**row, **next(predicted)} for row in echo]


def write_jsonl(rows: Iterable[dict], path: str | None) -> None:
    """JSONL to a file (written to a temporary name, then renamed) or to stdout."""
    if path is None or path == "-":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    with replace_atomically(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

