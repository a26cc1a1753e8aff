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


def test_auto_measures_only_fixed_or_bucketed_shapes_with_enough_steps_per_shape():
    dynamic = plan_compile("auto", "cpu", "no", 1_000_000, 66, None, batch_size=32)
    short = plan_compile("auto", "cpu", "no", 4_000, 66, 16, batch_size=32)
    bucketed = plan_compile("auto", "cpu", "bf16", 67_349, 66, 16, batch_size=32)
    blocks = plan_compile("auto", "cpu", "no", 6_400, 128, None, batch_size=32, fixed_length=128)
    streamed = plan_compile("auto", "cpu", "no", 1_000_000, 128, None, batch_size=32, fixed_length=128, streamed=True)
    spread = plan_compile("auto", "cuda", "bf16", 1_000_000, 66, 16, batch_size=32, processes=2)
    assert [p.enabled for p in (dynamic, short, streamed, spread)] == [False] * 4
    assert "padded to their longest row" in dynamic.reason and "train.pad_to_multiple_of buckets them" in dynamic.reason
    assert dynamic.pad_to_multiple_of is None  # auto never changes the padding: eager batches stay exact
    # 4,000 samples in batches of 32: 125 steps for 10 shapes (lengths 16..80, two batch sizes each)
    assert "125 planned steps for up to 10 shapes: fewer than 100 steps a shape" in short.reason
    assert "streamed training set is not measured" in streamed.reason and "2 processes" in spread.reason
    # long enough with bounded shapes: compile, unless the first batch's measurement says otherwise
    assert (bucketed.enabled, bucketed.measure, bucketed.pad_to_multiple_of, bucketed.max_shapes) == (True, True, 16, 10)
    assert (blocks.enabled, blocks.measure, blocks.pad_to_multiple_of, blocks.max_shapes) == (True, True, None, 2)
    assert "one length: blocks of 128 tokens, 200 planned steps" in blocks.reason
    for plan in (dynamic, short, bucketed, blocks):  # no figure from another machine, ever
        assert "1210" not in plan.reason and "AVX" not in plan.reason and "SST-2" not in plan.reason
    forced = plan_compile(True, "cpu", "no", 10, 32, 8)
    assert (forced.enabled, forced.measure, forced.pad_to_multiple_of, forced.max_shapes) == (True, False, 8, 8)
    assert plan_compile(True, "cpu", "no", 10, 32, None).pad_to_multiple_of == 16
    assert plan_compile(True, "cpu", "no", 10, 32, None, fixed_length=32).max_shapes == 2


@pytest.mark.parametrize("eager, compiled, compile_s, keep, says", [
    (0.20, 0.10, 5.0, True, "step 0.1 s compiled vs 0.2 s eager, 5 s to compile a shape: compiling up to 2 shapes "
                            "pays after 100 steps"),
    (0.20, 0.19, 30.0, False, "would not pay after 6,000 steps"),
    (0.20, 0.25, 1.0, False, "0.25 s compiled vs 0.2 s eager, 1 s to compile a shape: no faster"),
])
def test_the_measured_choice_weighs_the_gain_over_the_planned_steps_against_compiling_every_shape(
        eager, compiled, compile_s, keep, says):
    plan = plan_compile("auto", "cpu", "no", 32 * 500, 128, None, batch_size=32, fixed_length=128)
    chosen, reason = compiling.measured_choice(eager, compiled, compile_s, plan)
    assert chosen == keep and reason.startswith(plan.reason + "; measured on the first batch here: ") and says in reason


@pytest.mark.parametrize("compiled_step, chosen", [(0.01, "on"), (10.0, "off")])
def test_auto_says_its_measured_choice_in_one_line_and_trains_accordingly(tiny_model, toy_data, tmp_path,
                                                                         monkeypatch, capsys, compiled_step, chosen):
    """The whole path of a measured auto: the first batch timed eager and compiled (timings pinned here), one
    start-up line with the choice and the figures it came from, and a run that compiles, or trains eagerly the
    same steps as a run that never measured."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")  # the plumbing, without code generation
    monkeypatch.setattr(compiling, "MIN_STEPS_PER_SHAPE", 1)
    real = compiling.measured_choice
    monkeypatch.setattr(compiling, "measured_choice", lambda e, c, s, plan: real(0.1, compiled_step, 0.01, plan))
    model = str(without_dropout(tiny_model, tmp_path))
    extra = {"train.pad_to_multiple_of": 16}
    eager = run(model, toy_data, tmp_path / "eager", **{"train.compile": False, **extra})
    capsys.readouterr()
    auto = run(model, toy_data, tmp_path / "auto", **{"train.compile": "auto", **extra})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile ")]
    assert len(lines) == 1 and lines[0].startswith(f"compile    {chosen} (auto: bucketed: lengths padded to "
                                                   f"multiples of 16, 20 planned steps"), lines
    assert "measured on the first batch here: " in lines[0]
    assert json.loads((auto / "metrics.json").read_text())["train"]["compiled"] == (chosen == "on")
    if chosen == "off":
        assert history_losses(auto) == history_losses(eager)
    else:
        assert history_losses(auto) == pytest.approx(history_losses(eager), rel=1e-4, abs=1e-5)


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
