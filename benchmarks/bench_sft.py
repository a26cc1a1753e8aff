"""Instruction-tuning benchmark (issue 17): textune's `task: instruction` against TRL's `SFTTrainer`, same model,
data and hyper-parameters, and SmolLM2-135M-Instruct as shipped against the same model after textune's LoRA SFT,
all in one invocation.

Model: SmolLM2-135M-Instruct, the packaged causal LM (`textune.gguf.default_causal_lm_dir()`), fp32. Data:
../shared/data/instructions (Alpaca rows: instruction, input, output), seeded slices of the 4,800 training and
400 validation rows (`--train-rows`, `--eval-rows`; default all), written once and read by every arm, so every
arm sees the same rows. A row is a user turn (instruction, blank line, input if any) and the assistant's answer,
in SmolLM2's chat template (which adds its default system prompt).
Hyper-parameters: those of configs/instructions-smollm2-lora-sft.yaml, read from it: LoRA r 16, alpha 32,
dropout 0.05 on q, k, v, o, gate, up and down projections; AdamW (fused) lr 2e-4, weight decay 0.01, gradient
norm clipped at 1.0, linear decay after ceil(5% of the steps) warm-up steps; 8 conversations per step as 4
accumulated micro-batches of 2 (8 x 700 tokens at once need ~14 GB of activations); evaluation batch 8;
max_length 768 (no conversation is longer, so none is cut); `--steps` optimizer steps (default: the config's
300, half an epoch of the full training set); the loss on the assistant's answer tokens only; no packing; fp32
(the CPUs here have no native bf16). The last model is evaluated in both arms (no best-model selection), at the
end only. One difference stays, each library's own: over the 4 micro-batches of a step Trainer weighs every
answer token the same (`num_items_in_batch`), textune every conversation (each micro-batch's mean per token,
weighted by its conversations; see `train_step`).

Training arms, each in its own process (so its peak resident memory is its own, read with `os.wait4`), once per
seed (`--seeds`, default 1: 42; more: 43, 44, ...):
  trl       `SFTTrainer` with a PEFT `LoraConfig` on the conversational prompt-completion format
            ({"prompt": [user turn], "completion": [assistant turn]}: TRL applies the chat template and trains
            on the completion only), packing and padding-free off, bf16 False, use_cpu True, gradient
            checkpointing off (TRL's default is on: ~20-30% slower, less memory; textune's is off), the settings
            above (TRL's own defaults differ: lr 2e-5, bf16 on, gradient checkpointing on); otherwise TRL's
            defaults: random batches (`train_sampling_strategy="random"`; with `--trl-group-by-length`
            Trainer's length-grouped sampler, like textune's), fused AdamW, per-step entropy and token-accuracy
            metrics, its fused LM-head loss.
  textune   `textune.train.train` with the shipped config and the settings above (textune's defaults:
            length-grouped batches, dynamic padding, fused AdamW), evaluated only after the last step
            (train.eval_steps = steps, eval.generate_samples 0, train.load_best_at_end false).
Tokens: before training, the TRL arm writes the input ids and labels of its prepared data, and this script
compares them with textune's (`tokenize_conversations`) row by row. Checked on the full files (TRL 1.16.0,
transformers 5.24.0): all 4,800 training and 400 validation rows identical, input ids and labels (SmolLM2's
template writes the prompt with its generation prompt as a prefix of the whole conversation, so TRL's completion
starts where textune's answer span does; both end with <|im_end|> and its newline).

Figures:
- held-out loss: the mean loss per validation answer token of the final model (textune: metrics.json's
  validation loss; TRL: the same token-weighted mean, of TRL's own `compute_loss` over its eval loader).
  TRL's own `eval_loss` is reported too, but it is another mean: Trainer averages each eval batch's mean loss,
  weighting batches by their rows, not by their answer tokens. Both measurements agree: before training, TRL's
  token-weighted loss of the base model on 16 validation rows is 2.2700, textune's step-0 evaluation 2.2700
  (TRL's eval_loss 2.2935); with the same rows in every step (`--steps 2 --train-rows 8`: each step is the
  whole slice) the tuned models score 2.1054 (textune) and 2.1043 (TRL). Short runs on more rows differ by a few
  percent, as the arms see different rows (3 steps on 48 rows: 2.0632 against 2.0150).
- training tokens/s: non-padding input tokens (the attention mask's sum) over the seconds of the training loop.
  TRL: its logged cumulative `num_tokens` (attention_mask.sum() per batch) / `train_runtime` (the loop alone,
  evaluation and saving off). textune: the loop's own count (metrics.json tokens_per_s x seconds, also the
  attention mask's sum) over the loop's seconds less the evaluation it runs after the last step (timed here).
- answers: greedy answers (at most the config's eval.max_new_tokens, 32, new tokens) to every validation prompt
  by the base model and by each textune run, scored by normalised exact match and ROUGE-L, with the loss and
  perplexity on the answer tokens: `Instruction.evaluate_file`, what `textune evaluate` runs, called from Python
  with max_new_tokens set for both (the command would give the base model 64 and the run its config's 32).

Precision and each peer's best flags (issue 34): `--precision auto` trains both arms under bf16 autocast where the
CPU has native bf16 (AVX512-BF16 or AMX; else fp32; `fp32`, the default, and `bf16` force one); `--trl-padding-free`
gives TRL its padding-free batches (each micro-batch's conversations as one unpadded row with restarting position
ids; transformers keeps them apart with a block mask; TRL then needs max_length None, and no conversation here is
longer than 768 tokens, so none is cut either way); `--textune-set KEY=VALUE` changes one setting of the textune
arm (a switch measured alone: data.packing=true, train.compile=true, ...). `--no-answers` skips the greedy answers.
The CPU, its matmul ceiling for the arms' precision (2048 x 2048, timed in the run) and MFU are printed: FLOPs per
training token = 4 x the frozen matmul weights of the 30 layers (forward, and the backward's gradient with respect
to the activations; frozen weights need no weight gradient; LoRA's r-16 factors, under 3%, the embedding and the LM
head left out, as textune runs the head at answer positions only and TRL at every position).

Targets: issue 17: held-out loss within 2% of TRL's (token-weighted means, mean over seeds), training tokens/s
>= 1.2x TRL's. Issue 34 (printed): held-out loss within 1% of TRL's; tokens/s >= 1.5x 104 (textune's fp32 rate
before issue 34) and >= 2x TRL's with TRL's best flags.

    python benchmarks/bench_sft.py --steps 100 --eval-rows 100 --precision auto --trl-group-by-length \
        --trl-padding-free --no-answers --output benchmarks/results/sft-bf16.json     # issue 34: ~50 min here

    python benchmarks/bench_sft.py                                           # 300 steps, all rows (hours)
    python benchmarks/bench_sft.py --steps 3 --train-rows 48 --eval-rows 16 --output /tmp/sft-smoke.json

Writes benchmarks/results/sft.json and prints a table.

The shipped config as it is (`--shipped`): no TRL arm; trains configs/instructions-smollm2-lora-sft.yaml
unchanged (into benchmarks/runs/sft-shipped; wall time from process start to the saved model, peak memory), or takes a
finished run of it (`--shipped-run RUN`, checked against the config key by key), then answers every validation
prompt with the base model and with the run, the same decoding (the `answers` arms above). Writes
benchmarks/results/sft-shipped.json.

    python benchmarks/bench_sft.py --shipped                                 # ~1.5 h training + ~25 min answers here
    python benchmarks/bench_sft.py --shipped-run runs/instructions-smollm2-lora-sft
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from arms import add_arm_arguments, cpu_name, mean_std, measure
from bench_predict import matmul_ceiling

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions"
CONFIG = ROOT / "configs" / "instructions-smollm2-lora-sft.yaml"
SEED = 42
DEFAULT_OUTPUT = "benchmarks/results/sft.json"
SHIPPED_RUN = "benchmarks/runs/sft-shipped"
BASELINE_TOKENS_PER_S = 104  # issue 34's "today": textune's fp32 rate of session 9 (sft.json before issue 34)


def native_bf16() -> bool:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.train import cpu_supports_bf16

    return cpu_supports_bf16()


def training_flops_per_token(model_path: str) -> float:
    """Matmul FLOPs per training token of a LoRA step: the forward (2 per frozen weight) and the backward's
    gradient with respect to the activations (2 more); frozen weights need no weight gradient, and the LoRA
    factors (r 16) add under 3%, left out. Embedding lookups and the LM head are left out too (textune runs the
    head at answer positions only, TRL at every position), so the figure is the same work for both arms."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_path)
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return 4 * c.num_hidden_layers * (attention + mlp)


def shipped(overrides: dict | None = None):
    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config

    return load_config(CONFIG, overrides)


def write_slice(source: Path, rows: int | None, target: Path) -> int:
    """The first `rows` of a seeded shuffle of `source`'s lines (all of them, in order, for None) -> `target`."""
    lines = source.read_text(encoding="utf-8").splitlines()
    if rows is not None:
        lines = random.Random(SEED).sample(lines, min(rows, len(lines)))
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def run_textune(workdir: Path, seed: int, steps: int, precision: str, extra: dict, without: list[str]) -> dict:
    import textune.speedups
    import textune.train as loop

    if "bits-dropout" in without:  # the switch off: PyTorch's nn.Dropout, as before issue 34
        textune.speedups.use_bits_dropout = lambda model: 0
    if "autocast-copies" in without:
        textune.speedups.keep_autocast_copies = lambda model, precision: 0

    cfg = shipped({"output_dir": str(workdir / "textune"), "seed": seed, "train.max_steps": steps,
                   "train.eval_steps": steps, "eval.generate_samples": 0, "train.load_best_at_end": False,
                   "train.checkpoint_steps": None,
                   "train.mixed_precision": "bf16" if precision == "bf16" else "no",
                   "data.train": str(workdir.parent / "train.jsonl"),
                   "data.validation": str(workdir.parent / "validation.jsonl"), **extra})
    # The loop always evaluates after its last step, inside its timed span (train.seconds); the evaluation before
    # the first step is outside it. Time the ones inside, to leave them out of the training rate.
    evaluating: list[float] = []
    evaluate = loop.run_evaluation

    def timed_evaluation(model, eval_loader, evaluate_fn, accelerator, tokenizer, run, history, state, *rest):
        start = time.perf_counter()
        result = evaluate(model, eval_loader, evaluate_fn, accelerator, tokenizer, run, history, state, *rest)
        if state.step > 0:
            evaluating.append(time.perf_counter() - start)
        return result

    loop.run_evaluation = timed_evaluation
    run = loop.train(cfg, overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    tr = metrics["train"]
    tokens = round(tr["tokens_per_s"] * tr["seconds"])
    seconds = tr["seconds"] - sum(evaluating)
    v = metrics["validation"]
    return {"loss": v["loss"], "perplexity": v["perplexity"], "eval_tokens": v["tokens"], "train_tokens": tokens,
            "train_seconds": seconds, "tokens_per_s": tokens / seconds, "steps": tr["steps"],
            "last_train_loss": [r for r in history if r["type"] == "train"][-1]["loss"], "run": str(run)}


def run_shipped(run_dir: Path) -> dict:
    """Train the shipped config unchanged but for its output folder; the run folder and the loop's figures."""
    import textune.train as loop

    run = loop.train(shipped({"output_dir": str(run_dir)}), overwrite=True)
    return {"run": str(run), **json.loads((run / "metrics.json").read_text())}


def differs_from_shipped(run: Path) -> list[str]:
    """The config keys (section.key) whose values in RUN/config.yaml are not the shipped config's (output_dir
    aside): a run trained otherwise is not a figure for the shipped config."""
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return [f"{section}.{key}" for section, values in shipped().to_dict().items() if isinstance(values, dict)
            for key, value in values.items() if (saved.get(section) or {}).get(key) != value]


def prompt_completion(row: dict) -> dict:
    """An Alpaca row in TRL's conversational prompt-completion format, the turns textune makes of it."""
    extra = (row.get("input") or "").strip()
    user = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
    return {"prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}]}


def answer_token_loss(trainer) -> tuple[float, int]:
    """(mean loss per answer token, answer tokens) of TRL's model over its eval loader, through TRL's own loss
    (`compute_loss`, its fused LM head): each batch's mean weighted by its answer tokens, as textune's
    evaluation weighs them."""
    import torch

    trainer.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            n = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts the labels by one
            total += float(trainer.compute_loss(trainer.model, batch)) * n
            count += n
    return total / count, count


def trl_trainer(workdir: Path, seed: int, steps: int, group_by_length: bool, model_path: str, precision: str,
                padding_free: bool):
    """TRL's `SFTTrainer` on the row slices in workdir's parent, its data prepared (tokenised and masked)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    cfg = shipped()
    t, lora = cfg.train, cfg.tuning
    splits = {split: Dataset.from_list([prompt_completion(json.loads(line)) for line in
                                        (workdir.parent / f"{split}.jsonl").read_text().splitlines()])
              for split in ("train", "validation")}
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
    args = SFTConfig(
        output_dir=str(workdir / "trl"), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        per_device_eval_batch_size=t.eval_batch_size, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * steps),  # textune's count (transformers 5 dropped warmup_ratio)
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, seed=seed,
        # padding-free does not cut rows to max_length (TRL refuses the pair); no conversation here is longer
        max_length=None if padding_free else cfg.model.max_length,
        packing=False, padding_free=padding_free, completion_only_loss=True, bf16=precision == "bf16", use_cpu=True,
        gradient_checkpointing=False, train_sampling_strategy="group_by_length" if group_by_length else "random",
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=t.logging_steps, disable_tqdm=True)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
                      processing_class=tokenizer, peft_config=peft_config)


def run_trl(workdir: Path, seed: int, steps: int, group_by_length: bool, model_path: str, precision: str,
            padding_free: bool) -> dict:
    trainer = trl_trainer(workdir, seed, steps, group_by_length, model_path, precision, padding_free)
    for split, ds in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        ds.select_columns(["input_ids", "labels"]).to_json(workdir / f"trl-{split}-tokens.jsonl")
    out = trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    loss, eval_tokens = answer_token_loss(trainer)
    tokens = max(r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r)
    seconds = out.metrics["train_runtime"]
    train_losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"loss": loss, "perplexity": math.exp(loss), "eval_tokens": eval_tokens,
            "trl_eval_loss": eval_loss, "train_tokens": tokens, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds, "steps": trainer.state.global_step,
            "last_train_loss": train_losses[-1] if train_losses else out.metrics["train_loss"]}


def run_answers(model: str, validation: Path) -> dict:
    """Loss, perplexity, exact match and ROUGE-L on the validation file of a model folder or a run."""
    from textune.tasks.instruction import GENERATE_BATCH, TASK, InstructionPredictor

    cfg = shipped()
    start = time.perf_counter()
    predictor = InstructionPredictor(model, batch_size=GENERATE_BATCH)
    # the same decoding for every model: the base model folder has no saved config, which would give it 64
    predictor.max_new_tokens, predictor.max_length = cfg.eval.max_new_tokens, cfg.model.max_length
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = TASK.evaluate_file(predictor, str(validation), asdict(cfg.data))
    return {**metrics, "seconds": time.perf_counter() - start, "load_seconds": load_seconds}


def compare_tokens(workdir: Path) -> dict:
    """Per split: rows, and rows whose input ids and labels are the same in TRL's prepared data and textune's."""
    from textune.tasks.instruction import (chat_tokenizer, default_model_path, read_conversations,
                                           tokenize_conversations)

    cfg = shipped()
    tokenizer = chat_tokenizer(default_model_path(cfg.model.name), cfg.model)
    out = {}
    for split in ("train", "validation"):
        conversations, _ = read_conversations(str(workdir / f"{split}.jsonl"), cfg.data, f"data.{split}")
        ours, _ = tokenize_conversations(conversations, tokenizer, cfg.model.max_length, cfg.train.loss_on)
        theirs = [json.loads(line) for line in (workdir / f"trl-{split}-tokens.jsonl").read_text().splitlines()]
        same = [a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
                for a, b in zip(ours.select_columns(["input_ids", "labels"]), theirs)]
        out[split] = {"rows": {"textune": len(ours), "trl": len(theirs)}, "identical": sum(same),
                      "first_difference": same.index(False) if not all(same) else None}
    return out


def print_answers(quality: dict, n_eval: int, max_new_tokens: int) -> None:
    print(f"\nanswers on {n_eval:,} validation prompts (greedy, at most {max_new_tokens} new tokens), loss on "
          f"their answer tokens")
    header = f"{'model':<13}{'exact match':>12}{'ROUGE-L':>9}{'loss':>8}{'perplexity':>12}{'seconds':>9}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for name, r in quality.items():
        if not r:
            print(f"{name:<13} failed")
            continue
        label = "base" if name == "base" else "textune SFT"
        print(f"{label:<13}{r['exact_match']:>12.4f}{r['rougeL']:>9.4f}{r['loss']:>8.4f}{r['perplexity']:>12.2f}"
              f"{r['seconds']:>9.0f}{r['peak_rss_mb']:>9.0f}")


def shipped_main(args) -> None:
    """`--shipped` / `--shipped-run`: the shipped config's run, then base and tuned answers on every prompt."""
    from textune.gguf import default_causal_lm_dir

    cfg = shipped()
    if args.shipped_run:
        run = Path(args.shipped_run).resolve()
        if not (run / "metrics.json").is_file():
            sys.exit(f"--shipped-run {run}: no metrics.json there; give a finished run of {CONFIG.name}")
        changed = differs_from_shipped(run)
        if changed:
            sys.exit(f"--shipped-run {run}: trained with other values than {CONFIG.name} ({', '.join(changed)})")
    base = str(default_causal_lm_dir())  # converts the packaged GGUF once, outside every timed arm
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        training = {}
        if not args.shipped_run:
            start = time.perf_counter()
            # kept after the benchmark (benchmarks/runs is not tracked): a run to chat with, report on, compare
            training = measure(__file__, ["--arm", "shipped", "--workdir", str(ROOT / SHIPPED_RUN)],
                               tmp / "shipped.json")
            training["wall_s"] = round(time.perf_counter() - start, 1)
            if "error" in training:
                sys.exit(f"training the shipped config failed ({training['error']})")
            run = Path(training["run"])
        else:
            training = {"run": str(run), **json.loads((run / "metrics.json").read_text())}
        n_eval = write_slice(DATA / "validation.jsonl", None, tmp / "validation.jsonl")  # the config's file
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        answers = {name: summarise([measure(__file__, ["--arm", "answers", "--model", model, "--workdir", str(tmp)],
                                            tmp / f"answers-{name}.json")], ("loss", "perplexity", "exact_match",
                                                                              "rougeL", "seconds"))
                   for name, model in (("base", base), ("textune", str(run)))}
    tr = training.get("train", {})
    print(f"\nshipped config {CONFIG.name}: {tr.get('steps')} steps, training loop {tr.get('seconds')} s, "
          f"{tr.get('tokens_per_s')} tokens/s" + (f", wall {training['wall_s']} s, peak {training['peak_rss_mb']:.0f} MB"
                                                   if "wall_s" in training else f" (run {run})"))
    for record in history:
        if record.get("type") == "eval":
            print("  step {step}: ".format(**record) + ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                                                  if k not in ("type", "step", "epoch")
                                                                  and isinstance(v, float)))
    print_answers(answers, n_eval, cfg.eval.max_new_tokens)
    out = ROOT / (args.output if args.output != DEFAULT_OUTPUT else "benchmarks/results/sft-shipped.json")
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "config": str(CONFIG.relative_to(ROOT)),
                               "eval_rows": n_eval, "max_new_tokens": cfg.eval.max_new_tokens,
                               "training": training, "history": history, "answers": answers}, indent=2))
    print(f"\nwritten to {out}")


def summarise(rows: list[dict], keys: tuple[str, ...]) -> dict:
    good = [r for r in rows if "error" not in r]
    if not good:
        return {}
    out = {"seeds": len(good), "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
           "failed": [r for r in rows if "error" in r]}
    for key in keys:
        if all(key in r for r in good):
            out[key], out[f"{key}_std"] = mean_std([r[key] for r in good])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training arm (default: the "
                                                           "shipped config's train.max_steps, 300)")
    p.add_argument("--train-rows", type=int, default=None, help="seeded slice of the 4,800 training rows (default: all)")
    p.add_argument("--eval-rows", type=int, default=None, help="seeded slice of the 400 validation rows (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per arm: 42, 43, ...")
    p.add_argument("--trl-group-by-length", action="store_true",
                   help="give TRL Trainer's length-grouped sampler (default: its own default, random batches)")
    p.add_argument("--trl-padding-free", action="store_true",
                   help="TRL's padding_free: each micro-batch's conversations as one unpadded row (position ids)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="both arms: auto = bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), else fp32")
    p.add_argument("--textune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the textune arm only (a switch: data.packing=true, "
                        "train.compile=true, ...); repeatable")
    p.add_argument("--textune-without", nargs="*", default=[], choices=["bits-dropout", "autocast-copies"],
                   help="turn off textune.speedups' switches in the textune arm (each switch's own gain)")
    p.add_argument("--arms", nargs="+", default=["trl", "textune"], choices=["trl", "textune"],
                   help="training arms to run (textune alone for a switch table)")
    p.add_argument("--no-answers", action="store_true",
                   help="skip the greedy answers of the base and tuned models (the training figures only)")
    p.add_argument("--shipped", action="store_true", help="the shipped config as it is, no TRL arm: train it, "
                                                           "then base and tuned answers on every validation prompt")
    p.add_argument("--shipped-run", metavar="RUN", help="like --shipped, with a finished run of the shipped config")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    add_arm_arguments(p, seed=SEED)  # internal: run one arm, write --arm-output
    args = p.parse_args()
    if (args.shipped or args.shipped_run) and not args.arm:
        return shipped_main(args)
    steps = args.steps or shipped().train.max_steps
    precision = ("bf16" if native_bf16() else "fp32") if args.precision == "auto" else args.precision
    extra = {}
    for item in args.textune_set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--textune-set {item}: write KEY=VALUE, e.g. data.packing=true")
        import yaml

        extra[key] = yaml.safe_load(value)
    if args.arm == "textune":
        result = run_textune(Path(args.workdir), args.seed, steps, precision, extra, args.textune_without)
    elif args.arm == "trl":
        result = run_trl(Path(args.workdir), args.seed, steps, args.trl_group_by_length, args.model, precision,
                         args.trl_padding_free)
    elif args.arm == "shipped":
        result = run_shipped(Path(args.workdir))
    elif args.arm == "answers":
        result = run_answers(args.model, Path(args.workdir) / "validation.jsonl")
    if args.arm:
        Path(args.arm_output).write_text(json.dumps(result))
        return

    seeds = [SEED + i for i in range(args.seeds)]
    wall: dict[str, float] = {}

    def timed_measure(name: str, arm_args: list[str], out: Path) -> dict:
        start = time.perf_counter()
        result = measure(__file__, arm_args, out)
        wall[name] = round(time.perf_counter() - start, 1)
        return {**result, "wall_s": wall[name]}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_train = write_slice(DATA / "train.jsonl", args.train_rows, tmp / "train.jsonl")
        n_eval = write_slice(DATA / "validation.jsonl", args.eval_rows, tmp / "validation.jsonl")
        from textune.gguf import default_causal_lm_dir

        base = str(default_causal_lm_dir())  # converts the packaged GGUF once, outside every timed arm
        runs: dict[str, list[dict]] = {arm: [] for arm in ("trl", "textune") if arm in args.arms}
        answers: dict[str, list[dict]] = {"base": [], "textune": []}
        tokens = {}
        flops_per_token = training_flops_per_token(base)
        ceiling = matmul_ceiling("bfloat16" if precision == "bf16" else "float32")
        print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {precision} matmul ceiling {ceiling:.0f} GFLOP/s "
              f"(2048 x 2048, measured now)", flush=True)
        if not args.no_answers:
            answers["base"].append(timed_measure("answers base", ["--arm", "answers", "--model", base, "--workdir",
                                                                  str(tmp)], tmp / "answers-base.json"))
        for seed in seeds:  # seeds outermost: a slow patch of the machine then touches both arms
            for arm in runs:
                workdir = tmp / f"{arm}-{seed}"
                workdir.mkdir()
                arm_args = ["--arm", arm, "--seed", str(seed), "--steps", str(steps), "--workdir", str(workdir),
                            "--model", base, "--precision", precision]
                if arm == "trl":
                    arm_args += (["--trl-group-by-length"] if args.trl_group_by_length else []) + (
                        ["--trl-padding-free"] if args.trl_padding_free else [])
                else:
                    arm_args += [f"--textune-set={item}" for item in args.textune_set] + (
                        ["--textune-without", *args.textune_without] if args.textune_without else [])
                result = timed_measure(f"{arm} {seed}", arm_args, tmp / f"{arm}-{seed}.json")
                runs[arm].append({"seed": seed, **result})
                if arm == "trl" and not tokens and (workdir / "trl-validation-tokens.jsonl").is_file():
                    for split in ("train", "validation"):
                        (workdir / f"trl-{split}-tokens.jsonl").rename(tmp / f"trl-{split}-tokens.jsonl")
                    tokens = compare_tokens(tmp)
            run = runs["textune"][-1].get("run")
            if run and not args.no_answers:
                answers["textune"].append({"seed": seed, **timed_measure(
                    f"answers textune {seed}", ["--arm", "answers", "--model", run, "--workdir", str(tmp)],
                    tmp / f"answers-textune-{seed}.json")})

    training = {arm: summarise(rows, ("loss", "perplexity", "trl_eval_loss", "tokens_per_s", "train_seconds",
                                      "last_train_loss"))
                for arm, rows in runs.items()}
    quality = {name: summarise(rows, ("loss", "perplexity", "exact_match", "rougeL", "seconds"))
               for name, rows in answers.items()}
    for r in training.values():
        if r:
            r["mfu"] = r["tokens_per_s"] * flops_per_token / 1e9 / ceiling
    t, tr = training.get("textune", {}), training.get("trl", {})
    both = bool(t and tr)
    ratios = {"loss": t["loss"] / tr["loss"], "tokens_per_s": t["tokens_per_s"] / tr["tokens_per_s"],
              "peak_rss_mb": t["peak_rss_mb"] / tr["peak_rss_mb"]} if both else {}
    targets = {  # issue 34's (issue 17 asked 2% and 1.2x)
        "held-out loss within 1% of TRL's (token-weighted, mean over seeds)": both and abs(ratios["loss"] - 1) <= 0.01,
        f"training tokens/s >= 1.5x {BASELINE_TOKENS_PER_S} (textune fp32 before issue 34)":
            bool(t) and t["tokens_per_s"] >= 1.5 * BASELINE_TOKENS_PER_S,
        "training tokens/s >= 2x TRL's": both and ratios["tokens_per_s"] >= 2,
    }
    sampling = "length-grouped (--trl-group-by-length)" if args.trl_group_by_length else "random (its default)"
    cfg = shipped()
    tc = cfg.train
    print(f"\nSFT: SmolLM2-135M-Instruct, LoRA r{cfg.tuning.r}/alpha{cfg.tuning.alpha:g} on "
          f"{', '.join(m.removesuffix('_proj') for m in cfg.tuning.target_modules)}; {n_train:,} training rows, "
          f"{n_eval:,} validation rows; {steps} steps of {tc.batch_size} x {tc.gradient_accumulation_steps} "
          f"conversations, lr {tc.lr:g}, max_length {cfg.model.max_length}, {precision}; seeds "
          f"{', '.join(map(str, seeds))}; TRL batches: {sampling}"
          + (", padding-free" if args.trl_padding_free else "")
          + (f"; textune: {', '.join(args.textune_set)}" if args.textune_set else "")
          + (f"; textune without {', '.join(args.textune_without)}" if args.textune_without else ""))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {precision} matmul ceiling {ceiling:.0f} GFLOP/s; MFU counts "
          f"{flops_per_token / 1e9:.3f} GFLOP per training token (4 x the frozen matmul weights: forward and "
          f"input gradients)")
    header = (f"{'arm':<9}{'held-out loss (± std)':>23}{'TRL eval_loss':>15}{'tokens/s':>11}{'MFU':>7}{'train s':>10}"
              f"{'peak MB':>9}")
    print(header + "\n" + "-" * len(header))
    for arm, r in training.items():
        if not r:
            print(f"{arm:<9} failed ({runs[arm][0].get('error')})")
            continue
        trl_loss = f"{r['trl_eval_loss']:.4f}" if "trl_eval_loss" in r else "-"
        loss = f"{r['loss']:.4f} ± {r['loss_std']:.4f}"
        print(f"{arm:<9}{loss:>23}{trl_loss:>15}{r['tokens_per_s']:>11.1f}{r['mfu']:>7.1%}"
              f"{r['train_seconds']:>10.1f}{r['peak_rss_mb']:>9.0f}")
    if ratios:
        print(f"{'ratio':<9}{ratios['loss']:>23.4f}{'':>15}{ratios['tokens_per_s']:>10.2f}x{'':>7}{'':>10}"
              f"{ratios['peak_rss_mb']:>8.2f}x   (textune / TRL)")
    for split, c in tokens.items():
        print(f"tokens   {split}: {c['identical']:,} of {c['rows']['textune']:,} rows with the same input ids and "
              f"labels in TRL and textune" + (f" (TRL has {c['rows']['trl']:,} rows)"
                                             if c["rows"]["trl"] != c["rows"]["textune"] else ""))
    if not args.no_answers:
        print_answers(quality, n_eval, cfg.eval.max_new_tokens)
    print("\nwall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "precision": precision,
        "matmul_gflops": round(ceiling, 1), "flops_per_token": flops_per_token,
        "seeds": seeds, "steps": steps, "train_rows": n_train, "eval_rows": n_eval,
        "trl_sampling": "group_by_length" if args.trl_group_by_length else "random",
        "trl_padding_free": args.trl_padding_free, "textune_overrides": args.textune_set,
        "textune_without": args.textune_without,
        "hyperparameters": {"config": str(CONFIG.relative_to(ROOT)), "batch_size": tc.batch_size,
                            "gradient_accumulation_steps": tc.gradient_accumulation_steps,
                            "lr": tc.lr, "warmup_steps": math.ceil(tc.warmup_ratio * steps),
                            "weight_decay": tc.weight_decay, "max_grad_norm": tc.max_grad_norm,
                            "max_length": cfg.model.max_length, "lora": {"r": cfg.tuning.r, "alpha": cfg.tuning.alpha,
                            "dropout": cfg.tuning.dropout, "target_modules": list(cfg.tuning.target_modules)},
                            "max_new_tokens": cfg.eval.max_new_tokens},
        "training": training, "ratios": ratios, "answers": quality, "tokens": tokens, "targets": targets,
        "wall_s": wall, "runs": runs, "answer_runs": answers}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
