"""Where a training step's time goes: textune's loop against Trainer with its best flags, under PyTorch's profiler
(issue 34: "find out why textune's full fine-tuning step is slower than Trainer's, with a profile of both").

Both arms train the packaged MiniLM-L6 on the same seeded SST-2 sentences (`--train-samples`, default 1,280: 40
steps of 32) with bench_train.py's hyper-parameters, each in its own process, each with its own length-grouped
sampler (the same sentences per epoch, batched by each library's sampler). The profiler runs over the training
loop only (textune: `TrainingLoop.run` up to its evaluation; Trainer: between its on_train_begin and on_train_end callbacks), after
`--warmup` unprofiled steps in a first pass, so one-time costs (allocator growth, the first bf16 casts) stay out.

Per arm: milliseconds per optimizer step in total (wall) and per category of operator (self CPU time of the ops:
matmuls, attention, the AdamW kernel, gradient clipping, gradient scaling, bf16 casts, embedding backward,
allocation and fills, other element-wise work), the rest (wall minus the ops: Python, the data loader, the
framework), the padded tokens per step the batches held, and the 20 costliest operators. The profiler's own
overhead (a few microseconds per operator) is in both arms alike; bench_train.py measures unprofiled speed.

    python benchmarks/profile_train.py                      # both arms
    python benchmarks/profile_train.py --train-samples 320  # a smoke run

Writes benchmarks/results/train-profile.json and prints a table, with the CPU and its matmul ceilings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from arms import add_arm_arguments, cpu_name, measure
from bench_predict import matmul_ceiling
from bench_train import (BATCH_SIZE, EPOCHS, LR, MAX_LENGTH, SEED, WARMUP, WEIGHT_DECAY, run_textune, run_trainer,
                         trainer_bf16, write_subset)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["trainer-best", "textune"]
# operator name -> category; the first pattern contained in the name wins
CATEGORIES = [("attention", ("scaled_dot_product", "flash_attention")),
              ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
              ("AdamW", ("adamw", "adam")),
              ("clip grad norm", ("_foreach_norm", "linalg_vector_norm", "_foreach_mul", "clamp", "aten::stack")),
              ("gradient scaling", ("aten::mul_",)),
              ("bf16 casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
              ("embedding backward", ("embedding_dense_backward", "index_add", "embedding_backward")),
              ("allocation, fills", ("aten::empty", "aten::zero", "aten::fill_", "aten::zeros")),
              ("cross-entropy", ("nll_loss", "log_softmax", "cross_entropy"))]


def category(name: str) -> str:
    for cat, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return cat
    return "other element-wise"


class Profiled:
    """Counts optimizer steps and padded tokens, and profiles the steps after the first `warmup`."""

    def __init__(self, warmup: int):
        import torch

        self.warmup, self.steps, self.tokens, self.prof = warmup, 0, 0, None
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.wall, self.profiling = 0.0, False

    def step_done(self) -> None:
        import time

        self.steps += 1
        if self.steps == self.warmup:
            self.profiler.start()
            self.started, self.profiling = time.perf_counter(), True

    def stop(self) -> None:
        import time

        if self.steps >= self.warmup and not self.wall:
            self.wall, self.profiling = time.perf_counter() - self.started, False
            self.profiler.stop()

    def summary(self) -> dict:
        steps = self.steps - self.warmup
        per_cat, per_op = defaultdict(float), defaultdict(float)
        for e in self.profiler.key_averages():
            if e.key.startswith(("Optimizer.", "ProfilerStep", "enumerate(DataLoader)")):  # regions, not ops
                continue
            per_op[e.key] += e.self_cpu_time_total / 1000 / steps
            per_cat[category(e.key)] += e.self_cpu_time_total / 1000 / steps
        wall_ms = self.wall * 1000 / steps
        per_cat["rest: Python, data loading, framework"] = wall_ms - sum(per_cat.values())
        top = sorted(per_op.items(), key=lambda kv: -kv[1])[:20]
        return {"profiled_steps": steps, "ms_per_step": round(wall_ms, 2),
                "padded_tokens_per_step": round(self.tokens / steps, 1),
                "categories_ms_per_step": {k: round(v, 2) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
                "top_ops_ms_per_step": {k: round(v, 3) for k, v in top}}


def instrument(profiled: Profiled) -> None:
    """Hooks for both arms: the collator counts padded tokens; each optimizer step counts (AdamW's step hook);
    textune's loop, or Trainer's on_train_end, stops the profiler."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    collate = DataCollatorWithPadding.__call__

    def counting(self, features):
        batch = collate(self, features)
        if profiled.profiling:  # a training batch of a profiled step (the loaders collate in the loop's process)
            profiled.tokens += batch["input_ids"].numel()
        return batch

    DataCollatorWithPadding.__call__ = counting
    register_optimizer_step_post_hook(lambda *_: profiled.step_done())

    import textune.train as textune_train

    evaluate = textune_train.TrainingLoop.evaluate

    def stop_first(self, epoch):  # the loop evaluates after its last step; Trainer's arm evaluates outside train()
        profiled.stop()
        evaluate(self, epoch)

    textune_train.TrainingLoop.evaluate = stop_first

    class Stop(TrainerCallback):
        def on_train_end(self, *_, **__):
            profiled.stop()

    init = Trainer.__init__

    def with_callback(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.add_callback(Stop())

    Trainer.__init__ = with_callback


def run_arm(arm: str, train_file: Path, seed: int, warmup: int) -> dict:
    profiled = Profiled(warmup)
    instrument(profiled)
    with tempfile.TemporaryDirectory() as tmp:
        if arm == "textune":
            run_textune(train_file, Path(tmp), seed, {})
        else:
            run_trainer(train_file, Path(tmp), seed, best=True)
    return profiled.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=1280)
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before the profiler starts")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "train-profile.json"))
    add_arm_arguments(p, seed=SEED, choices=ARMS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        Path(args.arm_output).write_text(json.dumps(run_arm(args.arm, Path(args.train_file), args.seed, args.warmup)))
        return

    ceilings = {"fp32": round(matmul_ceiling("float32"), 1)}
    if trainer_bf16():
        ceilings["bf16"] = round(matmul_ceiling("bfloat16"), 1)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_samples, Path(tmp) / "train.tsv")
        results = {arm: measure(__file__, ["--arm", arm, "--train-file", str(train_file), "--warmup",
                                           str(args.warmup)], Path(tmp) / f"{arm}.json") for arm in ARMS}
    print(f"\nCPU {cpu_name()}; matmul ceiling {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in ceilings.items())}; "
          f"{args.train_samples:,} SST-2 sentences, batch {BATCH_SIZE}, bf16 autocast where native "
          f"({trainer_bf16()}); milliseconds per optimizer step")
    ok = {arm: r for arm, r in results.items() if "error" not in r}
    cats = list(dict.fromkeys(c for r in ok.values() for c in r["categories_ms_per_step"]))
    print(f"{'':<40}" + "".join(f"{arm:>14}" for arm in ok))
    for row, get in [("wall per step", lambda r: r["ms_per_step"]),
                     ("padded tokens per step", lambda r: r["padded_tokens_per_step"]),
                     *[(c, lambda r, c=c: r["categories_ms_per_step"].get(c, 0.0)) for c in cats]]:
        print(f"{row:<40}" + "".join(f"{get(r):>14.1f}" for r in ok.values()))
    for arm, r in results.items():
        if "error" in r:
            print(f"{arm}: failed ({r['error']})")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_name(), "matmul_gflops": ceilings, "train_samples": args.train_samples,
                               "warmup_steps": args.warmup, "hyperparameters": {
                                   "batch_size": BATCH_SIZE, "epochs": EPOCHS, "lr": LR, "warmup_ratio": WARMUP,
                                   "weight_decay": WEIGHT_DECAY, "max_length": MAX_LENGTH},
                               "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
