"""Extractive question answering: reading and answer checks, windows with stride, span post-processing,
SQuAD metrics, unanswerable questions, the transformers round trip, bad input, and train -> evaluate ->
predict -> serve on a tiny random BERT."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, needs_shared, write_jsonl
from textune.config import load_config
from textune.errors import ConfigError, TextuneError
from textune.tasks import get_task, task_of
from textune.tasks.question_answering import (Questions, answer_question, answer_token_span, best_null_threshold,
                                              best_spans, checked_answers, f1_score, normalize_answer, read_questions,
                                              squad_metrics, tokenize_windows)


def toy_question(rng: random.Random, n_words: int = 8, answerable: bool = True) -> dict:
    """Filler words and one sentiment word; the question "is it" asks for the sentiment word. Unanswerable:
    no sentiment word at all."""
    words = [rng.choice(FILLER) for _ in range(n_words)]
    if answerable:
        at = rng.randint(0, len(words))
        words.insert(at, rng.choice(POSITIVE + NEGATIVE))
        answer = words[at]
        start = len(" ".join(words[:at])) + (1 if at else 0)
        answers = {"text": [answer], "answer_start": [start]}
    else:
        answers = {"text": [], "answer_start": []}
    return {"id": f"q{rng.random():.8f}", "context": " ".join(words), "question": "is it", "answers": answers}


def toy_rows(n: int, seed: int, n_words: int = 8, unanswerable: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    return [toy_question(rng, n_words, rng.random() >= unanswerable) for _ in range(n)]


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qa-data")
    return {"train": write_jsonl(d / "train.jsonl", toy_rows(200, seed=1)),
            "validation": write_jsonl(d / "validation.jsonl", toy_rows(40, seed=2, n_words=30))}


def qa_overrides(tiny_model: Path, data: dict, out: Path, **extra) -> dict:
    return {"task": "question-answering", "model.name": str(tiny_model), "model.max_length": 32,
            "data.doc_stride": 8, "data.train": str(data["train"]), "data.validation": str(data["validation"]),
            "train.epochs": 6, "train.batch_size": 16, "train.lr": 5e-3, "train.warmup_ratio": 0.1,
            "train.logging_steps": 5, "train.mixed_precision": "no", "output_dir": str(out), **extra}


@pytest.fixture(scope="module")
def qa_run(tiny_model, qa_data, tmp_path_factory) -> Path:
    from textune.train import train

    return train(load_config(None, qa_overrides(tiny_model, qa_data, tmp_path_factory.mktemp("runs") / "qa")))


class Columns:  # the data.* settings read_questions reads
    context_column, question_column, answers_column = "context", "question", "answers"
    fix_answer_starts = False
    allow_unanswerable = False


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("offsets, start, end, expected", [
    ([None, None, (0, 3), (4, 8), (9, 12), None], 4, 8, (3, 3)),  # one token
    ([None, None, (0, 3), (4, 8), (9, 12), None], 0, 12, (2, 4)),  # the whole context
    ([None, None, (0, 3), (4, 8), (9, 12), None], 5, 7, (3, 3)),  # inside a token: that token
    ([None, None, (20, 23), (24, 28), None], 4, 8, (0, 0)),  # answer before this window: CLS
    ([None, None, (0, 3), (4, 8), None], 4, 12, (0, 0)),  # answer runs past the window's end: CLS
    ([None, None, (0, 3), (4, 8), None], None, None, (0, 0)),  # no answer
])
def test_answer_token_span(offsets, start, end, expected):
    assert answer_token_span(offsets, start, end, cls_index=0) == expected


def test_windows_with_stride_hold_the_answer_exactly_where_it_is(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = toy_rows(30, seed=5, n_words=60)
    qs = Questions()
    for r in rows:
        qs.ids.append(r["id"]), qs.questions.append(r["question"]), qs.contexts.append(r["context"])
        qs.answers.append([(r["answers"]["text"][0], r["answers"]["answer_start"][0])]), qs.where.append("t")
    windows = tokenize_windows(qs, tokenizer, max_length=32, stride=8)
    assert len(windows.example) == 3 * len(rows)  # 61 context tokens in windows of 27: three each
    for w in range(len(windows.example) - 1):  # consecutive windows of a question share doc_stride tokens
        if windows.example[w] == windows.example[w + 1]:
            this, following = ([o for o in windows.offsets[v] if o is not None] for v in (w, w + 1))
            assert this[-8:] == following[:8]
    for w, i in enumerate(windows.example):
        row = windows.dataset[w]
        assert len(row["input_ids"]) <= 32
        text, start = qs.answers[i][0]
        context_chars = [o for o in windows.offsets[w] if o is not None]
        holds = context_chars[0][0] <= start and context_chars[-1][1] >= start + len(text)
        s, e = row["start_positions"], row["end_positions"]
        if holds:  # the positions decode back to the answer, by characters and by tokens
            assert (s, e) != (0, 0)
            assert qs.contexts[i][windows.offsets[w][s][0]:windows.offsets[w][e][1]] == text
            assert tokenizer.decode(row["input_ids"][s:e + 1]) == text
        else:
            assert (s, e) == (0, 0) and windows.cls[w] == 0
    # every question's answer is in at least one window
    assert {i for w, i in enumerate(windows.example) if windows.dataset[w]["start_positions"]} == set(range(30))


OFFSETS = [None, None, None, (0, 4), (5, 9), (10, 14), (15, 19), None]  # [CLS] q q | 4 context tokens | [SEP]


@pytest.mark.parametrize("start, end, max_len, expected", [
    ([0, 9, 9, 1, 0, 5, 0, 0], [0, 9, 9, 0, 0, 6, 0, 0], 30, (10, 14)),  # best logits in the question: skipped
    ([0, 0, 0, 1, 0, 5, 0, 0], [0, 0, 0, 0, 6, 0, 0, 0], 30, (0, 9)),  # end before the best start: next best
    ([0, 0, 0, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 6, 9], 4, (0, 19)),  # end on [SEP] skipped; 4 tokens allowed
    ([0, 0, 0, 5, 0, 0, 0, 0], [0, 0, 0, 2, 0, 0, 6, 0], 2, (0, 4)),  # 4 tokens too long: a shorter one
])
def test_best_span_stays_inside_the_context(start, end, max_len, expected):
    spans = best_spans(np.array(start, float), np.array(end, float), OFFSETS, max_len)
    assert all(OFFSETS[3][0] <= s < e <= OFFSETS[6][1] for _, s, e in spans)
    assert max(spans)[1:] == expected


def test_best_answer_across_windows_and_top_k():
    context = "abcd efgh ijkl mnop qrst"
    w1 = (np.array([0, 0, 0, 2, 1, 0, 0, 0.]), np.array([0, 0, 0, 2, 0, 0, 0, 0.]), OFFSETS, 0)
    later = [None, None, None, (10, 14), (15, 19), (20, 24), None, None]
    w2 = (np.array([-5, -5, -5, -5, -5, 7, -5, -5.]), np.array([-5, -5, -5, -5, -5, 6, -5, -5.]), later, 0)
    answers, diff = answer_question([w1, w2], context, max_answer_length=30, top_k=3)
    assert [a["answer"] for a in answers][:2] == ["qrst", "abcd"]
    # null score: the lowest [CLS] start + end over the windows (-10), against the best span (13)
    assert answers[0]["start"] == 20 and answers[0]["end"] == 24 and diff == pytest.approx(-10 - 13)
    assert answers[0]["score"] > answers[1]["score"] > 0
    assert all(context[a["start"]:a["end"]] == a["answer"] for a in answers)


@pytest.mark.parametrize("threshold, expected", [(None, "qrst"), (20.0, "qrst"), (-20.0, "")])
def test_null_answer_against_the_threshold(threshold, expected):
    later = [None, None, None, (10, 14), (15, 19), (20, 24), None, None]
    w = (np.array([3, 0, 0, 0, 0, 7, 0, 0.]), np.array([3, 0, 0, 0, 0, 6, 0, 0.]), later, 0)
    answers, diff = answer_question([w], "abcd efgh ijkl mnop qrst", 30, null_threshold=threshold)
    assert answers[0]["answer"] == expected and diff == pytest.approx(6 - 13)


def test_best_null_threshold_maximises_f1():
    # two unanswerable questions with high null differences, two answerable ones answered right with low ones
    diffs, span_f1, has_answer = [5.0, 4.0, -3.0, 1.0], [0.0, 0.0, 1.0, 1.0], [False, False, True, True]
    t = best_null_threshold(diffs, span_f1, has_answer)
    assert 1.0 <= t < 4.0
    assert best_null_threshold([-1.0, -2.0], [1.0, 1.0], [True, True]) == float("inf")


@pytest.mark.parametrize("text, normalised", [
    ("The  Eiffel Tower!", "eiffel tower"), ("an apple, a pear", "apple pear"), ("  A.B.C  ", "abc"),
    ("Theory", "theory"),  # 'the' inside a word stays
])
def test_official_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_take_the_best_reference():
    assert f1_score("the Eiffel tower", "Eiffel Tower in Paris") == pytest.approx(2 * 1 * 0.5 / 1.5)
    m = squad_metrics(["Paris", "in 1856", "", "x"], [["London", "paris"], ["1856"], [], ["y"]])
    assert m["exact_match"] == pytest.approx(2 / 4)  # paris; "" for an unanswerable question
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)


# ---------------------------------------------------------------- reading


def test_squad_v2_json_and_flat_tables_read_alike(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Ada wrote it in 1843.", "qas": [
        {"id": "1", "question": " Who wrote it?", "answers": [{"text": "Ada", "answer_start": 0}]},
        {"id": "2", "question": "Where?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "1843", "answer_start": 16}]}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    Columns.allow_unanswerable = True
    try:
        qs = read_questions(str(tmp_path / "s.json"), "data.train", Columns)
        assert qs.questions == ["Who wrote it?", "Where?"] and qs.answers == [[("Ada", 0)], []]
        rows = [{"context": "Ada wrote it in 1843.", "question": "When?",
                 "answers": {"text": ["1843"], "answer_start": [16]}}]
        write_jsonl(tmp_path / "f.jsonl", rows)
        (tmp_path / "f.csv").write_text('context,question,answers\n"Ada wrote it in 1843.",When?,'
                                        '"{""text"": [""1843""], ""answer_start"": [16]}"\n')
        for name in ("f.jsonl", "f.csv"):
            assert read_questions(str(tmp_path / name), "data.train", Columns).answers == [[("1843", 16)]]
    finally:
        Columns.allow_unanswerable = False


def test_answer_starts_checked_and_fixed():
    with pytest.raises(TextuneError, match=r"f row 3: the answer 'Ada' is not at answer_start 2 .*it occurs at 0.*"
                                           r"data.fix_answer_starts: true"):
        checked_answers("Ada and Ada", ["Ada"], [2], "f row 3", "data.train", fix=False)
    assert checked_answers("Ada and Ada", ["Ada"], [6], "f row 3", "data.train", fix=True) == ([("Ada", 8)], 1)
    with pytest.raises(TextuneError, match="'Bob' does not occur in its context"):
        checked_answers("Ada and Ada", ["Bob"], [0], "f row 3", "data.train", fix=True)


# ---------------------------------------------------------------- bad input


def bad_files(tmp_path: Path) -> dict[str, Path]:
    ok = toy_rows(1, seed=9)[0]
    files = {"no_context": write_jsonl(tmp_path / "nc.jsonl", [ok, {**ok, "context": ""}]),
             "outside": write_jsonl(tmp_path / "out.jsonl", [{**ok, "answers": {"text": ["zzz"], "answer_start": [0]}}]),
             "not_squad": tmp_path / "ns.json", "classification": tmp_path / "cls.csv",
             "unanswerable": write_jsonl(tmp_path / "un.jsonl", toy_rows(3, seed=3, unanswerable=1.0))}
    files["not_squad"].write_text(json.dumps({"version": "1", "articles": []}))
    files["classification"].write_text("text,label\na film,positive\n")
    return files


@pytest.mark.parametrize("which, message", [
    ("no_context", r"nc.jsonl row 2: the question has no context"),
    ("outside", r"out.jsonl row 1: the answer 'zzz' does not occur in its context"),
    ("not_squad", r"ns.json is not SQuAD-shaped: expected .*got an object with keys \['articles', 'version'\]"),
    ("classification", r"cls.csv has no column 'context' \(data.context_column\).*is for task: classification"),
    ("unanswerable", r"un.jsonl row 1: the question has no answer; .*data.allow_unanswerable: true"),
])
def test_bad_qa_files_fail_before_anything_is_written(which, message, tmp_path, tiny_model, qa_data):
    out = tmp_path / "run"
    cfg = load_config(None, qa_overrides(tiny_model, qa_data, out, **{"data.train": str(bad_files(tmp_path)[which])}))
    with pytest.raises(TextuneError, match=message):
        get_task(cfg.task).load_inputs(cfg)
    assert not out.exists()


def test_doc_stride_must_leave_room(tiny_model, qa_data, tmp_path):
    with pytest.raises(ConfigError, match=r"data.doc_stride: must be greater than 0 and below model.max_length \(32\)"):
        load_config(None, qa_overrides(tiny_model, qa_data, tmp_path / "r", **{"data.doc_stride": 32}))
    long_question = write_jsonl(tmp_path / "lq.jsonl", [{**toy_rows(1, seed=1)[0], "question": "is it " * 12}])
    cfg = load_config(None, qa_overrides(tiny_model, qa_data, tmp_path / "r", **{"data.train": str(long_question),
                                                                                  "data.doc_stride": 8}))
    with pytest.raises(TextuneError, match=r"lq.jsonl row 1: the question is 24 tokens, which with data.doc_stride 8"):
        get_task(cfg.task).load_inputs(cfg)


def test_cli_bad_input_is_one_line_and_exit_2(tiny_model, qa_data, tmp_path):
    cfg = tmp_path / "qa.yaml"
    cfg.write_text(json.dumps({"task": "question-answering", "output_dir": str(tmp_path / "run"),
                               "model": {"name": str(tiny_model), "max_length": 32},
                               "data": {"train": str(bad_files(tmp_path)["outside"]),
                                        "validation": str(qa_data["validation"]), "doc_stride": 8}}))
    proc = subprocess.run([sys.executable, "-m", "textune", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "does not occur in its context" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a trained run


def test_training_runs_and_writes_squad_metrics(qa_run):
    metrics = json.loads((qa_run / "metrics.json").read_text())
    assert metrics["metric"] == "f1" and {"f1", "exact_match", "loss"} <= set(metrics["validation"])
    assert metrics["validation"]["f1"] > 0.5  # the toy task is learnable; windows of 32 over 31-word contexts
    assert task_of(qa_run) == "question-answering"
    rows = [json.loads(line) for line in (qa_run / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(r["context"][r["pred_start"]:r["pred_start"] + len(r["pred"])] == r["pred"]
                                   for r in rows)
    history = [json.loads(line) for line in (qa_run / "history.jsonl").read_text().splitlines()]
    assert all("eval_f1" in r and "eval_exact_match" in r for r in history if r["type"] == "eval")


def test_predict_offsets_top_k_and_bad_requests(qa_run):
    predictor = get_task("question-answering").load_predictor(qa_run)
    contexts = ["the movie was very good", "it " * 40 + "awful plot", "the film"]
    rows = predictor.predict(["is it"] * 3, contexts, top_k=3)
    for context, row in zip(contexts, rows):
        assert context[row["start"]:row["end"]] == row["answer"] and 0 <= row["score"] <= 1
        assert len(row["answers"]) <= 3 and row["answers"][0]["answer"] == row["answer"]
    assert rows[1]["answer"] == "awful"  # found in a later window
    with pytest.raises(TextuneError, match=r"question 2 \('is it'\) has no context"):
        predictor.predict(["is it", "is it"], ["good film", " "])
    with pytest.raises(TextuneError, match="got 1 questions but no contexts"):
        predictor.predict(["is it"])


def test_the_saved_folder_loads_in_transformers(qa_run):
    """transformers 5 removed `pipeline("question-answering")` (its REMOVED_TASKS). The round trip is the
    model and tokenizer loaded by their auto classes, decoded by the v4 QA pipeline's span selection
    (`select_starts_ends`, kept in transformers for document QA)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.pipelines.document_question_answering import select_starts_ends

    model = AutoModelForQuestionAnswering.from_pretrained(qa_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(qa_run / "model")
    ours = get_task("question-answering").load_predictor(qa_run)
    for context in ["the movie was very good", "a plot and acting really awful"]:
        enc = tokenizer("is it", context, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0]
        with torch.no_grad():
            out = model(**enc)
        p_mask = np.array([[s != 1 for s in enc.sequence_ids(0)]], dtype=int)
        p_mask[0, 0] = 0
        starts, ends, _, _ = select_starts_ends(out.start_logits.numpy(), out.end_logits.numpy(), p_mask,
                                                enc["attention_mask"].numpy(), max_answer_len=30)
        theirs = context[int(offsets[starts[0]][0]):int(offsets[ends[0]][1])]
        assert ours.predict(["is it"], [context])[0]["answer"] == theirs


def test_cli_evaluate_predict_and_report(qa_run, qa_data, tmp_path):
    from textune.cli import main

    out = tmp_path / "m.json"
    assert main(["evaluate", str(qa_run), "--data", str(qa_data["validation"]), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    saved = json.loads((qa_run / "metrics.json").read_text())["validation"]
    assert metrics["f1"] == pytest.approx(saved["f1"]) and metrics["exact_match"] == pytest.approx(saved["exact_match"])
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "is it", "context": "the film was good"},
                                                   {"question": "is it", "context": "awful acting"}])
    pred = tmp_path / "p.jsonl"
    assert main(["predict", str(qa_run), "--input", str(questions), "--output", str(pred), "--top-k", "2"]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert rows[0]["question"] == "is it" and {"answer", "score", "start", "end", "answers"} <= set(rows[0])
    assert len(rows[0]["answers"]) == 2
    assert main(["report", str(qa_run)]) == 0
    page = (qa_run / "report.html").read_text()
    assert "exact match" in page and "Validation questions answered worst" in page


def test_serve_answer_and_refuse_classify(qa_run):
    from fastapi.testclient import TestClient

    from openapi_check import assert_matches_schema
    from textune.serving import ServeSettings, create_app

    predictor = get_task("question-answering").load_predictor(qa_run)
    with TestClient(create_app(predictor, ServeSettings(max_chars=200), "qa")) as client:
        r = client.post("/v1/answer", json={"questions": ["is it", "is it"],
                                            "contexts": ["the film was good", "awful acting"]})
        assert r.status_code == 200, r.text
        assert_matches_schema(client, "POST", "/v1/answer", r)
        assert client.get("/v1/models").json()["task"] == "question-answering"
        results = r.json()["results"]
        assert len(results) == 2 and {"answer", "score", "start", "end"} <= set(results[0])
        r = client.post("/v1/answer", json={"questions": ["is it"], "contexts": ["a", "b"]})
        assert r.status_code == 422 and "2 contexts" in r.json()["error"]["message"]
        # A context longer than --max-chars is read whole, in windows (issue 30): the answer is the same as the
        # predictor's; the questions keep the limit.
        long_context = " ".join(["the film was good and the acting was awful"] * 12)
        r = client.post("/v1/answer", json={"questions": ["is it"], "contexts": [long_context]})
        assert r.status_code == 200 and len(long_context) > 200, r.text
        assert r.json()["results"] == predictor.predict(["is it"], [long_context])
        r = client.post("/v1/answer", json={"questions": ["x" * 300], "contexts": ["the film"]})
        assert r.status_code == 413 and "questions[0]" in r.json()["error"]["message"]
        assert_matches_schema(client, "POST", "/v1/answer", r)
        r = client.post("/v1/answer", json={"questions": ["is it"], "contexts": [" "]})
        assert r.status_code == 400 and "has no context" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"texts": ["x"]})
        assert r.status_code == 404 and "question-answering model" in r.json()["error"]["message"]


def test_unanswerable_questions_train_and_choose_a_threshold(tiny_model, tmp_path):
    from textune.train import train

    data = {"train": write_jsonl(tmp_path / "t.jsonl", toy_rows(120, seed=1, unanswerable=0.3)),
            "validation": write_jsonl(tmp_path / "v.jsonl", toy_rows(30, seed=2, unanswerable=0.3))}
    run = train(load_config(None, qa_overrides(tiny_model, data, tmp_path / "v2", **{
        "data.allow_unanswerable": True, "train.epochs": 2})))
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    assert "null_threshold" in metrics and 0 <= metrics["f1"] <= 1
    predictor = get_task("question-answering").load_predictor(run)
    assert predictor.null_threshold == pytest.approx(metrics["null_threshold"])
    rows = predictor.predict(["is it"], ["the film was"])
    assert rows[0]["answer"] in ("", "the", "film", "was", "the film", "film was", "the film was")


def test_lora_question_answering(tiny_model, qa_data, tmp_path):
    from textune.adapters import AdapterPredictor, AdapterRegistry, merge_adapter
    from textune.train import train

    run = train(load_config(None, qa_overrides(tiny_model, qa_data, tmp_path / "lora", **{
        "tuning.method": "lora", "tuning.target_modules": ["query", "value"], "train.epochs": 1})))
    assert json.loads((run / "model" / "adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"
    direct = get_task("question-answering").load_predictor(run).predict(["is it"], ["the film was good"])
    registry = AdapterRegistry(tmp_path / "adapters")
    registry.add(run, "qa")
    via_registry = AdapterPredictor(registry.root).predict(["is it"], ["the film was good"], adapter="qa")
    assert via_registry[0]["answer"] == direct[0]["answer"]
    merged = merge_adapter(run)
    assert task_of(merged) == "question-answering"
    assert get_task("question-answering").load_predictor(merged).predict(["is it"], ["the film was good"]) == direct


# ---------------------------------------------------------------- real data, end to end through the CLI


def test_end_to_end_cli_on_squad(tiny_model, tmp_path):
    """train -> evaluate -> predict -> serve on a few dozen real SQuAD questions (mechanics, not accuracy: the
    tiny model's word-level vocabulary reads most real words as [UNK])."""
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app

    squad = needs_shared("squad")
    lines = (squad / "validation.jsonl").read_text().splitlines()
    write = lambda name, part: (tmp_path / name).write_text("\n".join(part) + "\n")
    write("train.jsonl", lines[:40])
    write("val.jsonl", lines[40:60])
    cfg = tmp_path / "qa.yaml"
    cfg.write_text(json.dumps({"task": "question-answering", "output_dir": str(tmp_path / "run"),
                               "model": {"name": str(tiny_model), "max_length": 64},
                               "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl"),
                                        "doc_stride": 16},
                               "train": {"epochs": 1, "batch_size": 16, "mixed_precision": "no"}}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "textune", *a], capture_output=True, text=True, timeout=300)
    proc = run("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BertForQuestionAnswering" in proc.stdout and "windows" in proc.stdout
    proc = run("validate-data", str(cfg))
    assert proc.returncode == 0 and "windows    train:" in proc.stdout and "question mean" in proc.stdout
    proc = run("evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "val.jsonl"))
    assert proc.returncode == 0 and "exact match" in proc.stdout, proc.stderr[-2000:]
    proc = run("predict", str(tmp_path / "run"), "--input", str(tmp_path / "val.jsonl"), "--output",
               str(tmp_path / "p.jsonl"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    contexts = [json.loads(line)["context"] for line in lines[40:60]]
    assert len(rows) == 20 and all(c[r["start"]:r["end"]] == r["answer"] for c, r in zip(contexts, rows))
    predictor = get_task("question-answering").load_predictor(tmp_path / "run")
    with TestClient(create_app(predictor, ServeSettings(), "squad")) as client:
        first = json.loads(lines[40])
        r = client.post("/v1/answer", json={"questions": [first["question"]], "contexts": [first["context"]]})
        assert r.status_code == 200 and r.json()["results"][0]["answer"] == rows[0]["answer"]


# ---------------------------------------------------------------- other tokenizers, defaults, saved forms


def test_left_padding_tokenizer_trains_and_predicts_as_right_padding(tiny_model, qa_data, tmp_path):
    from transformers import AutoTokenizer

    from test_token_classification import left_padding_copy
    from textune.tasks.question_answering import QuestionAnswererPredictor
    from textune.train import train

    left = left_padding_copy(tiny_model, tmp_path / "left-model")
    cfg = load_config(None, qa_overrides(left, qa_data, tmp_path / "unused"))
    inputs = get_task(cfg.task).load_inputs(cfg)
    # A batch of a long and a short window: each row's start and end positions still point at its answer.
    windows = inputs.windows["validation"]  # 30-word contexts: two windows each, the second shorter
    ds = windows.dataset
    answerable = [w for w in range(len(ds)) if ds[w]["start_positions"] != windows.cls[w]]
    short, long_ = min(answerable, key=lambda w: ds[w]["length"]), max(answerable, key=lambda w: ds[w]["length"])
    assert ds[short]["length"] < ds[long_]["length"]
    batch = inputs.collator("train")([ds[short], ds[long_]])
    for row, w in enumerate((short, long_)):
        answer = inputs.splits["validation"].answers[windows.example[w]][0][0]
        s, e = int(batch["start_positions"][row]), int(batch["end_positions"][row])
        assert inputs.tokenizer.decode(batch["input_ids"][row][s:e + 1]) == answer
    runs = {name: train(load_config(None, qa_overrides(model, qa_data, tmp_path / name, **{"train.epochs": 2})))
            for name, model in (("right", tiny_model), ("left", left))}
    metrics = {k: json.loads((run / "metrics.json").read_text())["validation"] for k, run in runs.items()}
    assert metrics["left"]["f1"] == metrics["right"]["f1"]
    assert metrics["left"]["loss"] == pytest.approx(metrics["right"]["loss"], rel=1e-5)
    right = get_task("question-answering").load_predictor(runs["right"])
    around = QuestionAnswererPredictor.around(right.model, AutoTokenizer.from_pretrained(left), max_length=32)
    contexts = ["the movie was very good", "it " * 40 + "awful plot", "the film"]
    assert around.predict(["is it"] * 3, contexts) == right.predict(["is it"] * 3, contexts)


def test_question_answering_trains_with_no_optional_key(tiny_model, tmp_path, monkeypatch):
    """model.max_length 128 and data.doc_stride empty (a quarter of it): the defaults work together; on the tiny
    BERT's 64 positions training reads windows of 64 tokens (train.fit_max_length), sharing 16."""
    from textune.train import train

    monkeypatch.chdir(tmp_path)
    data = {"train": write_jsonl(tmp_path / "t.jsonl", toy_rows(40, seed=1)),
            "validation": write_jsonl(tmp_path / "v.jsonl", toy_rows(10, seed=2))}
    cfg = load_config(None, {"task": "question-answering", "model.name": str(tiny_model), "data.train": str(data["train"]),
                             "data.validation": str(data["validation"])})
    assert cfg.data.doc_stride is None and cfg.model.max_length == 128
    run = train(cfg)
    assert json.loads((run / "data_stats.json").read_text())["doc_stride"] == 16
    predictor = get_task("question-answering").load_predictor(run)
    assert (predictor.max_length, predictor.doc_stride) == (64, 16)


def test_predictors_load_from_runs_and_model_folders_and_refuse_other_tasks(qa_run, trained_run):
    from textune.tasks import load_predictor
    from textune.tasks.question_answering import QuestionAnswererPredictor

    questions, contexts = ["is it", "is it"], ["the film was good", "awful acting"]
    from_run = load_predictor(qa_run).predict(questions, contexts)
    from_model = load_predictor(qa_run / "model", batch_size=1)
    assert from_model.predict(questions, contexts) == from_run
    with pytest.raises(TextuneError, match=r"holds a classification model, not a question-answering one"):
        QuestionAnswererPredictor(trained_run)
