"""Training benchmark: textune's loop against `transformers.Trainer`, same model, data and hyper-parameters.

Model: the packaged MiniLM-L6. Data: 4,000 SST-2 training sentences drawn with a fixed seed; the full 872
validation sentences. Hyper-parameters for every arm: batch 32, 1 epoch, AdamW lr 5e-5, weight decay 0.01,
linear schedule with 6% warm-up, max_length 66, seed 42, dynamic padding.

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  trainer-default  Trainer with its defaults (fp32, random batches)
  trainer-best     Trainer with its speed flags: train_sampling_strategy="group_by_length" (what
                   transformers 5 calls group_by_length) and bf16=True where the CPU has native bf16 (AVX512-BF16
                   or AMX); on a CPU without it bf16 is emulated (~500x slower matmuls), so fp32 is its best there
  textune-fp32     `textune.train` with train.mixed_precision=no: what textune gains at Trainer's precision
  textune          `textune.train` with its defaults (length-grouped batches, bf16 autocast where the CPU
                   has native bf16, fused AdamW, no host syncs between logging steps, train.compile auto)
Switch arms (`--arms`), each textune's defaults with one switch changed, to measure each switch alone:
  textune-compile  train.compile: true          textune-pad16    train.pad_to_multiple_of: 16 (eager)
  textune-random   train.group_by_length: false textune-foreach  train.fused_optimizer: false

`--full`: the run length users have: the whole SST-2 training set (67,349 sentences), one epoch, the shipped
config's hyper-parameters (configs/sst2-minilm-full.yaml), one evaluation at the end, and wall time from
process start to the saved model (loading, tokenising, compiling and the final evaluation included). Default
arms there: trainer-best, textune, textune-compile; `--seeds 1` unless given.

Every arm runs once per training seed (`--seeds`, default 3: 42, 43, 44; the 4,000 sentences are the same
for all). One seed's accuracy on 872 sentences moves by about 1.4 points (standard error), so the
accuracy target compares means over seeds; speed is the mean too, with its spread.

Training time excludes tokenisation and evaluation for every arm (Trainer: `train_runtime` with
evaluation off; textune: the loop's own samples/s at its last step, logged before the final evaluation).
Tokens/s counts real (non-pad) tokens. MFU = 6 x non-embedding parameters x real tokens / time, over a
2048x2048 matmul timed in this run (fp32 ceiling for fp32 arms, bf16 for bf16 ones).

Targets: textune >= 2x Trainer defaults and >= 1.3x Trainer's best flags in samples/s, at accuracy within
1 point of Trainer defaults; MFU > 35%.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --train-samples 500 --seeds 1     # a quick smoke run

Writes benchmarks/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ARMS = ["trainer-default", "trainer-best", "textune-fp32", "textune"]
FULL_ARMS = ["trainer-best", "textune", "textune-compile"]
# Each textune arm: the defaults with these config overrides.
TEXTUNE_ARMS = {"textune": {}, "textune-fp32": {"train.mixed_precision": "no"},
                "textune-compile": {"train.compile": True}, "textune-pad16": {"train.pad_to_multiple_of": 16},
                "textune-random": {"train.group_by_length": False}, "textune-foreach": {"train.fused_optimizer": False}}
ALL_ARMS = ["trainer-default", "trainer-best", *TEXTUNE_ARMS]
SEED, BATCH_SIZE, EPOCHS, LR, WARMUP, MAX_LENGTH, WEIGHT_DECAY = 42, 32, 1, 5e-5, 0.06, 66, 0.01
LABELS = ["negative", "positive"]

from arms import add_arm_arguments, measure as measure_process  # noqa: E402  (the script's folder is on sys.path when run as a script)
from bench_predict import matmul_ceiling  # noqa: E402


def write_subset(n: int, path: Path) -> Path:
    with (SST2 / "train.tsv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows = random.Random(SEED).sample(rows, n)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["label", "sentence"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def read_tsv(path: Path) -> dict[str, list]:
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows]}


def run_textune(train_file: Path, workdir: Path, seed: int, overrides: dict) -> dict:
    from textune.config import load_config
    from textune.train import train

    cfg = load_config(None, {
        "output_dir": str(workdir / "textune"), "seed": seed, "model.max_length": MAX_LENGTH, **overrides,
        "data.train": str(train_file), "data.validation": str(SST2 / "validation.tsv"),
        "data.text_column": "sentence", "data.label_column": "label", "data.label_names": LABELS,
        "train.epochs": EPOCHS, "train.batch_size": BATCH_SIZE, "train.lr": LR, "train.warmup_ratio": WARMUP,
        "train.weight_decay": WEIGHT_DECAY})
    run = train(cfg, overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [r for r in history if r["type"] == "train"][-1]
    return {"samples_per_s_loop": last["samples_per_s"], "accuracy": metrics["validation"]["accuracy"],
            "compiled": metrics["train"]["compiled"], "compiled_shapes": metrics["train"]["compiled_shapes"]}


def run_trainer(train_file: Path, workdir: Path, seed: int, best: bool) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from textune.models import resolve_model

    model_path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenize = lambda b: tokenizer(b["sentence"], truncation=True, max_length=MAX_LENGTH)  # noqa: E731
    train_ds = Dataset.from_dict(read_tsv(train_file)).map(tokenize, batched=True, remove_columns=["sentence"])
    val_ds = Dataset.from_dict(read_tsv(SST2 / "validation.tsv")).map(tokenize, batched=True,
                                                                      remove_columns=["sentence"])
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    flags = {"train_sampling_strategy": "group_by_length", "bf16": trainer_bf16()} if best else {}
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=128,
        num_train_epochs=EPOCHS, learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, seed=seed,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True,
        use_cpu=True, **flags)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    out = trainer.train()
    pred = trainer.predict(val_ds)
    trainer.save_model(str(workdir / "trainer" / "model"))  # the --full arms time the process to a saved model
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"train_seconds": out.metrics["train_runtime"], "accuracy": accuracy}


def trainer_bf16() -> bool:
    """Trainer's best flags include bf16 only where it is fast: emulated bf16 matmuls would make it the slowest arm."""
    from textune.train import cpu_supports_bf16

    return cpu_supports_bf16()


def measure(arm: str, train_file: Path, workdir: Path, seed: int) -> dict:
    """One arm in its own process (`arms.measure`): its JSON, peak RSS and wall seconds from process start to exit
    (after the model is saved)."""
    result = measure_process(__file__, ["--arm", arm, "--train-file", str(train_file), "--seed", str(seed)],
                          workdir / f"{arm}-{seed}.json")
    if "error" not in result:
        result["wall_seconds"] = round(time.time() - result.pop("started_at"), 1)
    return {"arm": arm, "seed": seed, **result}


def useful_work(train_file: Path) -> tuple[int, int]:
    """(non-embedding parameters of the classifier, real tokens of the training texts at MAX_LENGTH)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from textune.models import resolve_model

    model_path = resolve_model(None)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    enc = AutoTokenizer.from_pretrained(model_path)(read_tsv(train_file)["sentence"], truncation=True,
                                                    max_length=MAX_LENGTH)
    return params, sum(len(ids) for ids in enc["input_ids"])


def summarise(arm: str, runs: list[dict], precision: str, train_samples: int, tokens: int, params: int,
              ceiling: float) -> dict:
    """One arm over its seeds: mean and standard deviation of speed and accuracy, MFU of the mean speed."""
    import statistics

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    seconds = [r["train_seconds"] if "train_seconds" in r else train_samples * EPOCHS / r["samples_per_s_loop"]
               for r in runs]
    speeds = [train_samples * EPOCHS / s for s in seconds]
    accuracies = [r["accuracy"] for r in runs]
    mean_seconds = statistics.mean(seconds)
    return {"arm": arm, "precision": precision, "seeds": [r["seed"] for r in runs],
            "samples_per_s": round(statistics.mean(speeds), 2), "samples_per_s_std": round(spread(speeds), 2),
            "tokens_per_s": round(tokens * EPOCHS / mean_seconds, 1),
            "accuracy": round(statistics.mean(accuracies), 4), "accuracy_std": round(spread(accuracies), 4),
            "accuracy_per_seed": [round(a, 4) for a in accuracies],
            "samples_per_s_per_seed": [round(v, 2) for v in speeds],
            "mfu": round(6 * params * tokens * EPOCHS / mean_seconds / 1e9 / ceiling, 4),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "wall_seconds": round(statistics.mean(r["wall_seconds"] for r in runs), 1),
            "wall_seconds_per_seed": [r["wall_seconds"] for r in runs],
            "compiled": [r.get("compiled", False) for r in runs],
            "compiled_shapes": [r.get("compiled_shapes", 0) for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--full", action="store_true", help="the whole SST-2 training set, wall time to a saved model")
    p.add_argument("--arms", nargs="+", choices=ALL_ARMS, help="arms to run (default: the four above, or the "
                                                                "--full set)")
    p.add_argument("--seeds", type=int, help="training seeds per arm (42, 43, ...); default 3, --full 1")
    p.add_argument("--output", help="default benchmarks/results/train.json, --full train-full.json")
    add_arm_arguments(p, seed=SEED, choices=ALL_ARMS)  # internal: run one arm, write --arm-output
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        with tempfile.TemporaryDirectory() as tmp:
            if args.arm.startswith("textune"):
                result = run_textune(Path(args.train_file), Path(tmp), args.seed, TEXTUNE_ARMS[args.arm])
            else:
                result = run_trainer(Path(args.train_file), Path(tmp), args.seed, best=args.arm == "trainer-best")
            Path(args.arm_output).write_text(json.dumps(result))
        return

    from textune.train import choose_mixed_precision

    arms = args.arms or (FULL_ARMS if args.full else ARMS)
    seeds = [SEED + i for i in range(args.seeds or (1 if args.full else 3))]
    output = args.output or ("benchmarks/results/train-full.json" if args.full else "benchmarks/results/train.json")
    textune_precision = choose_mixed_precision("auto", "auto")[0]
    precisions = {arm: "no" if arm in ("trainer-default", "textune-fp32") else textune_precision for arm in ALL_ARMS}
    precisions["trainer-best"] = "bf16" if trainer_bf16() else "no"
    # Only the precisions some arm runs: on a CPU without native bf16 one bf16 2048^2 matmul takes about a minute.
    ceiling = {prec: matmul_ceiling("float32" if prec == "no" else "bfloat16") for prec in {"no", *map(precisions.get, arms)}}
    with tempfile.TemporaryDirectory() as tmp:
        train_samples = sum(1 for _ in (SST2 / "train.tsv").open(encoding="utf-8")) - 1 if args.full else args.train_samples
        train_file = write_subset(train_samples, Path(tmp) / "train.tsv")
        params, tokens = useful_work(train_file)
        # Seeds outermost: a slow patch of the machine then touches every arm, not one.
        runs = [measure(arm, train_file, Path(tmp), seed) for seed in seeds for arm in arms]
    failed = [r for r in runs if "error" in r]
    results = []
    for arm in arms:
        ok = [r for r in runs if r["arm"] == arm and "error" not in r]
        if ok:
            results.append(summarise(arm, ok, "fp32" if precisions[arm] == "no" else precisions[arm],
                                     train_samples, tokens, params, ceiling[precisions[arm]]))
    by_arm = {r["arm"]: r for r in results}
    base = by_arm.get("trainer-default") or by_arm.get("trainer-best")
    for r in results:
        if base:
            r["x_baseline_speed"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
            r["x_baseline_wall"] = round(base["wall_seconds"] / r["wall_seconds"], 2)
    ours, best, ours_fp32 = by_arm.get("textune", {}), by_arm.get("trainer-best", {}), by_arm.get("textune-fp32", {})
    if args.full:
        targets = {
            "textune >= 1.15x Trainer best flags, wall time to a saved model": bool(best and ours)
                and best["wall_seconds"] >= 1.15 * ours["wall_seconds"],
            "textune accuracy within 0.5 points of Trainer best flags": bool(best and ours)
                and abs(ours["accuracy"] - best["accuracy"]) <= 0.005,
        }
    else:
        default = by_arm.get("trainer-default", {})
        targets = {
            "textune >= 2x Trainer defaults": bool(default) and ours.get("samples_per_s", 0) >= 2 * default["samples_per_s"],
            "textune fp32 >= 2x Trainer defaults (both fp32)": bool(default)
                and ours_fp32.get("samples_per_s", 0) >= 2 * default["samples_per_s"],
            "textune >= 1.3x Trainer best flags": bool(best) and ours.get("samples_per_s", 0) >= 1.3 * best["samples_per_s"],
            "textune accuracy within 1 point of Trainer defaults (means)": bool(default and ours)
                and abs(ours["accuracy"] - default["accuracy"]) <= 0.01,
            "textune MFU > 35%": ours.get("mfu", 0) > 0.35,
        }

    print(f"\n{train_samples:,} SST-2 sentences ({tokens:,} real tokens), 1 epoch, batch {BATCH_SIZE}, "
          f"seeds {', '.join(map(str, seeds))}; {params / 1e6:.1f}M non-embedding parameters; matmul ceiling "
          f"{', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in ceiling.items())} (mean ± std over seeds); "
          f"x baseline against {base['arm'] if base else '-'}")
    header = (f"{'arm':<16}{'precision':>10}{'samples/s':>16}{'x speed':>8}{'wall s':>8}{'x wall':>7}"
              f"{'accuracy':>17}{'MFU':>7}{'peak MB':>9}  compiled (shapes)")
    print(header + "\n" + "-" * len(header))
    for r in results:
        speed, acc = f"{r['samples_per_s']:.1f} ± {r['samples_per_s_std']:.1f}", f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
        compiled = ", ".join(f"{c} ({n})" for c, n in zip(r["compiled"], r["compiled_shapes"]))
        print(f"{r['arm']:<16}{r['precision']:>10}{speed:>16}{r.get('x_baseline_speed', 0):>8.2f}"
              f"{r['wall_seconds']:>8.0f}{r.get('x_baseline_wall', 0):>7.2f}{acc:>17}{r['mfu']:>7.1%}"
              f"{r['peak_rss_mb']:>9.0f}  {compiled}")
    for r in failed:
        print(f"{r['arm']:<16}  seed {r['seed']} failed: {r['error']}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "train_samples": train_samples, "full": args.full,
                               "validation_samples": 872, "real_train_tokens": tokens,
                               "non_embedding_parameters": params, "seeds": seeds, "arms": arms,
                               "trainer_best_flags": {"group_by_length": True, "bf16": trainer_bf16()},
                               "hyperparameters": {"batch_size": BATCH_SIZE, "epochs": EPOCHS, "lr": LR,
                                                   "warmup_ratio": WARMUP, "weight_decay": WEIGHT_DECAY,
                                                   "max_length": MAX_LENGTH},
                               "matmul_gflops": {("fp32" if k == "no" else k): round(v, 1) for k, v in ceiling.items()},
                               "targets": targets, "results": results, "failed": failed}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
