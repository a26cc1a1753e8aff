import pytest

from textune.config import TuningConfig
from textune.errors import TextuneError
from textune.models import (
    apply_tuning,
    count_parameters,
    default_model_dir,
    describe_model,
    load_classifier,
    load_tokenizer,
    resolve_model,
    resolve_run_model,
    set_attention,
)


def test_default_model_is_the_packaged_minilm():
    path = default_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model(None) == str(path)


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TextuneError, match="is not a model folder: it has no config.json"):
        resolve_model(str(tmp_path))


def test_model_folder_without_weights(tmp_path, tiny_model):
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(TextuneError, match=r"has no weights \(\*.safetensors\); it holds: config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_and_offline_hub_id(tmp_path):
    with pytest.raises(TextuneError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    assert resolve_model("bert-base-uncased") == "bert-base-uncased"  # a Hub id, loaded only --online
    with pytest.raises(TextuneError, match="pass --online to download it"):
        load_tokenizer("textune-test/certainly-not-cached")


def test_classifier_gets_label_names(tiny_model):
    model = load_classifier(str(tiny_model), ["neg", "pos", "neutral"])
    assert model.config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert model.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}
    assert model.classifier.out_features == 3


def test_head_tuning_freezes_encoder(tiny_model):
    model = load_classifier(str(tiny_model), ["a", "b"])
    apply_tuning(model, TuningConfig(method="head"))
    trainable, total = count_parameters(model)
    assert trainable == 32 * 2 + 2 and total > 10 * trainable
    assert all(not p.requires_grad for p in model.bert.parameters())
    apply_tuning(model, TuningConfig(method="full"))
    assert count_parameters(model)[0] == total


def test_describe_model(tiny_model):
    info = describe_model(str(tiny_model), load_tokenizer(str(tiny_model)))
    assert info["hidden_size"] == 32 and info["num_attention_heads"] == 2 and info["num_hidden_layers"] == 2
    assert info["vocab_size"] == 29 and info["parameters"] > 0


def test_resolve_run_model(tmp_path, tiny_model):
    assert resolve_run_model(tiny_model) == (tiny_model, None)
    with pytest.raises(TextuneError, match="no run or model folder"):
        resolve_run_model(tmp_path / "missing")
    with pytest.raises(TextuneError, match="neither a textune run folder"):
        resolve_run_model(tmp_path)


def test_attention_switch(tiny_model, monkeypatch):
    model = load_classifier(str(tiny_model), ["a", "b"])
    assert model.config._attn_implementation == "sdpa" and set_attention(model, "auto") is model
    assert set_attention(model, "eager").config._attn_implementation == "eager"
    assert set_attention(model, "sdpa").config._attn_implementation == "sdpa"

    def unsupported(self, name):
        raise ValueError(f"{type(self).__name__} does not support an attention implementation through {name}\nmore")

    monkeypatch.setattr(type(model), "set_attn_implementation", unsupported)
    with pytest.raises(TextuneError, match=r"^model.attention: BertForSequenceClassification cannot use eager "
                                           r"attention \(.*\); set model.attention: eager$"):
        set_attention(model, "eager")
