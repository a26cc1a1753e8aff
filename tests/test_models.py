import pytest

from textune.config import TuningConfig
from textune.errors import TextuneError
from textune.models import (
    count_parameters,
    default_model_dir,
    describe_model,
    load_classifier,
    load_tokenizer,
    resolve_model,
    resolve_run_model,
    set_attention,
)
from textune.tuning import apply_tuning


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
    assert trainable == 32 * 2 + 2 + 32 * 32 + 32 and total > 10 * trainable  # classifier + pooler
    assert all(not p.requires_grad for n, p in model.bert.named_parameters() if not n.startswith("pooler."))
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


def test_head_tuning_trains_the_pooler_with_the_head(tiny_model):
    # BERT's classifier reads the pooler (dense + tanh on [CLS]); the packaged MiniLM ships it untrained, so a
    # frozen pooler would make the head-only baseline a probe on a random projection. PEFT methods train it too.
    model = apply_tuning(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="head"))
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert not any(p.requires_grad for p in model.bert.encoder.parameters())
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    from textune.config import config_help

    assert "pooler" in next(line for line in config_help().splitlines() if "tuning.method " in line)


# ---------------------------------------------------------------- decoder-only models as classifiers


def build_tiny_decoder(folder, kind: str, eos: bool = True):
    """A random 2-layer, 32-wide GPT-2 or Llama with a word-level tokenizer that has no pad token (as GPT-2's
    and Llama's have none); `eos` False leaves out the end-of-sequence token too."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from conftest import FILLER, NEGATIVE, POSITIVE

    specials = ["<unk>"] + (["</s>"] if eos else [])
    vocab = {w: i for i, w in enumerate(specials + POSITIVE + NEGATIVE + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        **({"eos_token": "</s>"} if eos else {}))
    assert tokenizer.pad_token is None
    end = vocab.get("</s>")
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=end, eos_token_id=end))
    else:
        model = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                       bos_token_id=end, eos_token_id=end, pad_token_id=None))
    assert model.config.pad_token_id is None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_only_classifier_pads_with_eos_and_trains(kind, tmp_path, toy_data):
    from conftest import toy_overrides
    from textune.config import load_config
    from textune.tasks.classification import ClassifierPredictor
    from textune.train import train

    folder = build_tiny_decoder(tmp_path / kind, kind)
    run = train(load_config(None, toy_overrides(folder, toy_data, tmp_path / "run", **{"train.max_steps": 3})))
    assert (run / "metrics.json").is_file()
    assert ClassifierPredictor(run).predict(["a great film", "bad"])[0]["label"] in ("negative", "positive")
    tokenizer = load_tokenizer(str(folder), for_classifier=True)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert load_classifier(str(folder), ["a", "b"]).config.pad_token_id == tokenizer.pad_token_id


def test_decoder_without_pad_or_eos_token_is_refused_before_the_run_folder(tmp_path, toy_data):
    from conftest import toy_overrides
    from textune.config import load_config
    from textune.train import train

    folder = build_tiny_decoder(tmp_path / "gpt2", "gpt2", eos=False)
    with pytest.raises(TextuneError, match=r"^model.name: the tokenizer of .* has no padding token and no "
                                           r"end-of-sequence token to pad with"):
        train(load_config(None, toy_overrides(folder, toy_data, tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_inference_max_length_stays_inside_the_position_table(tiny_model):
    from transformers import AutoConfig, RobertaConfig

    from textune.models import inference_max_length

    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.model_max_length = int(1e30)  # saved without a limit, as many tokenizers are
    config = AutoConfig.from_pretrained(tiny_model)  # 64 positions
    assert inference_max_length(tokenizer) == 512  # nothing says otherwise
    assert inference_max_length(tokenizer, config=config) == 64
    assert inference_max_length(tokenizer, None, 256, config=config) == 64
    assert inference_max_length(tokenizer, 32, 256, config=config) == 32
    # RoBERTa's positions start after the padding index: 66 rows, 64 usable
    roberta = RobertaConfig(max_position_embeddings=66, pad_token_id=1)
    assert inference_max_length(tokenizer, config=roberta) == 64
    tokenizer.model_max_length = 48
    assert inference_max_length(tokenizer, config=config) == 48


def test_bare_model_folder_predicts_within_its_position_table(tmp_path, tiny_model):
    from textune.tasks.classification import ClassifierPredictor

    folder = tmp_path / "bare"
    model = load_classifier(str(tiny_model), ["neg", "pos"])
    model.save_pretrained(folder)
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.model_max_length = int(1e30)
    tokenizer.save_pretrained(folder)
    predictor = ClassifierPredictor(folder)
    assert predictor.max_length == 64
    assert len(predictor.predict([" ".join(["good"] * 300)])) == 1  # 300 words: cut at 64, no index error
