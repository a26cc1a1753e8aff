"""Chat on a tiny random Llama with a ChatML template (conftest.build_tiny_chat_lm): the conversation API of
generate.py, `textune chat` and `generate --chat`, and `/v1/chat/completions` called with OpenAI's own client
against a server in a background thread."""

import os
import shutil
import subprocess
import sys
import threading

import httpx
import pytest
import torch

from conftest import build_tiny_chat_lm, serve_in_thread
from openapi_check import assert_matches_schema
from textune.cli import main
from textune.errors import TextuneError
from textune.generate import (ChatSession, ConversationTooLong, StopStringFilter, chat_completion, chat_prompt_ids,
                              check_messages, generate_text, load_causal_lm)

TOKEN = "chat-test-token"
QUESTION = [{"role": "user", "content": "what is two plus three"}]
SERVER_LIMITS = {"max_new_tokens": 16, "max_texts": 4, "max_chars": 1000}


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    return build_tiny_chat_lm(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def no_template_dir(chat_dir, tmp_path_factory):
    """The same model without its chat template (as a base model is)."""
    folder = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(chat_dir, folder)
    (folder / "chat_template.jinja").unlink()
    return folder


@pytest.fixture(scope="session")
def lm(chat_dir):
    return load_causal_lm(chat_dir)


# ---------------------------------------------------------------- conversations and stop strings


@pytest.mark.parametrize("messages, message", [
    ([], "messages is empty"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\]\.role is 'tool', expected one of system, user, assistant"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     r"messages\[1\] is a system message; only the first message may be one"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "the last message is from the assistant; end with a user message"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content is int, expected a string"),
    (["hello"], r"messages\[0\] is a str, expected an object with role and content"),
])
def test_malformed_conversations_are_refused_naming_the_problem(messages, message):
    with pytest.raises(TextuneError, match=message):
        check_messages(messages)


def test_a_valid_conversation_keeps_role_and_content_only():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "ada"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    assert check_messages(messages) == [{k: m[k] for k in ("role", "content")} for m in messages]


@pytest.mark.parametrize("pieces, stops, want", [
    (["hello ", "world"], [], ["hello ", "world"]),
    (["hello ", "wor", "ld"], ["world"], ["hello "]),  # split over pieces: held back, then dropped
    (["ab", "c", "d"], ["cx"], ["ab", "cd"]),  # held back while it might begin a stop string, then released
    (["one\n", "\ntwo"], ["\n\n", "two"], ["one"]),  # the earliest stop string wins
    (["xa", "b"], ["ab", "b"], ["x"]),  # overlapping stop strings: cut at the first position
    (["abc"], ["c"], ["ab"]),
    (["ab"], ["bz"], ["a", "b"]),  # the stream ended: what was held back is released
])
def test_stop_string_filter_streams_the_text_cut_before_the_first_stop(pieces, stops, want):
    got = []
    out = StopStringFilter(stops, got.append)
    for piece in pieces:
        out.feed(piece)
    out.finish()
    assert got == want


def test_chat_completion_greedy_counts_tokens_and_streams_the_same_text(lm):
    model, tokenizer = lm
    reply = chat_completion(model, tokenizer, QUESTION, max_new_tokens=12)
    assert reply == chat_completion(model, tokenizer, QUESTION, max_new_tokens=12)  # greedy: deterministic
    assert reply.prompt_tokens == chat_prompt_ids(tokenizer, QUESTION).shape[1]
    assert (reply.finish_reason, reply.completion_tokens) == ("length", 12)  # a random model never says eos
    pieces = []
    assert chat_completion(model, tokenizer, QUESTION, max_new_tokens=12, on_text=pieces.append) == reply
    assert len(pieces) > 1 and "".join(pieces) == reply.text
    cancel = threading.Event()
    cancel.set()  # as a streaming client that went away: generation stops at the next token
    assert chat_completion(model, tokenizer, QUESTION, max_new_tokens=12, cancel=cancel).completion_tokens == 1


def test_chat_completion_ends_at_a_stop_string_or_the_end_of_sequence_token(lm):
    model, tokenizer = lm
    text = chat_completion(model, tokenizer, QUESTION, max_new_tokens=12).text
    stop = text[4:7]
    pieces = []
    reply = chat_completion(model, tokenizer, QUESTION, max_new_tokens=12, stop=["never", stop], on_text=pieces.append)
    assert reply.text == text[:text.index(stop)] == "".join(pieces)
    assert reply.finish_reason == "stop" and reply.completion_tokens < 12  # generation stopped there too
    with torch.no_grad():
        first = model(chat_prompt_ids(tokenizer, QUESTION)).logits[0, -1].argmax().item()
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first
    try:  # make the model's first greedy token its end of sequence
        reply = chat_completion(model, tokenizer, QUESTION, max_new_tokens=12)
    finally:
        model.generation_config.eos_token_id = eos
    assert (reply.finish_reason, reply.completion_tokens) == ("stop", 1)


def test_sampling_is_reproducible_with_a_seed(lm):
    model, tokenizer = lm
    draw = lambda seed: chat_completion(model, tokenizer, QUESTION, max_new_tokens=10, temperature=1.0, seed=seed)
    assert draw(1) == draw(1)
    assert draw(1).text != draw(2).text or draw(1).text != draw(3).text


def test_a_conversation_longer_than_the_context_is_refused_and_answers_are_capped_by_it(lm):
    model, tokenizer = lm
    with pytest.raises(ConversationTooLong, match=r"the conversation is \d+ tokens once formatted, and .* reads at "
                                                  r"most 256 \(its answer included\)"):
        chat_completion(model, tokenizer, [{"role": "user", "content": "~" * 300}])
    prompt = [{"role": "user", "content": "~" * 240}]
    room = 256 - chat_prompt_ids(tokenizer, prompt).shape[1]
    reply = chat_completion(model, tokenizer, prompt, max_new_tokens=200)
    assert (reply.completion_tokens, reply.finish_reason) == (room, "length")


@pytest.mark.parametrize("settings, message", [
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0"),
    ({"temperature": -1}, r"--temperature must be 0 \(greedy decoding\) or more, got -1"),
    ({"top_p": 0}, r"--top-p must be in \(0, 1\], got 0"),
    ({"stop": [""]}, "stop strings must be non-empty strings"),
])
def test_chat_completion_refuses_bad_settings(lm, settings, message):
    with pytest.raises(TextuneError, match=message):
        chat_completion(*lm, QUESTION, **settings)


def test_a_tokenizer_without_a_chat_template_is_one_clear_error(no_template_dir):
    model, tokenizer = load_causal_lm(no_template_dir)
    with pytest.raises(TextuneError, match="has no chat template, so it cannot format a conversation; train it with "
                                           "model.chat_template set, or use a model whose tokenizer has one"):
        chat_completion(model, tokenizer, QUESTION)
    with pytest.raises(TextuneError, match="has no chat template"):
        ChatSession(model, tokenizer)


def test_a_chat_session_keeps_the_history_and_resets_it(lm):
    session = ChatSession(*lm, max_new_tokens=6)
    first = session.send("what is two plus three")
    second = session.send("yes")
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first.text
    assert second.prompt_tokens > first.prompt_tokens + first.completion_tokens - 1  # the history was sent
    session.reset("you are a helpful assistant")
    assert session.history == [] and session.send("what is two plus three").prompt_tokens > first.prompt_tokens


# ---------------------------------------------------------------- the command line


def chat_script_answers(lm) -> list[str]:
    """What `textune chat --max-new-tokens 6` answers to SCRIPT, computed in this process."""
    session = ChatSession(*lm, max_new_tokens=6)
    answers = [session.send("what is two plus three").text, session.send("yes").text]
    session.reset()
    answers.append(session.send("yes").text)
    session.reset("you are a helpful assistant")
    answers.append(session.send("yes").text)
    return answers


SCRIPT = "what is two plus three\nyes\n/reset\nyes\n\n/system you are a helpful assistant\n/help\n/nope\nyes\n"


def test_cli_chat_streams_answers_keeps_history_and_leaves_at_eof(chat_dir, lm):
    proc = subprocess.run([sys.executable, "-m", "textune", "chat", str(chat_dir), "--max-new-tokens", "6"],
                          input=SCRIPT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    answers = chat_script_answers(lm)
    assert proc.stdout == "".join(a + "\n" for a in answers)  # each answer, then a line break
    # With history, "yes" is answered differently from "yes" alone: the conversation was kept, then cleared.
    assert answers[1] != answers[2]
    for note in ("(conversation cleared)", "(system prompt set; conversation cleared)", "/system TEXT",
                 "unknown command /nope; /help lists them", "(cut at 6 tokens: --max-new-tokens)"):
        assert note in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["chat", "{plain}"], "has no chat template, so it cannot format a conversation"),
    (["chat", "{missing}"], "model folder not found"),
    (["chat", "{chat}", "--temperature", "-1"], "--temperature must be 0 (greedy decoding) or more"),
    (["generate", "{plain}", "--chat", "hello"], "has no chat template"),
    (["generate", "{chat}", "a film", "--chat", "hello"], "--chat TEXT is the prompt, so generate takes only [MODEL]"),
    (["generate"], "generate needs a PROMPT (or --chat TEXT)"),
])
def test_cli_chat_mistakes_are_one_line_and_exit_2(argv, message, chat_dir, no_template_dir, tmp_path, capsys):
    paths = {"chat": chat_dir, "plain": no_template_dir, "missing": tmp_path / "nope"}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("textune: error: ") and message in err, err


def test_cli_generate_chat_text_prints_the_answer(chat_dir, lm, capsys):
    (want,) = generate_text(*lm, "hello", max_new_tokens=5, chat=True)
    assert main(["generate", str(chat_dir), "--chat", "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", str(chat_dir), "hello", "--chat", "--max-new-tokens", "5"]) == 0  # the older form
    assert capsys.readouterr().out == want + "\n"


# ---------------------------------------------------------------- /v1/chat/completions with OpenAI's client


@pytest.fixture(scope="module")
def server(chat_dir):
    """Base URL of the tiny chat model served (token required) by uvicorn in a background thread."""
    from textune.serving import ServeSettings, create_app
    from textune.tasks.language_modeling import LanguageModelPredictor

    app = create_app(LanguageModelPredictor(chat_dir), ServeSettings(token=TOKEN, **SERVER_LIMITS), "tiny-chat")
    yield from serve_in_thread(app)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0, timeout=60)


def test_openai_client_gets_a_chat_completion(client, lm):
    want = chat_completion(*lm, QUESTION, max_new_tokens=8)
    # Fields this server ignores, as OpenAI clients send them, are accepted.
    r = client.chat.completions.create(model="anything", messages=QUESTION, max_tokens=8, temperature=0,
                                       frequency_penalty=0.5, user="ada", logprobs=False)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny-chat"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 8)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = client.chat.completions.create(model="m", messages=QUESTION, max_completion_tokens=8, temperature=0,
                                       stop=want.text[2:5])
    assert r.choices[0].message.content == want.text[:want.text.index(want.text[2:5])]
    assert r.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, seed=5).choices[0]
               .message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_openai_client_streams_the_same_answer_in_chunks(client, lm):
    want = chat_completion(*lm, QUESTION, max_new_tokens=12)
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # in pieces, not at once
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_openai_client_lists_the_served_model(client, server):
    (model,) = client.models.list().data
    assert model.id == "tiny-chat" and model.owned_by == "textune"
    body = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert body["task"] == "language-modeling" and body["base"] == "tiny-chat"  # textune's own keys stay


@pytest.mark.parametrize("request_, param, message", [
    ({"messages": []}, "messages", "messages is empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "messages[0].role is 'tool', expected one of"),
    ({"messages": QUESTION + [{"role": "assistant", "content": "5"}]}, "messages",
     "the last message is from the assistant; end with a user message"),
    ({"max_tokens": 17}, "max_tokens", "max_tokens 17 is over the server's limit of 16 (--max-new-tokens)"),
    ({"n": 2}, "n", "n is 2: one answer per request is supported"),
    ({"messages": QUESTION * 5}, "messages", "got 5 messages, at most 4 per request"),
    ({"messages": [{"role": "user", "content": "x" * 1001}]}, "messages",
     "messages[0].content has 1001 characters, at most 1000"),
    ({"messages": [{"role": "user", "content": "~" * 600}]}, "messages", "the conversation is"),
    ({"messages": [{"role": "user", "content": "~" * 600}], "stream": True}, "messages", "reads at most 256"),
    ({"temperature": 3}, "temperature", "temperature: Input should be less than or equal to 2"),
])
def test_bad_chat_requests_raise_bad_request_with_our_message(client, request_, param, message):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": "m", "messages": QUESTION, "max_tokens": 4, **request_})
    assert message in caught.value.body["message"]
    assert caught.value.param == param and caught.value.type == "invalid_request_error"
    if "600" in str(request_):
        assert caught.value.code == "context_length_exceeded"


def test_chat_errors_take_openais_shape_for_any_client(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "m"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "messages: Field required", "type": "invalid_request_error",
                                  "param": "messages", "code": None}}


def test_a_wrong_key_raises_authentication_error(server):
    import openai

    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
    assert "bearer token" in caught.value.body["message"] and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_answers_and_errors_are_what_the_openapi_schema_promises(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        for body in ({"messages": QUESTION, "max_tokens": 4, "temperature": 0}, {"model": "m"},
                     {"messages": QUESTION, "max_tokens": 17}):
            assert_matches_schema(c, "POST", "/v1/chat/completions", c.post("/v1/chat/completions", json=body))
        assert_matches_schema(c, "POST", "/v1/classify", c.post("/v1/classify", json={"texts": ["a"]}))  # 404
        assert_matches_schema(c, "GET", "/v1/models", c.get("/v1/models"))


# ---------------------------------------------------------------- an instruction run: its system prompt

SYSTEM = "you are a terse assistant"


@pytest.fixture(scope="module")
def instruction_run(chat_dir, tmp_path_factory):
    """A run folder of an instruction run trained with a system prompt, as training leaves it: the model in
    RUN/model, the config naming the task and data.system_prompt (the tiny chat model stands in for the tuned one)."""
    import yaml

    run = tmp_path_factory.mktemp("runs") / "sft-run"
    shutil.copytree(chat_dir, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "instruction", "data": {"system_prompt": SYSTEM}}))
    return run


def test_an_instruction_run_is_served_with_its_system_prompt(instruction_run, lm):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app
    from textune.serving.server import load_served

    predictor, _, name = load_served(str(instruction_run), ServeSettings())
    assert (predictor.task, predictor.system_prompt, name) == ("instruction", SYSTEM, "sft-run")
    with_system = [{"role": "system", "content": SYSTEM}] + QUESTION
    want = chat_completion(*lm, with_system, max_new_tokens=8)
    with TestClient(create_app(predictor, ServeSettings(**SERVER_LIMITS), name)) as c:
        ask = lambda messages: c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                                    "temperature": 0}).json()
        without, given = ask(QUESTION), ask(with_system)
        # No system message: the run's own comes first, so the answer is the one the model learned to give.
        assert without["choices"] == given["choices"] and without["usage"] == given["usage"]
        assert without["choices"][0]["message"]["content"] == want.text
        assert without["usage"]["prompt_tokens"] == want.prompt_tokens > chat_prompt_ids(lm[1], QUESTION).shape[1]
        own = [{"role": "system", "content": "answer in French"}] + QUESTION  # a request's own system message wins
        assert ask(own)["usage"]["prompt_tokens"] == chat_prompt_ids(lm[1], own).shape[1]
        r = c.post("/v1/generate", json={"prompt": "what is two plus three", "chat": True, "max_new_tokens": 5})
        assert r.json()["texts"] == generate_text(*lm, "what is two plus three", max_new_tokens=5, chat=True,
                                                  system=SYSTEM)
        assert c.get("/v1/models").json()["task"] == "instruction"


def test_cli_chat_and_generate_use_an_instruction_runs_system_prompt(instruction_run, lm, monkeypatch, capsys):
    import io

    session = ChatSession(*lm, system=SYSTEM, max_new_tokens=6)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is two plus three\n"))
    assert main(["chat", str(instruction_run), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == session.send("what is two plus three").text + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("what is two plus three\n"))
    assert main(["chat", str(instruction_run), "--max-new-tokens", "6", "--system", "answer in French"]) == 0
    (other,) = [ChatSession(*lm, system="answer in French", max_new_tokens=6).send("what is two plus three").text]
    assert capsys.readouterr().out == other + "\n"
    (want,) = generate_text(*lm, "hello", max_new_tokens=5, chat=True, system=SYSTEM)
    assert main(["generate", str(instruction_run), "--chat", "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == want + "\n"
