"""Fine-tuning benchmark: run shipped configs end to end and report accuracy, F1, wall time, peak memory.

Each config runs as its own `textune train` process, so wall time and peak resident memory are the
whole job's (data loading, tokenisation, training, evaluation, saving).

    python benchmarks/bench_finetune.py                     # SST-2 and MRPC full fine-tuning
    python benchmarks/bench_finetune.py configs/sst2-minilm-head.yaml --set train.max_steps=100

Writes benchmarks/results/finetune.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/sst2-minilm-full.yaml", "configs/mrpc-minilm-full.yaml"]


def run_train_process(config: str, overrides: list[str], out_dir: Path, command: str = "train",
                      resume: bool = False) -> tuple[int, float, float]:
    """Run `textune train CONFIG` (or `command`, e.g. pretrain) with `KEY=VALUE` overrides as its own process,
    replacing `out_dir`, or continuing it from its latest checkpoint with `resume`.

    Returns (exit code, wall seconds, peak resident MB of that process alone, read with os.wait4)."""
    cmd = [sys.executable, "-m", "textune", command, config, "--output_dir", str(out_dir),
           *(["--resume", "latest"] if resume else ["--overwrite"])]
    for item in overrides:
        key, _, value = item.partition("=")
        cmd += [f"--{key}", value]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024


def run_config(config: str, overrides: list[str], runs_dir: Path) -> dict:
    out_dir = runs_dir / Path(config).stem
    code, wall, peak_mb = run_train_process(config, overrides, out_dir)
    if code != 0:
        return {"config": config, "error": f"exit {code}"}
    metrics = json.loads((out_dir / "metrics.json").read_text())
    val = metrics["validation"]
    return {"config": config, "accuracy": round(val["accuracy"], 4), "f1": round(val["f1"], 4),
            "best_step": metrics["best_step"], "train_steps": metrics["train"]["steps"],
            "train_samples_per_s": metrics["train"]["samples_per_s"],
            "wall_minutes": round(wall / 60, 2), "peak_rss_mb": round(peak_mb, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--runs-dir", default="benchmarks/runs")
    p.add_argument("--output", default="benchmarks/results/finetune.json")
    args = p.parse_args()
    results = [run_config(c, args.set, ROOT / args.runs_dir) for c in args.configs]
    header = f"{'config':<40}{'accuracy':>10}{'f1':>8}{'minutes':>9}{'samples/s':>11}{'peak MB':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['config']:<40}  failed: {r['error']}")
            continue
        print(f"{r['config']:<40}{r['accuracy']:>10.4f}{r['f1']:>8.4f}{r['wall_minutes']:>9.2f}"
              f"{r['train_samples_per_s']:>11.1f}{r['peak_rss_mb']:>9.0f}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
