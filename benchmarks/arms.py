"""What the side-by-side benchmarks share: each arm runs as its own process, so its peak memory is its own."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(script: str, args: list[str], out: Path) -> dict:
    """Run `python SCRIPT ARGS --arm-output OUT` from the repository root: the JSON the arm wrote to OUT plus its
    peak resident memory (`os.wait4`'s ru_maxrss, of that process alone), or {"error": ...} if it failed."""
    cmd = [sys.executable, script, *args, "--arm-output", str(out)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"error": f"exit {code}"}
    return {**json.loads(out.read_text()), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
