"""`textune ui` figures (issue 32): how fast the runs page paints, what the UI process holds in memory while a
run it launched trains, and what watching a run costs the run.

  paint      time to first contentful paint of the runs page in headless Chromium (Playwright, Debian's
             /usr/bin/chromium), with 10 and with 200 run folders (written by hand: config, history, metrics),
             first load and reloads (median of --repeats)
  overhead   the same SST-2 fine-tuning (configs/sst2-minilm-full.yaml, --train-samples sentences, 1 epoch) from
             the CLI, then launched by `textune ui` with its run page open in Chromium and polling: training
             samples/s (metrics.json) of each, one after the other on the same machine
  memory     resident memory of the `textune ui` process, sampled every 0.5 s while that run trains (peak, mean)

    .venv/bin/python benchmarks/bench_ui.py
    .venv/bin/python benchmarks/bench_ui.py --train-samples 64 --repeats 1     # smoke run
    .venv/bin/python benchmarks/bench_ui.py --paint-only

Writes benchmarks/results/ui.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CONFIG = "configs/sst2-minilm-full.yaml"
# The first contentful paint, from navigation start (ms); the observer also reports one painted before it runs.
FCP = """new Promise(resolve => new PerformanceObserver(list => {
  const e = list.getEntries().find(e => e.name === 'first-contentful-paint'); if (e) resolve(e.startTime);
}).observe({type: 'paint', buffered: true}))"""


def fake_runs(root: Path, n: int) -> Path:
    """`n` run folders as `textune train` leaves them (finished, or stopped with a checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        run = root / f"run-{i:03d}"
        run.mkdir(exist_ok=True)
        (run / "config.yaml").write_text(f"task: classification\noutput_dir: {run}\nmodel: {{name: null}}\n"
                                         f"data: {{train: train.csv}}\ntuning: {{method: lora}}\n"
                                         f"train: {{epochs: 2.0, metric: accuracy, lr: {1e-4 * (i + 1)}}}\n")
        history = [{"type": "train", "step": s, "epoch": s / 100, "loss": 1 / s} for s in range(5, 205, 5)]
        history.append({"type": "eval", "step": 200, "epoch": 2.0, "eval_loss": 0.4, "eval_accuracy": 0.8})
        (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        if i % 3:
            (run / "metrics.json").write_text(json.dumps({"best_step": 200, "best_metric": 0.8, "metric": "accuracy",
                                                          "train": {"steps": 200, "seconds": 60.0}}))
        else:
            (run / "checkpoints" / "step-100").mkdir(parents=True, exist_ok=True)
    return root


def start_ui(runs: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "textune", "ui", "--runs", str(runs), "--port", str(port)],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/api/configs", timeout=1)
            return ui, base
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("textune ui did not start")


def paint_arm(browser, n: int, repeats: int, work: Path) -> dict:
    ui, base = start_ui(fake_runs(work / f"paint-{n}", n))
    try:
        page = browser.new_page()
        times = []
        for _ in range(repeats + 1):  # the first load fills the UI's cache; the rest are reloads
            page.goto(base + "/", wait_until="load")
            times.append(page.evaluate(FCP))
        page.close()
    finally:
        ui.terminate()
        ui.wait()
    return {"arm": f"paint, {n} runs", "first_load_ms": round(times[0], 1),
            "reload_ms_median": round(statistics.median(times[1:]), 1)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def overrides(train_samples: int) -> dict:
    return {"data.max_train_samples": train_samples, "train.epochs": 1, "train.eval_steps": None,
            "train.logging_steps": 5, "train.checkpoint_steps": None}


def cli_arm(train_samples: int, work: Path) -> dict:
    out = work / "cli-run"
    args = [f"--{k}={'' if v is None else v}" for k, v in overrides(train_samples).items()]
    start = time.time()
    subprocess.run([sys.executable, "-m", "textune", "train", CONFIG, *args, "--output_dir", str(out), "--overwrite"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"arm": "run from the CLI", "samples_per_s": metrics["train"]["samples_per_s"],
            "wall_s": round(time.time() - start, 1)}


def ui_arm(browser, train_samples: int, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.config import load_config

    runs = work / "ui-runs"
    ui, base = start_ui(runs)
    samples, done = [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb(ui.pid))
            time.sleep(0.5)

    try:
        config = load_config(ROOT / CONFIG, overrides(train_samples)).to_dict()
        body = json.dumps({"config": config, "name": "watched"}).encode()
        request = urllib.request.Request(base + "/api/runs", body, {"Content-Type": "application/json"})
        start = time.time()
        urllib.request.urlopen(request)
        threading.Thread(target=sample, daemon=True).start()
        page = browser.new_page()
        page.goto(base + "/runs/watched")  # polls the run every 2 s while it runs
        page.wait_for_function("['finished', 'failed'].includes(document.getElementById('status').textContent)",
                               timeout=3_600_000)
        wall = time.time() - start
        done.set()
        page.close()
    finally:
        done.set()
        ui.terminate()
        ui.wait()
    metrics = json.loads((runs / "watched" / "metrics.json").read_text())
    return {"arm": "launched by textune ui, run page open", "samples_per_s": metrics["train"]["samples_per_s"],
            "wall_s": round(wall, 1), "ui_rss_mb_peak": round(max(samples), 1),
            "ui_rss_mb_mean": round(statistics.mean(samples), 1)}


def main() -> None:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paint-only", action="store_true", help="only the paint arms (no training)")
    p.add_argument("--output", default="benchmarks/results/ui.json")
    args = p.parse_args()
    work = ROOT / "benchmarks" / "runs" / "ui"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        results = [paint_arm(browser, n, args.repeats, work) for n in (10, 200)]
        if not args.paint_only:
            cli = cli_arm(args.train_samples, work)
            watched = ui_arm(browser, args.train_samples, work)
            watched["x_cli"] = round(watched["samples_per_s"] / cli["samples_per_s"], 3)
            results += [cli, watched]
        browser.close()
    for r in results:
        print("  ".join(f"{k} {v}" for k, v in r.items()))
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"train_samples": args.train_samples, "results": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
