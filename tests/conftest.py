"""Shared fixtures: a tiny randomly initialised BERT built from a config (no download) and toy data.

The toy task is learnable by construction: a sentence's label is the sentiment word it contains, so a
two-layer, 32-wide BERT reaches high accuracy in a few dozen steps on CPU.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POSITIVE = ["good", "great", "love", "nice", "superb"]
NEGATIVE = ["bad", "awful", "hate", "poor", "boring"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "really", "very", "and", "it", "story", "acting", "is", "this"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, rng.randint(2, 6))
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        rows.append({"text": toy_sentence(rng, positive), "label": "positive" if positive else "negative"})
    return rows


def run_textune(*args) -> subprocess.CompletedProcess:
    """textune in a subprocess, as a user runs it: exit code and captured text output."""
    return subprocess.run([sys.executable, "-m", "textune", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_bert(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT encoder with a word-level vocabulary of the toy words, saved as a model folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = SPECIALS + POSITIVE + NEGATIVE + FILLER
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_lm(folder: Path, kind: str) -> Path:
    """A random 2-layer, 32-wide language model with the tiny BERT's word-level tokenizer, saved as a model
    folder: kind "mlm" = BertForMaskedLM, "clm" = GPT2LMHeadModel ([CLS] begins, [SEP] ends a text)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_bert(folder))
    torch.manual_seed(0)
    if kind == "mlm":
        model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    else:
        special = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           **special))
        model.generation_config.update(**special)
    model.save_pretrained(folder)
    return folder


# ChatML, as SmolLM2-Instruct and Qwen write it, without their default system prompt.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT_WORDS = "you are a helpful assistant answer the question what is two plus three five yes no translate hello"


def build_tiny_chat_lm(folder: Path, kind: str = "llama", chat_template: str | None = TINY_CHAT_TEMPLATE) -> Path:
    """A random 2-layer, 32-wide causal LM ("llama" or "gpt2") with a byte-level BPE tokenizer trained here on
    a few words (so any text round-trips through encode/decode), ChatML special tokens and, unless
    `chat_template` is None, a small chat template; saved as a model folder."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CHAT_WORDS, CHAT_WORDS.upper(), "system user assistant 0123456789 ?!.,:"],
                            vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=256, **ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                           n_positions=256, **ids))
    model.generation_config.update(**ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("toy-data"), toy_rows, train=320, validation=64, test=48)


def write_splits(folder: Path, make_rows, **sizes: int) -> dict[str, Path]:
    """One CSV per split, `make_rows(n, seed=...)` rows each (seeds 1, 2, ... in the order given): a toy data set."""
    return {name: write_csv(folder / f"{name}.csv", make_rows(n, seed=seed))
            for seed, (name, n) in enumerate(sizes.items(), 1)}


def toy_overrides(tiny_model: Path, toy_data: dict[str, Path], output_dir: Path, **extra) -> dict:
    """Config overrides for a fast run of the tiny model on the toy task."""
    out = {"model.name": str(tiny_model), "model.max_length": 32,
           "data.train": str(toy_data["train"]), "data.validation": str(toy_data["validation"]),
           "train.epochs": 4, "train.batch_size": 16, "train.lr": 3e-3, "train.logging_steps": 5,
           "train.warmup_ratio": 0.1, "train.mixed_precision": "no", "output_dir": str(output_dir)}
    out.update(extra)
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_model, toy_data, tmp_path_factory) -> Path:
    """One finished run of the tiny model on the toy task, shared by the evaluate/predict/CLI tests."""
    from textune.config import load_config
    from textune.train import train

    out = tmp_path_factory.mktemp("runs") / "toy"
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, out, **{"data.test": str(toy_data["test"])}))
    return train(cfg)


def assert_same_rows(got, expected, path="row"):
    """Predictor rows equal, floats to 1e-4 (rounded to 6 decimals from outputs computed in another order or by
    another runtime)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for k in expected:
            assert_same_rows(got[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same_rows(g, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-4), path
    else:
        assert got == expected, path


def nested(overrides: dict) -> dict:
    """Dotted config keys (as the CLI takes them) as the nested mapping a YAML config file holds."""
    out: dict = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def needs_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (../shared/data beside the repo)")
    return path


def serve_in_thread(app):
    """Yield the base URL of `app` served by uvicorn in a background thread on a free loopback port (for clients
    that need a real socket: OpenAI's); stop it when the generator is closed."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
