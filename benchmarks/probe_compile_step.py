"""Does `torch.compile` with dynamic shapes make the full fine-tuning step faster on this CPU? (issue 34)

textune's `train.compile` compiles static shapes (bucketed lengths, fixed LM blocks) and leaves dynamically padded
classification batches eager. PyTorch's automatic dynamic shapes (`torch.compile(model)`, dynamic=None) would
compile such batches once or twice instead of once per length. This measures that on the step bench_train.py
runs: the packaged MiniLM, 140 length-grouped batches of 32 seeded SST-2 training sentences (max_length 66, dynamic
padding, in a shuffled batch order), bf16 autocast where the CPU has native bf16 (fp32 otherwise), fused AdamW,
gradient clipping at 1.0. Each mode in its own process: the first step (where compiling happens), the next 39,
then samples/s over 100 steps.

    python benchmarks/probe_compile_step.py             # eager, then compiled (dynamic=None)

Writes benchmarks/results/compile-step.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from arms import add_arm_arguments, cpu_name, measure
from bench_train import read_tsv

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
MODES = {"eager": "eager", "compiled": None}  # mode -> torch.compile's dynamic (eager: not compiled)


def batches_of_sst2(tokenizer, n_batches: int = 140, batch_size: int = 32) -> list[dict]:
    import torch

    data = read_tsv(SST2)
    rows = list(zip(data["sentence"], data["label"]))
    random.Random(0).shuffle(rows)
    sentences = [sentence for sentence, _ in rows[:batch_size * n_batches]]
    labels = [label for _, label in rows[:batch_size * n_batches]]
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=66)["input_ids"]]
    order = sorted(range(len(sentences)), key=lengths.__getitem__)  # grouped by length, as both trainers do
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([sentences[i] for i in idx], truncation=True, max_length=66, padding=True,
                        return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor([labels[i] for i in idx])})
    random.Random(1).shuffle(batches)
    return batches


def run_mode(mode: str) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from textune.models import resolve_model
    from textune.train import cpu_supports_bf16

    torch.manual_seed(0)
    path = resolve_model(None)
    batches = batches_of_sst2(AutoTokenizer.from_pretrained(path))
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True)
    forward = model if mode == "eager" else torch.compile(model, dynamic=MODES[mode])
    bf16 = cpu_supports_bf16()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step(batches[0])
    first = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:40]:
        step(batch)
    warm = time.perf_counter() - start
    timed = batches[40:]
    start = time.perf_counter()
    for batch in timed:
        step(batch)
    seconds = time.perf_counter() - start
    return {"mode": mode, "bf16": bf16, "first_step_s": round(first, 1), "next_39_steps_s": round(warm, 1),
            "samples_per_s": round(sum(len(b["labels"]) for b in timed) / seconds, 1),
            "padded_tokens_per_step": round(sum(b["input_ids"].numel() for b in timed) / len(timed), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "compile-step.json"))
    add_arm_arguments(p, choices=list(MODES))
    args = p.parse_args()
    if args.arm:
        Path(args.arm_output).write_text(json.dumps(run_mode(args.arm)))
        return
    from bench_predict import matmul_ceiling

    from textune.train import cpu_supports_bf16

    # (a bf16 matmul on a CPU without native bf16 takes about a minute: measured only where the step runs bf16)
    ceilings = {"fp32": round(matmul_ceiling("float32"), 1)}
    if cpu_supports_bf16():
        ceilings["bf16"] = round(matmul_ceiling("bfloat16"), 1)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(__file__, ["--arm", mode], Path(tmp) / f"{mode}.json") for mode in MODES]
    print(f"\nCPU {cpu_name()}; matmul ceiling " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()) + " GFLOP/s")
    for r in results:
        if "error" in r:
            print(f"failed: {r['error']}")
            continue
        print(f"{r['mode']:<9} first step {r['first_step_s']:>5.1f} s, next 39 steps {r['next_39_steps_s']:>5.1f} s, "
              f"then {r['samples_per_s']:.1f} samples/s over 100 steps ({r['padded_tokens_per_step']:.0f} padded "
              f"tokens a step)")
    out = Path(args.output)
    out.write_text(json.dumps({"cpu": cpu_name(), "matmul_gflops": ceilings, "results": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
