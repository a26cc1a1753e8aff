"""Fine-tuning: one training loop on Accelerate, readable top to bottom.

`train(cfg)` checks everything it can (config, data, model) before it creates the run folder, so a user
mistake leaves nothing half-written. Then: AdamW with linear/cosine warm-up, gradient accumulation and
clipping, mixed precision, evaluation every epoch or N steps, best-checkpoint keeping, early stopping.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from textune.config import Config, TrainConfig, save_config
from textune.data import label_counts, length_stats, load_task_data, tokenize_splits
from textune.errors import TextuneError
from textune.evaluate import evaluate_loader, headline
from textune.models import apply_tuning, count_parameters, load_classifier, load_tokenizer, resolve_model

RUN_MARKERS = ("config.yaml", "history.jsonl")


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


def prepare_run_folder(output_dir: str, overwrite: bool) -> Path:
    """Refuse to clobber an existing run unless asked; never delete a folder textune did not write."""
    run = Path(output_dir).expanduser().resolve()
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise TextuneError(f"run folder {run} already exists; pick another output_dir or pass --overwrite")
        if not any((run / m).exists() for m in RUN_MARKERS):
            raise TextuneError(f"{run} exists and is not a textune run folder; refusing to overwrite it")
    return run


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # Biases and LayerNorm weights are the 1-D parameters; decaying them only hurts (BERT recipe).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    try:  # fused AdamW runs on CPU and CUDA in recent PyTorch: one kernel instead of a Python loop
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_loader(ds, tokenizer, batch_size: int, shuffle: bool, group_by_length: bool, seed: int,
                num_workers: int = 0) -> DataLoader:
    collate = DataCollatorWithPadding(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if shuffle and group_by_length:
        # Buckets of similar length, shuffled between buckets: little padding, still random batches.
        sampler = LengthGroupedSampler(batch_size, lengths=list(ds["length"]), generator=generator)
    ds = ds.remove_columns([c for c in ("length",) if c in ds.column_names])
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=shuffle and sampler is None,
                      generator=generator if sampler is None else None, collate_fn=collate,
                      num_workers=num_workers)


class History:
    """Appends one JSON line per logging step and per evaluation to RUN/history.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def save_model(model, tokenizer, target: Path) -> None:
    """Write the model to a temporary folder, then swap it in, so `target` is never half-written."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors by default
    tokenizer.save_pretrained(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


@dataclass
class LoopState:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_eval: tuple | None = None  # (metrics, probabilities, labels) of the best evaluation
    last_eval: tuple | None = None
    evals_without_improvement: int = 0
    samples: int = 0
    stopped_early: bool = False


# ---------------------------------------------------------------- the training step and loop


def train_step(model, batch, optimizer, scheduler, accelerator: Accelerator, max_grad_norm: float | None):
    """Forward, backward and (once enough micro-batches are accumulated) one optimizer step.

    Returns the detached loss tensor: reading it (`.item()`) forces a host sync, so the loop only does
    that at logging steps.
    """
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train(cfg: Config, overwrite: bool = False, on_evaluate: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; return the run folder. See the module docstring.

    Args:
        on_evaluate: called with each evaluation record (step, epoch, eval_* metrics) as it is made;
            a hyper-parameter search uses it to prune a trial by raising.
    """
    t = cfg.train
    run = prepare_run_folder(cfg.output_dir, overwrite)
    precision, precision_note = choose_mixed_precision(t.mixed_precision, t.device)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise TextuneError("train.device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    # Accelerate keeps its settings in a process-wide singleton; reset them (not the distributed set-up)
    # so that several runs in one Python process (the API, tests, searches) can use different precisions.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                              cpu=t.device == "cpu")
    say = accelerator.print
    set_seed(cfg.seed)

    # 1. Everything that can fail because of user input happens before the run folder exists.
    model_path = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    data = load_task_data(cfg.data, cfg.seed)
    tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length)
    stats = {split: length_stats(ds["length"], cfg.model.max_length) for split, ds in tokenized.items()}
    model = load_classifier(model_path, data.label_names, cfg.model.trust_remote_code)
    model = apply_tuning(model, cfg.tuning)
    trainable, total = count_parameters(model)

    say(f"model      {cfg.model.name or model_path} ({type(model).__name__})")
    say(f"data       train {len(data.train):,} | validation {len(data.validation):,}"
        + (f" | test {len(data.test):,}" if data.test is not None else "")
        + f" | labels {', '.join(f'{k}={v}' for k, v in label_counts(data.train, data.label_names).items())}")
    s = stats["train"]
    say(f"tokens     mean {s['mean']} | p95 {s['p95']} | max {s['max']} | "
        f"truncated at {cfg.model.max_length}: {s['truncated_share']:.1%}")
    say(f"tuning     {cfg.tuning.method}: {trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    say(f"device     {accelerator.device} | precision {precision}" + (f" ({precision_note})" if precision_note else ""))

    # 2. The run folder: resolved config and data statistics first, the rest as training goes.
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    (run / "data_stats.json").write_text(json.dumps({
        "sizes": {k: len(v) for k, v in tokenized.items()},
        "label_names": data.label_names,
        "label_counts": {k: label_counts(getattr(data, k), data.label_names) for k in tokenized},
        "token_lengths": stats,
        "max_length": cfg.model.max_length,
    }, indent=2))
    history = History(run / "history.jsonl")

    train_loader = make_loader(tokenized["train"], tokenizer, t.batch_size, True, t.group_by_length, cfg.seed,
                               t.num_workers)
    eval_loader = make_loader(tokenized["validation"], tokenizer, t.eval_batch_size, False, False, cfg.seed)
    steps_per_epoch = math.ceil(len(train_loader) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total_steps)
    optimizer = build_optimizer(model, t)
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=warmup, num_training_steps=total_steps)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    say(f"schedule   {total_steps:,} steps ({total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch:,}), "
        f"batch {t.batch_size}x{t.gradient_accumulation_steps}x{accelerator.num_processes}, lr {t.lr:g}, "
        f"{t.scheduler} with {warmup} warm-up steps")

    # 3. The loop: the step is in train_step; here we decide when to log, evaluate and stop.
    state = LoopState()
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)  # summed on device: no sync per step
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    start = time.perf_counter()
    epoch = 0
    model.train()
    while state.step < total_steps and not state.stopped_early:
        for i, batch in enumerate(train_loader):
            state.samples += len(batch["input_ids"])
            tokens += batch["attention_mask"].sum()
            loss_sum += train_step(model, batch, optimizer, scheduler, accelerator, t.max_grad_norm)
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            end_of_epoch = i + 1 == len(train_loader)
            done = state.step >= total_steps
            if state.step % t.logging_steps == 0 or done:
                record = {"type": "train", "step": state.step, "epoch": round(epoch + (i + 1) / len(train_loader), 4),
                          "loss": (loss_sum / loss_count).item(), "lr": scheduler.get_last_lr()[0],
                          "samples_per_s": round(state.samples / (time.perf_counter() - start), 2)}
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                loss_sum.zero_()
                loss_count = 0
            if (t.eval_steps and state.step % t.eval_steps == 0) or (not t.eval_steps and end_of_epoch) or done:
                run_evaluation(model, eval_loader, data.label_names, accelerator, tokenizer, run, history, state,
                               t, epoch + (i + 1) / len(train_loader))
                if on_evaluate is not None:
                    on_evaluate(history.records[-1])
                if state.stopped_early:
                    tqdm.write(f"early stopping: no {t.metric} improvement in {t.early_stopping_patience} evaluations")
            if done or state.stopped_early:
                break
        epoch += 1
    bar.close()
    train_seconds = time.perf_counter() - start

    # 4. Finish: the best (or last) model, final metrics, validation predictions for the report.
    unwrapped = accelerator.unwrap_model(model)
    if t.load_best_at_end and state.best_step is not None:
        unwrapped.load_state_dict(load_file(run / "model" / "model.safetensors"), strict=False)
        final_val, probs, labels = state.best_eval
    else:
        if accelerator.is_main_process:
            save_model(unwrapped, tokenizer, run / "model")
        final_val, probs, labels = state.last_eval
    metrics = {"validation": final_val, "best_step": state.best_step, "best_metric": state.best_metric,
               "metric": t.metric, "stopped_early": state.stopped_early,
               "train": {"steps": state.step, "seconds": round(train_seconds, 1),
                         "samples_per_s": round(state.samples / train_seconds, 2),
                         "tokens_per_s": round(int(tokens) / train_seconds, 1)},
               "parameters": {"trainable": trainable, "total": total}}
    if "test" in tokenized:
        test_loader = accelerator.prepare(make_loader(tokenized["test"], tokenizer, t.eval_batch_size, False, False,
                                                      cfg.seed))
        metrics["test"], _, _ = evaluate_loader(model, test_loader, data.label_names, accelerator)
        say(f"test       {headline(metrics['test'])}")
    if accelerator.is_main_process:
        write_validation_predictions(data, probs, labels, run / "validation_predictions.jsonl")
        (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    say(f"best       step {state.best_step}: {headline(final_val)}")
    say(f"run        {run}  ({train_seconds / 60:.1f} min, {metrics['train']['samples_per_s']} samples/s)")
    return run


def run_evaluation(model, eval_loader, label_names, accelerator, tokenizer, run: Path, history: History,
                   state: LoopState, t: TrainConfig, epoch: float) -> None:
    """Evaluate, record, keep the best checkpoint and count evaluations without improvement."""
    metrics, probs, labels = evaluate_loader(model, eval_loader, label_names, accelerator)
    state.last_eval = (metrics, probs, labels)
    scalars = {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    history.append({"type": "eval", "step": state.step, "epoch": round(epoch, 4), **scalars})
    tqdm.write(f"eval  step {state.step:>6} | epoch {epoch:.2f} | {headline(metrics)}")
    value = metrics[t.metric]
    if is_better(value, state.best_metric, t.greater_is_better):
        state.best_metric, state.best_step, state.best_eval = value, state.step, state.last_eval
        state.evals_without_improvement = 0
        if t.load_best_at_end and accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), tokenizer, run / "model")
    else:
        state.evals_without_improvement += 1
        if t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience:
            state.stopped_early = True


def write_validation_predictions(data, probs, labels, path: Path) -> None:
    """Text, true label, predicted label and probabilities of every validation example (for reports)."""
    texts = list(data.validation[data.text_column])
    pairs = list(data.validation[data.text_pair_column]) if data.text_pair_column else None
    with path.open("w", encoding="utf-8") as f:
        for i, (p, y) in enumerate(zip(probs, labels)):
            row = {"text": texts[i], "label": data.label_names[y], "pred": data.label_names[int(p.argmax())],
                   "probs": [round(float(x), 5) for x in p]}
            if pairs is not None:
                row["text_pair"] = pairs[i]
            f.write(json.dumps(row) + "\n")
