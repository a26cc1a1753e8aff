"""train.compile: what auto chooses, bounded compiles, same losses as eager, exact resume, fallback on failure."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from conftest import toy_overrides
from textune import compiling
from textune.compiling import plan_compile
from textune.config import load_config
from textune.train import train


def history_losses(run):
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def without_dropout(tiny_model, tmp_path):
    """The tiny BERT with dropout off: compiled and eager kernels then compute the same function."""
    folder = tmp_path / "tiny-no-dropout"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run(tiny_model, toy_data, out, **extra):
    overrides = {"train.epochs": 1, "train.logging_steps": 1, "train.eval_steps": None, **extra}
    return train(load_config(None, toy_overrides(tiny_model, toy_data, out, **overrides)))


def test_auto_compiles_only_where_a_gain_was_measured_and_the_run_is_long_enough():
    short = plan_compile("auto", "cpu", "bf16", 4_000, 66, None)
    long = plan_compile("auto", "cpu", "bf16", 67_349, 66, None)
    fp32 = plan_compile("auto", "cpu", "no", 1_000_000, 66, None)
    unmeasured = plan_compile("auto", "cuda", "bf16", 1_000_000, 66, None)
    assert (short.enabled, long.enabled, fp32.enabled, unmeasured.enabled) == (False, True, False, False)
    assert "4,000 planned samples" in short.reason and "train.compile: true to try" in unmeasured.reason
    assert short.pad_to_multiple_of is None  # eager batches keep their exact dynamic padding
    # Compiling pads to multiples of 16: 66 tokens -> lengths 16, 32, 48, 64, 80, each at two batch sizes.
    assert (long.pad_to_multiple_of, long.max_shapes) == (16, 10)
    forced = plan_compile(True, "cpu", "no", 10, 32, 8)
    assert (forced.enabled, forced.pad_to_multiple_of, forced.max_shapes) == (True, 8, 8)


def test_compiled_training_has_eager_losses_and_compiles_no_more_than_the_buckets(tiny_model, toy_data, tmp_path):
    model = str(without_dropout(tiny_model, tmp_path))
    eager = run(model, toy_data, tmp_path / "eager", **{"train.compile": False, "train.pad_to_multiple_of": 16})
    compiled = run(model, toy_data, tmp_path / "compiled", **{"train.compile": True, "train.pad_to_multiple_of": 16})
    assert history_losses(compiled) == pytest.approx(history_losses(eager), rel=1e-4, abs=1e-5)
    metrics = json.loads((compiled / "metrics.json").read_text())["train"]
    # max_length 32 in multiples of 16: lengths 16 and 32; 320 rows in batches of 16 leave no smaller last batch.
    assert metrics["compiled"] and 1 <= metrics["compiled_shapes"] <= 2
    assert not json.loads((eager / "metrics.json").read_text())["train"]["compiled"]


def test_graphs_compiled_stay_within_the_bucket_bound(tiny_model, toy_data, tmp_path, monkeypatch):
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graphs, run as traced (no code generation: fast)
        graphs.append(tuple(getattr(x, "shape", None) for x in example_inputs))
        return gm.forward

    monkeypatch.setattr(compiling, "BACKEND", counting_backend)
    out = run(tiny_model, toy_data, tmp_path / "run", **{"train.compile": True, "train.pad_to_multiple_of": 8,
                                                       "train.batch_size": 24, "train.epochs": 2})
    plan = plan_compile(True, "cpu", "no", 0, 32, 8)
    shapes = json.loads((out / "metrics.json").read_text())["train"]["compiled_shapes"]
    # 320 rows in batches of 24: an epoch's last batch holds 8, so two batch sizes; lengths 8..32.
    assert 2 <= shapes <= plan.max_shapes
    assert len(graphs) <= shapes, [(g[0], g[3], len(g)) for g in graphs]  # one graph per shape: no recompiles beyond the buckets


def test_a_compiled_run_resumes_exactly(tiny_model, toy_data, tmp_path):
    extra = {"train.compile": True, "train.pad_to_multiple_of": 32, "train.epochs": 2, "train.checkpoint_steps": 10,
             "train.keep_last": 10, "train.load_best_at_end": False}  # the last model: the resumed folder has no best
    ref = run(tiny_model, toy_data, tmp_path / "ref", **extra)
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "resumed", **{
        "train.epochs": 2, "train.logging_steps": 1, "train.eval_steps": None, **extra}))
    resumed = train(cfg, resume=str(ref / "checkpoints" / "step-00000030"))
    # The same batches and dropout masks as the uninterrupted run. Not bit for bit: compiled CPU kernels are not
    # bit-reproducible even between two fresh runs (they part at the 8th digit within 15 steps), while one wrong
    # mask or batch moves the loss in the 2nd digit.
    assert history_losses(resumed)[30:] == pytest.approx(history_losses(ref)[30:], rel=1e-6)
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_a_failing_compiler_falls_back_to_eager_with_one_line(tiny_model, toy_data, tmp_path, monkeypatch, capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found\nsecond line of the compiler's output")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    eager = run(tiny_model, toy_data, tmp_path / "eager", **{"train.compile": False, "train.pad_to_multiple_of": 16})
    capsys.readouterr()
    fallen = run(tiny_model, toy_data, tmp_path / "fallen", **{"train.compile": True})
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "compile    failed" in line]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0] and "second line" not in out
    assert "Traceback" not in out
    # The probe left RNG and gradients untouched: the same steps as a run that never tried to compile.
    assert history_losses(fallen) == history_losses(eager)
    assert not json.loads((fallen / "metrics.json").read_text())["train"]["compiled"]
