"""Export a fine-tuned encoder to ONNX, check it against PyTorch, and run the export behind the model call the
predictors make.

`export_onnx(RUN)` writes RUN/onnx: `model.onnx` (fp32, or int8 weights with `quantize="int8"`), the model's
config.json and tokenizer, and the run files its task's predictor reads (config.yaml: max_length, columns, QA
windows; metrics.json: the QA null threshold; data_stats.json: the regression scale; thresholds.json: the
multi-label thresholds). Such a folder is both model and run folder: `textune predict`, `evaluate` and `serve`
take it as they take a run, through `OnnxModel`, which answers `model(input_ids=..., attention_mask=...)` like
a transformers model, so every task's predictor runs on ONNX Runtime unchanged.

The exporter is torch's own TorchScript one (`torch.onnx.export(..., dynamo=False)`). Hugging Face's
optimum-onnx would know each architecture's inputs and outputs, but its only release pins transformers<4.58
and textune runs on transformers 5; the dynamo exporter needs onnxscript, one more dependency for nothing the
TorchScript one lacks on these encoders. Encoder tasks only: a causal LM's generation loop (past key values,
sampling) is not a single graph worth exporting this way.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from textune.atomic import replace_atomically
from textune.errors import ONNX_EXPORT_INFO, ONNX_MODEL_FILE, TextuneError, is_onnx_export
from textune.models import inference_max_length, load_tokenizer, resolve_run_model, saved_run_config

EXPORTABLE_TASKS = ("classification", "regression", "multi-label", "token-classification", "question-answering")
HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
# Opset 17 has LayerNormalization as one operator (fused by ONNX Runtime) and is the newest the TorchScript
# exporter covers well; every onnxruntime the `onnx` extra allows (>= 1.18) runs it.
OPSET = 17
FP32_TOLERANCE = 1e-3  # max abs logit difference: float32 kernels differ in summation order, not more
CHECK_ROWS = 32
# Run files a predictor reads, copied beside the model (each where the run has it).
RUN_FILES = ("config.yaml", "metrics.json", "data_stats.json")
MODEL_FILES = ("thresholds.json",)
SAMPLE_TEXTS = ["a great film", "the plot was boring and the acting was poor, I would not watch it again",
                "Ada Lovelace wrote the first program in London.", "ok", "What a superb story, really moving.",
                "The service was slow but the food was nice.", "hate it", "Paris is the capital of France."]
SAMPLE_QUESTIONS = ["Who wrote the first program?", "What is the capital of France?"]
INSTALL_HINT = "pip install 'textune[onnx]' (onnx and onnxruntime)"


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise TextuneError(f"ONNX export and inference need {' and '.join(missing)}; run: {INSTALL_HINT}")


class OnnxOutput(dict):
    """The outputs of one call, by name, also as attributes (`out.logits`), as transformers' ModelOutput."""

    __getattr__ = dict.__getitem__


class OnnxModel:
    """An exported model on an ONNX Runtime CPU session, called as the predictors call a transformers model:
    `model(input_ids=..., attention_mask=..., token_type_ids=...)` -> `OnnxOutput` of torch tensors
    (`logits`, or `start_logits` and `end_logits`), with the model's `config`. Inputs the export does not
    take are ignored."""

    def __init__(self, folder: str | Path):
        _require("onnxruntime")
        import onnxruntime as ort
        from transformers import AutoConfig

        options = ort.SessionOptions()
        # the thread count torch was given (predict, serve --threads) holds for the session too
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(Path(folder) / ONNX_MODEL_FILE), options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = AutoConfig.from_pretrained(folder)
        self.device = torch.device("cpu")

    def __call__(self, **inputs) -> OnnxOutput:
        feed = {n: inputs[n].detach().cpu().numpy().astype(np.int64) for n in self.input_names}
        return OnnxOutput(zip(self.output_names, map(torch.from_numpy, self.session.run(self.output_names, feed))))

    def to(self, device) -> OnnxModel:  # the session stays on the CPU; predictors read `device` from it
        return self

    def eval(self) -> OnnxModel:
        return self


def load_onnx_model(folder: str | Path) -> tuple[OnnxModel, object]:
    """(OnnxModel, tokenizer) of an export folder."""
    return OnnxModel(folder), load_tokenizer(str(folder))


class _Traced(torch.nn.Module):
    """The model with positional inputs and a tuple of outputs: the form the TorchScript exporter traces."""

    def __init__(self, model, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(out[n] for n in self.output_names)


def export_onnx(run_or_model: str | Path, output: str | Path | None = None, quantize: str | None = None,
                overwrite: bool = False, say: Callable[[str], None] = print) -> Path:
    """Export the model of a run (or model folder) of an encoder task to ONNX; return the export folder.

    The export is checked before it is kept: its logits on up to 32 real inputs (the run's validation rows
    where its config names a readable file, else built-in sample texts) against PyTorch's, the max absolute
    difference reported through `say`. A PEFT run's LoRA/IA3 adapter is merged into its base first.

    Args:
        output: the folder to write (default: RUN/onnx, or beside a bare model folder).
        quantize: None (float32) or "int8": dynamic quantisation of the weights (onnxruntime's
            `quantize_dynamic`, QInt8); its difference from PyTorch and its label agreement are reported,
            not enforced.
        overwrite: replace an existing export at `output`.

    Raises:
        TextuneError: not a run or model folder; a task or architecture that cannot be exported; `output`
            exists (without `overwrite`, or is not an export); the float32 export differs from PyTorch by
            more than 1e-3. Nothing is left behind then.
    """
    from textune.adapters import is_peft_model  # PEFT: imported only when a model is exported
    from textune.infer import load_trained_model
    from textune.tasks import get_task

    if quantize not in (None, "int8"):
        raise TextuneError(f"--quantize {quantize}: ONNX export quantises to int8 only (or leave it out for float32)")
    _require("onnx", "onnxruntime")
    model_dir, run_dir = resolve_run_model(run_or_model)
    task = _exportable_task(run_or_model, model_dir)
    target = Path(output).expanduser() if output else (run_dir or model_dir.parent) / "onnx"
    _check_target(target, overwrite)
    model, tokenizer = load_trained_model(model_dir)
    if is_peft_model(model):  # what load_trained_model could not merge
        raise TextuneError("prefix tuning adds learned keys and values at run time, which cannot be folded into "
                           "the weights nor exported; use the run itself (textune predict RUN)")
    max_length = inference_max_length(tokenizer, (saved_run_config(run_dir).get("model") or {}).get("max_length"))
    first, second, where = check_inputs(get_task(task), task, run_dir)
    batch = _encode(tokenizer, first, second, max_length, "only_second" if task == "question-answering" else True)
    output_names = ["start_logits", "end_logits"] if task == "question-answering" else ["logits"]
    per_token = task in ("token-classification", "question-answering")
    with replace_atomically(target, folder=True) as tmp:
        input_names = _write_onnx(model, batch, output_names, per_token, tmp / ONNX_MODEL_FILE)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for folder, names in ((run_dir, RUN_FILES), (model_dir, MODEL_FILES)):
            for name in [n for n in names if folder is not None and (folder / n).is_file()]:
                shutil.copy2(folder / name, tmp / name)
        with torch.inference_mode():
            out = model(**{n: batch[n] for n in input_names}, return_dict=True)
        reference = {n: out[n].float().numpy() for n in output_names}
        mask = batch["attention_mask"].numpy().astype(bool)
        diff, _ = compare_outputs(reference, _onnx_outputs(tmp, batch), mask, task)
        say(f"ONNX Runtime vs PyTorch on {len(first)} {where}: max abs logit difference {diff:.2e}")
        if not diff <= FP32_TOLERANCE:
            raise TextuneError(f"the ONNX export of {type(model).__name__} differs from PyTorch by {diff:.2e} (more "
                               f"than {FP32_TOLERANCE:g}) on {where}; nothing was written")
        info = {"source": str((run_dir or model_dir).resolve()), "task": task, "architecture": type(model).__name__,
                "opset": OPSET, "inputs": input_names, "outputs": output_names, "quantize": quantize,
                "check": {"rows": len(first), "on": where, "max_abs_diff": diff}}
        if quantize == "int8":
            _quantize_int8(tmp / ONNX_MODEL_FILE)
            diff8, agreement = compare_outputs(reference, _onnx_outputs(tmp, batch), mask, task)
            agreed = "" if agreement is None else f", {agreement:.1%} of {AGREEMENT[task]} agree"
            say(f"int8 (dynamic quantisation) vs PyTorch: max abs logit difference {diff8:.2e}{agreed}")
            info["check"].update(int8_max_abs_diff=diff8, int8_agreement=agreement)
        (tmp / ONNX_EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return target


def _exportable_task(run_or_model, model_dir: Path) -> str:
    """The task of a run or model folder, if ONNX export covers it.

    Raises:
        TextuneError: a language model (by its run's task, or a bare model folder by its architecture).
    """
    from textune.tasks import task_of

    task = task_of(run_or_model)
    if task not in EXPORTABLE_TASKS:
        raise TextuneError(f"{run_or_model} holds a language model (task: {task}); ONNX export covers the encoder "
                           f"tasks ({', '.join(EXPORTABLE_TASKS)})")
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if architectures and not any(a.endswith(HEAD_SUFFIXES) for a in architectures):
        raise TextuneError(f"{run_or_model} holds a {architectures[0]}, not a classifier, tagger or question "
                           f"answerer; ONNX export covers the encoder tasks ({', '.join(EXPORTABLE_TASKS)})")
    return task


def _quantize_int8(path: Path) -> None:
    """Replace the float32 model at `path` by its dynamic int8 quantisation (weights QInt8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("model.fp32.onnx")
    os.replace(path, fp32)
    # quiet its advice to pre-process the graph first: the agreement reported after it measures the result
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    fp32.unlink()


def _check_target(target: Path, overwrite: bool) -> None:
    """As `textune merge` and `convert-gguf` treat their output: an existing folder is replaced only with
    --overwrite, and only when it is an export textune wrote."""
    if target.exists() and not target.is_dir():
        raise TextuneError(f"{target} is a file; --output must name a folder")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise TextuneError(f"{target} already exists; pass --overwrite to replace it or choose another --output")
        if not is_onnx_export(target):
            raise TextuneError(f"{target} exists and is not an ONNX export; refusing to overwrite it")


# What int8 agreement counts, per task: the decisions a prediction is made of.
AGREEMENT = {"classification": "predicted labels", "multi-label": "label decisions at 0.5",
             "token-classification": "token tags", "question-answering": "answer start and end tokens",
             "regression": ""}


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], mask: np.ndarray,
                    task: str) -> tuple[float, float | None]:
    """(max abs difference, share of agreeing decisions or None for regression) of two models' outputs on
    one padded batch. Per-token outputs are compared on real tokens only: what padding positions hold is
    never read."""
    diffs, agree = [], []
    for name, ref in reference.items():
        out = got[name]
        if task == "question-answering":  # one logit per token: the answer starts/ends at the best real token
            diffs.append(np.abs(ref - out)[mask].max())
            agree.append(np.where(mask, ref, -np.inf).argmax(-1) == np.where(mask, out, -np.inf).argmax(-1))
        elif task == "token-classification":
            diffs.append(np.abs(ref - out)[mask].max())
            agree.append(ref[mask].argmax(-1) == out[mask].argmax(-1))
        else:
            diffs.append(np.abs(ref - out).max())
            if task == "multi-label":
                agree.append(((ref > 0) == (out > 0)).ravel())
            elif task != "regression":
                agree.append(ref.argmax(-1) == out.argmax(-1))
    return float(max(diffs)), (float(np.concatenate(agree).mean()) if agree else None)


def check_inputs(task_obj, task: str, run_dir: Path | None) -> tuple[list, list | None, str]:
    """(first texts or word lists, second texts or None, where they come from) to check an export on: the
    run's validation rows where its config names a file the task can read, else built-in samples."""
    cfg = saved_run_config(run_dir)
    data = cfg.get("data") or {}
    if data.get("validation"):
        try:
            inputs, _ = task_obj.read_inputs(str(data["validation"]), data, None)
            first = list(inputs[0][:CHECK_ROWS])
            second = list(inputs[1][:CHECK_ROWS]) if len(inputs) > 1 and inputs[1] is not None else None
            if first:
                return first, second, f"validation rows of {data['validation']}"
        except (TextuneError, OSError):  # moved, deleted, or a format only training reads (SQuAD JSON)
            pass
    if task == "question-answering":
        return (SAMPLE_QUESTIONS * 4), SAMPLE_TEXTS, "built-in sample questions"
    pairs = SAMPLE_TEXTS[::-1] if data.get("text_pair_column") else None
    return SAMPLE_TEXTS, pairs, "built-in sample texts"


def _encode(tokenizer, first: list, second: list | None, max_length: int, truncation) -> dict[str, torch.Tensor]:
    """One padded batch, truncated as the task's predictor truncates (QA: the context only)."""
    return dict(tokenizer(first, second, is_split_into_words=isinstance(first[0], list), padding=True,
                          truncation=truncation, max_length=max_length, return_tensors="pt"))


def _write_onnx(model, batch: dict[str, torch.Tensor], output_names: list[str], per_token: bool,
                path: Path) -> list[str]:
    """Trace `model` into `path` (batch and sequence axes dynamic, `per_token` outputs too); return the input
    names: those of the tokenizer's outputs the model takes (token_type_ids only where it has them)."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch and n in takes]
    # The example is the longest and the shortest row, so it holds padding and no shortcut for an all-ones
    # attention mask is traced into the graph.
    lengths = batch["attention_mask"].sum(1)
    rows = [int(lengths.argmax()), int(lengths.argmin())]
    example = tuple(batch[n][rows] for n in input_names)
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes.update({n: {0: "batch", 1: "sequence"} if per_token else {0: "batch"} for n in output_names})
    try:
        with warnings.catch_warnings():  # the tracer warns of every Python branch it freezes; the check tells
            warnings.simplefilter("ignore")
            torch.onnx.export(_Traced(model, input_names, output_names).eval(), example, str(path),
                              input_names=input_names, output_names=output_names, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False)
    except Exception as e:  # the exporter raises many types; which architecture failed is what the user needs
        raise TextuneError(f"torch.onnx could not export {type(model).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return input_names


def _onnx_outputs(folder: Path, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in OnnxModel(folder)(**batch).items()}
