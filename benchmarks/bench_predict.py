"""Prediction benchmark: textune's `Predictor` against the usual Hugging Face ways, on the 872 SST-2
validation sentences with one fine-tuned model.

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  naive          tokenise one text at a time, padded to 128, one model call per text (torch.no_grad)
  pipeline       transformers.pipeline("text-classification", batch_size=32)
  textune-fp32   Predictor(batch_size=32): length-sorted batches, dynamic padding, inference_mode
  textune-bf16   the same with precision="bf16"
  textune-int8   the same with precision="int8" (dynamic quantisation of the Linear layers)

For each: samples/s, ratio against the naive loop and the pipeline, agreement of the predicted labels with
textune fp32 (identical for pipeline and fp32 is the target), and model FLOPs utilisation: useful FLOPs
(2 x non-embedding parameters x real tokens) per second over a 2048x2048 matmul timed in the same run
(fp32 ceiling for fp32 arms, bf16 ceiling for bf16; int8 against the bf16 ceiling, no int8 ceiling is timed).

Targets: textune fp32 >= 30x naive and >= 2x pipeline with identical predictions; bf16 or int8 >= 1.5x
textune fp32 with >= 99% agreement; MFU > 50%.

    python benchmarks/bench_predict.py                                   # benchmarks/runs/sst2-minilm-full
    python benchmarks/bench_predict.py RUN --repeats 3

Writes benchmarks/results/predict.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2_VALIDATION = ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"
ARMS = ["naive", "pipeline", "textune-fp32", "textune-bf16", "textune-int8"]
BATCH_SIZE, NAIVE_PAD = 32, 128


def matmul_ceiling(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of the best of `repeats` n x n matmuls: the machine's practical peak for that dtype."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def load_texts() -> list[str]:
    with SST2_VALIDATION.open(encoding="utf-8") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]


def run_arm(arm: str, run: Path, repeats: int) -> dict:
    """Predict every text with one arm (in this process); best-of-`repeats` timing after a warm-up."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from textune.infer import Predictor

    texts = load_texts()
    model_dir = run / "model"
    if arm.startswith("textune"):
        predictor = Predictor(run, batch_size=BATCH_SIZE, precision=arm.split("-")[1])
        predict = lambda items: predictor.predict_proba(items).argmax(1).tolist()  # noqa: E731
    elif arm == "pipeline":
        pipe = pipeline("text-classification", model=str(model_dir), batch_size=BATCH_SIZE, device=-1)
        label2id = pipe.model.config.label2id
        predict = lambda items: [label2id[r["label"]] for r in pipe(items, truncation=True)]  # noqa: E731
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

        @torch.no_grad()
        def predict(items):
            out = []
            for text in items:
                enc = tokenizer(text, padding="max_length", max_length=NAIVE_PAD, truncation=True,
                                return_tensors="pt")
                out.append(int(model(**enc).logits.argmax(-1)))
            return out

    predict(texts[:BATCH_SIZE])  # warm-up: first-call allocations and kernel selection
    best, labels = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        labels = predict(texts)
        best = min(best, time.perf_counter() - start)
    return {"arm": arm, "seconds": round(best, 3), "samples_per_s": round(len(texts) / best, 1), "labels": labels}


def measure(arm: str, run: Path, repeats: int, workdir: Path) -> dict:
    out = workdir / f"{arm}.json"
    cmd = [sys.executable, __file__, str(run), "--arm", arm, "--repeats", str(repeats), "--arm-output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return {"arm": arm, "error": f"exit {os.waitstatus_to_exitcode(status)}"}
    return {**json.loads(out.read_text()), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def useful_work(run: Path) -> tuple[int, int]:
    """(non-embedding parameters, real tokens of the validation texts at the run's max_length)."""
    from textune.infer import Predictor

    predictor = Predictor(run)
    params = sum(p.numel() for n, p in predictor.model.named_parameters() if "embeddings" not in n)
    enc = predictor.tokenizer(load_texts(), truncation=True, max_length=predictor.max_length)
    return params, sum(len(ids) for ids in enc["input_ids"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="benchmarks/runs/sst2-minilm-full", help="a textune run folder")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per arm; the best counts")
    p.add_argument("--output", default="benchmarks/results/predict.json")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm, write --arm-output
    p.add_argument("--arm-output", help=argparse.SUPPRESS)
    args = p.parse_args()
    run = (ROOT / args.run).resolve()
    if args.arm:
        Path(args.arm_output).write_text(json.dumps(run_arm(args.arm, run, args.repeats)))
        return

    ceiling = {"float32": matmul_ceiling("float32"), "bfloat16": matmul_ceiling("bfloat16")}
    params, tokens = useful_work(run)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(arm, run, args.repeats, Path(tmp)) for arm in ARMS]
    by_arm = {r["arm"]: r for r in results if "error" not in r}
    reference = by_arm.get("textune-fp32", {}).get("labels")
    for r in by_arm.values():
        dtype = "float32" if r["arm"] in ("naive", "pipeline", "textune-fp32") else "bfloat16"
        r["mfu"] = round(2 * params * tokens / r["seconds"] / 1e9 / ceiling[dtype], 4)
        r["agreement_with_fp32"] = (round(sum(a == b for a, b in zip(r["labels"], reference)) / len(reference), 4)
                                    if reference else None)
        for base in ("naive", "pipeline"):
            if base in by_arm:
                r[f"x_{base}"] = round(r["samples_per_s"] / by_arm[base]["samples_per_s"], 2)
    fp32 = by_arm.get("textune-fp32", {})
    fast = [r for k, r in by_arm.items() if k in ("textune-bf16", "textune-int8")]
    targets = {
        "fp32 >= 30x naive": fp32.get("x_naive", 0) >= 30,
        "fp32 >= 2x pipeline": fp32.get("x_pipeline", 0) >= 2,
        "fp32 predictions identical to pipeline": by_arm.get("pipeline", {}).get("agreement_with_fp32") == 1.0,
        "bf16 or int8 >= 1.5x fp32 at >= 99% agreement": any(
            r["samples_per_s"] >= 1.5 * fp32.get("samples_per_s", float("inf")) and r["agreement_with_fp32"] >= 0.99
            for r in fast),
        "fp32 MFU > 50%": fp32.get("mfu", 0) > 0.5,
    }

    header = (f"{'arm':<14}{'samples/s':>10}{'x naive':>9}{'x pipeline':>11}{'agree fp32':>11}"
              f"{'MFU':>7}{'peak MB':>9}")
    print(f"\n872 SST-2 validation sentences, {tokens:,} real tokens, {params / 1e6:.1f}M non-embedding parameters; "
          f"matmul ceiling fp32 {ceiling['float32']:.0f} GFLOP/s, bf16 {ceiling['bfloat16']:.0f} GFLOP/s")
    print(header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<14}  failed: {r['error']}")
            continue
        print(f"{r['arm']:<14}{r['samples_per_s']:>10.1f}{r.get('x_naive', 0):>9.2f}{r.get('x_pipeline', 0):>11.2f}"
              f"{r['agreement_with_fp32'] or 0:>11.2%}{r['mfu']:>7.1%}{r['peak_rss_mb']:>9.0f}")
    for name, met in targets.items():
        print(f"target  {name}: {'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "labels"} for r in results]
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "run": os.path.relpath(run, ROOT),
                               "texts": len(load_texts()), "real_tokens": tokens,
                               "non_embedding_parameters": params,
                               "matmul_gflops": {k: round(v, 1) for k, v in ceiling.items()},
                               "targets": targets, "results": summary}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
