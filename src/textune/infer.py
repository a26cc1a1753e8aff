"""Inference: batched, length-sorted prediction with a fine-tuned classifier, in the input's order."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from textune.data import column_values, read_table, read_text_lines
from textune.atomic import replace_atomically
from textune.errors import TextuneError, is_onnx_export
from textune.models import (inference_device, inference_max_length, load_saved_model, resolve_model,
                            resolve_run_model, saved_run_config)


class ModelPredictor:
    """A fine-tuned model loaded for prediction: model, tokenizer, device, precision and the run's max_length.
    Each task's predictor (`Predictor` here for classifiers, `tasks.token_classification.TokenClassifierPredictor`)
    adds its `predict`; `around` wraps a model already in memory (the adapter registry's active adapter)."""

    task = "classification"

    def __init__(self, run_or_model: str | Path, batch_size: int = 64, max_length: int | None = None,
                 device: str | None = None, precision: str = "fp32"):
        """`precision`: fp32 (exact), bf16 (weights and activations in bfloat16) or int8 (dynamic
        quantisation of the Linear layers, CPU only); see `benchmarks/bench_predict.py` for speed and
        agreement with fp32. An ONNX export (`textune export`) runs on ONNX Runtime's CPU provider: `device`
        does not apply to it, and a precision other than fp32 is refused (quantise at export instead)."""
        model_dir, run_dir = resolve_run_model(run_or_model, onnx_ok=True)
        model, tokenizer = load_trained_model(model_dir)
        self.model_dir = model_dir
        max_length = max_length or (saved_run_config(run_dir).get("model") or {}).get("max_length")
        self._setup(model, tokenizer, run_dir, batch_size, max_length, device, precision)

    @classmethod
    def around(cls, model, tokenizer, batch_size: int = 64, max_length: int | None = None, device=None):
        """A predictor for a model already loaded (and already on its device)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, None, batch_size, max_length, device, "fp32")
        return self

    def _setup(self, model, tokenizer, run_dir, batch_size, max_length, device, precision) -> None:
        self.run_dir, self.tokenizer, self.batch_size, self.precision = run_dir, tokenizer, batch_size, precision
        # An ONNX export runs on its ONNX Runtime session's device (the CPU); only PyTorch models move.
        self.device = inference_device(device) if isinstance(model, torch.nn.Module) else model.device
        self.model = with_precision(model.to(self.device), precision, self.device)
        self.max_length = inference_max_length(tokenizer, max_length)
        self.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]


class Predictor(ModelPredictor):
    """A loaded classifier. `Predictor("runs/sst2").predict(["great film"])` -> [{"label": ..., ...}].

    Inputs are tokenised once, sorted by length and batched, so each batch pads to a similar length;
    results come back in the input order.
    """

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_labels), rows in input order."""
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise TextuneError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; give one pair per text")
        if not texts:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        enc = self.tokenizer(texts, text_pairs, truncation=True, max_length=self.max_length)
        order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
        out = np.empty((len(texts), len(self.label_names)), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer.pad([{k: enc[k][i] for k in enc.keys()} for i in idx], return_tensors="pt")
            logits = self.model(**batch.to(self.device)).logits.float()
            out[idx] = torch.softmax(logits, dim=-1).cpu().numpy()
        return out

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        """One dict per input: `label`, `score` (its probability) and `probabilities` by label name."""
        probs = self.predict_proba(texts, text_pairs)
        return [{"label": self.label_names[int(p.argmax())], "score": round(float(p.max()), 6),
                 "probabilities": {n: round(float(x), 6) for n, x in zip(self.label_names, p)}} for p in probs]


def load_trained_model(model_dir: str | Path):
    """(model in eval mode, tokenizer) of a fine-tuned model folder as `textune train` saves it: a full model,
    or an adapter, which is loaded on its base model and merged where PEFT can; or an ONNX export, run by
    ONNX Runtime behind the same call (see `textune.export.OnnxModel`)."""
    if is_onnx_export(model_dir):
        from textune.export import load_onnx_model  # onnxruntime: imported only for exports

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



def read_inputs(source: str, text_column: str = "text", text_pair_column: str | None = None
                ) -> tuple[list[str], list[str] | None]:
    """Texts to predict from `-` (stdin, one text per line), a .txt file (one per line), or a data file."""
    if source == "-" or source.endswith(".txt"):
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = read_text_lines(Path(source), "input file")
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise TextuneError(f"no texts to predict in {'standard input' if source == '-' else source}")
        return texts, None
    ds = read_table(source, "input")
    for col in [text_column] + ([text_pair_column] if text_pair_column else []):
        if col not in ds.column_names:
            raise TextuneError(f"input {source} has no column {col!r}; its columns are: "
                               f"{', '.join(map(repr, ds.column_names))} (set --text-column)")
    texts = [str(t) if t is not None else "" for t in column_values(ds, text_column)]
    pairs = ([str(t) if t is not None else "" for t in column_values(ds, text_pair_column)]
             if text_pair_column else None)
    return texts, pairs


def write_jsonl(rows: Iterable[dict], path: str | None) -> None:
    """JSONL to a file (written to a temporary name, then renamed) or to stdout."""
    if path is None or path == "-":
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    with replace_atomically(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

