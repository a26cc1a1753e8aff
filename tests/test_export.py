"""textune export --format onnx: the export matches PyTorch, every encoder task's predictor runs on it unchanged
(predict, evaluate, serve), int8 reports its agreement, PEFT runs are merged, and bad input is refused in one
line with nothing left behind."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import assert_same_rows, build_tiny_lm, run_textune, toy_overrides, write_csv, write_jsonl  # noqa: E402
from test_adapters import train_adapter  # noqa: E402
from test_multi_label import ml_overrides, toy_row as ml_row  # noqa: E402
from test_question_answering import qa_overrides, toy_rows as qa_rows  # noqa: E402
from test_regression import reg_overrides, toy_pair  # noqa: E402
from test_token_classification import ner_overrides, write_conll  # noqa: E402

from textune.config import load_config  # noqa: E402
from textune.errors import TextuneError  # noqa: E402
import textune.export as export  # noqa: E402
from textune.export import export_onnx, time_graphs  # noqa: E402
from textune.onnx_model import OnnxModel  # noqa: E402
from textune.infer import load_trained_model  # noqa: E402
from textune.tasks.classification import ClassifierPredictor  # noqa: E402
from textune.tasks import get_task, load_predictor  # noqa: E402
from textune.train import train  # noqa: E402

TEXTS = ["the movie was great and superb", "awful boring film", "the plot was very nice and the acting was good",
         "it was poor", "love this story", "the film"]


@pytest.fixture(autouse=True)
def fused_graph_runs_faster(monkeypatch):
    """`fuse="auto"` times both graphs on this machine; here the fused one wins, so what a test checks does not
    hang on the timing of the moment (test_auto_keeps_the_fused_graph_only_where_it_runs_faster times for real)."""
    monkeypatch.setattr(export, "time_graphs", lambda folder, batch, files, repeats=5: {"plain": 0.002, "fused": 0.001})


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The toy classifier exported by the CLI, as a user does it: (folder, the command's result)."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    result = run_textune("export", trained_run, "--format", "onnx", "--output", out, "--fuse", "yes")
    return out, result


def test_cli_export_writes_model_tokenizer_run_files_and_its_check(exported, trained_run):
    out, result = exported
    assert result.returncode == 0, result.stderr
    assert "validation rows of" in result.stdout and "max abs logit difference" in result.stdout
    assert f"ONNX export written to {out}" in result.stdout
    for name in ("model.onnx", "config.json", "tokenizer_config.json", "config.yaml", "textune_onnx.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "textune_onnx.json").read_text())
    assert info["source"] == str(trained_run.resolve()) and info["task"] == "classification"
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and info["outputs"] == ["logits"]
    assert info["check"]["max_abs_diff"] < 1e-5 and info["quantize"] is None
    # a BERT: ONNX Runtime's transformer fusions applied, in float32, and said in the check's line
    optimization = info["optimization"]
    assert optimization["fused"] and optimization["precision"] == "fp32" and optimization["opt_level"] == 1
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= set(optimization["operators"])
    assert "ONNX Runtime (fused: 1 EmbedLayerNormalization, 2 Attention" in result.stdout


def test_onnx_logits_equal_pytorch_on_a_padded_batch_of_another_shape(exported, trained_run):
    import onnx

    out, _ = exported
    operators = {node.op_type for node in onnx.load(out / "model.onnx").graph.node}
    assert {"Attention", "EmbedLayerNormalization"} <= operators and "Softmax" not in operators  # the fused graph
    model, tokenizer = load_trained_model(trained_run / "model")
    # five rows, padded to the longest: neither the batch size nor the length of the export's example
    batch = tokenizer(TEXTS[:5], TEXTS[1:6], padding=True, return_tensors="pt")
    assert batch["attention_mask"].shape[0] == 5 and not batch["attention_mask"].all()
    onnx_logits = OnnxModel(out)(**batch).logits.numpy()
    torch_logits = model(**batch).logits.detach().numpy()
    assert onnx_logits.shape == torch_logits.shape == (5, 2)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-5)


def test_predict_on_the_export_gives_the_runs_labels_and_probabilities(exported, trained_run, tmp_path):
    out, _ = exported
    np.testing.assert_allclose(ClassifierPredictor(out, batch_size=4).predict_proba(TEXTS),
                               ClassifierPredictor(trained_run, batch_size=4).predict_proba(TEXTS), atol=1e-5)
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS))
    by_cli = run_textune("predict", out, "--input", inputs)
    assert by_cli.returncode == 0, by_cli.stderr
    rows = [json.loads(line) for line in by_cli.stdout.splitlines()]
    assert_same_rows(rows, [{"text": t, **r} for t, r in zip(TEXTS, ClassifierPredictor(trained_run).predict(TEXTS))])


def test_evaluate_on_the_export_gives_the_runs_metrics(exported, trained_run, toy_data):
    out, _ = exported
    task = get_task("classification")
    on_export = task.evaluate_file(task.load_predictor(out), str(toy_data["test"]), {})
    on_run = task.evaluate_file(task.load_predictor(trained_run), str(toy_data["test"]), {})
    assert on_export["accuracy"] == on_run["accuracy"] and on_export["loss"] == pytest.approx(on_run["loss"], abs=1e-5)


def test_serve_on_the_export_answers_classify(exported, trained_run):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app

    out, _ = exported
    with TestClient(create_app(load_predictor(out), ServeSettings(), "onnx")) as client:
        r = client.post("/v1/classify", json={"texts": TEXTS[:3]})
        assert r.status_code == 200, r.text
        assert_same_rows(r.json()["results"], ClassifierPredictor(trained_run).predict(TEXTS[:3]))


def test_predict_precision_options_are_refused_on_an_export(exported):
    out, _ = exported
    with pytest.raises(TextuneError, match=r"an ONNX export is quantised when exported .*--quantize int8"):
        ClassifierPredictor(out, precision="int8")


# ---------------------------------------------------------------- every encoder task


def task_run(task: str, tiny_model: Path, root: Path):
    """(run of `task` trained one epoch on a little toy data, predict's inputs)."""
    rng = random.Random(7)
    if task == "regression":  # a text pair: token_type_ids matter
        data = {s: write_csv(root / f"{s}.csv", [toy_pair(rng) for _ in range(n)]) for s, n in (("train", 64), ("validation", 16))}
        overrides, inputs = reg_overrides(tiny_model, data, root / "run"), (TEXTS[:4], TEXTS[2:])
    elif task == "multi-label":
        data = {s: write_csv(root / f"{s}.csv", [ml_row(rng) for _ in range(n)]) for s, n in (("train", 64), ("validation", 16))}
        overrides, inputs = ml_overrides(tiny_model, data, root / "run"), (["good story", "bad", "the plot"],)
    elif task == "token-classification":
        data = {"train": write_conll(root / "train.conll", 64, seed=1), "validation": write_conll(root / "val.conll", 16, seed=2)}
        overrides, inputs = ner_overrides(tiny_model, data, root / "run"), (TEXTS,)
    else:
        data = {"train": write_jsonl(root / "train.jsonl", qa_rows(64, seed=1)),
                "validation": write_jsonl(root / "validation.jsonl", qa_rows(16, seed=2, n_words=30))}
        contexts = [r["context"] for r in qa_rows(3, seed=3, n_words=40)]  # longer than one window
        overrides, inputs = qa_overrides(tiny_model, data, root / "run"), (["is it"] * 3, contexts)
    return train(load_config(None, {**overrides, "train.epochs": 1})), inputs


@pytest.mark.parametrize("task", ["regression", "multi-label", "token-classification", "question-answering"])
def test_each_encoder_task_predicts_the_same_on_its_export(task, tiny_model, tmp_path):
    run, inputs = task_run(task, tiny_model, tmp_path)
    lines = []
    out = export_onnx(run, say=lines.append)
    assert out == run / "onnx" and "validation rows of" in lines[0] and "(fused: " in lines[0], lines
    info = json.loads((out / "textune_onnx.json").read_text())
    assert info["check"]["max_abs_diff"] < 1e-4 and "Attention" in info["optimization"]["operators"]
    if task == "multi-label":
        assert (out / "thresholds.json").read_text() == (run / "model" / "thresholds.json").read_text()
    on_export = load_predictor(out)
    assert type(on_export).__name__ == type(load_predictor(run)).__name__
    assert_same_rows(on_export.predict(*inputs), load_predictor(run).predict(*inputs))


def test_int8_export_reports_its_agreement_and_predicts(trained_run, tmp_path):
    lines = []
    out = export_onnx(trained_run, tmp_path / "int8", quantize="int8", say=lines.append)
    assert len(lines) == 2 and lines[1].startswith("int8 (dynamic quantisation) vs PyTorch: max abs logit difference")
    assert "of predicted labels agree" in lines[1]
    check = json.loads((out / "textune_onnx.json").read_text())["check"]
    assert 0.9 <= check["int8_agreement"] <= 1.0 and check["int8_max_abs_diff"] > 0
    assert not (out / "model.fp32.onnx").exists()
    probs = ClassifierPredictor(out).predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_fused_per_token_outputs_equal_pytorch_on_a_padded_batch_of_another_shape(tiny_model, tmp_path):
    """Token classification's logits, one per token, from the fused graph: the same as PyTorch's on every real
    token of a batch whose size and length are not the export's sample's."""
    import torch

    run, _ = task_run("token-classification", tiny_model, tmp_path)
    out = export_onnx(run, say=lambda line: None)
    assert json.loads((out / "textune_onnx.json").read_text())["optimization"]["fused"]
    model, tokenizer = load_trained_model(run / "model")
    words = [t.split() for t in TEXTS[:5]]
    batch = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool().numpy()
    assert mask.shape[0] == 5 and not mask.all()
    with torch.inference_mode():
        expected = model(**batch).logits.numpy()
    np.testing.assert_allclose(OnnxModel(out)(**batch).logits.numpy()[mask], expected[mask], atol=1e-5)


def test_an_architecture_the_optimizer_does_not_fuse_is_exported_plain_with_one_line(tiny_model, tmp_path):
    import torch
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = DebertaV2Config(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                             type_vocab_size=0, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(tmp_path / "deberta")
    tokenizer.save_pretrained(tmp_path / "deberta")
    lines = []
    out = export_onnx(tmp_path / "deberta", say=lines.append)
    why = ("ONNX Runtime's transformer optimizer has no fusions for deberta-v2 models (it fuses bert, roberta, "
           "xlm-roberta, camembert, distilbert, electra)")
    assert lines[0] == f"plain ONNX graph (no fusions): {why}" and len(lines) == 2
    assert lines[1].startswith("ONNX Runtime (plain graph) vs PyTorch on 8 built-in sample texts")
    info = json.loads((out / "textune_onnx.json").read_text())
    assert info["optimization"] == {"fused": False, "why": why} and info["check"]["max_abs_diff"] < 1e-5
    np.testing.assert_allclose(ClassifierPredictor(out).predict_proba(TEXTS),
                               ClassifierPredictor(tmp_path / "deberta").predict_proba(TEXTS), atol=1e-5)


def test_auto_keeps_the_fused_graph_only_where_it_runs_faster(trained_run, tmp_path, monkeypatch):
    timed = []

    def plain_as_fast(folder, batch, files, repeats=5):
        timed.append(time_graphs(folder, batch, files, repeats=1))  # the real timing: both graphs load and run
        return {"plain": 0.0100, "fused": 0.0101}

    monkeypatch.setattr(export, "time_graphs", plain_as_fast)
    lines = []
    out = export_onnx(trained_run, tmp_path / "auto", say=lines.append)
    assert set(timed[0]) == {"plain", "fused"} and all(0 < s < 60 for s in timed[0].values())
    why = ("the fused graph was no faster on this machine (10.1 ms against the plain graph's 10.0 ms per 32 rows; "
           "--fuse yes keeps it)")
    assert lines[0] == f"plain ONNX graph (no fusions): {why}" and "(plain graph)" in lines[1]
    info = json.loads((out / "textune_onnx.json").read_text())
    assert info["optimization"] == {"fused": False, "why": why, "plain_ms": 10.0, "fused_ms": 10.1}
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]
    out = export_onnx(trained_run, tmp_path / "yes", fuse="yes", say=lines.append)  # kept, whatever the timing
    assert json.loads((out / "textune_onnx.json").read_text())["optimization"]["fused"] and len(timed) == 1
    with pytest.raises(TextuneError, match="--fuse maybe: choose one of auto, yes, no"):
        export_onnx(trained_run, tmp_path / "bad", fuse="maybe")
    assert not (tmp_path / "bad").exists()


def test_a_fused_graph_that_disagrees_or_an_optimizer_failure_keeps_the_plain_graph(trained_run, tmp_path,
                                                                                  monkeypatch):
    import onnxruntime.transformers.optimizer as optimizer

    import textune.export as export
    from textune.export import compare_outputs

    calls = []

    def fused_far_apart(*args):  # the first comparison is the fused graph's against the plain one
        calls.append(1)
        return (0.5, None) if len(calls) == 1 else compare_outputs(*args)

    monkeypatch.setattr(export, "compare_outputs", fused_far_apart)
    lines = []
    out = export_onnx(trained_run, tmp_path / "disagrees", say=lines.append)
    assert lines[0] == "plain ONNX graph (no fusions): the fused graph differs from the plain one by 5.00e-01"
    assert "ONNX Runtime (plain graph) vs PyTorch" in lines[1]
    assert json.loads((out / "textune_onnx.json").read_text())["check"]["max_abs_diff"] < 1e-5
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("graph too strange\nsecond line")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    lines = []
    out = export_onnx(trained_run, tmp_path / "failed", say=lines.append)
    assert lines[0] == "plain ONNX graph (no fusions): ONNX Runtime's transformer optimizer failed on it (graph too strange)"
    assert json.loads((out / "textune_onnx.json").read_text())["optimization"]["fused"] is False
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]


def test_a_lora_run_is_merged_into_its_base_before_export(tiny_model, toy_data, tmp_path):
    run = train_adapter(tiny_model, toy_data, tmp_path / "lora", "lora")
    out = export_onnx(run, say=lambda line: None)
    assert not any(out.glob("adapter_*")) and json.loads((out / "config.json").read_text())["id2label"]
    np.testing.assert_allclose(ClassifierPredictor(out).predict_proba(TEXTS), ClassifierPredictor(run).predict_proba(TEXTS), atol=1e-5)


def test_the_check_names_its_rows_found_from_any_folder_or_why_it_used_samples(tiny_model, toy_data, tmp_path,
                                                                              monkeypatch):
    """Export reads the run's validation file from another folder than training ran in (also for a run whose
    config.yaml kept its data paths relative, as runs did before they were saved resolved: they are found from its
    output_dir as given), and says why when it checks on the built-in samples instead."""
    import yaml

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        shutil.copy(toy_data[split], project / "data" / f"{split}.csv")
    monkeypatch.chdir(project)
    relative = {split: Path("data") / f"{split}.csv" for split in ("train", "validation")}
    run = train(load_config(None, toy_overrides(tiny_model, relative, Path("runs/toy"), **{"train.max_steps": 2})))
    monkeypatch.chdir(tmp_path)
    lines = []
    export_onnx(run, tmp_path / "found", say=lines.append)
    assert f"on 32 validation rows of {project / 'data' / 'validation.csv'}: max abs" in lines[0], lines
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"].update(train="data/train.csv", validation="data/validation.csv")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    export_onnx(run, tmp_path / "found-relative", say=lines.append)
    assert f"on 32 validation rows of {project / 'data' / 'validation.csv'}: max abs" in lines[1], lines
    (project / "data" / "validation.csv").unlink()
    out = export_onnx(run, tmp_path / "samples", say=lines.append)
    why = "built-in sample texts (its validation file data/validation.csv is not found from here)"
    assert f"on 8 {why}: max abs" in lines[2], lines
    assert json.loads((out / "textune_onnx.json").read_text())["check"]["on"] == why


# ---------------------------------------------------------------- refusals


def test_tasks_without_an_export_spec_and_models_of_another_kind_are_refused(tmp_path):
    covered = r"ONNX export covers the encoder tasks \(classification, token-classification, question-answering, " \
              r"regression, multi-label, embedding\)"
    lm = build_tiny_lm(tmp_path / "clm", "clm")
    with pytest.raises(TextuneError, match=r"clm: language-modeling models cannot be exported to ONNX yet; " + covered):
        export_onnx(lm)
    run = tmp_path / "sft"
    shutil.copytree(lm, run / "model")
    (run / "config.yaml").write_text("task: instruction\n")
    with pytest.raises(TextuneError, match=r"sft: instruction models cannot be exported to ONNX yet; " + covered):
        export_onnx(run)
    assert not (run / "onnx").exists()
    (run / "config.yaml").write_text("task: classification\n")  # a run whose model is not its task's kind
    with pytest.raises(TextuneError, match=r"holds a GPT2LMHeadModel, not a classification model \(whose class name "
                                           r"ends in ForSequenceClassification\); " + covered):
        export_onnx(run)


def test_an_existing_output_needs_overwrite_and_must_be_an_export(exported, trained_run, tmp_path):
    out, _ = exported
    with pytest.raises(TextuneError, match=r"already exists; pass --overwrite to replace it or choose another --output"):
        export_onnx(trained_run, out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(TextuneError, match=r"exists and is not an ONNX export; refusing to overwrite it"):
        export_onnx(trained_run, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "--format tflite: textune exports to onnx only"),
    (["--quantize", "int4"], "--quantize int4: ONNX export quantises to int8 only"),
])
def test_cli_refuses_other_formats_and_quantisations_in_one_line(trained_run, tmp_path, args, message, capsys):
    from textune.cli import main

    assert main(["export", str(trained_run), "--output", str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"textune: error: {message}" + (
        " (or leave it out for float32)" if "int4" in message else "")
    assert not (tmp_path / "out").exists()


def test_a_path_that_is_no_run_or_model_is_refused(tmp_path):
    with pytest.raises(TextuneError, match=r"no run or model folder at"):
        export_onnx(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextuneError, match=r"is neither a textune run folder"):
        export_onnx(tmp_path / "empty")


def test_a_failed_export_or_check_leaves_nothing_behind(trained_run, tmp_path, monkeypatch):
    import torch

    import textune.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(TextuneError, match=r"torch.onnx could not export BertForSequenceClassification: Exporting the "
                                           r"operator 'aten::magic'"):
        export_onnx(trained_run, tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)
    with pytest.raises(TextuneError, match=r"differs from PyTorch by .* on validation rows .*nothing was written"):
        export_onnx(trained_run, tmp_path / "out", say=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_an_export_given_where_a_pytorch_run_is_needed_says_what_it_is(exported, trained_run, toy_data, tmp_path):
    from textune.adapters import merge_adapter
    from textune.report import write_report

    out, _ = exported
    what = rf"{out} is an ONNX export \(textune export\), which textune predict, evaluate and serve run"
    with pytest.raises(TextuneError, match=what + r".*choose another output_dir, or resume the run it was exported"):
        train(load_config(None, toy_overrides(Path("unused"), toy_data, out)), resume="latest")
    with pytest.raises(TextuneError, match=what + r", but this needs a YAML config"):
        load_config(out)
    for needs_pytorch in (merge_adapter, write_report, export_onnx):
        with pytest.raises(TextuneError, match=what + rf".*use the run it was exported from \({trained_run.resolve()}\)"):
            needs_pytorch(out)
    with pytest.raises(TextuneError, match=what):  # as model.name
        train(load_config(None, toy_overrides(out, toy_data, tmp_path / "run")))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "config.json", "config.yaml", "data_stats.json", "metrics.json", "textune_onnx.json",
         "tokenizer.json", "tokenizer_config.json"])
