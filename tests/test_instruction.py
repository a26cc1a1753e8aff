"""Instruction tuning (textune.tasks.instruction) on tiny random Llama and GPT-2 models built here with a small
ChatML template (conftest.build_tiny_chat_lm): the label mask, the three data formats, packing, the answer
metrics, bad input, and one end-to-end CLI run train -> evaluate -> predict."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_CHAT_TEMPLATE, build_tiny_chat_lm, run_textune, write_jsonl
from test_generate import build_base_chat_lm
from textune.config import DataConfig, load_config
from textune.errors import TextuneError
from textune.tasks.instruction import (InstructionPredictor, PackedCollator, answer_loss, answer_row_losses,
                                       check_conversation, check_packing, generate_answers, prompt_ids,
                                       read_conversations, score_rows, tokenize_conversations, pack)

CHAT = [{"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "what is two plus three?"}, {"role": "assistant", "content": "five"},
        {"role": "user", "content": "and three plus two?"}, {"role": "assistant", "content": "five, yes"}]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def chat_lm(request, tmp_path_factory):
    return build_tiny_chat_lm(tmp_path_factory.mktemp(f"tiny-chat-{request.param}"), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_chat_lm(tmp_path_factory.mktemp("tiny-chat-llama"), "llama")


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


def test_only_the_assistant_turns_carry_labels_in_a_multi_turn_chat(chat_lm):
    tokenizer = tokenizer_of(chat_lm)
    ds, counts = tokenize_conversations([CHAT], tokenizer, max_length=256, loss_on="assistant")
    row = ds[0]
    assert trained_text(tokenizer, row) == "five<|im_end|>\nfive, yes<|im_end|>\n"
    # every labelled token is the input token at that position (the model shifts them itself)
    assert all(label in (-100, tok) for label, tok in zip(row["labels"], row["input_ids"]))
    assert counts == {"dropped": 0, "cut": 0}
    every, _ = tokenize_conversations([CHAT], tokenizer, max_length=256, loss_on="all")
    assert every[0]["labels"] == every[0]["input_ids"]


def test_the_three_formats_give_the_same_tokens_for_the_same_conversation(llama, tmp_path):
    d = DataConfig()
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "translate hello", "input": "yes", "output": "hello"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "translate hello\n\nyes"},
                                                               {"role": "assistant", "content": "hello"}]}])
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "translate hello\n\nyes"},
                                                                      {"from": "gpt", "value": "hello"}]}])
    tokenizer = tokenizer_of(llama)
    seen = {}
    for path in (alpaca, chat, share):
        conversations, fmt = read_conversations(str(path), d, "data.train")
        seen[fmt] = tokenize_conversations(conversations, tokenizer, 64, "assistant")[0][0]
    assert set(seen) == {"alpaca", "chat", "sharegpt"}
    assert seen["alpaca"] == seen["chat"] == seen["sharegpt"]


def test_truncation_drops_prompts_that_fill_the_window_and_counts_cut_answers(llama):
    tokenizer = tokenizer_of(llama)
    long_prompt = [{"role": "user", "content": "hello " * 40}, {"role": "assistant", "content": "yes"}]
    long_answer = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "five " * 40}]
    ds, counts = tokenize_conversations([long_prompt, long_answer, CHAT[1:3]], tokenizer, max_length=24,
                                        loss_on="assistant")
    assert counts == {"dropped": 1, "cut": 1}
    assert len(ds) == 2 and max(ds["length"]) == 24


def test_packing_gives_the_loss_of_the_unpacked_examples(chat_lm):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    tokenizer = tokenizer_of(chat_lm)
    model = AutoModelForCausalLM.from_pretrained(chat_lm).eval()
    conversations = [CHAT, CHAT[1:3], [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes no"}]]
    ds, _ = tokenize_conversations(conversations, tokenizer, 256, "assistant")
    check_packing(model)
    packed = pack(ds, max_length=256)
    assert len(packed) == 1 and packed[0]["position_ids"].count(0) == 3
    unpacked = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(list(ds.remove_columns(["length"])))
    with torch.no_grad():
        plain, plain_tokens = answer_loss(model, dict(unpacked))
        together, together_tokens = answer_loss(model, PackedCollator(tokenizer.pad_token_id)([packed[0]]))
    assert together_tokens == plain_tokens and together.item() == pytest.approx(plain.item(), rel=1e-5)


def test_the_loss_from_answer_logits_alone_is_the_models_own_loss(chat_lm):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    tokenizer = tokenizer_of(chat_lm)
    model = AutoModelForCausalLM.from_pretrained(chat_lm).eval()
    ds, _ = tokenize_conversations([CHAT, CHAT[1:3]], tokenizer, 256, "assistant")
    batch = dict(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(list(ds.remove_columns(["length"]))))
    with torch.no_grad():
        loss_sum, tokens = answer_loss(model, batch)  # summed per token: the loop divides by the step's count
        assert tokens == (batch["labels"][:, 1:] != -100).sum().item()
        assert (loss_sum / tokens).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_per_row_answer_losses_sum_to_each_conversations_own_loss(chat_lm):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    tokenizer = tokenizer_of(chat_lm)
    model = AutoModelForCausalLM.from_pretrained(chat_lm).eval()
    ds, _ = tokenize_conversations([CHAT, CHAT[1:3], CHAT[:3]], tokenizer, 256, "assistant")
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    rows = list(ds.remove_columns(["length"]))
    with torch.no_grad():
        sums, counts = answer_row_losses(model, dict(collate(rows)))
        for row, total, count in zip(rows, sums, counts):
            alone = dict(collate([row]))
            assert count.item() == (alone["labels"][:, 1:] != -100).sum().item()
            assert total.item() / count.item() == pytest.approx(model(**alone).loss.item(), rel=1e-5)


def test_packing_is_refused_where_the_attention_crosses_examples():
    class Leaky(torch.nn.Module):
        """Ignores position ids: every token sees all before it (a running mean), as a kernel that cannot
        separate packed examples would."""
        config = type("C", (), {"vocab_size": 50, "_attn_implementation": "leaky"})()

        def forward(self, input_ids, position_ids=None, use_cache=False):
            x = input_ids.float().unsqueeze(-1)
            return type("Out", (), {"logits": x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)})()

    with pytest.raises(TextuneError, match="data.packing: .*attend to each other"):
        check_packing(Leaky())


def test_answer_metrics_normalise_exact_match_and_score_rouge_l():
    prompt = [{"role": "user", "content": "q"}]
    metrics, rows = score_rows([prompt] * 3, ["Five.", "the red fox", "yes"], ["five", "a red fox jumped", "no"])
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]  # case, punctuation and articles do not count
    assert rows[1]["rougeL"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3), rel=1e-6)  # "red fox"
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["generated"] == 3


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "roles out of order: turn 1 is assistant, expected user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "turn 2 is user, expected assistant"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "turn 2 has role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "an assistant turn is empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
     "turn 3 is system"),
])
def test_bad_conversations_are_refused_naming_the_problem(messages, message):
    with pytest.raises(TextuneError, match=message):
        check_conversation(messages, "data.train: f.jsonl row 3")


def test_a_template_that_does_not_write_turns_in_order_is_refused(tmp_path):
    # A template that writes the answers first: the text before an answer changes as turns are added.
    reordered = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tokenizer = tokenizer_of(build_tiny_chat_lm(tmp_path / "m", chat_template=reordered))
    with pytest.raises(TextuneError, match="does not write a conversation as its turns one after another"):
        tokenize_conversations([CHAT[1:3]], tokenizer, 64, "assistant")


def instruction_overrides(model, train, validation, out, **extra) -> dict:
    return {"task": "instruction", "model.name": str(model), "model.max_length": 64, "data.train": str(train),
            "data.validation": str(validation), "train.epochs": 3, "train.batch_size": 8, "train.lr": 3e-3,
            "train.mixed_precision": "no", "train.logging_steps": 5, "eval.generate_samples": 4,
            "eval.max_new_tokens": 6, "output_dir": str(out), **extra}


ROWS = [{"instruction": "what is two plus three", "input": "", "output": "five"},
        {"instruction": "translate hello", "input": "yes", "output": "hello"}] * 16


def test_a_model_without_a_chat_template_needs_model_chat_template(tmp_path):
    from textune.train import train

    bare = build_tiny_chat_lm(tmp_path / "bare", chat_template=None)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = load_config(None, instruction_overrides(bare, data, data, tmp_path / "run", **{"train.epochs": 1}))
    with pytest.raises(TextuneError, match="model.chat_template: the tokenizer of .* has no chat template"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    template = tmp_path / "chatml.jinja"
    template.write_text(TINY_CHAT_TEMPLATE)
    cfg = load_config(None, instruction_overrides(bare, data, data, tmp_path / "run",
                                                  **{"train.epochs": 1, "model.chat_template": str(template)}))
    run = train(cfg)
    assert tokenizer_of(run / "model").chat_template == TINY_CHAT_TEMPLATE  # saved with the model


def test_instruction_keys_on_another_task_name_the_key(tmp_path):
    with pytest.raises(TextuneError, match="data.packing: is for task instruction, not classification"):
        load_config(None, {"data.train": "x.csv", "data.packing": True})
    with pytest.raises(TextuneError, match="data.format: chat is a format of instruction data"):
        load_config(None, {"data.train": "x.csv", "data.format": "chat"})


def write_config(path, overrides: dict):
    """A YAML config of dotted keys (as the CLI takes them)."""
    import yaml

    nested: dict = {}
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = str(value) if hasattr(value, "parts") else value
    path.write_text(yaml.safe_dump(nested))
    return path


def test_a_chat_file_given_to_a_classifier_is_one_line_exit_2(tmp_path, tiny_model):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    config = write_config(tmp_path / "c.yaml", {"model.name": tiny_model, "data.train": chat,
                                                "output_dir": tmp_path / "run"})
    result = run_textune("train", config)
    assert result.returncode == 2 and "has no column 'text'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_cli_train_evaluate_predict_end_to_end(llama, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS)
    chat_file = write_jsonl(tmp_path / "val_chat.jsonl", [{"messages": [{"role": "user", "content": r["instruction"]
                                                                         + (f"\n\n{r['input']}" if r["input"] else "")},
                                                                        {"role": "assistant", "content": r["output"]}]}
                                                          for r in ROWS[:4]])
    run = tmp_path / "run"
    overrides = instruction_overrides(llama, train_file, chat_file, run, **{"tuning.method": "lora", "tuning.r": 4,
                                                                            "train.lr": 2e-2, "data.packing": True})
    result = run_textune("train", write_config(tmp_path / "c.yaml", overrides))
    assert result.returncode == 0, result.stderr
    assert "trained on 'five<|im_end|>\\n'" in result.stdout and "packing" in result.stdout
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    evals = [h for h in history if h["type"] == "eval"]
    assert evals[0]["step"] == 0 and {"eval_loss", "eval_rougeL", "eval_exact_match"} <= set(evals[0])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["first_example"]["trained_on"] == "five<|im_end|>\n"

    # evaluate: the run, and the base model on the same prompts (before/after)
    tuned = run_textune("evaluate", run, "--data", chat_file, "--output", tmp_path / "tuned.json")
    base = run_textune("evaluate", llama, "--task", "instruction", "--data", chat_file, "--output", tmp_path / "base.json")
    assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr + base.stderr
    after, before = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tuned", "base"))
    assert after["loss"] < before["loss"] and after["generated"] == before["generated"] == 4
    assert "ROUGE-L" in tuned.stdout

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is two plus three\ntranslate hello\n")
    predicted = run_textune("predict", run, "--input", prompts, "--output", tmp_path / "answers.jsonl")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["what is two plus three", "translate hello"]
    assert all(isinstance(r["response"], str) for r in rows)


# ---------------------------------------------------------------- answers: where they stop, long prompts (issue 30)


def ask(words: int) -> list[dict]:
    return [{"role": "user", "content": " ".join(["two plus three"] * words)}]


def test_evaluation_answers_stop_at_the_templates_end_of_turn_where_eos_differs(tmp_path):
    from textune.generate import load_causal_lm

    folder, word = build_base_chat_lm(tmp_path / "base")
    model, tokenizer = load_causal_lm(folder)
    assert generate_answers(model, tokenizer, [ask(1), ask(2)], max_new_tokens=6) == [tokenizer.decode([word]).strip()] * 2


def test_prompts_the_loss_drops_are_not_answered_and_answers_stay_within_the_positions(chat_lm):
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(chat_lm)
    model = AutoModelForCausalLM.from_pretrained(chat_lm).eval()  # 256 positions
    prompts = [ask(n) for n in (1, 8, 12, 13, 60)]
    lengths = [len(ids) for ids in prompt_ids(tokenizer, prompts)]
    assert lengths == sorted(lengths) and lengths[2] < 64 <= lengths[3] and 250 < lengths[4] < 256
    # The loss and the answers skip the same conversations at model.max_length 64.
    _, counts = tokenize_conversations([p + [{"role": "assistant", "content": "five"}] for p in prompts], tokenizer,
                                       64, "assistant")
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=4, max_length=64)
    assert [a is None for a in answers] == [False, False, False, True, True] and counts["dropped"] == 2
    # A window above the model's positions: the longest prompt is answered within them (GPT-2's learned
    # positions raise an index error past 256), its answer cut to the room left.
    widths, generate = [], model.generate
    model.generate = lambda **kwargs: widths.append(generate(**kwargs).shape[1]) or generate(**kwargs)
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=20, max_length=1024, batch_size=2)
    assert all(isinstance(a, str) for a in answers) and len(widths) == 3
    assert widths[-1] == 256 and max(widths) <= 256  # the last batch ran out of positions, not of new tokens
    assert generate_answers(model, tokenizer, [ask(100)], max_new_tokens=4, max_length=1024) == [None]


def test_predict_max_new_tokens_and_long_prompts_through_the_cli(tmp_path):
    from textune.cli import main

    run = tmp_path / "run"
    _, word = build_base_chat_lm(run / "model", ends=False)  # every answer runs to its token limit
    (run / "config.yaml").write_text("task: instruction\nmodel:\n  max_length: 64\neval:\n  max_new_tokens: 2\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + "two plus three " * 40 + "\n")
    for extra, n in (([], 2), (["--max-new-tokens", "5"], 5)):
        assert main(["predict", str(run), "--input", str(prompts), "--output", str(tmp_path / "out.jsonl"), *extra]) == 0
        short, long = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert short == {"prompt": "hello", "response": ("five " * n).strip()}
        assert long["response"] is None and "fills the 64 tokens this model answers from" in long["skipped"]
    assert main(["predict", str(run), "--input", str(prompts), "--max-new-tokens", "0"]) == 2
    with pytest.raises(TextuneError, match="--max-new-tokens must be at least 1, got 0"):
        InstructionPredictor(run).predict([ask(1)], max_new_tokens=0)


# ---------------------------------------------------------------- bad files: encoding, JSON line numbers (issue 30)


def test_a_utf16_instruction_file_is_named_utf16_with_the_fix(tmp_path):
    text = "".join(json.dumps(r) + "\n" for r in ROWS[:3])
    for name, encoding in (("bom.jsonl", "utf-16"), ("no-bom.jsonl", "utf-16-le"), ("rows.csv", "utf-16")):
        path = tmp_path / name
        path.write_text(text if name.endswith("jsonl") else "instruction,output\nhello,yes\n", encoding=encoding)
        with pytest.raises(TextuneError, match=rf"data.train file .*{name} is UTF-16 text, not UTF-8; save it as UTF-8"):
            read_conversations(str(path), DataConfig(), "data.train")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n", encoding="utf-16-le")
    from textune.data import read_text_lines

    with pytest.raises(TextuneError, match="input file .*prompts.txt is UTF-16 text, not UTF-8; save it as UTF-8"):
        read_text_lines(prompts, "input file")


@pytest.mark.parametrize("name, text, message", [
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n',
     r"line 3, column 32: Expecting value \(JSON Lines hold one JSON object per line\)"),
    ("list.jsonl", '{"instruction": "a", "output": "b"}\n["c", "d"]\n', "line 2 is a list, not a JSON object"),
    ("broken.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n',
     "line 3, column 23: Expecting ',' delimiter"),
])
def test_json_errors_count_lines_from_one_as_editors_do(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TextuneError, match=rf"could not read data.train file .*{name} as JSON: {message}"):
        read_conversations(str(path), DataConfig(), "data.train")


# ---------------------------------------------------------------- a merged run (issue 30)


def test_a_merged_lora_run_keeps_its_system_prompt_and_says_text_generation(llama, tmp_path, capsys):
    from textune.cli import main
    from textune.tasks.language_modeling import load_causal_predictor

    system = "you are a helpful assistant"
    run = tmp_path / "run"
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    overrides = instruction_overrides(llama, data, data, run, **{"tuning.method": "lora", "tuning.r": 4,
                                                                 "train.max_steps": 2, "data.system_prompt": system})
    assert main(["train", str(write_config(tmp_path / "c.yaml", overrides))]) == 0
    capsys.readouterr()
    assert main(["merge", str(run)]) == 0
    assert "transformers.pipeline('text-generation'" in capsys.readouterr().out  # not the task's fill-mask
    question = [{"role": "user", "content": "what is two plus three"}]
    replies = []
    for folder in (run, run / "merged"):
        predictor = load_causal_predictor(folder)
        assert predictor.system_prompt == system
        replies.append(predictor.chat(question, max_new_tokens=6, temperature=0))
    assert replies[0].text == replies[1].text and replies[0].prompt_tokens == replies[1].prompt_tokens
