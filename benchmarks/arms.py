"""What the side-by-side benchmarks share: each arm runs as its own process, so its peak memory is its own."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(script: str, args: list[str], out: Path, python: str = sys.executable) -> dict:
    """Run `PYTHON SCRIPT ARGS --arm-output OUT` from the repository root: the JSON the arm wrote to OUT plus its
    peak resident memory (`os.wait4`'s ru_maxrss, of that process alone), or {"error": ...} if it failed.
    `started_at` is the wall clock just before the process started, so an arm that writes the wall clock of its
    first prediction gives its cold start. `python` runs a peer that needs other library versions (a venv)."""
    cmd = [python, script, *args, "--arm-output", str(out)]
    print("$", " ".join(cmd), flush=True)
    started_at = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"error": f"exit {code}"}
    return {**json.loads(out.read_text()), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "started_at": started_at}


def add_arm_arguments(parser: argparse.ArgumentParser, seed: int | None = None, choices: list[str] | None = None):
    """The hidden arguments a benchmark's parent passes to one arm's process (internal, not for users): which arm,
    its seed, model and working folder, and where it writes its JSON."""
    parser.add_argument("--arm", choices=choices, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=seed, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--arm-output", help=argparse.SUPPRESS)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), printed beside every figure: timings hold for that CPU only."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


def export_run(run: str, out: str) -> dict:
    """`textune export` of a benchmark's textune run to `out`, in an arm's process (the parent stays without
    torch): its seconds, what ONNX Runtime fused, its check against PyTorch, and the fp32 matmul ceiling."""
    sys.path.insert(0, str(ROOT / "src"))
    from bench_predict import matmul_ceiling
    from textune.export import export_onnx

    start = time.perf_counter()
    export_onnx(run, out, fuse="yes")  # the fused path is what the benchmarks measure, as it was before `auto`
    info = json.loads((Path(out) / "textune_onnx.json").read_text())
    return {"seconds": round(time.perf_counter() - start, 1), "max_abs_diff": info["check"]["max_abs_diff"],
            "check_on": info["check"]["on"], "fused": info["optimization"].get("operators") or info["optimization"],
            "matmul_gflops_fp32": round(matmul_ceiling("float32"), 1)}
