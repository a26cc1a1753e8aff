"""The packaged MiniLM on small slices of the real data in ../shared/data (skipped where it is absent)."""

import json
from pathlib import Path

import pytest

from conftest import needs_shared
from textune.config import load_config
from textune.data import load_task_data, tokenize_splits
from textune.models import load_tokenizer, resolve_model
from textune.tasks import load_predictor
from textune.train import train

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_minilm_learns_sst2_from_a_small_slice(tmp_path):
    sst2 = needs_shared("sst2")
    cfg = load_config(CONFIGS / "sst2-minilm-full.yaml", {
        "data.train": str(sst2 / "train.tsv"), "data.validation": str(sst2 / "validation.tsv"),
        "data.max_train_samples": 640, "data.max_eval_samples": 200, "train.eval_steps": None,
        "train.logging_steps": 5, "train.epochs": 1, "train.batch_size": 16, "train.lr": 1.5e-4, "output_dir": str(tmp_path / "run")})
    run = train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] > 0.65, metrics["validation"]["accuracy"]  # chance is ~0.5
    predictor = load_predictor(run)  # the README's Python API
    assert predictor.task == "classification"
    rows = predictor.predict(["a gorgeous , moving film", "a dull , tedious mess"])
    assert [r["label"] for r in rows] == ["positive", "negative"]


def test_mrpc_pairs_reach_the_tokenizer_as_pairs():
    mrpc = needs_shared("mrpc")
    cfg = load_config(CONFIGS / "mrpc-minilm-full.yaml", {"data.train": str(mrpc / "validation.tsv"),
                                                        "data.validation": str(mrpc / "validation.tsv")})
    data = load_task_data(cfg.data, seed=0)
    tok = tokenize_splits(data, load_tokenizer(resolve_model(None)), cfg.model.max_length)
    row = tok["train"][0]
    assert 0 in row["token_type_ids"] and 1 in row["token_type_ids"]
    assert row["token_type_ids"].index(1) == row["input_ids"].index(102) + 1  # segment B starts after [SEP]


def test_minilm_finds_wnut16_entities_from_a_small_slice(tmp_path):
    wnut = needs_shared("wnut16")
    cfg = load_config(CONFIGS / "wnut16-minilm-ner.yaml", {
        "data.train": str(wnut / "train.conll"), "data.validation": str(wnut / "validation.conll"),
        "data.max_train_samples": 600, "train.epochs": 3, "train.lr": 2e-4, "train.logging_steps": 10,
        "output_dir": str(tmp_path / "run")})
    run = train(cfg)
    v = json.loads((run / "metrics.json").read_text())["validation"]
    assert v["f1"] > 0.05 and v["accuracy"] > 0.9, v  # 600 tweets: a weak but real tagger (O alone scores f1 0)
    from textune.tasks import load_predictor

    text = "Empire State Building in New York City"
    for e in load_predictor(run).predict([text])[0]["entities"]:
        assert text[e["start"]:e["end"]] == e["text"]
