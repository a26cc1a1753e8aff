"""Pretraining: masking statistics, packing, causal-mask loss, and real `textune pretrain` runs on tiny models."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import SPECIALS, toy_rows
from test_checkpoint import write_config as write_nested_config
from textune.cli import main
from textune.config import load_config
from textune.errors import ConfigError, TextuneError
from textune.tasks.language_modeling import (end_of_text_id, load_pretrain_inputs, mlm_collator, pack_blocks, read_corpus,
                              split_corpus, tokenize_documents)


def word_tokenizer(n_words: int):
    """A BERT WordPiece tokenizer over `n_words` made-up words w0..wN (a large vocabulary: a random
    replacement then almost never draws the original token back)."""
    from transformers import BertTokenizer

    vocab = SPECIALS + [f"w{i}" for i in range(n_words)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def lm_overrides(model_dir, corpus, out, **extra) -> dict:
    base = {"model.name": str(model_dir), "model.max_length": 16, "pretrain.corpus": str(corpus),
            "pretrain.validation_share": 0.2, "train.metric": "loss", "train.greater_is_better": False,
            "train.epochs": 3, "train.batch_size": 16, "train.lr": 3e-3, "train.logging_steps": 5,
            "train.warmup_ratio": 0.1, "train.mixed_precision": "no", "output_dir": str(out)}
    return {**base, **extra}


def write_config(path, overrides: dict) -> str:
    return str(write_nested_config(path, overrides))


def eval_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if r["type"] == "eval"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(r["text"] for r in toy_rows(400, seed=5)) + "\n\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- masking


def test_masking_chooses_15_percent_and_splits_80_10_10_over_100k_tokens():
    tokenizer = word_tokenizer(2000)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(2000)}" for _ in range(rng.randint(60, 126))) for _ in range(1300)]
    enc = tokenizer(texts, return_special_tokens_mask=True)
    examples = [dict(zip(enc, values)) for values in zip(*enc.values())]
    torch.manual_seed(0)
    collate = mlm_collator(tokenizer, 0.15, whole_word_mask=False)
    chosen = masked = kept = special_chosen = pad_chosen = words = 0
    for start in range(0, len(examples), 100):
        part = examples[start:start + 100]
        original = tokenizer.pad([{"input_ids": e["input_ids"]} for e in part], return_tensors="pt")["input_ids"]
        batch = collate(part)  # pads to the batch's longest: padding positions exist in every batch
        pick = batch["labels"] != -100
        special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
        assert torch.equal(batch["labels"][pick], original[pick])  # labels are the original tokens
        words += int((~special).sum())
        chosen += int(pick.sum())
        special_chosen += int((pick & special).sum())
        pad_chosen += int((pick & (original == tokenizer.pad_token_id)).sum())
        masked += int((pick & (batch["input_ids"] == tokenizer.mask_token_id)).sum())
        kept += int((pick & (batch["input_ids"] == original)).sum())
    assert words >= 100_000
    assert special_chosen == 0 and pad_chosen == 0
    assert abs(chosen / words - 0.15) < 0.01
    random_share = (chosen - masked - kept) / chosen
    assert abs(masked / chosen - 0.8) < 0.01 and abs(random_share - 0.1) < 0.01 and abs(kept / chosen - 0.1) < 0.01


def test_whole_word_masking_chooses_every_piece_of_a_word():
    from transformers import BertTokenizer

    vocab = SPECIALS + ["play", "##ing", "##ed", "walk", "the", "dog"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    docs = ["playing walked the dog playing played walking"] * 400
    blocks = tokenize_documents(docs, tokenizer, "mlm", whole_word_mask=True)
    torch.manual_seed(0)
    batch = mlm_collator(tokenizer, 0.15, whole_word_mask=True)([blocks[i] for i in range(len(blocks))])
    pick = batch["labels"] != -100
    ids = torch.tensor(blocks["input_ids"])
    continuation = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(["##ing", "##ed"])))
    # A continuation piece is chosen exactly when the piece before it (its word's start) is.
    assert torch.equal(pick[:, 1:][continuation[:, 1:]], pick[:, :-1][continuation[:, 1:]])
    assert pick.any() and (batch["input_ids"][pick] == tokenizer.mask_token_id).all()


# ---------------------------------------------------------------- corpus and packing


def test_packing_fills_every_block_and_loses_only_the_tail():
    docs = [list(range(start, start + n)) for start, n in ((0, 5), (100, 11), (200, 3), (300, 9))]
    blocks = pack_blocks({"input_ids": docs}, block_size=8, with_labels=True)
    stream = [t for d in docs for t in d]  # 28 tokens: 3 full blocks, 4 tail tokens dropped
    assert [len(b) for b in blocks["input_ids"]] == [8, 8, 8]
    assert [t for b in blocks["input_ids"] for t in b] == stream[:24]
    assert blocks["labels"] == blocks["input_ids"] and blocks["attention_mask"] == [[1] * 8] * 3


def test_document_boundaries_mlm_keeps_specials_clm_ends_each_document(tiny_model):
    from textune.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    docs = ["the movie was good", "bad plot"]
    mlm = tokenize_documents(docs, tokenizer, "mlm")["input_ids"]
    assert [d[0] for d in mlm] == [tokenizer.cls_token_id] * 2 and [d[-1] for d in mlm] == [tokenizer.sep_token_id] * 2
    clm = tokenize_documents(docs, tokenizer, "clm")["input_ids"]
    assert clm == [tokenizer.convert_tokens_to_ids(d.split()) + [end_of_text_id(tokenizer)] for d in docs]


def test_corpus_reading_and_held_out_split(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\n\n  second doc  \nthird\n", encoding="utf-8")
    assert read_corpus(txt) == ["first doc", "second doc", "third"]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("label\tsentence\n1\tgood one\n0\tbad one\n", encoding="utf-8")
    assert read_corpus(tsv, "sentence") == ["good one", "bad one"]
    with pytest.raises(TextuneError, match=r"pretrain.corpus: .* has no column 'text' \(pretrain.text_column\)"):
        read_corpus(tsv)
    train, held_out = split_corpus([f"d{i}" for i in range(100)], None, 0.1, seed=1)
    assert len(train) == 90 and len(held_out) == 10 and not set(train) & set(held_out)


# ---------------------------------------------------------------- causal LM loss


def test_clm_loss_is_shifted_cross_entropy_and_attention_is_causal():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        by_hand = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 50
        later = model(input_ids=changed).logits
    assert torch.allclose(out.loss, by_hand, atol=1e-6)
    assert torch.allclose(out.logits[:, :8], later[:, :8], atol=1e-5)  # earlier positions never see later tokens
    assert not torch.allclose(out.logits[:, 8:], later[:, 8:])


# ---------------------------------------------------------------- real runs through the CLI


def test_mlm_pretrain_cli_lowers_loss_and_its_model_fine_tunes(tiny_model, corpus, toy_data, tmp_path, capsys):
    run = tmp_path / "mlm"
    assert main(["pretrain", write_config(tmp_path / "mlm.yaml", lm_overrides(tiny_model, corpus, run, **{"train.epochs": 4}))]) == 0
    printed = capsys.readouterr().out
    assert "start fresh (random): cls.predictions" in printed  # the tiny BERT, like MiniLM, has no MLM head
    losses = eval_losses(run)
    assert len(losses) == 5 and losses[-1] < losses[0]  # step 0 plus one per epoch
    assert (run / "model" / "model.safetensors").is_file() and not (run / "validation_predictions.jsonl").exists()
    assert json.loads((run / "metrics.json").read_text())["validation"]["perplexity"] > 1
    tuned = tmp_path / "tuned"
    fine_tune = {"model.name": str(run / "model"), "model.max_length": 32, "data.train": str(toy_data["train"]),
                 "data.validation": str(toy_data["validation"]), "train.max_steps": 4, "train.batch_size": 16,
                 "train.mixed_precision": "no", "output_dir": str(tuned)}
    assert main(["train", write_config(tmp_path / "tune.yaml", fine_tune)]) == 0
    assert (tuned / "validation_predictions.jsonl").is_file()


def test_mlm_resume_from_a_checkpoint_draws_the_same_masks(tiny_model, corpus, tmp_path):
    from safetensors.torch import load_file

    from textune.train import train

    steps = {"train.max_steps": 6, "train.checkpoint_steps": 3, "train.keep_last": 3, "train.eval_steps": 100}
    ref = train(load_config(None, lm_overrides(tiny_model, corpus, tmp_path / "ref", **steps)))
    cut = train(load_config(None, lm_overrides(tiny_model, corpus, tmp_path / "cut", **steps)),
                resume=str(ref / "checkpoints" / "step-00000003"))
    ref_weights, cut_weights = load_file(ref / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert all(torch.equal(ref_weights[k], cut_weights[k]) for k in ref_weights)
    assert eval_losses(ref) == eval_losses(cut)


def test_clm_pretrain_from_scratch_lowers_loss(tiny_model, corpus, tmp_path):
    run = tmp_path / "clm"
    scratch = {"pretrain.objective": "clm", "model.init": "scratch", "model.architecture": "gpt2",
               "model.layers": 2, "model.heads": 2, "model.hidden_size": 32}
    assert main(["pretrain", write_config(tmp_path / "clm.yaml", lm_overrides(tiny_model, corpus, run, **scratch))]) == 0
    losses = eval_losses(run)
    assert losses[-1] < losses[0] - 0.2
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run / "model").config.model_type == "gpt2"


def test_lora_clm_on_a_pretrained_gpt2_trains_a_causal_lm_adapter(tiny_model, corpus, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = tmp_path / "lora"
    lora = {"pretrain.objective": "clm", "tuning.method": "lora", "train.lr": 1e-2, "train.epochs": 2}
    assert main(["pretrain", write_config(tmp_path / "lora.yaml", lm_overrides(base, corpus, run, **lora))]) == 0
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and set(adapter["target_modules"]) == {"c_attn"}
    losses = eval_losses(run)
    assert losses[-1] < losses[0]
    capsys.readouterr()
    assert main(["merge", str(run)]) == 0  # the merged causal LM's pipeline, not the task's fill-mask
    assert "transformers.pipeline('text-generation'" in capsys.readouterr().out


def test_nsp_pairs_train_bert_pretraining_heads(tiny_model, corpus, tmp_path):
    cfg = load_config(None, lm_overrides(tiny_model, corpus, tmp_path / "nsp", **{"pretrain.nsp": True}))
    inputs = load_pretrain_inputs(cfg)
    assert type(inputs.model).__name__ == "BertForPreTraining"
    pairs = inputs.tokenized["train"]
    assert set(pairs["next_sentence_label"]) == {0, 1}
    share = sum(pairs["next_sentence_label"]) / len(pairs)
    assert 0.4 < share < 0.6
    loader = torch.utils.data.DataLoader(inputs.tokenized["validation"], batch_size=32, collate_fn=inputs.collator("validation"))
    metrics, _ = inputs.evaluate(inputs.model, loader)
    assert metrics["tokens"] > 0 and 0 <= metrics["nsp_accuracy"] <= 1


SCRATCH_CLM = {"pretrain.objective": "clm", "model.init": "scratch", "model.architecture": "gpt2", "model.layers": 2,
               "model.heads": 2, "model.hidden_size": 32}


@pytest.mark.parametrize("overrides", [{}, SCRATCH_CLM, {"pretrain.nsp": True}], ids=["mlm", "clm", "nsp"])
def test_held_out_loss_weighs_every_token_the_same_whatever_the_batches(tiny_model, corpus, tmp_path, overrides):
    """The loss per predicted token, from per-row sums (what several processes gather): one batch, uneven
    batches and the rows one by one agree."""
    inputs = load_pretrain_inputs(load_config(None, lm_overrides(tiny_model, corpus, tmp_path / "run", **overrides)))
    held_out = inputs.tokenized["validation"]
    results = []
    for batch_size in (len(held_out), 7, 1):
        loader = torch.utils.data.DataLoader(held_out, batch_size=batch_size, collate_fn=inputs.collator("validation"))
        results.append(inputs.evaluate(inputs.model, loader)[0])
    assert len(held_out) % 7 and results[0]["tokens"] > 0
    for other in results[1:]:
        assert other["tokens"] == results[0]["tokens"] and other.get("nsp_accuracy") == results[0].get("nsp_accuracy")
        assert other["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)


# ---------------------------------------------------------------- config errors name the key


@pytest.mark.parametrize("overrides, message", [
    ({"train.metric": "accuracy", "train.greater_is_better": True},
     r"train.metric: 'accuracy' is not a metric of task language-modeling"),
    ({"pretrain.objective": "clm", "pretrain.whole_word_mask": True}, r"pretrain.whole_word_mask: only for"),
    ({"pretrain.mlm_probability": 1.5}, r"pretrain.mlm_probability: must be between 0 and 1"),
    ({"model.init": "scratch", "model.architecture": "gpt2"}, r"model.architecture: gpt2 cannot be trained with pretrain.objective mlm"),
    ({"model.init": "scratch", "pretrain.objective": "clm", "model.hidden_size": 30, "model.heads": 4},
     r"model.hidden_size: 30 is not divisible by model.heads 4"),
    ({"pretrain.tokenizer_vocab_size": 500}, r"pretrain.tokenizer_vocab_size: needs model.init scratch"),
    ({"data.train": "x.csv"}, r"pretrain.corpus: set together with data.train"),
])
def test_config_errors_name_the_key(overrides, message, tmp_path):
    base = lm_overrides("m", "c.txt", tmp_path / "r")
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**base, **overrides})


def test_scratch_init_is_refused_for_fine_tuning():
    with pytest.raises(ConfigError, match="model.init: scratch is for textune pretrain"):
        load_config(None, {"data.train": "x.csv", "model.init": "scratch"})


def test_cli_keeps_pretrain_and_train_configs_apart(tiny_model, corpus, toy_data, tmp_path, capsys):
    fine_tune = {"data.train": str(toy_data["train"]), "output_dir": str(tmp_path / "a")}
    assert main(["pretrain", write_config(tmp_path / "a.yaml", fine_tune)]) == 2
    assert "pretrain.corpus: textune pretrain needs a corpus" in capsys.readouterr().err
    assert main(["train", write_config(tmp_path / "b.yaml", lm_overrides(tiny_model, corpus, tmp_path / "b"))]) == 2
    assert "pretrains a language model: run textune pretrain" in capsys.readouterr().err
    bad = lm_overrides(tiny_model, tmp_path / "missing.txt", tmp_path / "c")
    assert main(["pretrain", write_config(tmp_path / "c.yaml", bad)]) == 2
    assert "pretrain.corpus: file not found" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_the_training_loss_per_token_is_the_models_own_loss_as_a_sum_and_a_count(objective, tmp_path):
    """The loop divides the sum by the count of the whole step (all processes, all micro-batches): for one
    batch that is the model's own loss, a mean per masked or next token."""
    from conftest import build_tiny_lm
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from textune.tasks.language_modeling import predicted_token_loss

    folder = build_tiny_lm(tmp_path / objective, objective)
    model = (AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM).from_pretrained(folder).eval()
    ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if objective == "mlm":
        labels[torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) > 0.3] = -100  # a few per row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        loss_sum, tokens = predicted_token_loss(model, batch, causal=objective == "clm")
        own = model(**batch).loss
    expected = (labels != -100).sum() if objective == "mlm" else 3 * 11  # causal: each token predicts the next
    assert tokens.item() == expected
    assert (loss_sum / tokens).item() == pytest.approx(own.item(), rel=1e-5)
