"""NER benchmark: textune's token classification against a Hugging Face `Trainer` script written like
transformers' `run_ner.py`, same model, data and hyper-parameters, in one invocation.

Model: the packaged MiniLM-L6 (a fresh token-classification head). Data: ../shared/data/wnut16 (1,800 training,
200 validation tweets, 10 entity types, BIO tags). Hyper-parameters for both arms (those of
configs/wnut16-minilm-ner.yaml): batch 16, 8 epochs, AdamW lr 1e-4, weight decay 0.01, linear schedule with
10% warm-up, max_length 128, first-sub-token labels (the rest -100), the last model evaluated (no best-model
selection in either arm: run_ner.py keeps the last one).

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  trainer   AutoModelForTokenClassification + DataCollatorForTokenClassification + Trainer with its defaults
            (fp32, random batches) + seqeval, as run_ner.py does it
  textune   `textune train` with the shipped config's settings and textune's defaults (length-grouped batches,
            bf16 autocast where the CPU has native bf16, fused AdamW); train.load_best_at_end false and one
            evaluation at the end, like the Trainer arm
Each arm runs once per seed (`--seeds`, default 3: 42, 43, 44).

Training speed: samples/s of the training loop (Trainer: `train_runtime` with evaluation and saving off;
textune: the loop's own rate at its last logging step, before the final evaluation).

Prediction (one more process per arm, on the best-F1 textune run's model): the 2,000 WNUT-16 sentences as raw
text (words joined by spaces), `transformers.pipeline("token-classification", aggregation_strategy="first",
batch_size=32)` against textune's `TokenClassifierPredictor` (batch 32; fp32, the exact path, and bf16, what
`textune predict --quantize bf16` does; and fp32 on `textune export` of that run, ONNX Runtime with the graph
fused by its transformer optimizer, exported in a process of its own before it): sentences/s, and the share of
sentences where both give exactly the same entities (type, start, end); agreement with aggregation "simple"
too; for the export, its own check (max abs logit difference from PyTorch on real tokens). Each arm loads, warms up and times `--repeats` passes; the fastest counts.

Targets (issue 15): entity F1 within 1 point of the Trainer's (mean over seeds); training samples/s >= 1.5x
the Trainer's defaults; prediction >= 2x the pipeline with the same entities on >= 99% of sentences; issue 34:
the fused ONNX export >= 3x the pipeline with the same entities.

    python benchmarks/bench_ner.py
    python benchmarks/bench_ner.py --epochs 1 --seeds 1 --predict-sentences 200     # a quick smoke run

Writes benchmarks/results/ner.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from arms import add_arm_arguments, cpu_name, export_run, mean_std, measure

ROOT = Path(__file__).resolve().parents[1]
WNUT = ROOT.parent / "shared" / "data" / "wnut16"
BATCH_SIZE, LR, WARMUP, MAX_LENGTH, WEIGHT_DECAY, SEED = 16, 1e-4, 0.1, 128, 0.01, 42
PREDICT_ARMS = ("pipeline", "predictor", "predictor-bf16", "onnx")


def read_split(name: str):
    sys.path.insert(0, str(ROOT / "src"))
    from textune.tasks.token_classification import read_conll

    return read_conll(WNUT / f"{name}.conll", name)


def run_textune(workdir: Path, seed: int, epochs: float) -> dict:
    from textune.config import load_config
    from textune.train import train

    cfg = load_config(ROOT / "configs" / "wnut16-minilm-ner.yaml", {
        "output_dir": str(workdir / "textune"), "seed": seed, "train.epochs": epochs,
        "data.train": str(WNUT / "train.conll"), "data.validation": str(WNUT / "validation.conll"),
        "train.load_best_at_end": False, "train.eval_steps": 10**9, "train.checkpoint_steps": None})
    run = train(cfg, overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [r for r in history if r["type"] == "train"][-1]
    v = metrics["validation"]
    return {"samples_per_s": last["samples_per_s"], "f1": v["f1"], "precision": v["precision"], "recall": v["recall"],
            "per_type": {k: r["f1"] for k, r in v["per_type"].items()}, "model": str(run)}


def run_trainer(workdir: Path, seed: int, epochs: float) -> dict:
    """run_ner.py, reduced to what this comparison needs."""
    import numpy as np
    from datasets import Dataset
    from seqeval.metrics import classification_report
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)

    from textune.models import resolve_model

    train, validation = read_split("train"), read_split("validation")
    # run_ner.py's get_label_list: the sorted set of training tags
    labels = sorted({t for tags in train.tags for t in tags})
    label_to_id = {n: i for i, n in enumerate(labels)}
    model_path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize_and_align_labels(batch):
        enc = tokenizer(batch["tokens"], truncation=True, max_length=MAX_LENGTH, is_split_into_words=True)
        all_labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            previous, ids = None, []
            for word in enc.word_ids(batch_index=i):
                ids.append(-100 if word is None or word == previous else label_to_id[tags[word]])
                previous = word
            all_labels.append(ids)
        enc["labels"] = all_labels
        return enc

    def dataset(split):
        ds = Dataset.from_dict({"tokens": split.tokens, "ner_tags": split.tags})
        return ds.map(tokenize_and_align_labels, batched=True, remove_columns=["tokens", "ner_tags"])

    set_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_to_id)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=128,
        num_train_epochs=epochs, learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, seed=seed,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(train),
                      data_collator=DataCollatorForTokenClassification(tokenizer), processing_class=tokenizer)
    out = trainer.train()
    pred = trainer.predict(dataset(validation))
    predictions = np.argmax(pred.predictions, axis=2)
    gold = [[labels[y] for y in row if y != -100] for row in pred.label_ids]
    guess = [[labels[p] for p, y in zip(prow, yrow) if y != -100] for prow, yrow in zip(predictions, pred.label_ids)]
    report = classification_report(gold, guess, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    return {"samples_per_s": len(train.tokens) * epochs / out.metrics["train_runtime"], "f1": float(micro["f1-score"]),
            "precision": float(micro["precision"]), "recall": float(micro["recall"]),
            "per_type": {k: float(r["f1-score"]) for k, r in report.items() if not k.endswith(" avg")}}


def sentences(n: int) -> list[str]:
    texts = [" ".join(words) for split in ("train", "validation") for words in read_split(split).tokens]
    return texts[:n]


def run_predict(arm: str, model_dir: str, n: int, repeats: int) -> dict:
    """Load, warm up, then time `repeats` passes over the sentences; the fastest pass counts (the machine is
    shared: the best pass is the one least disturbed)."""
    texts = sentences(n)
    start = time.perf_counter()
    if arm == "pipeline":
        from transformers import pipeline

        def load(strategy):
            return pipeline("token-classification", model=model_dir, aggregation_strategy=strategy, device="cpu")

        ner = load("first")
        predict = lambda: ner(texts, batch_size=32)  # noqa: E731
        entities = lambda rows: [[(e["entity_group"], e["start"], e["end"]) for e in row] for row in rows]  # noqa: E731
    else:
        from textune.tasks.token_classification import TokenClassifierPredictor

        # "onnx": model_dir is the export folder, which the predictor takes like a run
        predictor = TokenClassifierPredictor(model_dir, batch_size=32,
                                             precision="bf16" if arm.endswith("bf16") else "fp32")
        predict = lambda: predictor.predict(texts)  # noqa: E731
        entities = lambda rows: [[(e["entity"], e["start"], e["end"]) for e in r["entities"]] for r in rows]  # noqa: E731
    load_seconds = time.perf_counter() - start
    predict()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = predict()
        times.append(time.perf_counter() - start)
    out = {"seconds": min(times), "all_seconds": times, "load_seconds": load_seconds, "entities": entities(rows)}
    if arm == "pipeline":
        out["entities_simple"] = entities(load("simple")(texts, batch_size=32))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--predict-sentences", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="timed prediction passes per arm; the fastest counts")
    p.add_argument("--output", default="benchmarks/results/ner.json")
    add_arm_arguments(p, seed=SEED)  # internal: run one arm, write --arm-output
    args = p.parse_args()
    if args.arm in ("trainer", "textune"):
        run = run_textune if args.arm == "textune" else run_trainer
        Path(args.arm_output).write_text(json.dumps(run(Path(args.workdir), args.seed, args.epochs)))
        return
    if args.arm in PREDICT_ARMS:
        Path(args.arm_output).write_text(json.dumps(run_predict(args.arm, args.model, args.predict_sentences,
                                                                args.repeats)))
        return
    if args.arm == "export":
        Path(args.arm_output).write_text(json.dumps(export_run(args.model, args.workdir)))
        return

    seeds = [SEED + i for i in range(args.seeds)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"trainer": [], "textune": []}
        for seed in seeds:  # seeds outermost: a slow patch of the machine then touches both arms
            for arm in runs:
                workdir = tmp / f"{arm}-{seed}"
                workdir.mkdir()
                result = measure(__file__, ["--arm", arm, "--seed", str(seed), "--epochs", str(args.epochs),
                                  "--workdir", str(workdir)], tmp / f"{arm}-{seed}.json")
                runs[arm].append({"seed": seed, **result})
        ok = [r for r in runs["textune"] if "error" not in r]
        best_run = max(ok, key=lambda r: r["f1"])["model"] if ok else None
        best_model = str(Path(best_run) / "model") if ok else None
        predict, exported = {}, {}
        if best_model:
            exported = measure(__file__, ["--arm", "export", "--model", best_run, "--workdir", str(tmp / "onnx")],
                               tmp / "export.json")
            for arm in PREDICT_ARMS:
                if arm == "onnx" and "error" in exported:
                    continue
                model = str(tmp / "onnx") if arm == "onnx" else best_model
                predict[arm] = measure(__file__, ["--arm", arm, "--model", model, "--predict-sentences",
                                        str(args.predict_sentences), "--repeats", str(args.repeats)],
                                       tmp / f"{arm}.json")
    summary = {}
    for arm, rows in runs.items():
        good = [r for r in rows if "error" not in r]
        if not good:
            continue
        f1, f1_std = mean_std([r["f1"] for r in good])
        speed, speed_std = mean_std([r["samples_per_s"] for r in good])
        types = sorted(good[0]["per_type"])
        summary[arm] = {"f1": round(f1, 4), "f1_std": round(f1_std, 4), "f1_per_seed": [round(r["f1"], 4) for r in good],
                        "precision": round(statistics.mean(r["precision"] for r in good), 4),
                        "recall": round(statistics.mean(r["recall"] for r in good), 4),
                        "samples_per_s": round(speed, 2), "samples_per_s_std": round(speed_std, 2),
                        "per_type_f1": {t: round(statistics.mean(r["per_type"].get(t, 0.0) for r in good), 4)
                                        for t in types},
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                        "failed": [r for r in rows if "error" in r]}
    prediction = {}
    if predict and all("error" not in predict.get(arm, {"error": 1}) for arm in PREDICT_ARMS[:3]):
        n = args.predict_sentences
        theirs = predict["pipeline"]
        norm = lambda rows: [[tuple(e) for e in row] for row in rows]  # noqa: E731 (JSON turned tuples into lists)
        prediction = {"sentences": n, "pipeline_per_s": round(n / theirs["seconds"], 1),
                      "load_seconds": {"pipeline": round(theirs["load_seconds"], 2)},
                      "peak_rss_mb": {"pipeline": theirs["peak_rss_mb"]}}
        ours_fp32 = predict["predictor"]
        for arm, key in (("predictor", "textune"), ("predictor-bf16", "textune_bf16"), ("onnx", "onnx_fused")):
            if "error" in predict.get(arm, {"error": 1}):
                continue
            ours = predict[arm]
            prediction[key] = {
                "per_s": round(n / ours["seconds"], 1), "speedup": round(theirs["seconds"] / ours["seconds"], 2),
                "same_entities_as_pipeline_first": round(sum(a == b for a, b in zip(
                    norm(ours["entities"]), norm(theirs["entities"]))) / n, 4),
                "same_entities_as_pipeline_simple": round(sum(a == b for a, b in zip(
                    norm(ours["entities"]), norm(theirs["entities_simple"]))) / n, 4)}
            prediction[key]["x_pytorch_fp32"] = round(ours_fp32["seconds"] / ours["seconds"], 2)
            prediction[key]["same_entities_as_pytorch_fp32"] = round(sum(a == b for a, b in zip(
                norm(ours["entities"]), norm(ours_fp32["entities"]))) / n, 4)
            prediction["load_seconds"][key] = round(ours["load_seconds"], 2)
            prediction["peak_rss_mb"][key] = ours["peak_rss_mb"]
    t, tr = summary.get("textune", {}), summary.get("trainer", {})
    targets = {
        "entity F1 within 1 point of the Trainer's (means)": bool(t and tr) and abs(t["f1"] - tr["f1"]) <= 0.01,
        # the issue asks for equal quality: a higher F1 than the Trainer's misses "within" but not this one
        "entity F1 at most 1 point below the Trainer's (means)": bool(t and tr) and t["f1"] >= tr["f1"] - 0.01,
        "training samples/s >= 1.5x the Trainer's defaults": bool(t and tr)
            and t["samples_per_s"] >= 1.5 * tr["samples_per_s"],
        "prediction (fp32, exact) >= 2x pipeline": prediction.get("textune", {}).get("speedup", 0) >= 2,
        "fp32: same entities as the pipeline on >= 99% of sentences":
            prediction.get("textune", {}).get("same_entities_as_pipeline_first", 0) >= 0.99,
        "prediction (bf16) >= 2x pipeline with the same entities on >= 99% of sentences":
            prediction.get("textune_bf16", {}).get("speedup", 0) >= 2
            and prediction.get("textune_bf16", {}).get("same_entities_as_pipeline_first", 0) >= 0.99,
        "fused ONNX >= 3x pipeline with the same entities": prediction.get("onnx_fused", {}).get("speedup", 0) >= 3
            and prediction.get("onnx_fused", {}).get("same_entities_as_pipeline_first", 0) == 1.0,
    }
    ceiling = {k: v for k, v in exported.items() if k != "started_at"}.get("matmul_gflops_fp32")
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, fp32 matmul ceiling {ceiling or '-'} GFLOP/s (measured in this run)")
    print(f"WNUT-16: 1,800 training / 200 validation sentences, {args.epochs:g} epochs, batch {BATCH_SIZE}, lr {LR:g}, "
          f"max_length {MAX_LENGTH}, seeds {', '.join(map(str, seeds))} (mean ± std over seeds)")
    header = f"{'arm':<10}{'entity F1':>18}{'precision':>11}{'recall':>9}{'samples/s':>16}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for arm, r in summary.items():
        print(f"{arm:<10}{r['f1']:>11.4f} ± {r['f1_std']:.4f}{r['precision']:>11.4f}{r['recall']:>9.4f}"
              f"{r['samples_per_s']:>9.1f} ± {r['samples_per_s_std']:<5.1f}{r['peak_rss_mb']:>9.0f}")
    if t and tr:
        print("\nper-type F1 (mean over seeds):")
        for name in sorted(set(t["per_type_f1"]) | set(tr["per_type_f1"])):
            print(f"  {name:<14} textune {t['per_type_f1'].get(name, 0):.4f}   trainer {tr['per_type_f1'].get(name, 0):.4f}")
    if prediction:
        print(f"\nprediction on {prediction['sentences']:,} raw sentences (batch 32, fastest of {args.repeats}): "
              f"pipeline {prediction['pipeline_per_s']}/s, peak {prediction['peak_rss_mb']['pipeline']:.0f} MB")
        for key in ("textune", "textune_bf16", "onnx_fused"):
            r = prediction.get(key)
            if r is None:
                continue
            print(f"  {key:<13} {r['per_s']}/s = {r['speedup']}x ({r['x_pytorch_fp32']}x PyTorch fp32); same entities "
                  f"as pipeline 'first' on {r['same_entities_as_pipeline_first']:.2%}, as 'simple' on "
                  f"{r['same_entities_as_pipeline_simple']:.2%}, as PyTorch fp32 on {r['same_entities_as_pytorch_fp32']:.2%}; "
                  f"peak {prediction['peak_rss_mb'][key]:.0f} MB")
        if "error" not in exported and exported:
            print(f"  export: fused {exported['fused']}, check max abs logit difference {exported['max_abs_diff']:.1e} "
                  f"on {exported['check_on']}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "cpu_count": os.cpu_count(), "matmul_gflops_fp32": ceiling,
                               "export": {k: v for k, v in exported.items() if k != "started_at"}, "seeds": seeds, "epochs": args.epochs,
                               "hyperparameters": {"batch_size": BATCH_SIZE, "lr": LR, "warmup_ratio": WARMUP,
                                                   "weight_decay": WEIGHT_DECAY, "max_length": MAX_LENGTH},
                               "training": summary, "prediction": prediction, "targets": targets,
                               "runs": runs}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
