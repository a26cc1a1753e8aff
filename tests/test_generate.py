"""fill-mask and generate on tiny random models built here (a BERT masked LM, a GPT-2 causal LM); the real
SmolLM2 completion is in tests/test_gguf.py."""

import json
import re
import shutil

import pytest
import torch

from conftest import build_tiny_bert, build_tiny_chat_lm, build_tiny_lm
from textune.cli import main
from textune.errors import TextuneError
from textune.generate import (chat_completion, chat_prompt_ids, end_of_turn_token_id, fill_mask, generate_text,
                              load_causal_lm, load_masked_lm, stop_token_ids, with_mask_token)

TWO_MASKS = "the movie was [MASK] and [MASK]"


def tiny_tokenizer(folder, **kwargs):
    """The conftest tiny BERT's word-level tokenizer (vocabulary: specials + toy words)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_bert(folder), **kwargs)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-mlm"), "mlm")


@pytest.fixture(scope="module")
def clm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), "clm")


@pytest.fixture(scope="module")
def mlm(mlm_dir):
    return load_masked_lm(mlm_dir)


@pytest.fixture(scope="module")
def clm(clm_dir):
    return load_causal_lm(clm_dir)


def test_fill_mask_gives_top_k_per_mask_sorted_with_the_models_probabilities(mlm):
    model, tokenizer = mlm
    (masks,) = fill_mask(model, tokenizer, [TWO_MASKS], top_k=4)
    assert len(masks) == 2
    enc = tokenizer(TWO_MASKS, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0], dim=-1)
    positions = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    for candidates, pos in zip(masks, positions):
        scores = [c["score"] for c in candidates]
        assert len(candidates) == 4 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
        want = probs[pos].topk(4)
        assert [c["token"] for c in candidates] == tokenizer.convert_ids_to_tokens(want.indices.tolist())
        assert scores == pytest.approx(want.values.tolist(), abs=1e-6)
    assert masks[0] != masks[1]  # each mask is scored at its own position


def test_fill_mask_nests_texts_then_masks_for_one_or_many_texts(mlm):
    model, tokenizer = mlm
    one = fill_mask(model, tokenizer, ["a [MASK] film"], top_k=3)
    assert len(one) == 1 and len(one[0]) == 1 and len(one[0][0]) == 3
    many = fill_mask(model, tokenizer, ["a [MASK] film", TWO_MASKS, "[MASK] plot"], top_k=2)
    assert [len(t) for t in many] == [1, 2, 1]
    assert [c["token"] for c in many[0][0]] == [c["token"] for c in one[0][0][:2]]


def test_mask_placeholder_becomes_the_models_own_mask_token(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = tiny_tokenizer(tmp_path)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})  # as RoBERTa-style models spell it
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)).eval()
    assert with_mask_token("a [MASK] film", tokenizer) == "a <mask> film"
    assert fill_mask(model, tokenizer, ["a [MASK] film"]) == fill_mask(model, tokenizer, ["a <mask> film"])
    with pytest.raises(TextuneError, match=r"no mask in 'a good film': write \[MASK\] \(or <mask>\)"):
        with_mask_token("a good film", tokenizer)


def test_fill_mask_refuses_text_without_mask_and_models_without_mlm_head(mlm, tiny_model, clm_dir):
    model, tokenizer = mlm
    with pytest.raises(TextuneError, match=r"no mask in 'a good film': write \[MASK\] where the missing word goes"):
        fill_mask(model, tokenizer, ["a [MASK] film", "a good film"])
    with pytest.raises(TextuneError, match="top-k must be at least 1"):
        fill_mask(model, tokenizer, ["a [MASK] film"], top_k=0)
    with pytest.raises(TextuneError, match=r"has no trained masked-LM head \(missing weights such as cls\."):
        load_masked_lm(tiny_model)  # a bare encoder, like the packaged MiniLM
    with pytest.raises(TextuneError, match="is a gpt2 model, which has no masked-LM form; train one"):
        load_masked_lm(clm_dir)


def test_greedy_generation_is_deterministic_and_follows_the_argmax(clm):
    model, tokenizer = clm
    prompt = "the movie was"
    (text,) = generate_text(model, tokenizer, prompt, max_new_tokens=6)
    assert generate_text(model, tokenizer, prompt, max_new_tokens=6) == [text]
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # the oracle: pick the likeliest next token, six times
        for _ in range(6):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt == model.generation_config.eos_token_id:
                break
    assert text == tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith(prompt)


def test_sampling_returns_k_sequences_reproducible_with_a_seed(clm):
    model, tokenizer = clm
    kwargs = dict(max_new_tokens=8, num_return_sequences=3, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    first = generate_text(model, tokenizer, "a film", seed=7, **kwargs)
    assert len(first) == 3 and all(t.startswith("a film") for t in first)
    assert generate_text(model, tokenizer, "a film", seed=7, **kwargs) == first
    others = [generate_text(model, tokenizer, "a film", seed=s, **kwargs) for s in (8, 9)]
    assert any(o != first for o in others)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": " "}, "the prompt is empty"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
    ({"num_return_sequences": 2}, "--num-return-sequences 2 needs --do-sample"),
    ({"do_sample": True, "temperature": 0}, "--temperature must be greater than 0"),
    ({"do_sample": True, "top_p": 1.5}, r"--top-p must be in \(0, 1\], got 1.5"),
    ({"chat": True}, "has no chat template, so it cannot format a conversation; .* or leave out --chat"),
])
def test_generate_refuses_bad_settings(clm, kwargs, message):
    model, tokenizer = clm
    with pytest.raises(TextuneError, match=message):
        generate_text(model, tokenizer, **{"prompt": "a film", **kwargs})


def test_generate_refuses_a_model_that_is_not_a_causal_lm(mlm_dir):
    with pytest.raises(TextuneError, match="is a BertForMaskedLM, not a causal language model"):
        load_causal_lm(mlm_dir)


def test_cli_fill_mask_and_generate_end_to_end_on_a_run_folder(mlm_dir, clm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mlm_dir, run / "model")  # a textune run folder holds its model in model/
    assert main(["fill-mask", str(run), TWO_MASKS, "a [MASK] film", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["text"] for o in out] == [TWO_MASKS, "a [MASK] film"]
    assert [len(o["masks"]) for o in out] == [2, 1] and all(len(m) == 3 for o in out for m in o["masks"])
    assert main(["fill-mask", str(mlm_dir), "a [MASK] film"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "a [MASK] film" and lines[1].startswith("  mask 1: ") and lines[1].count(",") == 4
    assert main(["generate", str(clm_dir), "the plot", "--max-new-tokens", "5", "--do-sample", "--seed", "1",
                 "--num-return-sequences", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "the plot" and len(out["texts"]) == 2
    threads = torch.get_num_threads()
    try:
        assert main(["generate", str(clm_dir), "the plot", "--max-new-tokens", "3", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:  # torch's thread count is process-wide: leave it as the other tests expect
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.startswith("the plot")


@pytest.mark.parametrize("argv, message", [
    (["fill-mask", "{mlm}", "a good film"], r"no mask in 'a good film': write \[MASK\]"),
    (["fill-mask", "{tiny}", "a [MASK] film"], "has no trained masked-LM head"),
    (["fill-mask", "{missing}", "a [MASK] film"], "model folder not found"),
    (["generate", "{mlm}", "a film"], "is a BertForMaskedLM, not a causal language model"),
    (["generate", "{clm}", "a film", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "{clm}", "a", "film"], r"generate takes \[MODEL\] PROMPT, got 3 arguments"),
    (["generate", "{clm}", "a film", "--threads", "0"], "--threads must be greater than 0, got 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, mlm_dir, clm_dir, tiny_model, tmp_path, capsys):
    paths = {"mlm": mlm_dir, "clm": clm_dir, "tiny": tiny_model, "missing": tmp_path / "nope"}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("textune: error: ")
    assert re.search(message, err), err


def test_generate_loads_a_lora_run_of_a_causal_lm_merged_into_its_base(clm_dir, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(clm_dir)
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["c_attn"]))
    with torch.no_grad():  # a trained adapter is not the identity: make this one change the outputs
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "run" / "model")  # as a textune LoRA run saves RUN/model
    model, tokenizer = load_causal_lm(tmp_path / "run")
    ids = tokenizer("the movie was", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(clm_dir)(ids).logits, want, atol=1e-3)
    assert type(model).__name__ == "GPT2LMHeadModel"  # merged: a plain transformers model


# ---------------------------------------------------------------- the chat template's end of turn (issue 30 item 4)


def test_model_architecture_reads_the_registry_table_for_folders_runs_and_adapters(mlm_dir, clm_dir, tiny_model,
                                                                                  tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from textune.generate import model_architecture
    from textune.tasks import CAUSAL_LM, ENCODER_BODY, MASKED_LM

    assert model_architecture(mlm_dir) is MASKED_LM and model_architecture(clm_dir) is CAUSAL_LM
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(clm_dir),
                          LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["c_attn"]))
    lora.save_pretrained(tmp_path / "run" / "model")  # an adapter: its PEFT task type says what it is
    assert model_architecture(tmp_path / "run") is CAUSAL_LM
    assert model_architecture(tiny_model) is ENCODER_BODY  # a bare encoder: what task embedding trains
    assert model_architecture(tmp_path / "nothing") is None


def build_base_chat_lm(folder, answer: str = " five", ends: bool = True):
    """A base model as Qwen2.5 base is one: eos <|endoftext|> (tokenizer and generation config) while its ChatML
    template ends turns with <|im_end|>. Its output is fixed, a bigram table: the attention and MLP outputs are
    zeroed, so the last hidden state is the current token's embedding, and the LM head maps the generation
    prompt's last token to `answer`'s token, that token to <|im_end|>, and <|im_end|> back to it. A model that
    does not stop at <|im_end|> writes `answer` again and again. `ends` False: `answer`'s token is followed by
    itself, so every answer runs to max_new_tokens. Returns (folder, the answer's token id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_chat_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = model.config.eos_token_id = tokenizer.eos_token_id
    prompt_end = chat_prompt_ids(tokenizer, [{"role": "user", "content": "hello"}])[0, -1].item()
    word = tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        states = model.model.norm(model.model.embed_tokens.weight)  # the last hidden state of each token
        head = torch.zeros_like(model.lm_head.weight)
        for source, target in ((prompt_end, word), (word, im_end if ends else word), (im_end, word)):
            head[target] += 100 * states[source] / states[source].norm()
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, word


@pytest.fixture(scope="module")
def base_chat(tmp_path_factory):
    folder, word = build_base_chat_lm(tmp_path_factory.mktemp("base-chat"))
    model, tokenizer = load_causal_lm(folder)
    return model, tokenizer, word


def test_the_templates_end_of_turn_token_stops_generation_where_eos_differs(base_chat):
    model, tokenizer, word = base_chat
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|endoftext|>" and model.generation_config.eos_token_id != im_end
    assert end_of_turn_token_id(tokenizer) == im_end
    assert im_end in stop_token_ids(model, tokenizer) and tokenizer.eos_token_id in stop_token_ids(model, tokenizer)
    reply = chat_completion(model, tokenizer, [{"role": "user", "content": "hello"}], max_new_tokens=8)
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == (tokenizer.decode([word]), "stop", 2)
    assert generate_text(model, tokenizer, "hello", max_new_tokens=8, chat=True) == [tokenizer.decode([word]).strip()]


def test_no_end_of_turn_token_without_a_template_or_with_plain_text_after_the_answer(base_chat):
    _, tokenizer, _ = base_chat
    plain = tokenizer.chat_template.replace("'<|im_end|>\\n'", "'\\n\\n'")
    assert plain != tokenizer.chat_template
    for template in (None, plain):
        tokenizer.chat_template, saved = template, tokenizer.chat_template
        try:
            assert end_of_turn_token_id(tokenizer) is None
        finally:
            tokenizer.chat_template = saved
