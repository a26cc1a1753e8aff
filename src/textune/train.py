"""Fine-tuning: one training loop on Accelerate, readable top to bottom.

`train(cfg)` checks everything it can (config, data, model, trackers) before it writes the run folder, so a
user mistake leaves nothing half-written. Then: AdamW with linear/cosine warm-up, gradient accumulation and
clipping, mixed precision, evaluation every epoch or N steps, best-checkpoint keeping, early stopping.

`_train` reads as the list of its stages (as torchtune's recipes set up): `locate_run`, `setup_accelerator`,
`load_inputs`, `open_run`, `plan_training`, `TrainingLoop.run`, `finish_run`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset, RandomSampler
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from textune.config import Config, TrainConfig, save_config, with_resolved_paths
from textune.data import column_values
from textune.diagnose import diagnose_curves, format_baselines, format_diagnosis
from textune.compiling import CompiledForward, plan_compile
from textune.checkpoint import (check_checkpoint_matches, find_checkpoint, list_checkpoints, load_checkpoint,
                                remove_checkpoints, save_checkpoint)
from textune.atomic import old_copy, replace_atomically
from textune.errors import TextuneError, TrainingInterrupted, is_onnx_export, onnx_export_error
from textune.launch import FSDP_WITHOUT_GPU, batch_split_problem
from textune.evaluate import headline
from textune.adapters import is_peft_model, load_adapter_weights, save_adapter_extras
from textune.model_card import write_model_card
from textune.models import HEAD_MODULE_NAMES, count_parameters, folder_position_limit
from textune.tasks import get_task
from textune.tasks.base import TaskInputs
from textune.speedups import speed_up
from textune.tuning import optimizer_step_hook
from textune.tracking import (PROJECT, build_trackers, final_values, finish_trackers, flat_config, record_values,
                              start_trackers)

RUN_MARKERS = ("config.yaml", "history.jsonl")
KEEP_WHILE_TRAINING = 2  # checkpoints kept during a run when train.keep_last is empty (all deleted at its end)


# ---------------------------------------------------------------- set-up helpers


def cpu_supports_bf16() -> bool:
    """bf16 autocast only pays off on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_mixed_precision(requested: str, device: str) -> tuple[str, str | None]:
    """Resolve `train.mixed_precision` for the device; return (mode, note for the user or None)."""
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if requested == "fp16" and not on_cuda:
        raise TextuneError("train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if requested != "auto":
        return requested, None
    if on_cuda:
        return ("bf16", None) if torch.cuda.is_bf16_supported() else ("fp16", None)
    if device in ("auto", "cpu") and not torch.backends.mps.is_available() and cpu_supports_bf16():
        return "bf16", None
    return "no", "this CPU has no fast bf16 (AVX512-BF16/AMX): training in fp32"


def check_process_count(t: TrainConfig, accelerator: Accelerator) -> None:
    """train.batch_size is the global batch: it must split evenly over the processes. adamw_8bit needs CUDA."""
    problem = batch_split_problem(t.batch_size, accelerator.num_processes)
    if problem:
        raise TextuneError(problem)
    sharded = {DistributedType.FSDP: "FSDP shards the weights", DistributedType.DEEPSPEED: "ZeRO shards the optimizer state"}
    if accelerator.distributed_type in sharded:
        raise TextuneError(f"{sharded[accelerator.distributed_type]}, but textune's checkpoints and saved model are "
                           f"written by the main process from whole copies; launch with "
                           f"configs/accelerate/multi-gpu-ddp.yaml (DDP) instead")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # fsdp.yaml, but Accelerate chose no FSDP
        # (On CPU Accelerate makes it DDP, while its fsdp_cpu_ram_efficient_loading has the model loaded empty on
        # all but the main process: the run would crash in prepare().)
        raise TextuneError(FSDP_WITHOUT_GPU)
    if t.optimizer == "adamw_8bit" and accelerator.device.type != "cuda":
        raise TextuneError(f"train.optimizer: adamw_8bit (bitsandbytes) is supported on CUDA GPUs only, and this run "
                           f"is on {accelerator.device.type}; use adamw")


def eval_batch_size(t: TrainConfig, accelerator: Accelerator) -> int:
    """train.eval_batch_size rounded up to split evenly over the processes (it only changes speed and memory)."""
    n = accelerator.num_processes
    return -(-t.eval_batch_size // n) * n


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """train.gradient_checkpointing: recompute each layer's activations in the backward pass."""
    base = model.get_base_model() if is_peft_model(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TextuneError(f"train.gradient_checkpointing: {type(base).__name__} does not support it; set it to false")
    # Non-reentrant checkpointing also works when the inputs of a layer need no gradient (frozen embeddings
    # under PEFT), where the reentrant kind silently trains nothing.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def synced_stop_signal(signum: int | None, accelerator: Accelerator) -> int | None:
    """The stop signal any process received, on every process, so all checkpoint and stop at the same step.

    One tiny all-reduce per step with several processes (nothing with one): a signal reaches processes at
    slightly different steps, and a process that stopped alone would leave the others waiting for it.
    """
    if accelerator.num_processes == 1:
        return signum
    received = accelerator.reduce(torch.tensor(signum or 0, device=accelerator.device), reduction="sum").item()
    return (signum or signal.SIGTERM) if received else None


def refuse_onnx_export(run: Path) -> None:
    """An ONNX export holds its run's config.yaml, so it would pass for a run folder to resume or replace."""
    if is_onnx_export(run):
        raise onnx_export_error(run, "a run folder to train into (output_dir)",
                                "choose another output_dir, or resume the run it was exported from")


def prepare_run_folder(output_dir: str, overwrite: bool) -> Path:
    """Refuse to clobber an existing run unless asked; never delete a folder textune did not write."""
    run = Path(output_dir).expanduser().resolve()
    refuse_onnx_export(run)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise TextuneError(f"run folder {run} already exists; pick another output_dir or pass --overwrite")
        if not any((run / m).exists() for m in RUN_MARKERS):
            raise TextuneError(f"{run} exists and is not a textune run folder; refusing to overwrite it")
    return run


# Encoder blocks are numbered `layer.3` (BERT), `layers.3`, `h.3` (GPT-2) or `block.3` (T5) in parameter names.
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def parameter_lr(name: str, t: TrainConfig, num_layers: int, lora_b_ratio: float | None = None) -> float:
    """The learning rate of parameter `name`: `train.head_lr` for the classification head; with
    `train.layer_lr_decay` d, lr * d**(layers above this one) in the encoder and lr * d**num_layers for the
    embeddings; `train.lr` for the rest (pooler, final norm, PEFT prompt encoder). LoRA+
    (`tuning.loraplus_lr_ratio`): a LoRA B matrix learns at `lora_b_ratio` times its layer's rate."""
    parts = name.split(".")
    if t.head_lr is not None and any(p in HEAD_MODULE_NAMES for p in parts):
        return t.head_lr
    scale = lora_b_ratio if lora_b_ratio is not None and "lora_B" in parts else 1.0
    if t.layer_lr_decay is None:
        return t.lr * scale
    layer = LAYER_INDEX.search(name)
    if layer:
        return t.lr * scale * t.layer_lr_decay ** (num_layers - 1 - int(layer.group(1)))
    if "prompt_encoder" not in parts and any(p.startswith("embed") or p in ("wte", "wpe") for p in parts):
        return t.lr * t.layer_lr_decay ** num_layers
    return t.lr * scale


def build_optimizer(model: torch.nn.Module, t: TrainConfig,
                    lora_b_ratio: float | None = None) -> torch.optim.Optimizer:
    """AdamW with one parameter group per (learning rate, weight decay); see `parameter_lr`.

    LoRA+ is one more learning rate here rather than PEFT's `create_loraplus_optimizer`, which builds its own
    groups: they would drop train.head_lr and layer_lr_decay, and put every 1-D parameter (biases, the head's,
    DoRA's magnitudes) at B's rate, where the LoRA+ paper raises only B's."""
    layers = {int(m.group(1)) for n, _ in model.named_parameters() if (m := LAYER_INDEX.search(n))}
    num_layers = max(layers) + 1 if layers else 0
    by_setting: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Biases and LayerNorm weights are the 1-D parameters; decaying them only hurts (BERT recipe).
            decay = t.weight_decay if p.ndim >= 2 else 0.0
            by_setting.setdefault((parameter_lr(name, t, num_layers, lora_b_ratio), decay), []).append(p)
    # The base lr's groups first: the loop logs the first group's lr.
    ordered = sorted(by_setting.items(), key=lambda item: item[0][0] != t.lr)
    groups = [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in ordered]
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optimizer == "adamw_8bit":  # config validation checked that bitsandbytes is installed
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    if t.fused_optimizer:
        try:  # fused AdamW runs on CPU and CUDA in recent PyTorch: one kernel instead of a Python loop
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_loader(ds, tokenizer, batch_size: int, shuffle: bool, group_by_length: bool, seed: int,
                num_workers: int = 0, collate=None) -> DataLoader:
    """A DataLoader with dynamic padding (or the given `collate`). Its shuffling draws only from
    `loader.generator`, never from the global RNG (which dropout uses), so `reseed_loader` fixes each epoch's
    order and a resumed run replays the same batches and the same dropout masks."""
    collate = collate or DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    if isinstance(ds, IterableDataset):  # data.streaming: the stream shuffles itself through a bounded buffer
        return DataLoader(ds, batch_size=batch_size, generator=generator, collate_fn=collate, num_workers=num_workers)
    sampler = None
    if shuffle and group_by_length and "length" in ds.column_names:  # packed LM blocks all have one length
        # Buckets of similar length, shuffled between buckets: little padding, still random batches.
        sampler = LengthGroupedSampler(batch_size, lengths=column_values(ds, "length"), generator=generator)
    elif shuffle:
        sampler = RandomSampler(ds, generator=generator)
    ds = ds.remove_columns([c for c in ("length",) if c in ds.column_names])
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, generator=generator, collate_fn=collate,
                      num_workers=num_workers)


def reseed_loader(loader: DataLoader, seed: int, epoch: int) -> None:
    """Each epoch's data order depends only on (seed, epoch): what makes mid-epoch resume exact."""
    if isinstance(loader.dataset, IterableDataset):  # a stream's shuffle buffer is seeded with (seed, epoch)
        loader.set_epoch(epoch)
        return
    loader.generator.manual_seed(seed * 1000 + epoch)


class History:
    """Appends one JSON line per logging step and per evaluation to RUN/history.jsonl, and hands each record to
    `log(values, step=)` (`Accelerator.log`: the experiment trackers of logging.report_to, if any)."""

    def __init__(self, path: Path, write: bool = True, log: Callable[..., None] | None = None):
        self.path = path
        self.write = write  # False on all but the main process: they keep the records, the file is main's
        self.log = log
        self.records: list[dict] = []

    def append(self, record: dict) -> None:
        self.records.append(record)
        if not self.write:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.log is not None:  # train/loss, train/lr, eval/accuracy, ... against the step
            self.log(record_values(record), step=record["step"])

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with `records` (a resumed run continues from its checkpoint's history)."""
        self.records = list(records)
        if not self.write:
            return
        with replace_atomically(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def save_model(model, tokenizer, target: Path) -> None:
    """Write the model to a temporary folder, then swap it in, so `target` is never half-written."""
    with replace_atomically(target, folder=True) as tmp:
        model.save_pretrained(tmp)  # safetensors by default; a PEFT model writes its adapter alone
        if is_peft_model(model):
            save_adapter_extras(model, tmp)
        tokenizer.save_pretrained(tmp)


def progress_line(record: dict, total_steps: int, seconds: float, steps_done: int) -> str:
    """One logging step as a plain line (for a log file): step, epoch, loss, lr, rate and time left."""
    left = seconds / max(steps_done, 1) * (total_steps - record["step"])
    return (f"step {record['step']}/{total_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s | "
            f"{timedelta(seconds=round(left))} left")


def load_saved_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the weights `save_model` wrote into `model`, strictly.

    Every parameter and buffer must be in the file, except one tied to another that is (save_pretrained
    writes shared weights once, e.g. an LM head tied to the embeddings), and the file may hold nothing else.

    Raises:
        TextuneError: keys missing or unexpected (the folder holds another model, or a damaged one).
    """
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):  # one file, or the shards of a large model
        weights.update(load_file(f))
    own = model.state_dict(keep_vars=True)
    names_of_storage: dict[int, set[str]] = {}
    for name, tensor in own.items():
        names_of_storage.setdefault(tensor.data_ptr(), set()).add(name)
    missing = [k for k in own if k not in weights and not names_of_storage[own[k].data_ptr()] & weights.keys()]
    unexpected = sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise TextuneError(f"{folder} does not fit the model being trained: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}; it was damaged or written by another run: "
                           f"delete it and train again")
    model.load_state_dict(weights, strict=False)  # strict=True would also want the tied copies just accepted


def warn_if_config_changed(cfg: Config, saved: Path, say) -> None:
    if not saved.is_file():
        return
    import yaml

    # Paths compared resolved: config.yaml holds them resolved, the config being run perhaps relative.
    before, now = (with_resolved_paths(c)[0] for c in (yaml.safe_load(saved.read_text()), cfg.to_dict()))
    changed = [f"{section}.{k}" for section, values in now.items() if isinstance(values, dict)
               for k, v in values.items() if (before.get(section) or {}).get(k) != v]
    if changed:
        say(f"warning    the config differs from the one this run started with ({', '.join(changed)}); "
            f"the resumed run uses the new values")


def handle_nonfinite(state: LoopState, t: TrainConfig, run: Path, loss: float) -> None:
    """Skip up to `train.skip_nonfinite_steps` bad steps, then stop with the last good checkpoint kept."""
    state.nonfinite_skipped += 1
    where = f"step {state.step + 1} (epoch {state.epoch + 1}, batch {state.batch})"
    if state.nonfinite_skipped > t.skip_nonfinite_steps:
        good = list_checkpoints(run)
        kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        raise TextuneError(f"training stopped: non-finite loss or gradient (loss={loss}) at {where}; {kept}. "
                           f"Lower train.lr, keep train.max_grad_norm set, or allow skips with "
                           f"train.skip_nonfinite_steps")
    tqdm.write(f"skipped {where}: non-finite loss or gradient ({state.nonfinite_skipped} of "
               f"{t.skip_nonfinite_steps} allowed)")


def is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


@dataclass
class LoopState:
    """Everything the loop counts; saved in checkpoints (plain values only) and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    samples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0  # loss summed since the last logging step
    loss_count: int = 0  # items (examples, or a task's tokens: see train_step) on this process in loss_sum
    nonfinite_skipped: int = 0
    stopped_early: bool = False


class StopRequest:
    """SIGINT/SIGTERM handler: the loop finishes its step, writes a checkpoint and exits cleanly.

    A second signal falls through to the default handler, so a stuck run can still be killed.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only install on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        tqdm.write(f"{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
                   f"(send it again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_run_folder(run: Path, resuming: bool) -> None:
    """Create the run folder empty (replacing the run `prepare_run_folder` allowed to overwrite), or, resuming,
    reuse it."""
    if resuming:
        # A kill between save_model's two renames leaves only model.old: put it back.
        if not (run / "model").exists() and old_copy(run / "model").exists():
            old_copy(run / "model").rename(run / "model")
        run.mkdir(parents=True, exist_ok=True)  # resuming another run's checkpoint into a new folder
        return
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)


def write_run_header(run: Path, cfg: Config, inputs: TaskInputs) -> None:
    """The resolved config and the data statistics, the run folder's first files."""
    save_config(cfg, run / "config.yaml")
    stats = inputs.data_stats(cfg)
    if inputs.measured_baselines:  # the diagnosis and the report read them here, as they read the label counts
        stats["baselines"] = inputs.measured_baselines
    (run / "data_stats.json").write_text(json.dumps(stats, indent=2))


# ---------------------------------------------------------------- the training step and loop


@dataclass
class AccumulationWindow:
    """The micro-batches of the optimizer step being accumulated, on this process."""

    items: torch.Tensor | int = 0  # what the losses were summed over: examples, or tokens (see train_step)
    nonfinite: torch.Tensor | int = 0  # non-finite losses seen, kept on the device (reading it would sync)

    def add(self, items: torch.Tensor | int, loss: torch.Tensor) -> None:
        self.items = self.items + items
        self.nonfinite = self.nonfinite + (~torch.isfinite(loss)).int()

    def reset(self) -> None:
        self.items, self.nonfinite = 0, 0

    def close(self, model, accelerator: Accelerator, scaled: bool = False) -> bool:
        """At the window's last micro-batch: turn the summed gradient into the mean over the items of the
        window on every process (unless the loss was `scaled` already), start a new window, and say whether any
        process saw a non-finite loss (the same answer on each)."""
        counts = torch.stack([torch.as_tensor(x, device=accelerator.device).reshape(()).long()
                              for x in (self.items, self.nonfinite)])
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        items, bad = counts.tolist()  # one host sync for both
        if not scaled:
            # Accelerate divided by the accumulation steps and DDP averaged over the processes: times G x P / (the
            # items of all processes) is the mean over every item of the step, however they were shared out.
            scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(items, 1)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.reset()
        return bool(bad)


def train_step(model, batch, optimizer, scheduler, accelerator: Accelerator, max_grad_norm: float | None,
               loss_fn: Callable | None = None, window: AccumulationWindow | None = None,
               forward: Callable | None = None, after_step: Callable[[], None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | int, bool, bool]:
    """Forward, backward and (once the window's micro-batches are accumulated) one optimizer step.

    Every item weighs the same in a step, however the step splits into micro-batches and processes: each
    micro-batch's loss summed over its items is back-propagated, and the window's gradient is divided by the
    number of items of the whole step, counted over every process (what transformers' Trainer does with
    `num_items_in_batch`). The items are examples, or what a task's `loss_fn` counts (answer tokens: see
    `TaskInputs.loss_fn`). So an epoch's last window, with fewer micro-batches or a smaller last batch, is the
    mean over its items like every other step, and a process whose share has more tokens weighs more.

    Returns (detached loss summed over the micro-batch's items, their number, finite, stepped). finite is False
    when a loss or the gradient is NaN/inf on any process: every process skips the update together. That
    check reads a scalar or two per step: free on a CPU, one host sync per step on a GPU, a price worth paying
    to never write NaN weights. stepped is True when the optimizer took a step: not while accumulating, and
    not when fp16's gradient scaler skipped an overflowing step (routine while it finds its scale).
    `loss_fn(model, batch)` replaces the model's own loss (mixup, answer tokens); `window` carries the
    accumulation across calls (a fresh one: a window of one micro-batch); `forward` is the model as the
    forward pass calls it (`compiling.CompiledForward`), None for `model` itself. `after_step()` runs after
    each optimizer step, before the gradients are cleared (the tuning method's hook: AdaLoRA reads them).
    """
    window = window if window is not None else AccumulationWindow()
    forward = forward if forward is not None else model
    examples = len(batch["input_ids"])
    with accelerator.accumulate(model):
        loss = loss_fn(forward, batch) if loss_fn else forward(**batch).loss
        # a mean per example, or a task's (sum, count) of a loss per token
        loss, items = loss if isinstance(loss, tuple) else (loss * examples, examples)
        # One process skips a bad loss's backward at once. With several, every process must run its backward
        # (the others wait for its gradients), so the loss is checked on all of them when the window closes.
        if accelerator.num_processes == 1 and not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            window.reset()
            return loss.detach(), items, False, False
        window.add(items, loss)
        # A step of one micro-batch on one process knows its items before the backward: dividing the loss there
        # gives the same gradient as scaling it afterwards, without a pass over every gradient (profile_train.py).
        alone = accelerator.gradient_accumulation_steps == 1 and accelerator.num_processes == 1
        accelerator.backward(loss / torch.as_tensor(items).clamp(min=1) if alone else loss)
        if not accelerator.sync_gradients:
            return loss.detach(), items, True, False
        bad_loss = window.close(model, accelerator, scaled=alone)
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        # With fp16 the gradient scaler skips overflowing steps itself; an inf gradient there is routine.
        if bad_loss or (accelerator.scaler is None and norm is not None and not torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            return loss.detach(), items, False, False
        scale_before = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
        optimizer.step()
        # The scaler lowers its scale exactly when it skipped the step. (Accelerate's optimizer_step_was_skipped
        # misses the skips a fused AdamW makes itself from the scaler's found-inf flag.)
        stepped = scale_before is None or accelerator.scaler.get_scale() >= scale_before
        if stepped:
            scheduler.step()
            if after_step is not None:
                after_step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), items, True, stepped


def train(cfg: Config, overwrite: bool = False, on_evaluate: Callable[[dict], None] | None = None,
          resume: str | None = None, compute_metrics: Callable[..., dict] | None = None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; return the run folder. See the module docstring.

    Args:
        overwrite: replace an existing run folder (only one textune wrote).
        on_evaluate: called with each evaluation record (step, epoch, eval_* metrics) as it is made;
            a hyper-parameter search uses it to prune a trial by raising.
        resume: `latest` or a checkpoint folder: continue that run exactly where it stopped.
        compute_metrics: `(predictions, labels) -> dict` merged into every evaluation's metrics, history and
            metrics.json (see `TaskInputs.compute_metrics`); train.metric still selects among the task's own.

    Raises:
        TextuneError: bad config, data or model; a tracker that cannot start; non-finite loss beyond
            `train.skip_nonfinite_steps`.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    # The trackers are closed however the run ends (an error, a search pruning this trial by raising), so a
    # later run in this process starts its own MLflow run instead of finding this one still active.
    trackers = build_trackers(cfg.logging.report_to, Path(cfg.output_dir).expanduser().resolve())
    try:
        return _train(cfg, trackers, overwrite, on_evaluate, resume, compute_metrics)
    finally:
        finish_trackers(trackers)


def _train(cfg: Config, trackers: list, overwrite: bool, on_evaluate: Callable[[dict], None] | None,
           resume: str | None, compute_metrics: Callable[..., dict] | None) -> Path:
    """`train`'s body: its stages in order (as torchtune's recipes set up). Everything that can fail because of
    user input (the run folder, the device, the data, the model, a checkpoint that does not fit, a tracker) is
    checked before the run folder's files are written."""
    run, checkpoint = locate_run(cfg.output_dir, overwrite, resume)
    accelerator, precision, precision_note = setup_accelerator(cfg.train, trackers)
    set_seed(cfg.seed)
    inputs = load_inputs(cfg, accelerator, precision, precision_note, checkpoint, compute_metrics)
    history = open_run(cfg, run, inputs, accelerator, checkpoint)
    plan = plan_training(cfg, inputs, accelerator, precision)
    state = LoopState()
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint, plan.model, plan.optimizer, plan.scheduler, accelerator)
        state = LoopState(**saved["loop"])
        history.rewrite(saved["history"])  # drop what was logged after the checkpoint: it will be redone
    loop = TrainingLoop(cfg, plan, inputs, accelerator, run, history, state, on_evaluate)
    loop.run()
    finish_run(cfg, run, plan, inputs, accelerator, loop)
    return run


# ---------------------------------------------------------------- the stages of a run


def locate_run(output_dir: str, overwrite: bool, resume: str | None) -> tuple[Path, Path | None]:
    """The run folder, and the checkpoint to resume from (None for a new run). Nothing is written yet."""
    if not resume:
        return prepare_run_folder(output_dir, overwrite), None
    run = Path(output_dir).expanduser().resolve()
    refuse_onnx_export(run)
    return run, find_checkpoint(run, resume)


def setup_accelerator(t: TrainConfig, trackers: list) -> tuple[Accelerator, str, str | None]:
    """The Accelerator for `train.device` and `train.mixed_precision`; returns (accelerator, precision, note
    on the precision for the user or None)."""
    precision, precision_note = choose_mixed_precision(t.mixed_precision, t.device)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise TextuneError("train.device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    # Accelerate keeps its settings in a process-wide singleton; reset them (not the distributed set-up)
    # so that several runs in one Python process (the API, tests, searches) can use different precisions.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True also on a machine without an accelerator: under `accelerate launch` that is what makes the
    # processes one gloo group (MULTI_CPU) instead of N unrelated single-process runs. split_batches: the loader
    # yields train.batch_size examples per step and each process takes its 1/N share of the same batches one
    # process would see, so the batch size, accumulation and schedule mean the same for any N.
    on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()
                                   and not torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                              cpu=on_cpu, dataloader_config=DataLoaderConfiguration(split_batches=True),
                              log_with=trackers or None)
    check_process_count(t, accelerator)
    return accelerator, precision, precision_note


def fit_max_length(cfg: Config, say: Callable[[str], None]) -> None:
    """Lower model.max_length (the default 128 included) to what a local model folder can read, its position
    table, before any task tokenises: a longer input would index past the table (a raw error on the first long
    text). config.yaml then records the length trained with, which prediction reads."""
    limit = None if cfg.model.init == "scratch" else folder_position_limit(cfg.model.name)
    if limit is not None and cfg.model.max_length > limit:
        say(f"max_length {cfg.model.max_length} -> {limit}: the model reads at most {limit} tokens (its position "
            f"table); set model.max_length to {limit} or less to say so")
        cfg.model.max_length = limit


def load_inputs(cfg: Config, accelerator: Accelerator, precision: str, precision_note: str | None,
                checkpoint: Path | None, compute_metrics: Callable[..., dict] | None) -> TaskInputs:
    """The task (textune.tasks) reads and checks its data, tokenises it and loads the model with its head;
    a checkpoint to resume from must fit that model. Says what will be trained."""
    fit_max_length(cfg, accelerator.print)
    inputs = get_task(cfg.task).load_inputs(cfg)
    inputs.compute_metrics = compute_metrics
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(inputs.model)
    trainable, total = count_parameters(inputs.model)
    if checkpoint is not None:
        check_checkpoint_matches(checkpoint, inputs.model)
    say = accelerator.print
    say(inputs.summary(cfg))
    # What the task scores without training (zero-shot baselines), measured once, by the process that writes the
    # run folder: the others never report it.
    if accelerator.is_main_process:
        inputs.measured_baselines = inputs.baselines(cfg)
        for line in format_baselines(inputs.measured_baselines):
            say(line)
    say(f"tuning     {cfg.tuning.method}: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    say(f"device     {accelerator.device} | precision {precision}" + (f" ({precision_note})" if precision_note else ""))
    return inputs


def open_run(cfg: Config, run: Path, inputs: TaskInputs, accelerator: Accelerator,
             checkpoint: Path | None) -> History:
    """Create (or, resuming, reuse) the run folder, start the experiment trackers, then write the resolved config
    and the data statistics; the history that the loop appends to."""
    say = accelerator.print
    if checkpoint is not None:
        finished = " (the run had finished: the steps after it are trained again)" if (
            run / "metrics.json").is_file() else ""
        say(f"resume     from {checkpoint}{finished}")
        warn_if_config_changed(cfg, run / "config.yaml", say)
    accelerator.wait_for_everyone()  # every process has checked the run folder before the main one writes it
    if accelerator.is_main_process:
        make_run_folder(run, resuming=checkpoint is not None)
    # The trackers start before any file of the run is written: a tracker that cannot start (a store MLflow
    # refuses) leaves no half-written run behind. They start on the main process only, so every process
    # learns of a failure (the others would otherwise wait for it at their next collective call).
    failure = None
    try:
        start_trackers(accelerator, PROJECT, flat_config(cfg))
    except TextuneError as e:
        failure = e
    failed = failure is not None
    if accelerator.num_processes > 1:
        failed = bool(accelerator.reduce(torch.tensor(int(failed), device=accelerator.device), reduction="sum"))
    if failed:
        if checkpoint is None and accelerator.is_main_process:
            shutil.rmtree(run, ignore_errors=True)  # it holds only what the trackers began to write
        raise failure or TextuneError("logging.report_to: a tracker could not start on the main process")
    if accelerator.is_main_process:
        write_run_header(run, cfg, inputs)
    return History(run / "history.jsonl", write=accelerator.is_main_process, log=accelerator.log)


@dataclass
class TrainingPlan:
    """What the loop runs: the prepared model, optimizer, scheduler and loaders, and how many steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader
    total_steps: int
    batches_per_epoch: int | None  # None for a stream, which has no length
    compile_plan: object  # compiling.CompilePlan
    # the tuning method's work after each optimizer step, given the step's index from 0 (AdaLoRA), or None
    after_optimizer_step: Callable[[int], None] | None = None


def plan_training(cfg: Config, inputs: TaskInputs, accelerator: Accelerator, precision: str) -> TrainingPlan:
    """Loaders, the number of steps, the optimizer and the learning-rate schedule, all through
    `accelerator.prepare`; says the schedule."""
    t, say = cfg.train, accelerator.print
    train_data = inputs.train_data
    planned_samples = (t.max_steps * t.batch_size * t.gradient_accumulation_steps if t.max_steps
                       else math.ceil(len(train_data) * t.epochs))
    compile_plan = plan_compile(t.compile, accelerator.device.type, precision, planned_samples, cfg.model.max_length,
                                t.pad_to_multiple_of, batch_size=t.batch_size, fixed_length=inputs.fixed_length,
                                streamed=isinstance(train_data, IterableDataset), processes=accelerator.num_processes)
    if not compile_plan.measure:  # a measured plan says its choice once it has measured (CompiledForward.probe)
        say(f"compile    {compile_plan.describe()}")
    train_loader = make_loader(train_data, inputs.tokenizer, t.batch_size, True, t.group_by_length, cfg.seed,
                               t.num_workers, collate=inputs.collator("train", compile_plan.pad_to_multiple_of))
    eval_loader = make_loader(inputs.tokenized["validation"], inputs.tokenizer, eval_batch_size(t, accelerator),
                              False, False, cfg.seed, collate=inputs.collator("validation"))
    # A stream has no length: it runs train.max_steps steps (config validation made sure there is one).
    batches_per_epoch = None if isinstance(train_data, IterableDataset) else len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / t.gradient_accumulation_steps) if batches_per_epoch else None
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    optimizer = build_optimizer(inputs.model, t, cfg.tuning.loraplus_lr_ratio)
    after_optimizer_step = optimizer_step_hook(inputs.model, total_steps)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        inputs.model, optimizer, train_loader, eval_loader, scheduler)
    said = speed_up(accelerator.unwrap_model(model), precision)
    if said:
        say(said)
    epochs = f"{total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch:,}" if steps_per_epoch else "streamed"
    say(f"schedule   {total_steps:,} steps ({epochs}), batch {t.batch_size} over {accelerator.num_processes} "
        f"process(es) x {t.gradient_accumulation_steps} accumulated, lr {t.lr:g}, "
        f"{t.scheduler} with {warmup} warm-up steps")
    return TrainingPlan(model, optimizer, scheduler, train_loader, eval_loader, total_steps, batches_per_epoch,
                        compile_plan, after_optimizer_step)


class TrainingLoop:
    """The loop. The step is `train_step`; `run` decides when to log, evaluate, checkpoint and stop. It knows
    the task only through `inputs` (the contract of tasks/base.py)."""

    def __init__(self, cfg: Config, plan: TrainingPlan, inputs: TaskInputs, accelerator: Accelerator, run: Path,
                 history: History, state: LoopState, on_evaluate: Callable[[dict], None] | None):
        self.cfg, self.t, self.plan, self.inputs, self.accelerator = cfg, cfg.train, plan, inputs, accelerator
        self.run_dir, self.history, self.state, self.on_evaluate = run, history, state, on_evaluate
        # Running sums stay on the device between logging steps: reading them would force a host sync.
        self.loss_sum = torch.tensor(state.loss_sum, device=accelerator.device)
        self.loss_count = torch.tensor(state.loss_count, dtype=torch.long, device=accelerator.device)
        self.tokens = torch.tensor(state.tokens, dtype=torch.long, device=accelerator.device)
        self.samples_at_start, self.step_at_start = state.samples, state.step
        self.window = AccumulationWindow()
        self.forward: CompiledForward | None = None  # None: the eager model
        hook = plan.after_optimizer_step
        self.after_step = None if hook is None else (lambda: hook(self.state.step))  # the step being closed
        self.start = self.seconds = 0.0
        self.last_evaluation: tuple[int, dict, Any] | None = None  # this process's latest: step, metrics, predictions
        # Off a terminal (a log file, nohup, CI) a bar's carriage returns make one ever-growing line: print one
        # plain line per logging step there instead.
        self.plain_progress = accelerator.is_main_process and not sys.stderr.isatty()
        self.bar = None

    def run(self) -> None:
        """Train until the planned steps are done, early stopping, or a stop signal (checkpoint, then raise)."""
        t, state, plan, accelerator = self.t, self.state, self.plan, self.accelerator
        if self.inputs.evaluate_first and state.step == 0:  # where the learning curve starts (pretraining)
            run_evaluation(plan.model, plan.eval_loader, self.inputs.evaluate, accelerator, self.inputs.tokenizer,
                           self.run_dir, self.history, state, t, 0.0)
        self.bar = tqdm(total=plan.total_steps, initial=state.step, desc="training", unit="step",
                        disable=not accelerator.is_main_process or self.plain_progress, dynamic_ncols=True)
        self.start = time.perf_counter()
        plan.model.train()
        self.forward = self.compiled_forward()
        with StopRequest() as stop:
            while state.step < plan.total_steps and not state.stopped_early:
                reseed_loader(plan.train_loader, self.cfg.seed, state.epoch)
                skip = state.batch
                batches = accelerator.skip_first_batches(plan.train_loader, skip) if skip else plan.train_loader
                for i, batch in enumerate(batches, start=skip):
                    state.batch = i + 1
                    if not self.step(batch):  # accumulating, or a skipped step: not an optimizer step
                        continue
                    epoch_float = state.epoch + ((i + 1) / plan.batches_per_epoch if plan.batches_per_epoch else 0)
                    end_of_epoch = i + 1 == plan.batches_per_epoch
                    done = state.step >= plan.total_steps
                    if state.step % t.logging_steps == 0 or done:
                        self.log(epoch_float)
                    evaluated = (t.eval_steps and state.step % t.eval_steps == 0) or (
                        not t.eval_steps and end_of_epoch) or done
                    if evaluated:
                        self.evaluate(epoch_float)
                    if end_of_epoch:
                        state.epoch, state.batch = state.epoch + 1, 0
                    stop_signal = synced_stop_signal(stop.signal, accelerator)
                    if not done and (evaluated or (t.checkpoint_steps and state.step % t.checkpoint_steps == 0)
                                     or stop_signal):
                        self.checkpoint(stop_signal)
                    if done or state.stopped_early:
                        break
                else:  # the loader ran out without a step closing the epoch (e.g. its last batch was skipped)
                    if state.batch:
                        state.epoch, state.batch = state.epoch + 1, 0
        self.bar.close()
        self.seconds = time.perf_counter() - self.start
        self.tokens = accelerator.reduce(self.tokens, reduction="sum")

    def compiled_forward(self) -> CompiledForward | None:
        """The compiled model per `train.compile` (its first shape compiled, or fallen back, before the first
        step), or None for the eager model."""
        plan, accelerator = self.plan, self.accelerator
        if not plan.compile_plan.enabled:
            return None
        forward = CompiledForward(plan.model, plan.compile_plan, accelerator.print)
        if plan.batches_per_epoch is not None:  # a stream is not indexable: its first batch compiles in the loop
            data = plan.train_loader.dataset
            first = [data[i] for i in range(min(len(data), self.t.batch_size // accelerator.num_processes))]
            forward.probe({k: v.to(accelerator.device) for k, v in plan.train_loader.collate_fn(first).items()})
        return forward

    def step(self, batch: dict) -> bool:
        """One micro-batch through `train_step`; True when it closed an optimizer step."""
        state, plan, accelerator = self.state, self.plan, self.accelerator
        examples = len(batch["input_ids"])
        state.samples += examples * accelerator.num_processes  # equal shares (split_batches)
        self.tokens += batch["attention_mask"].sum()
        loss, items, finite, stepped = train_step(plan.model, batch, plan.optimizer, plan.scheduler, accelerator,
                                                  self.t.max_grad_norm, self.inputs.loss_fn, self.window, self.forward,
                                                  self.after_step)
        if not finite:
            handle_nonfinite(state, self.t, self.run_dir, float(loss))
            return False
        self.loss_sum += loss  # the logged loss is a mean over the same items as the step's loss
        self.loss_count += items
        if not stepped:  # accumulating, or fp16's scaler skipped an overflowing step: not a step
            return False
        state.step += 1
        self.bar.update(1)
        return True

    def log(self, epoch: float) -> None:
        """A training record: the mean loss since the last one, the lr and the throughput."""
        state = self.state
        # summed over the processes, then divided: the loss of the whole batch, however its items were shared
        loss_sum, count = self.loss_sum, self.loss_count.to(self.loss_sum.dtype)
        if self.accelerator.num_processes > 1:
            loss_sum, count = self.accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
        mean_loss = loss_sum / count
        elapsed = time.perf_counter() - self.start
        record = {"type": "train", "step": state.step, "epoch": round(epoch, 4), "loss": mean_loss.item(),
                  "lr": self.plan.scheduler.get_last_lr()[0],
                  "samples_per_s": round((state.samples - self.samples_at_start) / elapsed, 2)}
        self.history.append(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if self.plain_progress:
            print(progress_line(record, self.plan.total_steps, time.perf_counter() - self.start,
                                state.step - self.step_at_start), file=sys.stderr, flush=True)
        self.loss_sum.zero_()
        self.loss_count.zero_()

    def evaluate(self, epoch: float) -> None:
        """Evaluate, keep the best model, count towards early stopping; then tell `on_evaluate`."""
        metrics, predictions = run_evaluation(self.plan.model, self.plan.eval_loader, self.inputs.evaluate,
                                              self.accelerator, self.inputs.tokenizer, self.run_dir, self.history,
                                              self.state, self.t, epoch)
        self.last_evaluation = (self.state.step, metrics, predictions)
        if self.on_evaluate is not None:
            self.on_evaluate(self.history.records[-1])
        if self.state.stopped_early:
            tqdm.write(f"early stopping: no {self.t.metric} improvement in {self.t.early_stopping_patience} "
                       f"evaluations")

    def checkpoint(self, stop_signal: int | None) -> None:
        """Write a checkpoint; after a stop signal, stop the run with how to resume it."""
        state, plan = self.state, self.plan
        # Every process takes part: each writes its own RNG state (its dropout masks), the main one the rest.
        loop = {**vars(state), "loss_sum": self.loss_sum.item(), "loss_count": int(self.loss_count), "tokens": int(self.tokens)}
        path = save_checkpoint(self.run_dir, state.step, plan.model, plan.optimizer, plan.scheduler,
                               self.accelerator, loop, self.history.records, self.t.keep_last or KEEP_WHILE_TRAINING)
        if stop_signal:
            raise TrainingInterrupted(f"stopped by {signal.Signals(stop_signal).name} at step {state.step}; checkpoint "
                                      f"written to {path}; continue with: textune train CONFIG --resume latest")


def finish_run(cfg: Config, run: Path, plan: TrainingPlan, inputs: TaskInputs, accelerator: Accelerator,
               loop: TrainingLoop) -> None:
    """The best (or last) model saved, final metrics, validation predictions for the report, the model card;
    the checkpoints deleted unless `train.keep_last` asks to keep them. Says how the run went."""
    t, state, say = cfg.train, loop.state, accelerator.print
    accelerator.wait_for_everyone()  # the main process has finished writing model/ before the others read it
    unwrapped = accelerator.unwrap_model(plan.model)
    # The loop's evaluation after the last step, in this process, is of the model in memory now.
    last = loop.last_evaluation if loop.last_evaluation and loop.last_evaluation[0] == state.step else None
    # (model/ can be missing when another run's checkpoint was resumed into a new folder: save the last.)
    best_saved = t.load_best_at_end and state.best_step is not None and (run / "model").is_dir()
    best_in_memory = best_saved and state.best_step == state.step and last is not None  # and in model/ already
    if best_saved and not best_in_memory:
        if is_peft_model(unwrapped):
            load_adapter_weights(unwrapped, run / "model")
        else:
            load_saved_weights(unwrapped, run / "model")
        last = None
    elif not best_saved and accelerator.is_main_process:
        save_model(unwrapped, inputs.tokenizer, run / "model")
    # The saved model's metrics and probabilities, exact also after a resume: its evaluation by the loop, or a new
    # one (a best model from an earlier step, a run resumed after its last evaluation).
    final_val, predictions = last[1:] if last else inputs.evaluate(plan.model, plan.eval_loader, accelerator)
    metrics = final_metrics(final_val, loop, count_parameters(unwrapped))
    if "test" in inputs.tokenized:
        test_loader = accelerator.prepare(make_loader(inputs.tokenized["test"], inputs.tokenizer,
                                                      eval_batch_size(t, accelerator), False, False, cfg.seed,
                                                      collate=inputs.collator("test")))
        metrics["test"], _ = inputs.evaluate(plan.model, test_loader, accelerator)
        say(f"test       {headline(metrics['test'], t.metric)}")
    deleted = 0
    if accelerator.is_main_process:
        if predictions is not None:  # a language model has none
            inputs.write_predictions(predictions, run / "validation_predictions.jsonl")
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_model_card(run)  # RUN/model/README.md, from the files just written
        if t.keep_last is None:  # a finished run is not resumed: its checkpoints would only take disk
            deleted = remove_checkpoints(run)
    accelerator.log(final_values(metrics), step=state.step)
    say(f"best       step {state.best_step}: {headline(final_val, t.metric)}")
    if deleted:
        say(f"cleanup    {deleted} checkpoint(s) deleted now that the model is saved (train.keep_last N keeps the "
            f"last N)")
    say(f"run        {run}  ({loop.seconds / 60:.1f} min, {metrics['train']['samples_per_s']} samples/s)")
    say(format_diagnosis(diagnose_curves(loop.history.records, inputs.label_counts(), t.metric, t.greater_is_better,
                                         inputs.measured_baselines)))


def final_metrics(validation: dict, loop: TrainingLoop, parameters: tuple[int, int]) -> dict:
    """metrics.json: the final validation metrics, the best evaluation, and how training went."""
    state, t, seconds = loop.state, loop.t, loop.seconds
    trainable, total = parameters
    return {"validation": validation, "best_step": state.best_step, "best_metric": state.best_metric,
            "metric": t.metric, "stopped_early": state.stopped_early,
            "train": {"steps": state.step, "seconds": round(seconds, 1),
                      "samples_per_s": round((state.samples - loop.samples_at_start) / seconds, 2),
                      "tokens_per_s": round(int(loop.tokens) / seconds, 1),
                      "compiled": loop.forward is not None and loop.forward.compiled is not None,
                      "compiled_shapes": len(loop.forward.shapes) if loop.forward is not None else 0},
            "parameters": {"trainable": trainable, "total": total, "ratio": trainable / total}}


def run_evaluation(model, eval_loader, evaluate: Callable, accelerator, tokenizer, run: Path, history: History,
                   state: LoopState, t: TrainConfig, epoch: float) -> tuple[dict, Any]:
    """Evaluate (`evaluate(model, loader, accelerator)` -> (metrics, predictions)), record, keep the best checkpoint
    and count evaluations without improvement. Returns what `evaluate` returned."""
    metrics, predictions = evaluate(model, eval_loader, accelerator)
    scalars = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    history.append({"type": "eval", "step": state.step, "epoch": round(epoch, 4), **scalars})
    if accelerator.is_main_process:
        tqdm.write(f"eval  step {state.step:>6} | epoch {epoch:.2f} | {headline(metrics, t.metric)}")
    value = metrics[t.metric]
    if is_better(value, state.best_metric, t.greater_is_better):
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
        if t.load_best_at_end and accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), tokenizer, run / "model")
    else:
        state.evals_without_improvement += 1
        if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
            state.stopped_early = True
    return metrics, predictions
