"""Training benchmark: textune's loop against `transformers.Trainer`, same model, data and hyper-parameters.

Model: the packaged MiniLM-L6. Data: 4,000 SST-2 training sentences drawn with a fixed seed; the full 872
validation sentences. Hyper-parameters for every arm: batch 32, 1 epoch, AdamW lr 5e-5, weight decay 0.01,
linear schedule with 6% warm-up, max_length 66, seed 42, dynamic padding.

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  trainer-default  Trainer with its defaults (fp32, random batches)
  trainer-best     Trainer with its speed flags: train_sampling_strategy="group_by_length" (what
                   transformers 5 calls group_by_length) and bf16=True
  textune          `textune.train` with its defaults (length-grouped batches, bf16 autocast where the CPU
                   has native bf16, fused AdamW, no host syncs between logging steps)

Training time excludes tokenisation and evaluation for every arm (Trainer: `train_runtime` with
evaluation off; textune: the loop's own samples/s at its last step, logged before the final evaluation).
Tokens/s counts real (non-pad) tokens. MFU = 6 x non-embedding parameters x real tokens / time, over a
2048x2048 matmul timed in this run (fp32 ceiling for fp32 arms, bf16 for bf16 ones).

Targets: textune >= 2x Trainer defaults and >= 1.3x Trainer's best flags in samples/s, at accuracy within
1 point of Trainer defaults; MFU > 35%.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --train-samples 500      # a quick smoke run

Writes benchmarks/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ARMS = ["trainer-default", "trainer-best", "textune"]
SEED, BATCH_SIZE, EPOCHS, LR, WARMUP, MAX_LENGTH, WEIGHT_DECAY = 42, 32, 1, 5e-5, 0.06, 66, 0.01
LABELS = ["negative", "positive"]

sys.path.insert(0, str(Path(__file__).parent))
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


def run_textune(train_file: Path, workdir: Path) -> dict:
    from textune.config import load_config
    from textune.train import train

    cfg = load_config(None, {
        "output_dir": str(workdir / "textune"), "seed": SEED, "model.max_length": MAX_LENGTH,
        "data.train": str(train_file), "data.validation": str(SST2 / "validation.tsv"),
        "data.text_column": "sentence", "data.label_column": "label", "data.label_names": LABELS,
        "train.epochs": EPOCHS, "train.batch_size": BATCH_SIZE, "train.lr": LR, "train.warmup_ratio": WARMUP,
        "train.weight_decay": WEIGHT_DECAY})
    run = train(cfg, overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [r for r in history if r["type"] == "train"][-1]
    return {"samples_per_s_loop": last["samples_per_s"], "accuracy": metrics["validation"]["accuracy"]}


def run_trainer(train_file: Path, workdir: Path, best: bool) -> dict:
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
    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    flags = {"train_sampling_strategy": "group_by_length", "bf16": True} if best else {}
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=128,
        num_train_epochs=EPOCHS, learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, seed=SEED,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True,
        use_cpu=True, **flags)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer),
                      processing_class=tokenizer)
    out = trainer.train()
    pred = trainer.predict(val_ds)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"train_seconds": out.metrics["train_runtime"], "accuracy": accuracy}


def measure(arm: str, train_file: Path, workdir: Path) -> dict:
    out = workdir / f"{arm}.json"
    cmd = [sys.executable, __file__, "--arm", arm, "--train-file", str(train_file), "--arm-output", str(out)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"arm": arm, "error": f"exit {os.waitstatus_to_exitcode(status)}"}
    return {"arm": arm, **json.loads(out.read_text()), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--output", default="benchmarks/results/train.json")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, write --arm-output
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--arm-output", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_textune if args.arm == "textune" else lambda f, w: run_trainer(f, w, args.arm == "trainer-best")
            Path(args.arm_output).write_text(json.dumps(fn(Path(args.train_file), Path(tmp))))
        return

    from textune.train import choose_mixed_precision

    textune_precision = choose_mixed_precision("auto", "auto")[0]
    ceiling = {"no": matmul_ceiling("float32"), "bf16": matmul_ceiling("bfloat16")}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_samples, Path(tmp) / "train.tsv")
        params, tokens = useful_work(train_file)
        results = [measure(arm, train_file, Path(tmp)) for arm in ARMS]
    precisions = {"trainer-default": "no", "trainer-best": "bf16", "textune": textune_precision}
    for r in results:
        if "error" in r:
            continue
        r["precision"] = "fp32" if precisions[r["arm"]] == "no" else precisions[r["arm"]]
        if "train_seconds" not in r:  # textune: its loop's samples/s, measured before the final evaluation
            r["train_seconds"] = round(args.train_samples * EPOCHS / r.pop("samples_per_s_loop"), 2)
        r["samples_per_s"] = round(args.train_samples * EPOCHS / r["train_seconds"], 2)
        r["tokens_per_s"] = round(tokens * EPOCHS / r["train_seconds"], 1)
        r["mfu"] = round(6 * params * tokens * EPOCHS / r["train_seconds"] / 1e9 / ceiling[precisions[r["arm"]]], 4)
        r["accuracy"] = round(r["accuracy"], 4)
    by_arm = {r["arm"]: r for r in results if "error" not in r}
    base = by_arm.get("trainer-default")
    for r in by_arm.values():
        if base:
            r["x_trainer_default"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
    ours, best = by_arm.get("textune", {}), by_arm.get("trainer-best", {})
    targets = {
        "textune >= 2x Trainer defaults": ours.get("x_trainer_default", 0) >= 2,
        "textune >= 1.3x Trainer best flags": bool(best) and ours.get("samples_per_s", 0) >= 1.3 * best["samples_per_s"],
        "textune accuracy within 1 point of Trainer defaults": bool(base and ours)
            and abs(ours["accuracy"] - base["accuracy"]) <= 0.01,
        "textune MFU > 35%": ours.get("mfu", 0) > 0.35,
    }

    print(f"\n{args.train_samples:,} SST-2 sentences ({tokens:,} real tokens), 1 epoch, batch {BATCH_SIZE}; "
          f"{params / 1e6:.1f}M non-embedding parameters; matmul ceiling fp32 {ceiling['no']:.0f} GFLOP/s, "
          f"bf16 {ceiling['bf16']:.0f} GFLOP/s")
    header = (f"{'arm':<17}{'precision':>10}{'samples/s':>10}{'tokens/s':>10}{'x default':>10}{'accuracy':>10}"
              f"{'MFU':>7}{'peak MB':>9}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<17}  failed: {r['error']}")
            continue
        print(f"{r['arm']:<17}{r['precision']:>10}{r['samples_per_s']:>10.1f}{r['tokens_per_s']:>10.0f}"
              f"{r.get('x_trainer_default', 0):>10.2f}{r['accuracy']:>10.4f}{r['mfu']:>7.1%}{r['peak_rss_mb']:>9.0f}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "train_samples": args.train_samples,
                               "validation_samples": 872, "real_train_tokens": tokens,
                               "non_embedding_parameters": params,
                               "hyperparameters": {"batch_size": BATCH_SIZE, "epochs": EPOCHS, "lr": LR,
                                                   "warmup_ratio": WARMUP, "weight_decay": WEIGHT_DECAY,
                                                   "max_length": MAX_LENGTH, "seed": SEED},
                               "matmul_gflops": {"fp32": round(ceiling["no"], 1), "bf16": round(ceiling["bf16"], 1)},
                               "targets": targets, "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
