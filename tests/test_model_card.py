"""The model card (MODEL/README.md): Hub metadata the Hub can read, metrics as in metrics.json, and its sections."""

import json

import pytest
import yaml

from conftest import toy_overrides
from textune.diagnose import diagnose_run
from textune.errors import TextuneError
from textune.model_card import DEFAULT_BASE_MODEL, base_model_id, write_model_card


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def test_a_finished_run_has_a_card_with_its_final_metrics(trained_run):
    from huggingface_hub import ModelCard

    card = trained_run / "model" / "README.md"
    meta, body = front_matter(card)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert meta["tags"][:2] == ["textune", "classification"]
    assert meta["datasets"] == ["train.csv", "validation.csv", "test.csv"]
    assert "base_model" not in meta  # the tiny model is a local folder, not a Hub id
    (index,) = meta["model-index"]
    logged = {(r["dataset"]["split"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    for split in ("validation", "test"):
        for name in ("accuracy", "f1", "loss"):
            assert logged[(split, name)] == metrics[split][name]
    assert ("validation", "examples") not in logged  # a count, not a metric
    assert {"accuracy", "f1", "loss"} <= set(meta["metrics"])

    loaded = ModelCard.load(card)
    assert loaded.data.library_name == "transformers"
    assert {r.metric_type for r in loaded.data.eval_results} >= {"accuracy", "f1"}
    for section in ("## Results", "## Training data", "## Hyper-parameters", "## Training curve", "## Diagnosis",
                    "## Intended use", "## Limits"):
        assert section in body
    assert "- train: `train.csv`: 320 rows" in body
    assert f"**{diagnose_run(trained_run).verdict}**" in body
    assert str(trained_run.parent) not in card.read_text()  # no local folders in a card meant for the Hub


@pytest.mark.parametrize("name, expected", [
    (None, DEFAULT_BASE_MODEL), ("bert-base-uncased", "bert-base-uncased"),
    ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    ("runs/sst2/model", None), ("./model", None), ("~/models/x", None)])
def test_base_model_is_a_hub_id_or_nothing(name, expected):
    assert base_model_id(name) == expected


def test_an_existing_local_folder_is_not_a_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mybert").mkdir()
    assert base_model_id("mybert") is None


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(TextuneError, match="is not a textune run folder"):
        write_model_card(tmp_path)


def test_a_lora_run_card_says_peft_and_its_merge_says_transformers(tiny_model, toy_data, tmp_path):
    from textune.adapters import merge_adapter
    from textune.config import load_config
    from textune.train import train

    run = train(load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "lora", **{
        "train.max_steps": 2, "tuning.method": "lora"})))
    meta, body = front_matter(run / "model" / "README.md")
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "A lora adapter" in body
    merged, _ = front_matter(merge_adapter(run) / "README.md")
    assert merged["library_name"] == "transformers" and merged["model-index"] == meta["model-index"]


def test_an_unfinished_masked_lm_run_gets_a_fill_mask_card(tmp_path):
    run = tmp_path / "mlm"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "task": "language-modeling", "model": {"name": "bert-base-uncased"},
        "pretrain": {"corpus": str(tmp_path / "corpus.txt")}, "train": {"metric": "loss", "greater_is_better": False}}))
    (run / "model" / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    meta, body = front_matter(write_model_card(run))
    assert meta["pipeline_tag"] == "fill-mask" and meta["base_model"] == "bert-base-uncased"
    assert meta["datasets"] == ["corpus.txt"] and "model-index" not in meta
    assert "the run did not finish" in body and "- corpus `corpus.txt`" in body
