"""Load test of `textune serve`: throughput, latency percentiles and errors, with and without micro-batching.

Starts the server twice on a free loopback port, first with --max-batch-size 1 (the baseline: one model
call per request), then with the batching settings asked for, and sends the same bounded load to each:
N single-text requests from C concurrent clients, stopping early at the time limit.

    python benchmarks/load_serve.py benchmarks/runs/sst2-minilm-full
    python benchmarks/load_serve.py RUN --requests 500 --concurrency 8 --max-wait-ms 10

Writes benchmarks/results/serve.json and prints a table; the batching gain is the throughput ratio
against the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SST2_VALIDATION = ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"
FALLBACK_TEXTS = ["a gripping, beautifully acted film", "one long string of cliches", "i could not stop laughing",
                  "the plot goes nowhere and takes its time", "a small gem", "dull, flat and far too long"]


def load_texts() -> list[str]:
    if not SST2_VALIDATION.is_file():
        return FALLBACK_TEXTS
    with SST2_VALIDATION.open(encoding="utf-8") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, max_batch_size: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "textune", "serve", run, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", str(max(1024, 4 * args.concurrency))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


async def drive(url: str, texts: list[str], requests: int, concurrency: int, time_limit: float) -> dict:
    """Send up to `requests` one-text requests from `concurrency` clients; stop issuing at `time_limit` s."""
    latencies: list[float] = []
    errors: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        before = (await client.get("/metrics")).text
        start = time.perf_counter()

        async def client_loop() -> None:
            nonlocal next_index
            while next_index < requests and time.perf_counter() - start < time_limit:
                i = next_index
                next_index += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", json={"texts": [texts[i % len(texts)]]})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        after = (await client.get("/metrics")).text
    lat = np.array(latencies) * 1000
    calls = _metric(after, "textune_batch_texts_count") - _metric(before, "textune_batch_texts_count")
    texts_run = _metric(after, "textune_batch_texts_sum") - _metric(before, "textune_batch_texts_sum")
    return {"requests": len(latencies) + len(errors), "ok": len(latencies), "errors": len(errors),
            "error_examples": errors[:3], "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "model_calls": int(calls),
            "mean_batch_texts": round(texts_run / calls, 2) if calls else None}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def measure(run: str, texts: list[str], args: argparse.Namespace, max_batch_size: int) -> dict:
    proc, url = start_server(run, max_batch_size, args)
    try:
        asyncio.run(drive(url, texts, args.concurrency * 2, args.concurrency, 30))  # warm-up, not counted
        result = asyncio.run(drive(url, texts, args.requests, args.concurrency, args.time_limit))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"max_batch_size": max_batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="benchmarks/runs/sst2-minilm-full", help="run or model folder to serve")
    p.add_argument("--requests", type=int, default=2000, help="requests per setting")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--time-limit", type=float, default=120, help="seconds per setting before issuing stops")
    p.add_argument("--threads", type=int, help="server's torch threads (default: torch's); 1 on a shared CPU")
    p.add_argument("--output", default="benchmarks/results/serve.json")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = load_texts()
    results = [measure(args.run, texts, args, 1), measure(args.run, texts, args, args.max_batch_size)]
    baseline, batched = results
    gain = round(batched["throughput_rps"] / baseline["throughput_rps"], 2) if baseline["throughput_rps"] else None
    header = f"{'max batch':>10}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean batch':>12}"
    print(f"\n{args.run}: {args.concurrency} concurrent clients, one text per request, server threads "
          f"{args.threads or 'torch default'}\n{header}\n" + "-" * len(header))
    for r in results:
        print(f"{r['max_batch_size']:>10}{r['requests']:>10}{r['errors']:>8}{r['throughput_rps']:>9}"
              f"{r['p50_ms']:>9}{r['p95_ms']:>9}{r['p99_ms']:>9}{r['mean_batch_texts']:>12}")
    print(f"micro-batching gain: {gain}x throughput against max batch size 1")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "concurrency": args.concurrency, "results": results,
                               "batching_gain": gain}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
