"""Prediction benchmark: textune's `ClassifierPredictor` (PyTorch and ONNX Runtime) against the usual Hugging Face ways,
on the 872 SST-2 validation sentences with one fine-tuned model.

Arms, each in its own process (so peak resident memory is its own, read with `os.wait4`):
  naive          tokenise one text at a time, padded to 128, one model call per text (torch.no_grad)
  pipeline       transformers.pipeline("text-classification", batch_size=32)
  textune-fp32   ClassifierPredictor(batch_size=32): length-sorted batches, dynamic padding, inference_mode
  textune-bf16   the same with precision="bf16"
  textune-int8   the same with precision="int8" (dynamic quantisation of the Linear layers)
  textune-compile  textune-fp32 with the model through torch.compile (dynamic=False) and batches padded to
                 multiples of 16 (train.compile's length buckets), the compiling inside its cold start
  onnx-fp32      ClassifierPredictor on `textune export RUN --format onnx` (ONNX Runtime, CPU provider): the graph
                 fused by ONNX Runtime's transformer optimizer (attention, embedding + LayerNorm, bias + GELU,
                 residual + LayerNorm), float32
  onnx-plain     the same export without the fusions (`export_onnx(..., fuse="no")`: the export before issue 34)
  onnx-int8      the same on `--quantize int8` (ONNX Runtime's dynamic quantisation)
  optimum-ort    optimum's ORTModelForSequenceClassification the way its docs show it: exported from the run's
                 model folder, then transformers.pipeline(..., batch_size=32) over it. optimum-onnx's only
                 release pins transformers<4.58, so this arm runs in its own virtual environment
                 (--optimum-python; see benchmarks/README.md); it is skipped when there is none.

For each: samples/s, ratio against the naive loop and the pipeline, agreement of the predicted labels with
textune fp32 (identical for pipeline and fp32 is the target), for textune's arms the max abs logit difference
from textune fp32, cold start (process start to the first batch
predicted, model loading included; the exports are made once before the arms, their seconds reported apart), and
model FLOPs utilisation: useful FLOPs (2 x non-embedding parameters x real tokens) per second over a 2048x2048
matmul timed in the same run (fp32's ceiling for fp32 arms; for bf16 and int8 arms the higher of fp32's and bf16's,
as a CPU without native bf16 multiplies bf16 slower than fp32).

Targets: textune fp32 >= 30x naive and >= 2x pipeline with identical predictions; bf16 or int8 >= 1.5x
textune fp32 with >= 99% agreement; MFU > 50%; textune's fastest path with >= 99.5% agreement >= 1.3x
optimum's ORT default (issue 20); the fused ONNX export >= 1.4x textune fp32 with identical labels and logits
within 1e-4 (issue 34).

    python benchmarks/bench_predict.py                                   # benchmarks/runs/sst2-minilm-full
    python benchmarks/bench_predict.py RUN --repeats 3 --optimum-python /path/to/optimum-venv/bin/python
    python benchmarks/bench_predict.py --texts 20000 --arms pipeline textune-fp32 textune-compile \
        --output benchmarks/results/predict-20k.json      # a long job: 20,000 seeded SST-2 training sentences

Writes benchmarks/results/predict.json and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

from arms import add_arm_arguments, cpu_name, measure

ROOT = Path(__file__).resolve().parents[1]
SST2_VALIDATION = ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"
ARMS = ["naive", "pipeline", "textune-fp32", "textune-bf16", "textune-int8", "onnx-fp32", "onnx-plain", "onnx-int8",
        "optimum-ort", "textune-compile"]
DEFAULT_ARMS = ARMS[:-1]
TEXTUNE_ARMS = ["textune-fp32", "textune-bf16", "textune-int8", "onnx-fp32", "onnx-plain", "onnx-int8", "textune-compile"]
FP32_ARMS = ["naive", "pipeline", "textune-fp32", "onnx-fp32", "onnx-plain", "optimum-ort", "textune-compile"]
SST2_TRAIN = SST2_VALIDATION.with_name("train.tsv")
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


def load_texts(count: int | None = None) -> list[str]:
    """The 872 validation sentences, or `count` training sentences drawn with a fixed seed (a long job)."""
    import random

    with (SST2_TRAIN if count else SST2_VALIDATION).open(encoding="utf-8") as f:
        texts = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]
    return random.Random(0).sample(texts, count) if count else texts


def pipeline_predict(pipe):
    label2id = pipe.model.config.label2id
    return lambda items: [label2id[r["label"]] for r in pipe(items, truncation=True)]


def arm_predictor(arm: str, run: Path, exports: Path):
    """The arm's predict(texts) -> labels (textune's arms: logits, an array texts x classes), loaded the way a
    user of that tool would load it."""
    from transformers import AutoTokenizer, pipeline

    model_dir = run / "model"
    if arm in TEXTUNE_ARMS:
        from textune.tasks.classification import ClassifierPredictor

        if arm.startswith("onnx"):
            predictor = ClassifierPredictor(exports / arm, batch_size=BATCH_SIZE)
        elif arm == "textune-compile":  # a trial: what train.compile's buckets would give a prediction job
            import functools

            import torch

            predictor = ClassifierPredictor(run, batch_size=BATCH_SIZE)
            predictor.model = torch.compile(predictor.model, dynamic=False)
            predictor.tokenizer.pad = functools.partial(predictor.tokenizer.pad, pad_to_multiple_of=16)
        else:
            predictor = ClassifierPredictor(run, batch_size=BATCH_SIZE, precision=arm.split("-")[1])
        return predictor.logits
    if arm == "pipeline":
        return pipeline_predict(pipeline("text-classification", model=str(model_dir), batch_size=BATCH_SIZE,
                                         device=-1))
    if arm == "optimum-ort":
        from optimum.onnxruntime import ORTModelForSequenceClassification

        model = ORTModelForSequenceClassification.from_pretrained(exports / arm)
        return pipeline_predict(pipeline("text-classification", model=model,
                                         tokenizer=AutoTokenizer.from_pretrained(exports / arm),
                                         batch_size=BATCH_SIZE))
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def predict(items):
        out = []
        for text in items:
            enc = tokenizer(text, padding="max_length", max_length=NAIVE_PAD, truncation=True, return_tensors="pt")
            out.append(int(model(**enc).logits.argmax(-1)))
        return out
    return predict


def run_arm(arm: str, run: Path, exports: Path, repeats: int, count: int | None) -> dict:
    """Predict every text with one arm (in this process); best-of-`repeats` timing after a warm-up batch, whose
    end is the arm's first prediction (cold start = that wall clock minus the process start, taken by the parent)."""
    texts = load_texts(count)
    predict = arm_predictor(arm, run, exports)
    predict(texts[:BATCH_SIZE])  # warm-up: first-call allocations and kernel selection
    first_prediction_at = time.time()
    warm_pass = None
    if arm == "textune-compile":  # one untimed pass compiles the other length buckets
        start = time.perf_counter()
        predict(texts)
        warm_pass = round(time.perf_counter() - start, 1)
    best, labels = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        labels = predict(texts)
        best = min(best, time.perf_counter() - start)
    logits = labels.tolist() if arm in TEXTUNE_ARMS else None
    labels = labels.argmax(1).tolist() if arm in TEXTUNE_ARMS else labels
    return {"arm": arm, "seconds": round(best, 3), "samples_per_s": round(len(texts) / best, 1), "labels": labels,
            "logits": logits,
            "compiling_pass_s": warm_pass,
            "first_prediction_at": first_prediction_at}


def export_optimum(run: Path, out: Path) -> None:
    """optimum's own export (`from_pretrained(..., export=True)` then `save_pretrained`), as its docs show."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    ORTModelForSequenceClassification.from_pretrained(run / "model", export=True).save_pretrained(out)
    AutoTokenizer.from_pretrained(run / "model").save_pretrained(out)


def make_exports(run: Path, exports: Path) -> dict:
    """The ONNX folders the onnx arms load, made once before the arms; seconds each export took."""
    from textune.export import export_onnx

    seconds = {}
    for arm, quantize in (("onnx-fp32", None), ("onnx-plain", None), ("onnx-int8", "int8")):
        start = time.perf_counter()
        export_onnx(run, exports / arm, quantize=quantize, fuse="no" if arm == "onnx-plain" else "yes")
        seconds[arm] = round(time.perf_counter() - start, 1)
    return seconds


def setup(run: Path, exports: Path, count: int | None, bf16: bool) -> dict:
    """What the parent needs before the arms, made in a process of its own: a child's peak RSS as `os.wait4`
    reports it starts from its parent's at fork, so the parent stays small (no torch) to keep the arms' own.
    bf16's ceiling only where a bf16 or int8 arm runs: without native bf16 it takes minutes to time."""
    ceiling = {"float32": matmul_ceiling("float32"), **({"bfloat16": matmul_ceiling("bfloat16")} if bf16 else {})}
    params, tokens = useful_work(run, count)
    return {"export_seconds": make_exports(run, exports), "ceiling": ceiling, "params": params, "tokens": tokens}


def useful_work(run: Path, count: int | None) -> tuple[int, int]:
    """(non-embedding parameters, real tokens of the benchmark's texts at the run's max_length)."""
    from textune.tasks.classification import ClassifierPredictor

    predictor = ClassifierPredictor(run)
    params = sum(p.numel() for n, p in predictor.model.named_parameters() if "embeddings" not in n)
    enc = predictor.tokenizer(load_texts(count), truncation=True, max_length=predictor.max_length)
    return params, sum(len(ids) for ids in enc["input_ids"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="benchmarks/runs/sst2-minilm-full", help="a textune run folder")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per arm; the best counts")
    p.add_argument("--output", default="benchmarks/results/predict.json")
    p.add_argument("--optimum-python", default=os.environ.get("OPTIMUM_PYTHON"),
                   help="python of a venv with optimum-onnx[onnxruntime] (it pins transformers<4.58); "
                        "default $OPTIMUM_PYTHON; without it the optimum-ort arm is skipped")
    p.add_argument("--exports", default="benchmarks/runs/predict-exports", help="where the ONNX exports go")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=DEFAULT_ARMS)
    p.add_argument("--texts", type=int, help="predict this many seeded SST-2 training sentences instead of the 872 "
                                             "validation ones")
    add_arm_arguments(p, choices=ARMS)  # internal: run one arm, write --arm-output
    p.add_argument("--export-optimum", help=argparse.SUPPRESS)  # internal: optimum's export, in its venv
    p.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)  # internal: exports and ceilings
    p.add_argument("--bf16-ceiling", action="store_true", help=argparse.SUPPRESS)  # internal: setup times bf16 too
    args = p.parse_args()
    run, exports = (ROOT / args.run).resolve(), (ROOT / args.exports).resolve()
    if args.export_optimum:
        export_optimum(run, Path(args.export_optimum))
        Path(args.arm_output).write_text("{}")
        return
    if args.arm:
        Path(args.arm_output).write_text(json.dumps(run_arm(args.arm, run, exports, args.repeats, args.texts)))
        return
    if args.setup:
        Path(args.arm_output).write_text(json.dumps(setup(run, exports, args.texts, args.bf16_ceiling)))
        return

    arms = [a for a in args.arms if a != "optimum-ort" or args.optimum_python]
    if len(arms) < len(args.arms):
        print("optimum-ort skipped: no --optimum-python (a venv with optimum-onnx[onnxruntime]; benchmarks/README.md)")
    shutil.rmtree(exports, ignore_errors=True)  # the benchmark's own folder: fresh exports of this run every time
    exports.mkdir(parents=True)
    bf16 = any(a in arms for a in ("textune-bf16", "textune-int8", "onnx-int8"))
    prepared = measure(__file__, [str(run), "--setup", "--exports", str(exports),
                                  *(["--texts", str(args.texts)] if args.texts else []),
                                  *(["--bf16-ceiling"] if bf16 else [])], exports / "setup.json")
    if "error" in prepared:
        sys.exit(f"setup failed ({prepared['error']}): exporting {run} or reading its validation texts")
    export_seconds, ceiling = prepared["export_seconds"], prepared["ceiling"]
    params, tokens = prepared["params"], prepared["tokens"]
    if "optimum-ort" in arms:
        start = time.perf_counter()
        result = measure(__file__, [str(run), "--export-optimum", str(exports / "optimum-ort")],
                         exports / "optimum-export.json", python=args.optimum_python)
        export_seconds["optimum-ort"] = result.get("error") or round(time.perf_counter() - start, 1)
    results = []
    for arm in arms:
        python = args.optimum_python if arm == "optimum-ort" else sys.executable
        r = measure(__file__, [str(run), "--arm", arm, "--repeats", str(args.repeats), "--exports", str(exports),
                               *(["--texts", str(args.texts)] if args.texts else [])],
                    exports / f"{arm}.json", python=python)
        if "error" not in r:
            r["cold_start_s"] = round(r.pop("first_prediction_at") - r.pop("started_at"), 2)
        results.append({"arm": arm, **r})
    by_arm = {r["arm"]: r for r in results if "error" not in r}
    reference = by_arm.get("textune-fp32", {}).get("labels")
    reference_logits = by_arm.get("textune-fp32", {}).get("logits")
    for r in by_arm.values():
        # bf16 and int8 arms against the better ceiling: where the CPU has no native bf16, fp32's is higher
        peak = ceiling["float32"] if r["arm"] in FP32_ARMS else max(ceiling.values())
        r["mfu"] = round(2 * params * tokens / r["seconds"] / 1e9 / peak, 4)
        r["agreement_with_fp32"] = (round(sum(a == b for a, b in zip(r["labels"], reference)) / len(reference), 4)
                                    if reference else None)
        r["max_logit_diff_fp32"] = (max(abs(a - b) for row, ref in zip(r["logits"], reference_logits)
                                        for a, b in zip(row, ref)) if reference_logits and r["logits"] else None)
        for base in ("naive", "pipeline", "optimum-ort"):
            if base in by_arm:
                r[f"x_{base}"] = round(r["samples_per_s"] / by_arm[base]["samples_per_s"], 2)
    fp32 = by_arm.get("textune-fp32", {})
    fast = [r for k, r in by_arm.items() if k in ("textune-bf16", "textune-int8")]
    exact_enough = [r for k, r in by_arm.items() if k in TEXTUNE_ARMS and (r["agreement_with_fp32"] or 0) >= 0.995]
    fastest = max(exact_enough, key=lambda r: r["samples_per_s"], default={})
    fastest_name = f"fastest >= 99.5%-agreeing textune path ({fastest.get('arm')}) >= 1.3x optimum ORT"
    # Each target with the arms it compares; a target whose arms did not run is not measured, not missed.
    targets = {name: (met if all(arm in by_arm for arm in arms) else None) for name, arms, met in (
        ("fp32 >= 30x naive", ("textune-fp32", "naive"), fp32.get("x_naive", 0) >= 30),
        ("fp32 >= 2x pipeline", ("textune-fp32", "pipeline"), fp32.get("x_pipeline", 0) >= 2),
        ("fp32 predictions identical to pipeline", ("textune-fp32", "pipeline"),
         by_arm.get("pipeline", {}).get("agreement_with_fp32") == 1.0),
        ("bf16 or int8 >= 1.5x fp32 at >= 99% agreement",
         ("textune-fp32", *([r["arm"] for r in fast] or ["textune-bf16 or -int8"])),
         any(r["samples_per_s"] >= 1.5 * fp32.get("samples_per_s", float("inf")) and r["agreement_with_fp32"] >= 0.99
             for r in fast)),
        ("fp32 MFU > 50%", ("textune-fp32",), fp32.get("mfu", 0) > 0.5),
        (fastest_name, ("optimum-ort",), fastest.get("x_optimum-ort", 0) >= 1.3),
        ("fused ONNX >= 1.4x fp32, labels identical, logits within 1e-4", ("onnx-fp32", "textune-fp32"),
         by_arm.get("onnx-fp32", {}).get("samples_per_s", 0) >= 1.4 * fp32.get("samples_per_s", float("inf"))
         and by_arm.get("onnx-fp32", {}).get("agreement_with_fp32") == 1.0
         and (by_arm.get("onnx-fp32", {}).get("max_logit_diff_fp32") or 1) <= 1e-4),
    )}

    header = (f"{'arm':<14}{'samples/s':>10}{'x naive':>9}{'x pipeline':>11}{'x optimum':>10}{'agree fp32':>11}"
              f"{'MFU':>7}{'max dlogit':>11}{'peak MB':>9}{'cold s':>8}")
    print(f"\n{len(load_texts(args.texts)):,} SST-2 sentences, {tokens:,} real tokens, {params / 1e6:.1f}M non-embedding parameters; "
          f"{cpu_name()}, {os.cpu_count()} cores, matmul ceiling {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in ceiling.items())}; "
          f"export seconds {export_seconds}")
    print(header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['arm']:<14}  failed: {r['error']}")
            continue
        print(f"{r['arm']:<14}{r['samples_per_s']:>10.1f}{r.get('x_naive', 0):>9.2f}{r.get('x_pipeline', 0):>11.2f}"
              f"{r.get('x_optimum-ort', 0):>10.2f}{r['agreement_with_fp32'] or 0:>11.2%}{r['mfu']:>7.1%}"
              f"{'-' if r['max_logit_diff_fp32'] is None else format(r['max_logit_diff_fp32'], '.1e'):>11}"
              f"{r['peak_rss_mb']:>9.0f}{r['cold_start_s']:>8.2f}")
    for name, met in targets.items():
        print(f"target  {name}: {'not measured (its arms did not run)' if met is None else 'met' if met else 'MISSED'}")
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k not in ("labels", "logits")} for r in results]
    out.write_text(json.dumps({"cpu": cpu_name(), "cpu_count": os.cpu_count(), "run": os.path.relpath(run, ROOT),
                               "texts": len(load_texts(args.texts)), "real_tokens": tokens,
                               "non_embedding_parameters": params,
                               "matmul_gflops": {k: round(v, 1) for k, v in ceiling.items()},
                               "export_seconds": export_seconds, "targets": targets, "results": summary}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
