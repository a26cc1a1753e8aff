"""PEFT benchmark: full fine-tuning against LoRA on SST-2, one `textune train` process each.

For each run: validation accuracy, trainable parameters, wall time and peak resident memory of the whole
process (data loading, tokenisation, training, evaluation, saving), and the size on disk of what the run
saves (the full model, or the adapter alone) against the base model. Accuracy and memory are reported
against the full fine-tuning run measured in the same invocation.

Target: LoRA within 2 accuracy points of full fine-tuning, with under 2% of the parameters trainable.

    python benchmarks/bench_peft.py                               # full vs LoRA, 1 epoch each
    python benchmarks/bench_peft.py --lora-variant train.lr=1e-3  # also a LoRA run with these overrides
    python benchmarks/bench_peft.py --set train.max_steps=20      # smoke test of the script
    python benchmarks/bench_peft.py --reuse full                  # keep the full run of the last invocation
    python benchmarks/bench_peft.py --reuse full --resume lora    # ... and continue an interrupted LoRA run

--reuse NAME takes that run's figures from the previous results file instead of training it again (only
when its config and overrides are the same; the entry is marked "reused": the CPU is the bottleneck here
and a full SST-2 epoch costs 16+ minutes).

Writes benchmarks/results/peft.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL, LORA = "configs/sst2-minilm-full.yaml", "configs/sst2-minilm-lora.yaml"
TARGET_POINTS, TARGET_TRAINABLE = 2.0, 0.02
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import run_train_process  # noqa: E402  (benchmarks are scripts, not a package)


def run_training(name: str, config: str, overrides: list[str], runs_dir: Path, resume: bool = False) -> dict:
    out_dir = runs_dir / name
    code, wall, peak_mb = run_train_process(config, overrides, out_dir, resume=resume)
    if code != 0:
        return {"name": name, "config": config, "overrides": overrides, "error": f"exit {code}"}
    metrics = json.loads((out_dir / "metrics.json").read_text())
    model_dir = out_dir / "model"
    saved = model_dir / ("adapter_model.safetensors" if (model_dir / "adapter_config.json").is_file()
                         else "model.safetensors")
    params = metrics["parameters"]
    return {"name": name, "config": config, "overrides": overrides,
            "accuracy": round(metrics["validation"]["accuracy"], 4), "best_step": metrics["best_step"],
            "trainable_params": params["trainable"], "total_params": params["total"],
            "trainable_share": params["trainable"] / params["total"],
            "train_samples_per_s": metrics["train"]["samples_per_s"],
            "wall_minutes": round(wall / 60, 2), "peak_rss_mb": round(peak_mb, 1), "resumed": resume,
            "saved_weights_bytes": saved.stat().st_size,
            "saved_folder_bytes": sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())}


def base_weights_bytes() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from textune.models import default_model_dir

    return sum(f.stat().st_size for f in default_model_dir().glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--lora-variant", action="append", default=[], metavar="KEY=VALUE",
                   help="also run LoRA with these overrides (e.g. a higher train.lr)")
    p.add_argument("--reuse", action="append", default=[], metavar="NAME",
                   help="take this run from the previous results file if its config and overrides match")
    p.add_argument("--resume", action="append", default=[], metavar="NAME",
                   help="continue this run from its latest checkpoint (its wall time then covers the rest only)")
    p.add_argument("--runs-dir", default="benchmarks/runs")
    p.add_argument("--output", default="benchmarks/results/peft.json")
    args = p.parse_args()
    runs_dir = ROOT / args.runs_dir
    plan = [("full", FULL, args.set), ("lora", LORA, args.set)]
    if args.lora_variant:
        plan.append(("lora-variant", LORA, args.set + args.lora_variant))
    out = ROOT / args.output
    previous = {r["name"]: r for r in json.loads(out.read_text())["results"]} if out.is_file() else {}
    results = []
    for name, config, overrides in plan:
        old = previous.get(name)
        if (name in args.reuse and old and "error" not in old and old["config"] == config
                and old["overrides"] == overrides):
            print(f"{name}: reusing the figures measured by the previous invocation ({out.name})")
            results.append({**old, "reused": True})
        else:
            results.append(run_training(name, config, overrides, runs_dir, resume=name in args.resume))
    base = base_weights_bytes()

    full = results[0] if "error" not in results[0] else None
    header = (f"{'run':<14}{'accuracy':>9}{'vs full':>9}{'trainable':>12}{'share':>8}{'minutes':>9}"
              f"{'peak MB':>9}{'saved MB':>10}{'of base':>9}  overrides")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<14}  failed: {r['error']}")
            continue
        r["points_vs_full"] = round(100 * (r["accuracy"] - full["accuracy"]), 2) if full else None
        r["saved_share_of_base"] = r["saved_weights_bytes"] / base
        r["meets_target"] = (r["name"] != "full" and full is not None and r["points_vs_full"] >= -TARGET_POINTS
                             and r["trainable_share"] < TARGET_TRAINABLE)
        extra = " ".join(o for o in r["overrides"] if o not in args.set)
        print(f"{r['name']:<14}{r['accuracy']:>9.4f}{r['points_vs_full'] if full else float('nan'):>+9.2f}"
              f"{r['trainable_params']:>12,}{r['trainable_share']:>8.2%}{r['wall_minutes']:>9.2f}"
              f"{r['peak_rss_mb']:>9.0f}{r['saved_weights_bytes'] / 1e6:>10.2f}{r['saved_share_of_base']:>9.2%}  {extra}")
    print(f"base model weights on disk: {base / 1e6:.2f} MB; target: LoRA within {TARGET_POINTS:g} points of full "
          f"with under {TARGET_TRAINABLE:.0%} of the parameters trainable")
    for r in results[1:]:
        if "meets_target" in r:
            print(f"  {r['name']}: {'meets' if r['meets_target'] else 'misses'} the target")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "base_weights_bytes": base, "overrides": args.set,
                               "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
