"""Scaling benchmark: the same SST-2 fine-tuning as 1 process and as 2 data-parallel processes (gloo, CPU).

Config: configs/sst2-minilm-full.yaml with 4,000 training sentences (`data.max_train_samples`, drawn with the
seed) and the full 872-sentence validation set, 1 epoch, global batch 32 (each of 2 processes takes 16 of
every batch), evaluation at the end. Arms, each its own `textune train` process tree:

  1 process, all cores   plain `textune train` (PyTorch uses one intra-op thread per core)
  1 process, 1 thread    OMP_NUM_THREADS=1: what each of the 2 processes below gets
  2 processes            `textune train --num-processes 2`: accelerate launch, cores / 2 threads each

samples/s is the training loop's own figure at its last step (logged before the final evaluation), counting
the examples of all processes. Peak MB is the largest single process (os.wait4), wall the whole command.

    python benchmarks/bench_scale.py
    python benchmarks/bench_scale.py --train-samples 256      # a quick smoke run

Writes benchmarks/results/scale.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_finetune import ROOT, run_train_process  # noqa: E402

CONFIG = "configs/sst2-minilm-full.yaml"
ARMS = {  # name: (processes, OMP_NUM_THREADS for a single process or None)
    "1 process, all cores": (1, None),
    "1 process, 1 thread": (1, "1"),
    "2 processes": (2, None),
}


def run_arm(name: str, processes: int, threads: str | None, train_samples: int, runs: Path) -> dict:
    out = runs / name.replace(" ", "-").replace(",", "")
    overrides = [f"data.max_train_samples={train_samples}", "train.eval_steps=", "train.logging_steps=25",
                 "train.checkpoint_steps="]
    if processes > 1:  # run_train_process turns KEY=VALUE into `--KEY VALUE`: here the CLI's own flag
        overrides.append(f"num-processes={processes}")
    env_before = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = threads
    try:
        code, wall, peak_mb = run_train_process(CONFIG, overrides, out)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if env_before is not None:
            os.environ["OMP_NUM_THREADS"] = env_before
    if code != 0:
        return {"arm": name, "error": f"exit {code}"}
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    last = [r for r in history if r["type"] == "train"][-1]
    return {"arm": name, "processes": processes, "samples_per_s": last["samples_per_s"],
            "accuracy": round(metrics["validation"]["accuracy"], 4), "validation_examples": metrics["validation"]["examples"],
            "steps": metrics["train"]["steps"], "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--output", default="benchmarks/results/scale.json")
    args = p.parse_args()
    runs = ROOT / "benchmarks" / "runs" / "scale"
    results = [run_arm(name, n, threads, args.train_samples, runs) for name, (n, threads) in ARMS.items()]
    ok = {r["arm"]: r for r in results if "error" not in r}
    base = ok.get("1 process, all cores")
    for r in ok.values():
        r["x_one_process"] = round(r["samples_per_s"] / base["samples_per_s"], 2) if base else None

    print(f"\nSST-2, {args.train_samples:,} training sentences, 872 validation, 1 epoch, global batch 32, "
          f"{os.cpu_count()} CPU cores")
    header = f"{'arm':<22}{'samples/s':>10}{'x 1 proc':>9}{'accuracy':>10}{'val n':>7}{'steps':>7}{'wall s':>8}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<22}  failed: {r['error']}")
            continue
        print(f"{r['arm']:<22}{r['samples_per_s']:>10.1f}{r['x_one_process'] or 0:>9.2f}{r['accuracy']:>10.4f}"
              f"{r['validation_examples']:>7}{r['steps']:>7}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>9.0f}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "train_samples": args.train_samples, "config": CONFIG,
                               "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
