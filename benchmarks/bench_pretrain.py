"""Pretraining benchmark: MLM domain adaptation, fine-tuning from it, CLM from scratch, LoRA CLM of SmolLM2.

All four on the SST-2 training sentences (`../shared/data/sst2/train.tsv`, column sentence), each training
run its own `textune pretrain` / `textune train` process:

1. MLM: continue pretraining the packaged MiniLM (configs/sst2-minilm-mlm.yaml) for --mlm-steps steps.
   Held-out perplexity at the first evaluation (step 0, before training: the MLM head is fresh) against
   the last (target: at least 3x lower), and fill-mask top 5 for "this movie is [MASK] ." on the checkpoint.
2. Fine-tuning on SST-2 (configs/sst2-minilm-full.yaml, first --finetune-samples training sentences after
   the seeded shuffle, 1 epoch, same seed) from that checkpoint and from the original MiniLM: validation
   accuracy of both, whichever wins.
3. CLM from scratch (configs/sst2-gpt2-scratch-clm.yaml, a 4-layer GPT-2 with an 8,000-token tokenizer
   trained on the corpus) for --clm-steps steps: perplexity first against last, and a generated sample.
4. LoRA CLM of SmolLM2-135M-Instruct (configs/sst2-smollm2-lora-clm.yaml) for --lora-steps steps:
   perplexity before against after, and "Once upon a time" completed by the tuned model.

    python benchmarks/bench_pretrain.py                                   # the figures in the README
    python benchmarks/bench_pretrain.py --mlm-steps 3 --finetune-samples 64 --clm-steps 3 --lora-steps 2 \\
        --set train.eval_steps=2 --output /tmp/pretrain-smoke.json          # smoke test of the script

Writes benchmarks/results/pretrain.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import run_train_process  # noqa: E402  (benchmarks are scripts, not a package)

MLM, CLM, LORA = "configs/sst2-minilm-mlm.yaml", "configs/sst2-gpt2-scratch-clm.yaml", "configs/sst2-smollm2-lora-clm.yaml"
FINETUNE = "configs/sst2-minilm-full.yaml"
FILL_MASK_TEXT = "this movie is [MASK] ."
TARGET_PERPLEXITY_RATIO = 3.0


def pretrain(name: str, config: str, overrides: list[str], runs_dir: Path) -> dict:
    """One `textune pretrain` run: held-out perplexity at its first and last evaluation, time, memory."""
    out_dir = runs_dir / name
    code, wall, peak_mb = run_train_process(config, overrides, out_dir, command="pretrain")
    if code != 0:
        return {"name": name, "error": f"exit {code}"}
    records = [json.loads(line) for line in (out_dir / "history.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    first, last = evals[0], evals[-1]
    return {"name": name, "run": str(out_dir), "config": config, "overrides": overrides,
            "steps": metrics["train"]["steps"], "first_eval_step": first["step"], "last_eval_step": last["step"],
            "perplexity_first": round(first["eval_perplexity"], 2), "perplexity_last": round(last["eval_perplexity"], 2),
            "perplexity_ratio": round(first["eval_perplexity"] / last["eval_perplexity"], 2),
            "perplexity_by_step": {r["step"]: round(r["eval_perplexity"], 2) for r in evals},
            "eval_tokens": first["eval_tokens"], "trainable_params": metrics["parameters"]["trainable"],
            "wall_minutes": round(wall / 60, 2), "peak_rss_mb": round(peak_mb, 1)}


def finetune(name: str, model_name: str | None, samples: int, overrides: list[str], runs_dir: Path) -> dict:
    out_dir = runs_dir / name
    sets = [f"data.max_train_samples={samples}", "train.epochs=1", *overrides]
    if model_name is not None:
        sets.append(f"model.name={model_name}")
    code, wall, peak_mb = run_train_process(FINETUNE, sets, out_dir)
    if code != 0:
        return {"name": name, "error": f"exit {code}"}
    val = json.loads((out_dir / "metrics.json").read_text())["validation"]
    return {"name": name, "model": model_name or "packaged MiniLM", "train_samples": samples,
            "accuracy": round(val["accuracy"], 4), "f1": round(val["f1"], 4), "wall_minutes": round(wall / 60, 2)}


def fill_mask_top5(run: Path) -> list[dict]:
    from textune.generate import fill_mask, load_masked_lm

    model, tokenizer = load_masked_lm(run)
    return [{"token": c["token"], "score": round(c["score"], 4)}
            for c in fill_mask(model, tokenizer, [FILL_MASK_TEXT], top_k=5)[0][0]]


def generated(run: Path, prompt: str, tokens: int) -> str:
    from textune.generate import generate_text, load_causal_lm

    model, tokenizer = load_causal_lm(run)
    return generate_text(model, tokenizer, prompt, max_new_tokens=tokens, do_sample=True, temperature=0.8,
                         top_k=50, top_p=0.95, seed=0)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlm-steps", type=int, default=460, help="MLM steps of 32 blocks x 64 tokens (460: one epoch of SST-2)")
    p.add_argument("--finetune-samples", type=int, default=2000, help="SST-2 sentences per fine-tuning run")
    p.add_argument("--clm-steps", type=int, default=100, help="GPT-2 steps of 32 blocks x 64 tokens")
    p.add_argument("--lora-steps", type=int, default=30, help="SmolLM2 LoRA steps of 8 blocks x 64 tokens")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every pretrain run")
    p.add_argument("--runs-dir", default="benchmarks/runs/pretrain")
    p.add_argument("--output", default="benchmarks/results/pretrain.json")
    args = p.parse_args()
    runs_dir = (ROOT / args.runs_dir).resolve()
    out = ROOT / args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"corpus": "SST-2 train.tsv, sentence column (67,349 sentences)"}

    def save() -> None:  # after every part, so a cut-short invocation keeps what it measured
        out.write_text(json.dumps(result, indent=2))

    mlm = pretrain("mlm", MLM, [f"train.max_steps={args.mlm_steps}", *args.set], runs_dir)
    if "error" not in mlm:
        mlm["target_ratio"] = TARGET_PERPLEXITY_RATIO
        mlm["target_met"] = mlm["perplexity_ratio"] >= TARGET_PERPLEXITY_RATIO
        mlm["fill_mask"] = {"text": FILL_MASK_TEXT, "top5": fill_mask_top5(runs_dir / "mlm")}
        result["finetune"] = [
            finetune("finetune-from-mlm", str(runs_dir / "mlm" / "model"), args.finetune_samples, [], runs_dir),
            finetune("finetune-from-minilm", None, args.finetune_samples, [], runs_dir)]
    result["mlm"] = mlm
    save()
    clm = pretrain("clm-scratch", CLM, [f"train.max_steps={args.clm_steps}", *args.set], runs_dir)
    if "error" not in clm:
        clm["sample"] = {"prompt": "this movie is", "text": generated(runs_dir / "clm-scratch", "this movie is", 30)}
    result["clm_scratch"] = clm
    save()
    lora = pretrain("smollm2-lora", LORA, [f"train.max_steps={args.lora_steps}", *args.set], runs_dir)
    if "error" not in lora:
        lora["sample"] = {"prompt": "Once upon a time",
                          "text": generated(runs_dir / "smollm2-lora", "Once upon a time", 40)}
    result["smollm2_lora"] = lora
    save()
    print(f"\n{'run':<16} {'steps':>6} {'ppl first':>12} {'ppl last':>10} {'ratio':>7} {'minutes':>8}")
    for r in (mlm, clm, lora):
        if "error" in r:
            print(f"{r['name']:<16} {r['error']}")
        else:
            print(f"{r['name']:<16} {r['steps']:>6} {r['perplexity_first']:>12,.2f} {r['perplexity_last']:>10,.2f} "
                  f"{r['perplexity_ratio']:>6.1f}x {r['wall_minutes']:>8.2f}")
    if "fill_mask" in mlm:
        print(f"\nfill-mask {FILL_MASK_TEXT!r}: "
              + ", ".join(f"{c['token']} ({c['score']:.3f})" for c in mlm["fill_mask"]["top5"]))
    for r in result.get("finetune", []):
        print(f"{r['name']:<22} " + (r["error"] if "error" in r else f"accuracy {r['accuracy']:.4f} "
                                     f"(f1 {r['f1']:.4f}, {r['train_samples']:,} sentences, 1 epoch)"))
    for r in (clm, lora):
        if "sample" in r:
            print(f"{r['name']} sample: {r['sample']['text']!r}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
