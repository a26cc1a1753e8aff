"""Long documents benchmark (issue 33): data.long_text truncate, head_tail, chunks (mean) and chunks (max) on the
20 Newsgroups training split, all arms in one run, each arm in its own process (`arms.measure`).

Data: ../shared/data/ng20/train.csv (11,293 posts, 20 balanced classes), split by the seed into train and
validation (`--validation-share`, stratified by class); `--rows N` keeps a seeded, stratified N of the posts
(a subset: say so when quoting figures). The 20 Newsgroups test split is not read: it stays for independent checks.
Model: the packaged MiniLM-L6 (textune's default) at model.max_length 128 (`--max-length`), textune's defaults
otherwise (batch 32, lr 5e-5, linear schedule, evaluated at the end of each epoch), `--epochs` (default 1).

chunks-max reuses the chunks-mean arm's trained model when that arm ran first (see `pooled_by_max`: the
same weights, pooled by max), so its training seconds are chunks-mean's.

Per arm: macro F1 and accuracy on validation (per document: chunks' windows pooled), macro F1 on the longest
quartile of validation documents by token length (the same documents for every arm), training seconds (the
loop, from metrics.json), prediction seconds (`load_predictor(run).predict` over the validation texts, the
model loaded first), windows trained on, peak memory. Printed with the CPU and its fp32 matmul ceiling measured
in this run, and the ratios to truncate.

    python benchmarks/bench_long.py                               # the full run (about an hour per arm on 2 cores)
    python benchmarks/bench_long.py --rows 400 --epochs 0.25      # a smoke run

Writes benchmarks/results/long.json (or --output).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from arms import add_arm_arguments, measure

ROOT = Path(__file__).resolve().parents[1]
NG20 = ROOT.parent / "shared" / "data" / "ng20" / "train.csv"
# arm -> data.* settings
ARMS = {"truncate": {"data.long_text": "truncate"},
        "head_tail": {"data.long_text": "head_tail"},
        "chunks-mean": {"data.long_text": "chunks", "data.chunk_pooling": "mean"},
        "chunks-max": {"data.long_text": "chunks", "data.chunk_pooling": "max"}}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def split_files(workdir: Path, rows: int | None, validation_share: float, seed: int) -> dict[str, Path]:
    """train.csv and validation.csv: ng20's posts split by class with the seed (a stratified `rows` of them)."""
    with NG20.open(encoding="utf-8", newline="") as f:
        posts = [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(f) if r["text"].strip()]
    rng = random.Random(seed)
    by_class = defaultdict(list)
    for post in posts:
        by_class[post["label"]].append(post)
    train, validation = [], []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        if rows is not None:
            group = group[:max(2, round(rows * len(group) / len(posts)))]
        cut = max(1, round(len(group) * validation_share))
        validation += group[:cut]
        train += group[cut:]
    rng.shuffle(train)
    out = {}
    for name, split in (("train", train), ("validation", validation)):
        out[name] = workdir / f"{name}.csv"
        with out[name].open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(split)
    return out


def macro_f1(labels: list[str], preds: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0))


# ---------------------------------------------------------------- one arm, in its own process


def run_arm(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config
    from textune.tasks import load_predictor
    from textune.train import train

    workdir = Path(args.workdir)
    overrides = {"data.train": str(workdir / "train.csv"), "data.validation": str(workdir / "validation.csv"),
                 "model.max_length": args.max_length, "train.epochs": args.epochs, "seed": args.seed,
                 "output_dir": str(workdir / args.arm), **ARMS[args.arm]}
    trained = workdir / "chunks-mean"
    if args.arm == "chunks-max" and (trained / "metrics.json").is_file():
        run = pooled_by_max(trained, workdir / args.arm)
    else:
        run = train(load_config(None, overrides), overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    stats = json.loads((run / "data_stats.json").read_text())
    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    predictor = load_predictor(run)
    texts = [r["text"] for r in rows]
    start = time.perf_counter()
    predicted = predictor.predict(texts)
    predict_seconds = time.perf_counter() - start
    labels, preds = [r["label"] for r in rows], [p["label"] for p in predicted]
    longest = sorted(range(len(rows)), key=lambda i: (rows[i]["tokens"], i))[-(len(rows) // 4):]
    chunks = stats["token_lengths"]["train"].get("chunks")
    result = {"arm": args.arm, "macro_f1": macro_f1(labels, preds),
              "accuracy": sum(a == b for a, b in zip(labels, preds)) / len(rows),
              "macro_f1_longest_quartile": macro_f1([labels[i] for i in longest], [preds[i] for i in longest]),
              "longest_quartile_min_tokens": rows[longest[0]]["tokens"] if longest else None,
              "validation_macro_f1_in_training": metrics["validation"]["f1_macro"],
              "train_seconds": metrics["train"]["seconds"], "train_steps": metrics["train"]["steps"],
              "predict_seconds": round(predict_seconds, 2), "validation_documents": len(rows),
              "train_rows": chunks["chunks"] if chunks else stats["sizes"]["train"],
              "train_documents": stats["sizes"]["train"],
              "truncated_share": stats["token_lengths"]["train"]["truncated_share"],
              "trained_by": json.loads((run / "trained_by.json").read_text())["arm"]
              if (run / "trained_by.json").is_file() else args.arm}
    Path(args.arm_output).write_text(json.dumps(result))


def pooled_by_max(trained: Path, run: Path) -> Path:
    """The chunks-mean arm's run with its windows pooled by max instead of mean. Training on windows does not read
    the pooling (every window carries its document's label), and with one evaluation per epoch the pooling picks no
    different checkpoint at one epoch, so training chunks-max separately would give the same weights for another
    hour of CPU; its training figures are chunks-mean's, and `validation_macro_f1_in_training` is mean-pooled."""
    import shutil

    import yaml

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for item in trained.iterdir():
        if item.name != "config.yaml":
            (run / item.name).symlink_to(item)
    config = yaml.safe_load((trained / "config.yaml").read_text())
    config["data"]["chunk_pooling"] = "max"
    config["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "trained_by.json").write_text(json.dumps({"arm": "chunks-mean"}))
    return run


# ---------------------------------------------------------------- the parent: all arms, one table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--rows", type=int, help="a stratified subset of the posts (default: all 11,293)")
    parser.add_argument("--validation-share", type=float, default=0.2)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "long.json"))
    add_arm_arguments(parser, seed=42, choices=list(ARMS))
    args = parser.parse_args()
    if args.arm:
        return run_arm(args)
    from bench_predict import matmul_ceiling

    cpu, ceiling = cpu_name(), matmul_ceiling("float32")
    print(f"CPU {cpu}; fp32 matmul ceiling {ceiling:.0f} GFLOP/s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        workdir = Path(tmp)
        files = split_files(workdir, args.rows, args.validation_share, args.seed)
        for arm in args.arms:
            common = ["--seed", str(args.seed), "--workdir", str(workdir), "--epochs", str(args.epochs),
                      "--max-length", str(args.max_length)]
            results[arm] = measure(str(Path(__file__).relative_to(ROOT)), ["--arm", arm, *common],
                                   workdir / f"{arm}.json")
        sizes = {k: sum(1 for _ in v.open(encoding="utf-8")) - 1 for k, v in files.items()}
    print_table(results)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"cpu": cpu, "matmul_gflops": {"float32": round(ceiling, 1)},
                                             "rows": args.rows, "split": sizes, "epochs": args.epochs,
                                             "max_length": args.max_length, "seed": args.seed,
                                             "arms": results}, indent=2))
    print(f"wrote {args.output}")


def print_table(results: dict) -> None:
    base = results.get("truncate") or {}
    print(f"{'arm':<12} {'macro F1':>9} {'accuracy':>9} {'F1 longest 25%':>15} {'train s':>9} {'x':>6} "
          f"{'predict s':>10} {'x':>6} {'train rows':>11} {'peak MB':>8}")
    for arm, r in results.items():
        if "error" in r:
            print(f"{arm:<12} {r['error']}")
            continue
        ratio = (lambda k: f"{r[k] / base[k]:.2f}" if base.get(k) else "")
        print(f"{arm:<12} {r['macro_f1']:>9.4f} {r['accuracy']:>9.4f} {r['macro_f1_longest_quartile']:>15.4f} "
              f"{r['train_seconds']:>9.1f} {ratio('train_seconds'):>6} {r['predict_seconds']:>10.2f} "
              f"{ratio('predict_seconds'):>6} {r['train_rows']:>11,} {r['peak_rss_mb']:>8.0f}")


if __name__ == "__main__":
    main()
