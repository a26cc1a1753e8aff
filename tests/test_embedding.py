"""task: embedding and textune.pooling, on a tiny random BERT saved with sentence-transformers' pooling files:
pooling as sentence-transformers pools, duplicate-aware in-batch negatives, the retrieval metrics on a hand-made
ranking (and against sentence-transformers' own evaluator), one training run through the CLI (step-0 evaluation,
the saved folder loaded by SentenceTransformer to the same vectors, evaluate, predict to JSONL and .npy),
/v1/embeddings through the `openai` client, ONNX export agreement, scored pairs and triplets, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import FILLER, NEGATIVE, POSITIVE, build_tiny_bert, serve_in_thread, write_csv, write_jsonl
from textune.errors import TextuneError
from textune.pooling import NO_POOLING_INFO, PoolingSpec, pool, read_pooling, write_pooling
from textune.tasks.embedding import false_negatives, loss_from_embeddings, make_loss, rank_metrics

KEYS = POSITIVE + NEGATIVE


def build_tiny_sentence_bert(folder: Path, mode: str = "mean", normalize: bool = True) -> Path:
    """The tiny BERT with sentence-transformers' modules.json and 1_Pooling (and a Normalize module)."""
    build_tiny_bert(folder)
    write_pooling(folder, PoolingSpec(mode, normalize, ""), 32, 32)
    return folder


def pair_rows(n: int, seed: int) -> list[dict]:
    """A question names a key word; its passage holds the same word among others (learnable retrieval)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key, words = rng.choice(KEYS), rng.sample(FILLER, 3)
        rows.append({"query": f"{key} {words[0]}", "passage": f"{words[1]} {key} {words[2]}"})
    return rows


def scored_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(KEYS), rng.choice(KEYS)
        rows.append({"s1": f"{a} {rng.choice(FILLER)}", "s2": f"{rng.choice(FILLER)} {b}",
                     "score": 1.0 if a == b else (0.5 if (a in POSITIVE) == (b in POSITIVE) else 0.0)})
    return rows


def config(d: Path, model: Path, **train) -> dict:
    return {"task": "embedding", "output_dir": str(d / "run"), "model": {"name": str(model), "max_length": 32},
            "data": {"train": str(d / "train.jsonl"), "validation": str(d / "validation.jsonl"),
                     "text_column": "query", "text_pair_column": "passage"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "logging_steps": 5, "mixed_precision": "no",
                      **train}}


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory) -> Path:
    return build_tiny_sentence_bert(tmp_path_factory.mktemp("tiny-st") / "model")


@pytest.fixture(scope="module")
def run(sentence_model, tmp_path_factory) -> Path:
    """`textune train` on toy question -> passage pairs."""
    from textune.cli import main

    d = tmp_path_factory.mktemp("embedding")
    write_jsonl(d / "train.jsonl", pair_rows(200, 1))
    write_jsonl(d / "validation.jsonl", pair_rows(40, 2))
    (d / "c.yaml").write_text(yaml.safe_dump(config(d, sentence_model)))
    assert main(["validate-data", str(d / "c.yaml")]) == 0
    assert main(["train", str(d / "c.yaml")]) == 0
    return d / "run"


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"])
def test_pool_matches_sentence_transformers_pooling(mode):
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right and left padding
    theirs = Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    assert torch.allclose(pool(hidden, mask, PoolingSpec(mode)), theirs, atol=1e-6)
    normalised = pool(hidden, mask, PoolingSpec(mode, normalize=True))
    assert torch.allclose(normalised.norm(dim=1), torch.ones(3), atol=1e-6)


def test_read_pooling_says_where_the_pooling_came_from(sentence_model, tmp_path):
    spec = read_pooling(sentence_model)
    assert (spec.mode, spec.normalize) == ("mean", True)
    assert spec.source == "the model's 1_Pooling/config.json and its Normalize module"
    bare = build_tiny_bert(tmp_path / "bare")
    assert read_pooling(bare) == PoolingSpec("mean", False, NO_POOLING_INFO)
    assert "mean pooling, as sentence-transformers assumes" in NO_POOLING_INFO
    cls = build_tiny_sentence_bert(tmp_path / "cls", "cls", normalize=False)
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    assert read_pooling(cls) == PoolingSpec("cls", False, "the model's 1_Pooling/config.json")
    (cls / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": ["cls", "mean"]}))
    with pytest.raises(TextuneError, match=r"asks for pooling \['cls', 'mean'\]; textune pools with one of mean"):
        read_pooling(cls)


# ---------------------------------------------------------------- in-batch negatives and metrics


def test_in_batch_negatives_see_no_false_negatives():
    # rows 0 and 1 share an anchor; rows 0 and 2 share a positive text; row 3 is unrelated
    anchor, positive = torch.tensor([0, 0, 1, 2]), torch.tensor([10, 11, 10, 12])
    mask = false_negatives(anchor, positive, None)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False],
                             [True, False, False, False], [False, False, False, False]]
    negative = torch.tensor([13, 13, 11, 10])  # row 3's hard negative is rows 0 and 2's positive
    assert false_negatives(anchor, positive, negative)[0].tolist() == [False, True, True, False,
                                                                      False, False, False, True]
    # Two rows of one anchor with equally good positives: masked, each row's only candidate is its own
    # positive (loss 0); unmasked, the other row's positive is a negative as good as the target (log 2).
    loss = make_loss("mnrl")
    a = torch.nn.functional.normalize(torch.randn(1, 8), dim=1).repeat(2, 1)
    ids = torch.tensor([0, 0])
    masked = loss_from_embeddings(loss, [a, a.clone()], None, false_negatives(ids, torch.tensor([1, 2]), None))
    plain = loss_from_embeddings(loss, [a, a.clone()], None, None)
    assert float(masked) == pytest.approx(0.0, abs=1e-6) and float(plain) == pytest.approx(np.log(2), abs=1e-5)


def test_rank_metrics_on_a_hand_made_ranking():
    scores = np.array([[0.9, 0.8, 0.7, 0.1],    # query 0: its passage (2) ranks third
                       [0.9, 0.5, 0.4, 0.8]])   # query 1: passages 0 and 3 rank first and second
    m = rank_metrics(scores, [{2}, {0, 3}])
    assert m["mrr_at_10"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["recall_at_1"] == pytest.approx((0 + 0.5) / 2) and m["recall_at_10"] == 1.0
    ndcg0 = (1 / np.log2(4)) / 1
    ndcg1 = (1 + 1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert m["ndcg_at_10"] == pytest.approx((ndcg0 + ndcg1) / 2)
    assert rank_metrics(scores, [{2}, {0, 3}], k=2)["mrr_at_2"] == pytest.approx(0.5)  # query 0 missed
    assert (m["queries"], m["corpus"]) == (2, 4)


# ---------------------------------------------------------------- a training run


def test_trains_from_the_base_models_figure(run):
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    evals = [r for r in history if r["type"] == "eval"]
    assert evals[0]["step"] == 0  # the base model's figure starts the curve
    assert {"eval_mrr_at_10", "eval_recall_at_1", "eval_recall_at_10", "eval_ndcg_at_10", "eval_loss"} <= set(evals[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "mrr_at_10" and metrics["best_metric"] > evals[0]["eval_mrr_at_10"]
    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"text", "text_pair", "rank", "top"} <= set(rows[0])
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["shape"] == "pairs" and stats["loss"] == "mnrl" and stats["pooling"]["normalize"] is True
    from textune.cli import main

    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert '<section id="embedding">' in page and "MRR@10" in page


def test_saved_folder_is_a_sentence_transformers_model(run):
    from sentence_transformers import SentenceTransformer

    from textune.tasks import load_predictor, task_of

    texts = ["good the movie", "bad plot", "the film was superb and the acting very nice"]
    ours = load_predictor(run).embed(texts)
    theirs = SentenceTransformer(str(run / "model"), device="cpu").encode(texts)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)  # the base model's Normalize module kept
    assert task_of(run / "model") == "embedding"  # a bare encoder folder reads as an embedding model


def test_metrics_agree_with_sentence_transformers_evaluator(run, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from textune.cli import main

    data = run.parent / "validation.jsonl"
    assert main(["evaluate", str(run), "--data", str(data), "--output", str(tmp_path / "m.json")]) == 0
    ours = json.loads((tmp_path / "m.json").read_text())
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    queries = {q: q for q in dict.fromkeys(r["query"] for r in rows)}
    corpus = {p: p for p in dict.fromkeys(r["passage"] for r in rows)}
    relevant: dict[str, set] = {}
    for r in rows:
        relevant.setdefault(r["query"], set()).add(r["passage"])
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, mrr_at_k=[10], ndcg_at_k=[10],
                                              precision_recall_at_k=[1, 10], accuracy_at_k=[1], map_at_k=[10])
    theirs = evaluator(SentenceTransformer(str(run / "model"), device="cpu"))
    for name, key in (("mrr_at_10", "cosine_mrr@10"), ("ndcg_at_10", "cosine_ndcg@10"),
                      ("recall_at_1", "cosine_recall@1"), ("recall_at_10", "cosine_recall@10")):
        assert ours[name] == pytest.approx(theirs[key], abs=1e-4), name


def test_evaluate_and_predict_through_the_cli(run, sentence_model, tmp_path, capsys):
    from textune.cli import main

    data = run.parent / "validation.jsonl"
    assert main(["evaluate", str(sentence_model), "--task", "embedding", "--data", str(data), "--text-column", "query",
                 "--text-pair-column", "passage", "--output", str(tmp_path / "base.json")]) == 0
    out = capsys.readouterr().out
    assert "MRR@10" in out and "pooling    the model's 1_Pooling/config.json" in out
    base = json.loads((tmp_path / "base.json").read_text())
    first = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert base["mrr_at_10"] == pytest.approx(first["eval_mrr_at_10"], abs=1e-6)  # the step-0 figure
    bare = build_tiny_bert(tmp_path / "bare")  # no pooling files: said, and mean-pooled
    assert main(["evaluate", str(bare), "--task", "embedding", "--data", str(data), "--text-column", "query",
                 "--text-pair-column", "passage", "--output", str(tmp_path / "bare.json")]) == 0
    assert "pooling    no pooling information: mean pooling, as sentence-transformers assumes" in capsys.readouterr().out

    (tmp_path / "in.txt").write_text("good the movie\n\nbad plot\n")
    assert main(["predict", str(run), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "embedding" not in rows[1] and len(rows[0]["embedding"]) == 32
    assert main(["predict", str(run), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.npy")]) == 2
    assert "input line 2 is blank; a .npy file holds one vector per text" in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("good the movie\nbad plot\n")
    assert main(["predict", str(run), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.npy")]) == 0
    vectors = np.load(tmp_path / "p.npy")
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    assert np.allclose(vectors[1], rows[2]["embedding"], atol=1e-6)


def test_exports_the_pooled_normalised_vector(run, tmp_path):
    from textune.cli import main
    from textune.tasks import load_predictor

    assert main(["export", str(run), "--output", str(tmp_path / "onnx")]) == 0
    info = json.loads((tmp_path / "onnx" / "textune_onnx.json").read_text())
    assert info["outputs"] == ["sentence_embedding"] and info["check"]["max_abs_diff"] < 1e-4
    texts = ["good the movie", "bad plot and boring acting"]
    assert np.allclose(load_predictor(tmp_path / "onnx").embed(texts), load_predictor(run).embed(texts), atol=1e-5)


# ---------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def server(run):
    from textune.serving import ServeSettings, create_app
    from textune.tasks import load_predictor

    app = create_app(load_predictor(run), ServeSettings(token="secret", max_texts=8), "tiny-embedding")
    yield from serve_in_thread(app)


def test_openai_client_gets_embeddings(server, run):
    import openai

    from textune.tasks import load_predictor

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="secret", max_retries=0, timeout=60)
    texts = ["good the movie", "bad plot"]
    got = client.embeddings.create(model="tiny-embedding", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == [0, 1] and got.model == "tiny-embedding"
    assert np.allclose([d.embedding for d in got.data], load_predictor(run).embed(texts), atol=1e-6)
    assert got.usage.prompt_tokens == got.usage.total_tokens == 9  # [CLS] good the movie [SEP] / [CLS] bad plot [SEP]
    one = client.embeddings.create(model="x", input="bad plot", encoding_format="float")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, got.data[1].embedding, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="x", input=["good", ""])
    assert caught.value.body["param"] == "input" and "non-empty" in caught.value.body["message"]
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="x", input=["good"] * 9)
    assert caught.value.status_code == 413 and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).embeddings.create(model="x", input="a")


# ---------------------------------------------------------------- other shapes


def test_scored_pairs_and_triplets_train(sentence_model, tmp_path):
    from textune.cli import main

    write_csv(tmp_path / "train.csv", scored_rows(120, 3))
    write_csv(tmp_path / "validation.csv", scored_rows(40, 4))
    cfg = config(tmp_path, sentence_model, max_steps=4, eval_steps=2)
    cfg["data"].update(train=str(tmp_path / "train.csv"), validation=str(tmp_path / "validation.csv"),
                       text_column="s1", text_pair_column="s2", label_column="score")
    (tmp_path / "scored.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "scored.yaml")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "spearman" and {"spearman", "pearson", "loss"} <= set(metrics["validation"])
    assert json.loads((tmp_path / "run" / "data_stats.json").read_text())["loss"] == "cosent"

    rows = [{**r, "negative": pair_rows(1, i)[0]["passage"]} for i, r in enumerate(pair_rows(80, 5))]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", pair_rows(20, 6))
    cfg = config(tmp_path, sentence_model, max_steps=3, eval_steps=3)
    cfg["output_dir"] = str(tmp_path / "triplets")
    cfg["data"]["negative_column"] = "negative"
    (tmp_path / "triplets.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "triplets.yaml")]) == 0
    assert json.loads((tmp_path / "triplets" / "data_stats.json").read_text())["shape"] == "triplets"


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


BAD = {
    "empty side": ([{"query": "good the", "passage": "a good film"}, {"query": "bad it", "passage": " "}], {},
                   r"data.train row 2 of .*: column 'passage' is empty; every pair needs both texts"),
    "score not a number": ([{"query": "good", "passage": "nice", "label": "1"}, {"query": "bad", "passage": "poor",
                                                                                "label": "high"}], {},
                           r"data.train row 2: score column 'label' holds 'high', not a number"),
    "one row": ([{"query": "good", "passage": "nice"}], {}, r"data.train: only 1 row; embedding training"),
    "one anchor": ([{"query": "good", "passage": "nice"}, {"query": "Good ", "passage": "great"}], {},
                   r"data.train: every anchor is the same text \('(good|Good )'\); the model learns by telling"),
    "batch of one": (pair_rows(10, 1), {"train.batch_size": 1},
                     r"train.batch_size: 1 leaves in-batch negatives \(train.loss mnrl\) with no negatives"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, sentence_model, tmp_path, capsys):
    from textune.cli import main

    rows, overrides, message = BAD[case]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", pair_rows(10, 2))
    cfg = config(tmp_path, sentence_model)
    for key, value in overrides.items():
        section, name = key.split(".")
        cfg[section][name] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    import re

    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "run").exists()


def test_config_keys_of_the_embedding_task():
    from textune.config import load_config
    from textune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.loss: is for task embedding, not classification"):
        load_config(None, {"data.train": "x.jsonl", "train.loss": "mnrl"})
    with pytest.raises(ConfigError, match=r"data.text_pair_column: task embedding reads pairs"):
        load_config(None, {"task": "embedding", "data.train": "x.jsonl"})
    with pytest.raises(ConfigError, match=r"tuning.method: lora cannot be used with task embedding"):
        load_config(None, {"task": "embedding", "data.train": "x.jsonl", "data.text_pair_column": "p",
                           "tuning.method": "lora"})
    cfg = load_config(None, {"task": "embedding", "data.train": "x.jsonl", "data.text_pair_column": "p"})
    assert (cfg.train.metric, cfg.train.loss) == ("mrr_at_10", "auto")


def test_encode_gives_sentence_transformers_vectors_in_input_order(sentence_model):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from textune.pooling import encode

    texts = ["the film was superb and the acting very nice", "bad", "good plot", "it is a very boring story"]
    ours = encode(AutoModel.from_pretrained(sentence_model), AutoTokenizer.from_pretrained(sentence_model), texts,
                  read_pooling(sentence_model), batch_size=3, max_length=32)
    theirs = SentenceTransformer(str(sentence_model), device="cpu").encode(texts)
    assert ours.shape == (4, 32) and ours.dtype == np.float32
    assert np.allclose(ours, theirs, atol=1e-5)


def test_playground_shows_a_vector_and_a_cosine(run):
    from textune.tasks import get_task, load_predictor

    task, predictor = get_task("embedding"), load_predictor(run)
    row = task.playground_predict(predictor, {"text": "good the movie", "other": "good the movie"})
    assert row["dimensions"] == 32 and len(row["embedding_start"]) == 8 and row["cosine"] == pytest.approx(1.0)
    assert "cosine" not in task.playground_predict(predictor, {"text": "bad plot", "other": ""})
    with pytest.raises(TextuneError, match="text: write something to embed"):
        task.playground_predict(predictor, {"text": " ", "other": "bad"})
