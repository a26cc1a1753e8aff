"""Augmentation benchmark: does EDA or mixup help MiniLM on small slices of SST-2?

Slices of 500 and 2,000 SST-2 training sentences (a seeded sample of ../shared/data/sst2/train.tsv, the same
slice for every arm), evaluated on the full validation set (872). Arms: no augmentation, each EDA operation
alone (synonym, insert, swap, delete), all four (eda), and embedding mixup. Full fine-tuning of the packaged
MiniLM, 3 training seeds per cell; mean and spread (sample std) of validation accuracy.

Compute-matched: within a slice size every arm takes the same number of optimizer steps (`--passes` x the
slice size examples seen), so augmented arms see fewer passes over the originals and more variety, at the
same cost. All runs go through `textune.train.train` in this one process (no reloading of Python and
libraries per run); each run folder is deleted once its metrics are read.

    python benchmarks/bench_augment.py                                    # the full grid (~30 min on 2 cores)
    python benchmarks/bench_augment.py --sizes 100 --seeds 1 --passes 1 --arms none swap   # smoke test

Writes benchmarks/results/augment.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
ARMS = {"none": {}, "synonym": {"data.augment.methods": ["synonym"]}, "insert": {"data.augment.methods": ["insert"]},
        "swap": {"data.augment.methods": ["swap"]}, "delete": {"data.augment.methods": ["delete"]},
        "eda": {"data.augment.methods": ["eda"]}, "mixup": {}}


def write_slice(size: int, folder: Path) -> Path:
    """A seeded sample of `size` training sentences, written as TSV (header label<TAB>sentence)."""
    import pandas as pd

    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    rows = pd.Series(lines[1:]).sample(n=size, random_state=0)
    path = folder / f"sst2-train-{size}.tsv"
    path.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    return path


def run_cell(train_file: Path, arm: str, seed: int, steps: int, args, runs_dir: Path) -> dict:
    from textune.config import load_config
    from textune.train import train

    overrides = {"data.train": str(train_file), "data.validation": str(SST2 / "validation.tsv"),
                 "data.text_column": "sentence", "data.label_names": ["negative", "positive"],
                 "model.max_length": 66, "seed": seed, "output_dir": str(runs_dir / f"{train_file.stem}-{arm}-{seed}"),
                 "train.max_steps": steps, "train.eval_steps": steps, "train.batch_size": args.batch_size,
                 "train.lr": args.lr, "train.warmup_ratio": 0.1, "train.logging_steps": max(1, steps // 5),
                 "train.checkpoint_steps": None, "train.load_best_at_end": False,
                 "data.augment.n": args.copies, **{f"data.augment.{k}_rate": args.rate for k in
                                                  ("synonym", "insert", "swap", "delete")},
                 **ARMS[arm]}
    if arm == "mixup":
        overrides["data.augment.mixup_alpha"] = args.mixup_alpha
    start = time.perf_counter()
    run = train(load_config(None, overrides), overwrite=True)
    metrics = json.loads((run / "metrics.json").read_text())
    sizes = json.loads((run / "data_stats.json").read_text())["sizes"]
    shutil.rmtree(run)
    return {"arm": arm, "seed": seed, "accuracy": metrics["validation"]["accuracy"], "steps": metrics["train"]["steps"],
            "train_rows": sizes["train"], "validation_rows": sizes["validation"],
            "seconds": round(time.perf_counter() - start, 1)}


def summarise(results: list[dict], sizes: list[int], arms: list[str]) -> list[dict]:
    table = []
    for size in sizes:
        base = None
        for arm in arms:
            accs = [r["accuracy"] for r in results if r["size"] == size and r["arm"] == arm]
            if not accs:  # a partial results file, written while the grid runs
                continue
            mean = statistics.mean(accs)
            base = mean if arm == "none" else base
            table.append({"size": size, "arm": arm, "mean": round(mean, 4),
                          "std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                          "delta_vs_none": None if base is None else round(mean - base, 4),
                          "accuracies": [round(a, 4) for a in accs]})
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="training slice sizes")
    p.add_argument("--passes", type=float, nargs="+", default=[4, 2],
                   help="examples seen per arm, in multiples of the slice size (one per size)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--copies", type=int, default=4, help="EDA copies per training sentence (data.augment.n)")
    p.add_argument("--rate", type=float, default=0.1, help="rate of every EDA operation")
    p.add_argument("--mixup-alpha", type=float, default=0.4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on this shared 2-core machine two OpenMP threads competing "
                        "with another process ran 5-10x slower than one")
    p.add_argument("--output", default="benchmarks/results/augment.json")
    p.add_argument("--runs-dir", default="benchmarks/runs/augment", help="where run folders live while they run")
    args = p.parse_args()
    if len(args.passes) != len(args.sizes):
        p.error("--passes needs one value per --sizes value")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    runs_dir = ROOT / args.runs_dir
    runs_dir.mkdir(parents=True, exist_ok=True)

    results, start = [], time.perf_counter()
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(minutes: float) -> None:
        settings = {**vars(args), "model": "packaged MiniLM-L6-H384", "max_length": 66,
                    "validation": "sst2/validation.tsv (872)", "minutes": round(minutes, 1)}
        out.write_text(json.dumps({"settings": settings, "table": summarise(results, args.sizes, args.arms),
                                   "runs": results}, indent=2))
    for size, passes in zip(args.sizes, args.passes):
        train_file = write_slice(size, runs_dir)
        steps = math.ceil(passes * size / args.batch_size)
        for arm in args.arms:
            for seed in range(args.seeds):
                r = {"size": size, **run_cell(train_file, arm, seed, steps, args, runs_dir)}
                results.append(r)
                print(f"[{(time.perf_counter() - start) / 60:5.1f} min] size {size} {arm:<8} seed {seed}: "
                      f"accuracy {r['accuracy']:.4f} ({r['train_rows']} train rows, {r['steps']} steps, "
                      f"{r['seconds']} s)", flush=True)
                write((time.perf_counter() - start) / 60)  # partial results survive an interrupted grid
    table = summarise(results, args.sizes, args.arms)
    minutes = (time.perf_counter() - start) / 60

    print(f"\nSST-2 validation accuracy (872 sentences), MiniLM full fine-tuning, {args.seeds} seeds, "
          f"{minutes:.1f} min in all")
    print(f"{'train':>6} | {'arm':<8} | {'mean':>6} | {'std':>6} | {'vs none':>8} | accuracies")
    for row in table:
        delta = "" if row["delta_vs_none"] is None or row["arm"] == "none" else f"{row['delta_vs_none']:+.4f}"
        print(f"{row['size']:>6} | {row['arm']:<8} | {row['mean']:.4f} | {row['std']:.4f} | {delta:>8} | "
              f"{', '.join(f'{a:.4f}' for a in row['accuracies'])}")
    write(minutes)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
