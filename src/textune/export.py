"""Export a fine-tuned encoder to ONNX and check it against PyTorch.

`export_onnx(RUN)` writes RUN/onnx: `model.onnx` (fp32, or int8 weights with `quantize="int8"`), the model's
config.json and tokenizer, and the files its task's predictor reads besides the weights (`Task.
prediction_files`: config.yaml for max_length, columns and QA windows; metrics.json for the QA null threshold;
thresholds.json for multi-label). Such a folder is both model and run folder: `textune predict`, `evaluate` and
`serve` take it as they take a run, through `textune.onnx_model.OnnxModel`, which answers `model(input_ids=...,
attention_mask=...)` like a transformers model, so every task's predictor runs on ONNX Runtime unchanged.

What is exported, and how the export is checked, is the task's (`Task.export_spec`, a `tasks.base.ExportSpec`):
its outputs, whether they hold a value per token, how check inputs are truncated, its built-in sample inputs and
the decisions an int8 export must agree on. A task without one is refused in one line.

Where ONNX Runtime's transformer optimizer covers the architecture (`FUSED_MODEL_TYPES`: the BERT family), the
graph is fused (`onnxruntime.transformers.optimizer.optimize_model`, its "bert" fusions: attention, embedding +
LayerNorm, bias + GELU, residual + LayerNorm) and kept in float32. Whether fusing pays is a property of the CPU,
not of the architecture (on a 2-core AMD EPYC the plain graph predicted SST-2 at 318 sentences/s against the fused
one's 301), so `fuse="auto"` times both graphs here and keeps the fused one only where it is faster by
FUSED_MIN_GAIN; "yes" keeps it wherever it agrees (an export made for another machine), "no" never fuses. The kept
graph is what is checked against PyTorch and shipped, and `textune_onnx.json`'s `optimization` records what was
fused and the timings. Other architectures, a fused graph that would not agree with the plain one, or one no
faster, keep the plain graph, with one line saying why.

The exporter is torch's own TorchScript one (`torch.onnx.export(..., dynamo=False)`). Hugging Face's
optimum-onnx would know each architecture's inputs and outputs, but its only release pins transformers<4.58
and textune runs on transformers 5; the dynamo exporter needs onnxscript, one more dependency for nothing the
TorchScript one lacks on these encoders. Encoder tasks only: a causal LM's generation loop (past key values,
sampling) is not a single graph worth exporting this way.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from textune.atomic import replace_atomically
from textune.errors import ONNX_EXPORT_INFO, ONNX_MODEL_FILE, TextuneError, is_onnx_export
from textune.models import (copy_prediction_files, inference_max_length, resolve_run_model, run_data_file,
                            saved_run_config, set_attention)
from textune.onnx_model import OnnxModel, require
from textune.tasks import TASKS, architecture_of, get_task, task_of
from textune.tasks.base import ExportSpec, Task

# Opset 17 has LayerNormalization as one operator (fused by ONNX Runtime) and is the newest the TorchScript
# exporter covers well; every onnxruntime the `onnx` extra allows (>= 1.18) runs it.
OPSET = 17
FP32_TOLERANCE = 1e-3  # max abs logit difference: float32 kernels differ in summation order, not more
CHECK_ROWS = 32
# config.model_type of the architectures ONNX Runtime's transformer optimizer fuses as its "bert" model type (its
# docs list BERT, RoBERTa, DistilBERT, ELECTRA and their multilingual twins; each was checked on a tiny random
# model: attention, embedding and LayerNorm fusions applied, logits within 1e-8). DeBERTa's disentangled
# attention, rotary encoders (ModernBERT) and others have no fusion there.
FUSED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")
# Level 1 (basic, hardware-independent) rewrites before the Python fusions: what optimize_model does by default
# for "bert". Higher levels would save CPU-specific layouts into the file; the session applies them at load anyway.
FUSION_OPT_LEVEL = 1
FUSE_CHOICES = ("auto", "yes", "no")
FUSED_MIN_GAIN = 1.05  # auto: the fused graph must run 5% faster than the plain one, beyond timing noise
TIMING_ROWS = 32  # auto times the graphs on the check rows repeated to a prediction batch (predict's is 64)


class _Traced(torch.nn.Module):
    """The model with positional inputs and a tuple of outputs: the form the TorchScript exporter traces."""

    def __init__(self, model, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(out[n] for n in self.output_names)


def export_onnx(run_or_model: str | Path, output: str | Path | None = None, quantize: str | None = None,
                overwrite: bool = False, say: Callable[[str], None] = print, fuse: str = "auto") -> Path:
    """Export the model of a run (or model folder) of a task that has an export spec to ONNX; return the
    export folder.

    The export is checked before it is kept: its outputs on up to 32 real inputs (the run's validation rows
    where its config names a file that can be read from here, else the task's built-in samples, the message
    saying why) against PyTorch's, the max absolute difference reported through `say`. A PEFT run's LoRA/IA3
    adapter is merged into its base first.

    Args:
        output: the folder to write (default: RUN/onnx, or beside a bare model folder).
        quantize: None (float32) or "int8": dynamic quantisation of the weights (onnxruntime's
            `quantize_dynamic`, QInt8); its difference from PyTorch and its agreement are reported, not enforced.
        overwrite: replace an existing export at `output`.
        fuse: ONNX Runtime's transformer fusions where they cover the architecture: "auto" keeps the fused graph
            where it runs faster on this machine, "yes" wherever it agrees with the plain one, "no" never.

    Raises:
        TextuneError: not a run or model folder; a task or architecture that cannot be exported; `output`
            exists (without `overwrite`, or is not an export); the float32 export differs from PyTorch by
            more than 1e-3. Nothing is left behind then.
    """
    from textune.adapters import is_peft_model  # PEFT: imported only when a model is exported
    from textune.infer import load_trained_model

    if fuse not in FUSE_CHOICES:
        raise TextuneError(f"--fuse {fuse}: choose one of {', '.join(FUSE_CHOICES)}")
    if quantize not in (None, "int8"):
        raise TextuneError(f"--quantize {quantize}: ONNX export quantises to int8 only (or leave it out for float32)")
    require("onnx", "onnxruntime")
    model_dir, run_dir = resolve_run_model(run_or_model)
    task = exportable_task(run_or_model, model_dir)
    spec = task.export_spec
    # a folder that is both model and run (a merged folder) is exported beside itself, as a bare model folder
    beside = run_dir if run_dir is not None and run_dir != model_dir else model_dir.parent
    target = Path(output).expanduser() if output else beside / "onnx"
    _check_target(target, overwrite)
    model, tokenizer = load_trained_model(model_dir)
    if is_peft_model(model):  # what load_trained_model could not merge
        raise TextuneError("prefix tuning adds learned keys and values at run time, which cannot be folded into "
                           "the weights nor exported; use the run itself (textune predict RUN)")
    unfused = unfused_reason(model.config) if fuse != "no" else "not asked for (--fuse no)"
    if unfused is None:
        # The optimizer's attention fusion matches the ops of the eager attention (MatMul, scale, mask Add,
        # Softmax, MatMul); a trace of PyTorch's SDPA kernel leaves attention unfused. Same function, same logits.
        set_attention(model, "eager")
    if spec.wrap is not None:  # outputs computed from the model's (the embedding task pools its hidden states)
        model = spec.wrap(model, model_dir)
    max_length = inference_max_length(tokenizer, (saved_run_config(run_dir).get("model") or {}).get("max_length"),
                                      config=model.config)
    first, second, where = check_inputs(task, run_dir)
    batch = _encode(tokenizer, first, second, max_length, spec.truncation)
    with replace_atomically(target, folder=True) as tmp:
        input_names = _write_onnx(model, batch, list(spec.outputs), spec.per_token, tmp / ONNX_MODEL_FILE)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        copy_prediction_files(task.prediction_files, model_dir, run_dir, tmp)
        optimization = _fuse(model.config, batch, spec, tmp, unfused, fuse == "auto", say)
        check = _check_export(model, batch, input_names, spec, tmp, where, quantize, optimization, say)
        info = {"source": str((run_dir or model_dir).resolve()), "task": task.name,
                "architecture": type(model).__name__, "opset": OPSET, "inputs": input_names,
                "outputs": list(spec.outputs), "optimization": optimization, "quantize": quantize, "check": check}
        (tmp / ONNX_EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return target


def exportable_task(run_or_model, model_dir: Path) -> Task:
    """The task of a run or model folder, if it can be exported and the folder holds a model of its kind.

    Raises:
        TextuneError: a task without an export spec, or a model whose architecture is not one its task builds.
    """
    name = task_of(run_or_model)
    task = get_task(name)
    covered = ", ".join(n for n in TASKS if get_task(n).export_spec is not None)
    if task.export_spec is None:
        raise TextuneError(f"{run_or_model}: {name} models cannot be exported to ONNX yet; ONNX export covers the "
                           f"encoder tasks ({covered})")
    architectures = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if architectures and architecture_of(architectures) not in TASKS[name].architectures:
        endings = " or ".join(s for arch in TASKS[name].architectures for s in arch.suffixes)
        raise TextuneError(f"{run_or_model} holds a {architectures[0]}, not a {name} model (whose class "
                           f"name ends in {endings}); ONNX export covers the encoder tasks ({covered})")
    return task


def unfused_reason(config) -> str | None:
    """Why an export of a model of this config stays a plain ONNX graph; None where ONNX Runtime's transformer
    optimizer fuses it."""
    model_type = getattr(config, "model_type", None)
    if model_type in FUSED_MODEL_TYPES:
        return None
    return (f"ONNX Runtime's transformer optimizer has no fusions for {model_type} models (it fuses "
            f"{', '.join(FUSED_MODEL_TYPES)})")


def _fuse(config, batch: dict[str, torch.Tensor], spec: ExportSpec, folder: Path, unfused: str | None,
          timed: bool, say: Callable[[str], None]) -> dict:
    """Replace the plain graph in `folder` by ONNX Runtime's fused one where `unfused` is None, the fused graph
    agrees with the plain one on `batch` and, if `timed`, runs faster here; else keep the plain graph and say why
    in one line. Return what the export's info records as its `optimization`."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused_file = folder / "model.fused.onnx"
    try:
        if unfused is None:
            # the optimizer logs every pattern it looked for and did not find: noise, as the check below decides
            logging.disable(logging.WARNING)
            try:
                fused = optimize_model(str(folder / ONNX_MODEL_FILE), model_type="bert", opt_level=FUSION_OPT_LEVEL,
                                       num_heads=getattr(config, "num_attention_heads", 0),
                                       hidden_size=getattr(config, "hidden_size", 0))
            finally:
                logging.disable(logging.NOTSET)
            fused.save_model_to_file(str(fused_file))  # float32 kept: no float16 conversion, which a CPU does not run
            operators = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
            mask = batch["attention_mask"].numpy().astype(bool)
            diff, _ = compare_outputs(_onnx_outputs(folder, batch), _onnx_outputs(folder, batch, fused_file.name),
                                      mask, spec)
            if operators and diff <= FP32_TOLERANCE:
                seconds = time_graphs(folder, batch, {"plain": ONNX_MODEL_FILE, "fused": fused_file.name}) \
                    if timed else {}
                timing = {f"{k}_ms": round(1000 * v, 2) for k, v in seconds.items()}
                if seconds and seconds["plain"] < seconds["fused"] * FUSED_MIN_GAIN:
                    return _plain(f"the fused graph was no faster on this machine ({timing['fused_ms']:.1f} ms "
                                  f"against the plain graph's {timing['plain_ms']:.1f} ms per {TIMING_ROWS} rows; "
                                  f"--fuse yes keeps it)", say, timing)
                os.replace(fused_file, folder / ONNX_MODEL_FILE)
                return {"fused": True, "optimizer": "onnxruntime.transformers.optimizer", "model_type": "bert",
                        "opt_level": FUSION_OPT_LEVEL, "precision": "fp32", "operators": operators, **timing}
            unfused = (f"the fused graph differs from the plain one by {diff:.2e}" if operators else
                       "ONNX Runtime's transformer optimizer found nothing to fuse in it")
    except Exception as e:  # noqa: BLE001  an optimizer failure costs the fusions, not the export
        unfused = f"ONNX Runtime's transformer optimizer failed on it ({(str(e).splitlines() or [''])[0][:200]})"
    finally:
        fused_file.unlink(missing_ok=True)
    return _plain(unfused, say)


def _plain(why: str, say: Callable[[str], None], timing: dict | None = None) -> dict:
    say(f"plain ONNX graph (no fusions): {why}")
    return {"fused": False, "why": why, **(timing or {})}


def time_graphs(folder: Path, batch: dict[str, torch.Tensor], files: dict[str, str], repeats: int = 5
                ) -> dict[str, float]:
    """Seconds per call of each graph (name -> file in `folder`) on `batch`'s rows repeated to TIMING_ROWS: the
    best of `repeats`, after a warm-up, the graphs taking turns so that a change of load meets both."""
    tiled = {k: v.repeat(-(-TIMING_ROWS // len(v)), *[1] * (v.dim() - 1))[:TIMING_ROWS] for k, v in batch.items()}
    models = {name: OnnxModel(folder, file) for name, file in files.items()}
    best = dict.fromkeys(files, float("inf"))
    for model in models.values():
        model(**tiled)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**tiled)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _check_export(model, batch: dict[str, torch.Tensor], input_names: list[str], spec: ExportSpec, folder: Path,
                  where: str, quantize: str | None, optimization: dict, say: Callable[[str], None]) -> dict:
    """Compare the export in `folder` with PyTorch on `batch` (the inputs the export takes), quantise it where
    asked; return what the export's info records of the check.

    Raises:
        TextuneError: the float32 export differs from PyTorch by more than FP32_TOLERANCE.
    """
    with torch.inference_mode():
        out = model(**{n: batch[n] for n in input_names}, return_dict=True)
    reference = {n: out[n].float().numpy() for n in spec.outputs}
    mask = batch["attention_mask"].numpy().astype(bool)
    rows = len(mask)
    diff, _ = compare_outputs(reference, _onnx_outputs(folder, batch), mask, spec)
    fused = ", ".join(f"{n} {name}" for name, n in optimization.get("operators", {}).items())
    graph = f"fused: {fused}" if optimization["fused"] else "plain graph"
    say(f"ONNX Runtime ({graph}) vs PyTorch on {rows} {where}: max abs logit difference {diff:.2e}")
    if not diff <= FP32_TOLERANCE:
        raise TextuneError(f"the ONNX export of {type(model).__name__} differs from PyTorch by {diff:.2e} (more "
                           f"than {FP32_TOLERANCE:g}) on {where}; nothing was written")
    check = {"rows": rows, "on": where, "max_abs_diff": diff}
    if quantize == "int8":
        _quantize_int8(folder / ONNX_MODEL_FILE)
        diff8, agreement = compare_outputs(reference, _onnx_outputs(folder, batch), mask, spec)
        agreed = "" if agreement is None else f", {agreement:.1%} of {spec.decisions} agree"
        say(f"int8 (dynamic quantisation) vs PyTorch: max abs logit difference {diff8:.2e}{agreed}")
        check.update(int8_max_abs_diff=diff8, int8_agreement=agreement)
    return check


def _quantize_int8(path: Path) -> None:
    """Replace the float32 model at `path` by its dynamic int8 quantisation (weights QInt8)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("model.fp32.onnx")
    os.replace(path, fp32)
    # quiet its advice to pre-process the graph first: the agreement reported after it measures the result
    logging.disable(logging.WARNING)
    try:
        # A fused graph's contrib operators (Attention, SkipLayerNormalization) have no ONNX shape inference: their
        # outputs' type is float32, said here, as the quantiser asks.
        quantize_dynamic(fp32, path, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
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


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], mask: np.ndarray,
                    spec: ExportSpec) -> tuple[float, float | None]:
    """(max abs difference, share of agreeing decisions or None where the task makes none) of two models'
    outputs on one padded batch. Per-token outputs are compared on real tokens only: what padding positions
    hold is never read."""
    diffs, agree = [], []
    for name, ref in reference.items():
        out = got[name]
        diffs.append(np.abs(ref - out)[mask].max() if spec.per_token else np.abs(ref - out).max())
        if spec.decide is not None:
            agree.append(np.ravel(spec.decide(ref, mask) == spec.decide(out, mask)))
    return float(max(diffs)), (float(np.concatenate(agree).mean()) if agree else None)


def check_inputs(task: Task, run_dir: Path | None) -> tuple[list, list | None, str]:
    """(first texts or word lists, second texts or None, which rows they are) to check an export on: the first
    rows of the run's validation file where it can be read from here, else the task's built-in samples, with
    the reason."""
    cfg = saved_run_config(run_dir)
    data = cfg.get("data") or {}
    path = run_data_file(data["validation"], run_dir, cfg.get("output_dir")) if data.get("validation") else None
    if path is not None:
        try:
            inputs, _ = task.read_inputs(str(path), data, None)
            first = list(inputs[0][:CHECK_ROWS])
            if first:
                second = list(inputs[1][:CHECK_ROWS]) if len(inputs) > 1 and inputs[1] is not None else None
                return first, second, f"validation rows of {path}"
            why = f"its validation file {path} holds no rows"
        except (TextuneError, OSError) as e:  # a format only training reads (SQuAD JSON), or unreadable
            why = f"its validation file {path} cannot be read as prediction input: {str(e).splitlines()[0]}"
    elif data.get("validation"):
        why = f"its validation file {data['validation']} is not found from here"
    elif data.get("name"):
        why = f"the run read the data set {data['name']}, not files"
    else:
        why = "the run names no validation file" if cfg else "the model folder has no run config.yaml"
    first, second = task.export_spec.samples(data)
    return first, second, f"{task.export_spec.samples_name} ({why})"


def _encode(tokenizer, first: list, second: list | None, max_length: int, truncation) -> dict[str, torch.Tensor]:
    """One padded batch, truncated as the task's predictor truncates (`ExportSpec.truncation`)."""
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


def _onnx_outputs(folder: Path, batch: dict[str, torch.Tensor], file: str = ONNX_MODEL_FILE) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in OnnxModel(folder, file)(**batch).items()}
