"""PEFT adapters on the tiny random BERT: training and saving, merging, the registry, one base with many adapters."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FILLER, assert_same_rows, build_tiny_bert, toy_overrides, toy_rows, write_csv
from textune.adapters import (
    AdapterPredictor,
    AdapterRegistry,
    apply_peft,
    load_adapter_classifier,
    merge_adapter,
)
from textune.cli import main
from textune.config import TrainConfig, TuningConfig, load_config
from textune.errors import ConfigError, TextuneError
from textune.tasks.classification import ClassifierPredictor
from textune.models import load_classifier
from textune.train import build_optimizer, train
from textune.tuning import apply_tuning

TEXTS = ["the movie was great and superb", "awful boring film", "the plot was very nice", "it was poor and bad",
         "the acting", "love this story"]


def train_adapter(tiny_model, toy_data, out, method, **extra):
    """A few steps of PEFT training; evaluating twice exercises the load-best-at-end path."""
    overrides = toy_overrides(tiny_model, toy_data, out, **{
        "tuning.method": method, "train.max_steps": 6, "train.eval_steps": 3, "train.lr": 1e-2,
        "train.checkpoint_steps": None, **extra})
    return train(load_config(None, overrides))


@pytest.fixture(scope="module")
def adapter_runs(tiny_model, toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-runs")
    return {m: train_adapter(tiny_model, toy_data, root / m, m) for m in ("lora", "prefix", "ia3")}


@pytest.fixture(scope="module")
def three_label_run(tiny_model, tmp_path_factory):
    """A second task on the same base: three labels (sentences without a sentiment word are neutral)."""
    root = tmp_path_factory.mktemp("three-labels")
    rng = random.Random(6)
    rows = toy_rows(96, seed=5) + [{"text": " ".join(rng.sample(FILLER, 4)), "label": "neutral"} for _ in range(48)]
    data = {"train": write_csv(root / "train.csv", rows), "validation": write_csv(root / "val.csv", rows[::4])}
    return train_adapter(tiny_model, data, root / "run", "lora")


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- config and wrapping


def test_lora_parameter_count_is_r_times_d_plus_k_per_target():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    with torch.device("meta"):  # BERT-base shapes without memory
        model = BertForSequenceClassification(config)
    model = apply_peft(model, TuningConfig(method="lora", r=8, target_modules=["query", "value"]))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 12 * 2 * 8 * (768 + 768) == 294_912
    trainable, total = model.get_nb_trainable_parameters()
    head = (768 * 2 + 2) + (768 * 768 + 768)  # classifier and pooler train with the adapter
    assert trainable == lora + head


def test_default_targets_come_from_the_architecture(tiny_model):
    model = apply_tuning(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="lora"))
    assert set(model.peft_config["default"].target_modules) == {"query", "value"}


def test_unknown_target_module_lists_the_models_layers(tiny_model):
    model = load_classifier(str(tiny_model), ["a", "b"])
    with pytest.raises(TextuneError, match=r"'q_proj' is not a layer of BertForSequenceClassification; its linear "
                                           r"layers are named: classifier, dense, key, query, value"):
        apply_tuning(model, TuningConfig(method="lora", target_modules=["query", "q_proj"]))


def test_tuning_values_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.train": "x.csv", "tuning.method": "prefix", "tuning.r": 0, "tuning.dropout": 1.5,
                           "tuning.target_modules": ["query"], "train.layer_lr_decay": 1.2, "train.head_lr": 0.0})
    problems = " | ".join(err.value.problems)
    for expected in ("tuning.r: must be 1 or more", "tuning.dropout: must be in [0, 1)",
                     "tuning.target_modules: only lora and ia3", "train.layer_lr_decay: must be in (0, 1]",
                     "train.head_lr: must be greater than 0"):
        assert expected in problems


def test_shipped_lora_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sst2-minilm-lora.yaml")
    assert (cfg.tuning.method, cfg.tuning.r, cfg.tuning.target_modules) == ("lora", 8, ["query", "value"])


def test_layer_lr_decay_and_head_lr(tiny_model):
    model = load_classifier(str(tiny_model), ["a", "b"])
    t = TrainConfig(lr=1e-3, layer_lr_decay=0.5, head_lr=1e-2, weight_decay=0.01)
    optimizer = build_optimizer(model, t)
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the lr the loop logs is the base one
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    expected_lr = {"bert.encoder.layer.1.": 1e-3, "bert.encoder.layer.0.": 5e-4, "bert.embeddings.": 2.5e-4,
                   "bert.pooler.": 1e-3, "classifier.": 1e-2}
    for name, p in model.named_parameters():
        lr, decay = setting[id(p)]
        assert lr == pytest.approx(next(v for k, v in expected_lr.items() if name.startswith(k))), name
        assert decay == (0.0 if p.ndim == 1 else 0.01), name
    plain = build_optimizer(model, TrainConfig(lr=1e-3))
    assert {g["lr"] for g in plain.param_groups} == {1e-3} and len(plain.param_groups) == 2


# ---------------------------------------------------------------- training, saving, loading


@pytest.mark.parametrize("method", ["lora", "prefix", "ia3"])
def test_adapter_run_saves_the_adapter_alone_and_loads_back(adapter_runs, tiny_model, method):
    run = adapter_runs[method]
    model_dir = run / "model"
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= \
        {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "model.safetensors").exists()
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model.resolve())
    weights = load_file(model_dir / "adapter_model.safetensors")
    assert any("classifier" in k for k in weights)  # the head is saved with the adapter
    if method == "lora":  # B starts at zero: non-zero means it trained
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)

    metrics = json.loads((run / "metrics.json").read_text())
    p = metrics["parameters"]
    assert 0 < p["trainable"] < p["total"] and p["ratio"] == pytest.approx(p["trainable"] / p["total"])

    # The best checkpoint's validation probabilities (recorded by the run) come back from the saved adapter.
    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    probs = ClassifierPredictor(run).predict_proba([r["text"] for r in rows])
    np.testing.assert_allclose(probs, [r["probs"] for r in rows], atol=1e-4)


def test_textune_predict_loads_an_adapter_run(adapter_runs, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS))
    code, out, err = run_cli(capsys, "predict", adapter_runs["lora"], "--input", tmp_path / "in.txt")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == TEXTS


# ---------------------------------------------------------------- merging


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_model_gives_the_adapters_logits(adapter_runs, tmp_path, method):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = merge_adapter(adapter_runs[method], tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    unmerged, _ = load_adapter_classifier(adapter_runs[method] / "model", merge=False)
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(merged(**batch).logits, unmerged(**batch).logits, atol=1e-4, rtol=0)
    clf = pipeline("text-classification", model=str(out), device="cpu")
    assert clf(TEXTS[0])[0]["label"] in ("negative", "positive")


def test_merge_cli_and_its_refusals(adapter_runs, tiny_model, capsys):
    run = adapter_runs["lora"]
    code, out, err = run_cli(capsys, "merge", run)
    assert code == 0, err
    assert (run / "merged" / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "merge", run)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert run_cli(capsys, "merge", run, "--overwrite")[0] == 0
    with pytest.raises(TextuneError, match="prefix tuning adds learned keys and values at run time"):
        merge_adapter(adapter_runs["prefix"])
    with pytest.raises(TextuneError, match="holds a full model, not an adapter"):
        merge_adapter(tiny_model)


# ---------------------------------------------------------------- many adapters on one base


@pytest.fixture
def registry(adapter_runs, three_label_run, tmp_path):
    reg = AdapterRegistry(tmp_path / "adapters")
    reg.add(adapter_runs["lora"], "toy")
    reg.add(three_label_run, "toy3")
    return reg


def test_two_adapters_on_one_base_match_each_loaded_alone(registry, adapter_runs, three_label_run, monkeypatch):
    predictor = AdapterPredictor(registry.root)
    two = predictor.predict_proba(TEXTS, adapter="toy")
    three = predictor.predict_proba(TEXTS, adapter="toy3")
    assert two.shape == (6, 2) and three.shape == (6, 3)
    assert predictor.predict(TEXTS[:1], adapter="toy3")[0]["probabilities"].keys() == {"negative", "neutral",
                                                                                        "positive"}
    np.testing.assert_allclose(two, ClassifierPredictor(adapter_runs["lora"]).predict_proba(TEXTS), atol=1e-5)
    np.testing.assert_allclose(three, ClassifierPredictor(three_label_run).predict_proba(TEXTS), atol=1e-5)

    # Switching back is PEFT set_adapter on the same model: nothing is loaded again.
    model = predictor.model
    monkeypatch.setattr("textune.adapters.load_classifier", lambda *a, **k: pytest.fail("base reloaded"))
    monkeypatch.setattr(type(model), "load_adapter", lambda *a, **k: pytest.fail("adapter reloaded"))
    np.testing.assert_allclose(predictor.predict_proba(TEXTS, adapter="toy"), two, atol=1e-6)
    assert predictor.model is model and predictor.label_names == ["negative", "positive"]
    assert not np.allclose(two[:, 1], three[:, 2], atol=1e-3)


def test_registry_refuses_another_base_another_type_and_full_models(registry, adapter_runs, tiny_model, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(adapter_runs["lora"] / "model", foreign)
    other_base = build_tiny_bert(tmp_path / "other-bert")
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other_base)}))
    with pytest.raises(TextuneError, match=rf"trained on the base model {other_base}, but registry .* holds adapters "
                                           rf"for {tiny_model.resolve()}; an adapter only works on the base"):
        registry.add(foreign, "foreign")
    with pytest.raises(TextuneError, match="holds lora adapters and PEFT switches only between adapters of one type"):
        registry.add(adapter_runs["ia3"], "toy-ia3")
    with pytest.raises(TextuneError, match="holds a full fine-tuned model, not an adapter"):
        registry.add(tiny_model, "base")
    with pytest.raises(TextuneError, match="'toy' is already in registry"):
        registry.add(adapter_runs["lora"], "toy")
    with pytest.raises(TextuneError, match="adapter name 'sst2.v1'"):
        registry.add(adapter_runs["lora"], "sst2.v1")
    with pytest.raises(TextuneError, match="no adapter 'nope' in registry .*; it holds: toy, toy3"):
        AdapterPredictor(registry.root).predict(TEXTS, adapter="nope")
    with pytest.raises(TextuneError, match="is \\(or was trained on\\) the base model"):
        AdapterPredictor(registry.root).check_base(other_base)
    tagger = tmp_path / "tagger"  # the same base and type, but another kind of head
    shutil.copytree(adapter_runs["lora"] / "model", tagger)
    config = json.loads((tagger / "config.json").read_text())
    (tagger / "config.json").write_text(json.dumps({**config, "architectures": ["BertForTokenClassification"]}))
    with pytest.raises(TextuneError, match=r"holds adapters loaded with AutoModelForSequenceClassification, and "
                                           r".*tagger needs AutoModelForTokenClassification: the registry loads its"):
        registry.add(tagger, "tagger")


def test_adapters_cli_add_list_remove_and_predict(adapter_runs, tiny_model, tmp_path, capsys):
    reg = tmp_path / "reg"
    code, out, err = run_cli(capsys, "adapters", "add", adapter_runs["lora"], "--name", "toy", "--registry", reg)
    assert code == 0 and "added toy (lora, labels negative, positive)" in out, err
    code, out, _ = run_cli(capsys, "adapters", "list", "--registry", reg)
    assert code == 0 and "1 adapter(s)" in out and "base weights" in out
    sizes = AdapterRegistry(reg).sizes()
    assert sizes["adapters"]["toy"]["weights"] < sizes["base"]["weights"]

    (tmp_path / "in.txt").write_text("\n".join(TEXTS))
    code, out, err = run_cli(capsys, "predict", tiny_model, "--adapter", "toy", "--registry", reg,
                             "--input", tmp_path / "in.txt")
    assert code == 0, err
    labels = [json.loads(line)["label"] for line in out.splitlines()]
    assert labels == [r["label"] for r in ClassifierPredictor(adapter_runs["lora"]).predict(TEXTS)]
    code, _, err = run_cli(capsys, "predict", adapter_runs["lora"], "--registry", reg, "--input", tmp_path / "in.txt")
    assert code == 2 and "add --adapter NAME" in err

    code, out, _ = run_cli(capsys, "adapters", "remove", "toy", "--registry", reg)
    assert code == 0 and AdapterRegistry(reg).names() == []
    code, _, err = run_cli(capsys, "adapters", "remove", "toy", "--registry", reg)
    assert code == 2 and "no adapter 'toy'" in err


# ---------------------------------------------------------------- every saved form predicts as the run


def lora_task_run(task: str, tiny_model: Path, root: Path):
    """(a LoRA run of `task`, a few steps on toy data, its inputs to predict), with the settings that turn outputs
    into predictions set away from their defaults: a regression scale of 0-5, multi-label thresholds of 0.3, QA
    with unanswerable questions (a null threshold) and windows of a stride of 8 tokens."""
    from conftest import write_jsonl
    from test_multi_label import ml_overrides, toy_row as ml_row
    from test_question_answering import qa_overrides, toy_rows as qa_rows
    from test_regression import reg_overrides, toy_pair
    from test_token_classification import ner_overrides, write_conll

    rng = random.Random(7)
    lora = {"tuning.method": "lora", "train.max_steps": 6, "train.lr": 1e-2, "train.eval_steps": 3}
    if task == "regression":
        data = {s: write_csv(root / f"{s}.csv", [toy_pair(rng) for _ in range(n)]) for s, n in (("train", 48), ("validation", 16))}
        return reg_overrides(tiny_model, data, root / "run", **lora), (TEXTS[:4], TEXTS[2:])
    if task == "multi-label":
        data = {s: write_csv(root / f"{s}.csv", [ml_row(rng) for _ in range(n)]) for s, n in (("train", 48), ("validation", 16))}
        return ml_overrides(tiny_model, data, root / "run", **lora, **{"train.threshold": 0.3}), (TEXTS,)
    if task == "token-classification":
        data = {"train": write_conll(root / "train.conll", 48, seed=1), "validation": write_conll(root / "val.conll", 16, seed=2)}
        return ner_overrides(tiny_model, data, root / "run", **lora), (TEXTS,)
    data = {"train": write_jsonl(root / "train.jsonl", qa_rows(48, seed=1, unanswerable=0.3)),
            "validation": write_jsonl(root / "validation.jsonl", qa_rows(16, seed=2, n_words=30, unanswerable=0.3))}
    contexts = [r["context"] for r in qa_rows(3, seed=3, n_words=40)]  # longer than one window
    return qa_overrides(tiny_model, data, root / "run", **lora, **{"data.allow_unanswerable": True}), (["is it"] * 3, contexts)


@pytest.mark.parametrize("task", ["regression", "multi-label", "question-answering", "token-classification"])
def test_every_saved_form_of_a_lora_run_predicts_as_the_run(task, tiny_model, tmp_path):
    """The run, its merged folder moved elsewhere, the adapter registry, and (with onnxruntime) the ONNX export of
    the merged folder: one task, one predictor class, the same predictions."""
    import importlib.util

    from textune.tasks import load_predictor, task_of

    overrides, inputs = lora_task_run(task, tiny_model, tmp_path)
    run = train(load_config(None, overrides))
    expected = load_predictor(run).predict(*inputs)

    moved = tmp_path / "elsewhere" / "merged"
    moved.parent.mkdir()
    shutil.move(merge_adapter(run), moved)  # away from the run: only what the folder carries
    assert task_of(moved) == task
    merged = load_predictor(moved)
    assert type(merged) is type(load_predictor(run))
    assert_same_rows(merged.predict(*inputs), expected)

    AdapterRegistry(tmp_path / "registry").add(run, "mine")
    from_registry = AdapterPredictor(tmp_path / "registry")
    assert_same_rows(from_registry.predict(*inputs, adapter="mine"), expected)

    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        from textune.export import export_onnx

        assert_same_rows(load_predictor(export_onnx(moved, say=lambda line: None)).predict(*inputs), expected)


def test_what_each_task_predicts_with_travels_with_the_merged_folder(tiny_model, tmp_path):
    """A merged regression keeps its scale and problem type in config.json, a merged multi-label its thresholds."""
    run = train(load_config(None, lora_task_run("multi-label", tiny_model, tmp_path)[0]))
    merged = merge_adapter(run)
    config = json.loads((merged / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert json.loads((merged / "thresholds.json").read_text())["thresholds"] == {"neg": 0.3, "pos": 0.3, "story": 0.3}
    assert {"config.yaml", "metrics.json", "data_stats.json"} <= {p.name for p in merged.iterdir()}


def test_a_causal_lm_adapter_merges_into_a_causal_lm(tmp_path):
    """The Auto class comes from the architecture table: a LoRA adapter of a causal LM (pretrain clm,
    instruction tuning) merges into a causal LM with the adapter's next-token logits, not into a classifier."""
    from conftest import build_tiny_lm
    from transformers import AutoModelForCausalLM

    from textune.adapters import save_adapter_extras

    base = build_tiny_lm(tmp_path / "gpt2", "clm")
    model = apply_peft(AutoModelForCausalLM.from_pretrained(base), TuningConfig(method="lora", target_modules=["c_attn"]))
    with torch.no_grad():  # a trained adapter is not the identity: make this one change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    save_adapter_extras(model, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "adapter", tmp_path / "merged"))
    assert type(merged).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
