"""data.long_text (issue 33): head_tail and chunks for the sequence tasks. Chunking keeps every token and its
offsets, pooling gives one row per document in order, metrics count documents, a document scores the same in
evaluate, predict, serve and an ONNX export, and the bad inputs are refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FILLER, NEGATIVE, POSITIVE, nested, run_textune, toy_overrides, write_jsonl, write_splits
from textune.chunking import (LongText, chunk_rows, head_tail_rows, head_tail_split, pool_documents, select_chunks,
                              special_token_ends)
from textune.config import load_config
from textune.errors import ConfigError

MAX_LENGTH = 16  # 14 words of text per window with [CLS] and [SEP]: the toy documents make 1 to 5 windows


def long_row(rng: random.Random, positive: bool) -> dict:
    """A toy document of 4 to 60 words whose one sentiment word is anywhere, often past the first window."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 60))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return {"text": " ".join(words), "label": "positive" if positive else "negative"}


def long_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [long_row(rng, rng.random() < 0.5) for _ in range(n)]


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> dict[str, Path]:
    return write_splits(tmp_path_factory.mktemp("long-data"), long_rows, train=160, validation=40, test=24)


def long_overrides(tiny_model, data, out, **extra) -> dict:
    return toy_overrides(tiny_model, data, out, **{"model.max_length": MAX_LENGTH, "train.epochs": 2, **extra})


@pytest.fixture(scope="module")
def chunks_run(tiny_model, long_data, tmp_path_factory) -> Path:
    from textune.train import train

    out = tmp_path_factory.mktemp("runs") / "chunks"
    return train(load_config(None, long_overrides(tiny_model, long_data, out, **{
        "data.long_text": "chunks", "data.chunk_stride": 4, "data.max_chunks": 4})))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from textune.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("max_length, stride", [(16, 4), (16, 0), (8, 5), (32, 10)])
def test_chunks_keep_every_token_and_their_offsets(tokenizer, max_length, stride):
    texts = [row["text"] for row in long_rows(12, seed=7)] + ["good"]
    rows = chunk_rows(tokenizer, texts, max_length, LongText("chunks", stride, 99), offsets=True)
    full = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    for doc, text in enumerate(texts):
        windows = [i for i, d in enumerate(rows["document"]) if d == doc]
        assert windows == list(range(windows[0], windows[0] + len(windows))), "a document's windows are consecutive"
        seen = []
        for n, i in enumerate(windows):
            ids, spans = rows["input_ids"][i], rows["offset_mapping"][i]
            assert len(ids) <= max_length
            content = [(t, tuple(s)) for t, s in zip(ids[1:-1], spans[1:-1])]  # without [CLS] and [SEP]
            if n:  # consecutive windows share exactly `stride` tokens
                assert content[:stride] == seen[-stride:] if stride else True
                content = content[stride:]
            seen += content
        # every token once, in order, and its offsets point at its own text
        assert seen == [(t, tuple(s)) for t, s in zip(full["input_ids"][doc], full["offset_mapping"][doc])]
        words = text.split()
        assert [text[a:b] for _, (a, b) in seen] == words


@pytest.mark.parametrize("n, max_chunks, expected", [(3, 8, [0, 1, 2]), (9, 3, [0, 4, 8]), (10, 4, [0, 3, 6, 9]),
                                                     (5, 1, [0]), (1, 1, [0])])
def test_windows_past_max_chunks_are_spread_from_first_to_last(n, max_chunks, expected):
    assert select_chunks(n, max_chunks) == expected


def test_max_chunks_caps_the_windows_of_each_document(tokenizer):
    texts = [" ".join(["film"] * 100), "good film"]
    rows = chunk_rows(tokenizer, texts, 16, LongText("chunks", 4, 3))
    assert rows["document"] == [0, 0, 0, 1]


def test_head_tail_keeps_the_first_and_last_tokens_scaled_from_sun_et_al():
    assert head_tail_split(510) == (128, 382)  # the paper's split at 512 tokens
    assert head_tail_split(126) == (32, 94)  # model.max_length 128
    enc = {"input_ids": [[101, *range(1, 31), 102], [101, 7, 102]], "attention_mask": [[1] * 32, [1] * 3]}
    out = head_tail_rows(enc, 10, (1, 1))
    head, tail = head_tail_split(8)
    assert out["input_ids"][0] == [101, *range(1, 1 + head), *range(31 - tail, 31), 102]
    assert out["input_ids"][1] == [101, 7, 102] and out["attention_mask"] == [[1] * 10, [1] * 3]


def test_special_token_ends_of_a_bert_tokenizer(tokenizer):
    assert special_token_ends(tokenizer) == (1, 1)


@pytest.mark.parametrize("how, expected", [("mean", [[2.0, 0.0], [4.0, 1.0], [7.0, 7.0]]),
                                           ("max", [[3.0, 0.0], [6.0, 2.0], [7.0, 7.0]])])
def test_pooling_gives_one_row_per_document_in_input_order(how, expected):
    values = np.array([[1, 0], [3, 0], [2, 0], [6, 2], [4, 1], [7, 7]], dtype=np.float32)
    pooled, first = pool_documents(values, np.array([5, 5, 2, 2, 2, 0]), how)
    assert pooled.tolist() == expected and first.tolist() == [0, 2, 5] and pooled.dtype == np.float32


# ------------------------------------------------------------------ a chunks run end to end


def validation_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]


def test_metrics_count_documents_not_chunks(chunks_run, long_data):
    metrics = json.loads((chunks_run / "metrics.json").read_text())
    stats = json.loads((chunks_run / "data_stats.json").read_text())
    chunks = stats["token_lengths"]["validation"]["chunks"]
    assert metrics["validation"]["examples"] == 40 == chunks["documents"] < chunks["chunks"]
    assert sum(metrics["validation"]["confusion_matrix"]["matrix"], []) and \
        sum(map(sum, metrics["validation"]["confusion_matrix"]["matrix"])) == 40
    assert stats["sizes"]["validation"] == 40 and stats["long_text"]["max_chunks"] == 4
    assert chunks["max"] <= 4
    rows = validation_rows(chunks_run)
    texts = [r["text"] for r in long_rows(40, seed=2)]
    assert [r["text"] for r in rows] == texts  # one row per document, in the file's order
    assert all(r["tokens"] == len(r["text"].split()) + 2 for r in rows)


def test_a_document_scores_the_same_in_evaluate_predict_and_serve(chunks_run, long_data):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app
    from textune.tasks import get_task, load_predictor

    rows = validation_rows(chunks_run)
    texts = [r["text"] for r in rows]
    predictor = load_predictor(chunks_run)
    predicted = predictor.predict(texts)
    assert np.allclose([list(p["probabilities"].values()) for p in predicted], [r["probs"] for r in rows], atol=1e-4)
    n_windows = [len(chunk_rows(predictor.tokenizer, [t], MAX_LENGTH, predictor.long_text)["document"]) for t in texts]
    assert [p["chunks"] for p in predicted] == n_windows and max(n_windows) > 1
    with TestClient(create_app(predictor, ServeSettings(max_chars=200), "long")) as client:
        long_text = " ".join(["film"] * 150)  # 749 characters: over --max-chars, within 4 windows' worth
        r = client.post("/v1/classify", json={"texts": texts[:5] + [long_text]})
        assert r.status_code == 200, r.text
        served = r.json()["results"]
        assert [s["label"] for s in served[:5]] == [p["label"] for p in predicted[:5]]
        assert np.allclose([s["score"] for s in served[:5]], [p["score"] for p in predicted[:5]], atol=1e-5)
        assert served[5]["chunks"] == 4
        too_long = client.post("/v1/classify", json={"texts": ["film " * 200]})
        assert too_long.status_code == 413 and "4 x --max-chars" in too_long.json()["error"]["message"]
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "chunks" in schema["Prediction"]["properties"]
    metrics = json.loads((chunks_run / "metrics.json").read_text())["validation"]
    evaluated = get_task("classification").evaluate_file(predictor, str(long_data["validation"]), {})
    assert evaluated["accuracy"] == metrics["accuracy"] and evaluated["examples"] == 40


def test_textune_predict_reads_the_runs_setting(chunks_run, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": " ".join(["film"] * 40) + " good"}, {"text": "bad"}])
    result = run_textune("predict", chunks_run, "--input", source, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["chunks"] for row in out] == [4, 1]


def test_a_chunks_run_exported_to_onnx_predicts_the_same_labels(chunks_run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from textune.export import export_onnx
    from textune.tasks import load_predictor

    out = export_onnx(chunks_run, tmp_path / "onnx", say=lambda *a: None)
    texts = [r["text"] for r in validation_rows(chunks_run)]
    on_export, on_run = load_predictor(out).predict(texts), load_predictor(chunks_run).predict(texts)
    assert [p["label"] for p in on_export] == [p["label"] for p in on_run]
    assert [p["chunks"] for p in on_export] == [p["chunks"] for p in on_run]


def test_a_head_tail_run_predicts_as_it_evaluated(tiny_model, long_data, tmp_path):
    from textune.tasks import load_predictor
    from textune.train import train

    run = train(load_config(None, long_overrides(tiny_model, long_data, tmp_path / "run", **{
        "data.long_text": "head_tail", "train.epochs": 1})))
    rows = validation_rows(run)
    predicted = load_predictor(run).predict([r["text"] for r in rows])
    assert np.allclose([list(p["probabilities"].values()) for p in predicted], [r["probs"] for r in rows], atol=1e-4)
    assert "chunks" not in predicted[0]  # only chunks runs say how many windows a text made


def test_the_start_up_summary_says_what_long_texts_become(tiny_model, long_data, tmp_path, capsys):
    from textune.tasks import get_task

    cfg = load_config(None, long_overrides(tiny_model, long_data, tmp_path / "run", **{"data.long_text": "chunks"}))
    summary = get_task("classification").load_inputs(cfg).summary(cfg)
    assert "long text  chunks of 16 tokens sharing 4, at most 8 per text" in summary
    assert "x the rows (and steps) of data.long_text truncate" in summary
    cfg = load_config(None, long_overrides(tiny_model, long_data, tmp_path / "run", **{"data.long_text": "head_tail"}))
    assert "keep their first 4 and last 10" in get_task("classification").load_inputs(cfg).summary(cfg)


# ------------------------------------------------------------------ the other sequence tasks


def test_regression_and_multi_label_pool_their_windows_too(tiny_model, tmp_path):
    from textune.tasks import load_predictor
    from textune.train import train

    rng = random.Random(3)
    docs = [long_row(rng, rng.random() < 0.5) for _ in range(60)]
    reg = [{"text": d["text"], "score": float(d["label"] == "positive")} for d in docs]
    ml = [{"text": d["text"], "labels": [d["label"]] + (["long"] if len(d["text"].split()) > 30 else [])}
          for d in docs]
    for task, rows, extra in (("regression", reg, {"data.label_column": "score"}),
                              ("multi-label", ml, {"data.label_column": "labels"})):
        files = {"train": write_jsonl(tmp_path / f"{task}-train.jsonl", rows[:48]),
                 "validation": write_jsonl(tmp_path / f"{task}-validation.jsonl", rows[48:])}
        run = train(load_config(None, long_overrides(tiny_model, files, tmp_path / task, **{
            "task": task, "data.long_text": "chunks", "data.chunk_pooling": "max", "train.epochs": 1, **extra})))
        metrics = json.loads((run / "metrics.json").read_text())["validation"]
        assert metrics["examples"] == 12 if task == "regression" else len(validation_rows(run)) == 12
        predicted = load_predictor(run).predict([r["text"] for r in rows[48:]])
        assert len(predicted) == 12 and all(p["chunks"] >= 1 for p in predicted)
        if task == "regression":
            assert np.allclose([p["score"] for p in predicted], [r["pred"] for r in validation_rows(run)], atol=1e-4)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("extra, message", [
    ({"data.long_text": "chunks", "data.text_pair_column": "text_b"},
     r"data\.long_text: chunks reads single texts, but data\.text_pair_column is set"),
    ({"data.long_text": "chunks", "data.chunk_stride": 16},
     r"data\.chunk_stride: must be 0 or more and below model\.max_length \(16\), got 16"),
    ({"data.long_text": "chunks", "data.max_chunks": 0}, r"data\.max_chunks: must be 1 or more"),
    ({"data.long_text": "chunks", "task": "token-classification"},
     r"data\.long_text: chunks is for tasks that make one prediction per text \(classification, regression, "
     r"multi-label\), not token-classification"),
    ({"data.long_text": "head_tail", "task": "question-answering"}, r"data\.long_text: head_tail is for tasks"),
    ({"data.chunk_stride": 4}, r"data\.chunk_stride: is for data\.long_text chunks, but data\.long_text is truncate"),
])
def test_bad_long_text_settings_are_refused_naming_the_key(tiny_model, long_data, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, long_overrides(tiny_model, long_data, tmp_path / "run", **extra))


def test_a_stride_that_fills_the_window_stops_the_cli_in_one_line(tiny_model, long_data, tmp_path):
    # 15 < model.max_length passes config validation, but [CLS] and [SEP] leave 14 tokens of text in a window
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(nested(long_overrides(tiny_model, long_data, tmp_path / "run", **{
        "data.long_text": "chunks", "data.chunk_stride": 15}))))
    result = run_textune("train", config)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("textune: error: data.chunk_stride: 15 leaves no new tokens in a window")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ validate-data and the report


def test_validate_data_says_how_many_texts_are_cut_and_their_windows(tiny_model, long_data, tmp_path, capsys):
    from textune.cli import main

    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(nested(long_overrides(tiny_model, long_data, tmp_path / "run", **{
        "data.long_text": "chunks", "data.max_chunks": 3}))))
    assert main(["validate-data", str(config)]) == 0
    out = capsys.readouterr().out
    assert "tokens     train: 133 of 160 texts (83.1%) are longer than model.max_length 16" in out
    assert "chunks     train: " in out and "(data.max_chunks 3)" in out and "x the rows (and steps) of an epoch" in out


def test_the_report_shows_metrics_by_text_length(chunks_run):
    from textune.report import write_report

    page = write_report(chunks_run).read_text()
    assert "Metrics by text length (validation)" in page and "longest" in page


def test_a_streamed_training_file_is_read_in_windows_too(tiny_model, long_data, tmp_path):
    from textune.train import train

    run = train(load_config(None, long_overrides(tiny_model, long_data, tmp_path / "run", **{
        "data.long_text": "chunks", "data.streaming": True, "train.max_steps": 3})))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["validation"]["examples"] == 40
