"""The PEFT variants of LoRA on the tiny random BERT: DoRA, rsLoRA, LoRA+, AdaLoRA (which moves rank between
layers after each optimizer step) and QLoRA (refused without a CUDA GPU and bitsandbytes)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from peft.tuners.adalora import AdaLoraModel

from conftest import toy_overrides
from textune.adapters import AdapterRegistry, apply_peft, load_adapter_classifier, merge_adapter, quantize_4bit
from textune.cli import main
from textune.config import QLORA_UNAVAILABLE, TrainConfig, TuningConfig, load_config
from textune.errors import ConfigError, TextuneError
from textune.models import load_classifier
from textune.tasks import load_predictor
from textune.train import build_optimizer, train

TEXTS = ["the movie was great and superb", "awful boring film", "the plot was very nice", "it was poor and bad"]
VARIANTS = {"dora": {"tuning.method": "lora", "tuning.use_dora": True},
            "rslora": {"tuning.method": "lora", "tuning.use_rslora": True, "tuning.r": 16},
            "loraplus": {"tuning.method": "lora", "tuning.loraplus_lr_ratio": 16.0},
            "adalora": {"tuning.method": "adalora", "tuning.r": 8, "tuning.target_r": 2}}
STEPS = 10


@pytest.fixture(scope="module")
def allocations():
    """update_and_allocate's calls (step indices) across the module's AdaLoRA runs."""
    return []


@pytest.fixture(scope="module")
def variant_runs(tiny_model, toy_data, tmp_path_factory, allocations):
    original = AdaLoraModel.update_and_allocate

    def counted(self, global_step):
        allocations.append(global_step)
        return original(self, global_step)

    root = tmp_path_factory.mktemp("variant-runs")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AdaLoraModel, "update_and_allocate", counted)
        for name, keys in VARIANTS.items():
            overrides = toy_overrides(tiny_model, toy_data, root / name, **{
                "train.max_steps": STEPS, "train.eval_steps": 5, "train.lr": 1e-2, "train.logging_steps": 1,
                "train.warmup_ratio": 0.0, "train.checkpoint_steps": None, **keys})
            runs[name] = train(load_config(None, overrides))
    return runs


def train_losses(run):
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("keys, problem", [
    ({"tuning.method": "ia3", "tuning.use_dora": True}, "tuning.use_dora: applies to tuning.method lora or qlora, "
                                                        "but tuning.method is ia3"),
    ({"tuning.method": "adalora", "tuning.use_rslora": True}, "tuning.use_rslora: applies to tuning.method lora or "
                                                              "qlora, but tuning.method is adalora"),
    ({"tuning.method": "full", "tuning.loraplus_lr_ratio": 16}, "tuning.loraplus_lr_ratio: applies to tuning.method "
                                                                "lora or qlora, but tuning.method is full"),
    ({"tuning.method": "lora", "tuning.loraplus_lr_ratio": 0}, "tuning.loraplus_lr_ratio: must be greater than 0"),
    ({"tuning.method": "lora", "tuning.target_r": 4}, "tuning.target_r: applies to tuning.method adalora, but "
                                                      "tuning.method is lora"),
    ({"tuning.method": "adalora", "tuning.r": 4, "tuning.target_r": 6}, r"tuning.target_r: must be between 1 and "
                                                                        r"tuning.r \(4\), got 6"),
    ({"tuning.method": "qlora", "train.device": "cpu"}, "tuning.method: qlora quantises the model on a CUDA GPU, "
                                                        "and train.device is cpu; use tuning.method: lora"),
])
def test_a_variant_key_is_checked_against_the_method(keys, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, {"data.train": "x.csv", **keys})


def test_variant_keys_load_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {train: x.csv}\ntuning: {method: lora, use_dora: true, use_rslora: true, "
                                     "loraplus_lr_ratio: 16}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.tuning.use_dora, cfg.tuning.use_rslora, cfg.tuning.loraplus_lr_ratio) == (True, True, 16.0)
    with pytest.raises(ConfigError, match="tuning.use_dora: expected true or false, got 'yes'"):
        load_config(None, {"data.train": "x.csv", "tuning.method": "lora", "tuning.use_dora": "yes"})


def test_qlora_is_refused_without_a_gpu_before_anything_is_written(tiny_model, toy_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine can run QLoRA")
    out = tmp_path / "run"
    config = {}
    for key, value in toy_overrides(tiny_model, toy_data, out, **{"tuning.method": "qlora"}).items():
        section, _, name = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[name] = value
    (tmp_path / "qlora.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "qlora.yaml")]) == 2
    assert QLORA_UNAVAILABLE in capsys.readouterr().err
    assert not out.exists()
    # bitsandbytes installed but no GPU: refused at start-up, when the model is wrapped
    with pytest.raises(TextuneError, match="tuning.method: qlora needs a CUDA GPU and bitsandbytes; on this machine "
                                           "use tuning.method: lora"):
        quantize_4bit(load_classifier(str(tiny_model), ["a", "b"]), keep=["classifier"])


# ---------------------------------------------------------------- wrapping and the optimizer


def test_dora_and_rslora_reach_peft(tiny_model):
    dora = apply_peft(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="lora", use_dora=True))
    assert dora.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in n for n, _ in dora.named_parameters())
    rs = apply_peft(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="lora", r=16, use_rslora=True))
    layer = rs.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(16.0 / math.sqrt(16))  # alpha / sqrt(r), not alpha / r


@pytest.mark.parametrize("fused", [True, False])
def test_loraplus_puts_lora_b_at_ratio_times_lr(tiny_model, fused):
    model = apply_peft(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="lora"))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, fused_optimizer=fused), lora_b_ratio=16.0)
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the lr the loop logs is the base one
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(1.6e-2 if ".lora_B." in name else 1e-3), name


# ---------------------------------------------------------------- training, merging, loading


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains(variant_runs, variant):
    losses = train_losses(variant_runs[variant])
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_adalora_reallocates_ranks_after_every_step(variant_runs, allocations):
    assert allocations == list(range(STEPS))  # the loop's hook: once per optimizer step, step index from 0
    saved = json.loads((variant_runs["adalora"] / "model" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == STEPS
    ranks = [sum(mask) for mask in saved["rank_pattern"].values()]
    # The saved adapter is the best evaluation's (step 5, while the budget falls from r 8 towards target_r 2):
    # ranks were taken from the layers, more from some than from others, and its weights are cut to them.
    assert 2 * len(ranks) <= sum(ranks) < 8 * len(ranks) and len(set(ranks)) > 1, ranks
    weights = load_file(variant_runs["adalora"] / "model" / "adapter_model.safetensors")
    assert sorted(v.shape[0] for k, v in weights.items() if "lora_E" in k) == sorted(ranks)


@pytest.mark.parametrize("variant", ["dora", "rslora", "adalora"])
def test_a_variant_merges_and_predicts_as_the_run(variant_runs, tmp_path, variant):
    run = variant_runs[variant]
    merged_dir = merge_adapter(run, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged, tokenizer = load_adapter_classifier(run / "model", merge=True)
    unmerged, _ = load_adapter_classifier(run / "model", merge=False)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(merged(**batch).logits, unmerged(**batch).logits, atol=1e-4, rtol=0)
    expected = load_predictor(run).predict(TEXTS)
    for other in (load_predictor(merged_dir), ):
        got = other.predict(TEXTS)
        assert [r["label"] for r in got] == [r["label"] for r in expected]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], atol=1e-4)


@pytest.mark.parametrize("variant", ["dora", "adalora"])
def test_a_variant_loads_in_the_registry(variant_runs, tmp_path, variant):
    from textune.adapters import AdapterPredictor

    registry = AdapterRegistry(tmp_path / "adapters")
    registry.add(variant_runs[variant], variant)
    assert registry.entry(variant)["method"] == ("adalora" if variant == "adalora" else "lora")
    got = AdapterPredictor(registry.root).predict_proba(TEXTS, adapter=variant)
    np.testing.assert_allclose(got, load_predictor(variant_runs[variant]).predict_proba(TEXTS), atol=1e-5)


@pytest.mark.parametrize("tuning", [TuningConfig(method="adalora", r=4, target_r=1, target_modules=["c_attn"]),
                                    TuningConfig(method="lora", use_dora=True, target_modules=["c_attn"])],
                         ids=["adalora", "dora"])
def test_a_causal_lm_variant_trains_with_its_hook_and_merges(tmp_path, tuning):
    """GPT-2's Conv1D layers (instruction tuning, pretrain clm): the tuning's hook after each step, then a merge
    into a causal LM with the adapter's logits."""
    from conftest import build_tiny_lm
    from transformers import AutoModelForCausalLM

    from textune.adapters import save_adapter_extras
    from textune.tuning import optimizer_step_hook

    base = build_tiny_lm(tmp_path / "gpt2", "clm")
    model = apply_peft(AutoModelForCausalLM.from_pretrained(base), tuning)
    hook = optimizer_step_hook(model, 10)
    assert (hook is None) == (tuning.method != "adalora")
    optimizer = build_optimizer(model, TrainConfig(lr=5e-2))
    ids = torch.randint(5, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if hook is not None:
            hook(step)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    if hook is not None:
        assert model.peft_config["default"].rank_pattern  # the budget was fixed at step 8
    model.save_pretrained(tmp_path / "adapter")
    save_adapter_extras(model, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "adapter", tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_adalora_resumed_after_its_budget_was_fixed_fixes_it_again(tiny_model):
    """A checkpoint holds weights, not the adapter's rank pattern: a run resumed in the last 20% of its steps
    finds none, and the hook fixes the budget again rather than failing."""
    from textune.tuning import optimizer_step_hook

    model = apply_peft(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="adalora", r=4))
    hook = optimizer_step_hook(model, 10)
    assert model.peft_config["default"].rank_pattern is None
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3]]), "labels": torch.tensor([1])}
    model(**batch).loss.backward()
    hook(9)
    assert model.peft_config["default"].rank_pattern


def _can_run_qlora() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not _can_run_qlora(), reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_on_a_4bit_base_and_merges(tiny_model, toy_data, tmp_path):
    import bitsandbytes as bnb

    model = apply_peft(load_classifier(str(tiny_model), ["a", "b"]), TuningConfig(method="qlora"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "classifier" in n)
    run = train(load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "tuning.method": "qlora", "train.max_steps": STEPS, "train.lr": 1e-2, "train.logging_steps": 1,
        "train.checkpoint_steps": None})))
    assert all(math.isfinite(v) for v in train_losses(run))
    merged = merge_adapter(run)
    assert len(load_predictor(merged).predict(TEXTS)) == len(TEXTS)
