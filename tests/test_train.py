import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import nested, toy_overrides, toy_rows, write_csv
from textune.config import TrainConfig, load_config
from textune.errors import TextuneError
from textune.models import load_classifier
from textune.tasks import get_task
from textune.train import build_optimizer, choose_mixed_precision, train


def read_history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_the_toy_task_is_learned(trained_run):
    history = read_history(trained_run)
    losses = [r["loss"] for r in history if r["type"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] >= 0.9
    assert metrics["test"]["accuracy"] >= 0.85
    assert metrics["validation"]["confusion_matrix"]["labels"] == ["negative", "positive"]


def test_run_folder_contents(trained_run):
    for name in ("config.yaml", "history.jsonl", "metrics.json", "data_stats.json", "validation_predictions.jsonl",
                 "model/model.safetensors", "model/config.json", "model/tokenizer.json"):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob("model.*"))  # no temporary model folders left behind
    history = read_history(trained_run)
    evals = [r for r in history if r["type"] == "eval"]
    assert len(evals) == 4  # one per epoch
    assert {"step", "epoch", "eval_loss", "eval_accuracy", "eval_f1"} <= set(evals[0])
    train_rec = next(r for r in history if r["type"] == "train")
    assert {"step", "epoch", "loss", "lr"} <= set(train_rec)
    stats = json.loads((trained_run / "data_stats.json").read_text())
    assert stats["sizes"] == {"train": 320, "validation": 64, "test": 48}
    assert set(stats["token_lengths"]["train"]) == {"examples", "mean", "p95", "max", "truncated_share"}


def test_saved_model_loads_in_transformers_with_named_labels(trained_run):
    from transformers import AutoModelForSequenceClassification, pipeline

    model = AutoModelForSequenceClassification.from_pretrained(trained_run / "model")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    clf = pipeline("text-classification", model=str(trained_run / "model"), device="cpu")
    assert clf("the movie was great and superb")[0]["label"] == "positive"
    assert clf("awful boring film")[0]["label"] == "negative"


def test_best_checkpoint_is_the_saved_model(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    evals = [r for r in read_history(trained_run) if r["type"] == "eval"]
    best = max(evals, key=lambda r: r["eval_accuracy"])  # first of the best: ties keep the earlier one
    assert metrics["best_step"] == best["step"]
    assert metrics["validation"]["accuracy"] == best["eval_accuracy"]


def test_a_last_evaluation_that_is_the_best_is_not_run_again_at_the_end(tiny_model, toy_data, tmp_path, monkeypatch):
    import textune.tasks.classification as classification

    passes, predict = [], classification.predict_logits

    def counted(model, loader, *args, **kwargs):
        passes.append(len(loader.dataset))
        return predict(model, loader, *args, **kwargs)

    monkeypatch.setattr(classification, "predict_logits", counted)
    run = train(load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{"train.max_steps": 2})))
    evals = [r for r in read_history(run) if r["type"] == "eval"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["step"] for r in evals] == [2] and metrics["best_step"] == 2
    assert passes == [64]  # the validation set once: the loop's evaluation stands for the final one
    assert metrics["validation"]["accuracy"] == evals[0]["eval_accuracy"]
    assert len((run / "validation_predictions.jsonl").read_text().splitlines()) == 64


def test_existing_run_folder_is_refused_unless_overwrite(tiny_model, toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("old")
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, out, **{"train.max_steps": 2}))
    with pytest.raises(TextuneError, match="already exists; pick another output_dir or pass --overwrite"):
        train(cfg)
    assert (out / "config.yaml").read_text() == "old"
    train(cfg, overwrite=True)
    assert (out / "model" / "model.safetensors").is_file()


def test_overwrite_never_deletes_a_foreign_folder(tiny_model, toy_data, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path, **{"train.max_steps": 2}))
    with pytest.raises(TextuneError, match="not a textune run folder; refusing"):
        train(cfg, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_data_leaves_no_run_folder(tiny_model, toy_data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, out, **{"data.text_column": "sentence"}))
    with pytest.raises(TextuneError, match="no column 'sentence'"):
        train(cfg)
    assert not out.exists()


def test_early_stopping_and_step_evaluation(tiny_model, toy_data, tmp_path):
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "train.lr": 1e-9, "train.eval_steps": 2, "train.early_stopping_patience": 2, "train.metric": "loss",
        "train.greater_is_better": False}))
    run = train(cfg)
    evals = [r for r in read_history(run) if r["type"] == "eval"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped_early"] is True
    assert [r["step"] for r in evals][:2] == [2, 4]
    assert len(evals) < 40 // 2  # 4 epochs of 20 steps would evaluate 40 times without stopping


def test_gradient_accumulation_counts_optimizer_steps(tiny_model, toy_data, tmp_path):
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "train.epochs": 1, "train.gradient_accumulation_steps": 2, "train.logging_steps": 1}))
    run = train(cfg)
    steps = [r["step"] for r in read_history(run) if r["type"] == "train"]
    assert steps == list(range(1, 11))  # 320 rows / 16 per micro-batch / 2 micro-batches per step


def test_head_only_leaves_the_encoder_untouched(tiny_model, toy_data, tmp_path):
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "tuning.method": "head", "train.max_steps": 5, "train.load_best_at_end": False}))
    run = train(cfg)
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    key = next(k for k in before if "encoder.layer.0.attention.self.query.weight" in k)
    assert torch.equal(before[key], after["bert." + key] if "bert." + key in after else after[key])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == 32 * 2 + 2 + 32 * 32 + 32  # classifier + pooler (issue 18)


def test_no_validation_file_splits_training_data(tiny_model, tmp_path):
    train_file = write_csv(tmp_path / "t.csv", toy_rows(100, 5))
    over = {"model.name": str(tiny_model), "data.train": str(train_file), "data.validation_split": 0.2,
            "train.max_steps": 3, "train.mixed_precision": "no", "output_dir": str(tmp_path / "r")}
    run = train(load_config(None, over))
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["sizes"] == {"train": 80, "validation": 20}


def test_same_seed_same_result(tiny_model, toy_data, tmp_path):
    over = {"train.max_steps": 6, "train.logging_steps": 1}
    a = train(load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "a", **over)))
    b = train(load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "b", **over)))
    assert [r["loss"] for r in read_history(a) if r["type"] == "train"] == \
           [r["loss"] for r in read_history(b) if r["type"] == "train"]


def test_mixed_precision_choice():
    assert choose_mixed_precision("no", "cpu") == ("no", None)
    assert choose_mixed_precision("bf16", "cpu") == ("bf16", None)
    with pytest.raises(TextuneError, match="fp16 needs a CUDA GPU"):
        choose_mixed_precision("fp16", "cpu")
    mode, note = choose_mixed_precision("auto", "cpu")
    assert mode in ("bf16", "no") and (mode == "bf16") == (note is None)


def test_fused_optimizer_switch(tiny_model):
    model = load_classifier(str(tiny_model), ["a", "b"])
    fused = build_optimizer(model, TrainConfig())
    foreach = build_optimizer(model, TrainConfig(fused_optimizer=False))
    assert fused.defaults["fused"] is True and not fused.defaults["foreach"]
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]


def test_eager_attention_trains_like_sdpa(tiny_model, toy_data, tmp_path):
    """model.attention switches the kernel, not the maths: same seed, same losses within float rounding."""
    losses = {}
    for attention in ("sdpa", "eager"):
        cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / attention, **{
            "train.max_steps": 4, "train.logging_steps": 1, "train.mixed_precision": "no",
            "model.attention": attention}))
        assert get_task(cfg.task).load_inputs(cfg).model.config._attn_implementation == attention
        run = train(cfg)
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        losses[attention] = [r["loss"] for r in history if r["type"] == "train"]
    assert len(losses["sdpa"]) == 4 and losses["sdpa"] == pytest.approx(losses["eager"], abs=1e-4)


def test_bf16_training_runs_on_cpu(tiny_model, toy_data, tmp_path):
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "train.max_steps": 3, "train.mixed_precision": "bf16"}))
    run = train(cfg)
    assert all(v.dtype == torch.float32 for v in load_file(run / "model" / "model.safetensors").values())


def test_steps_skipped_by_the_gradient_scaler_are_not_counted(tiny_model, toy_data, tmp_path, monkeypatch):
    """fp16's gradient scaler skips a step whose gradients overflowed; the step count and the schedule must
    both count only the optimizer steps taken. Accelerate keeps a scaler on GPUs only, so this run gets a
    CPU one, and the first two backward passes are made to overflow."""
    from accelerate import Accelerator

    import textune.train

    class OverflowingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)

        def prepare(self, *objects):
            prepared = super().prepare(*objects)
            if len(objects) > 1:  # the training set-up: model first
                passes = []
                weight = next(prepared[0].parameters())
                weight.register_hook(lambda g: g * float("inf") if len(passes) < 2 and not passes.append(1) else g)
            return prepared

    monkeypatch.setattr(textune.train, "Accelerator", OverflowingAccelerator)
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "train.max_steps": 6, "train.logging_steps": 1, "train.warmup_ratio": 0.0, "train.scheduler": "linear"}))
    run = train(cfg)
    records = [r for r in read_history(run) if r["type"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["epoch"] == 0.4  # 8 of the epoch's 20 batches: 2 skipped steps and 6 taken
    # linear decay from train.lr to 0 over 6 steps: the lr logged after step s is lr * (1 - s / 6)
    assert [r["lr"] for r in records] == pytest.approx([3e-3 * (1 - s / 6) for s in range(1, 7)])
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 6


def test_a_best_model_that_reloads_partially_is_an_error(tiny_model, toy_data, tmp_path, monkeypatch):
    import textune.train
    from safetensors.torch import save_file

    real_save_model = textune.train.save_model

    def save_without_a_layer(model, tokenizer, target):
        real_save_model(model, tokenizer, target)
        weights = load_file(target / "model.safetensors")
        del weights[next(k for k in weights if k.endswith("layer.1.output.dense.weight"))]
        save_file(weights, target / "model.safetensors", metadata={"format": "pt"})

    monkeypatch.setattr(textune.train, "save_model", save_without_a_layer)
    # The best model must be an earlier step's, so that the end reloads it: with a learning rate too small to move
    # a prediction, step 1's accuracy is never beaten.
    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "r", **{
        "train.max_steps": 2, "train.eval_steps": 1, "train.lr": 1e-12, "train.metric": "accuracy"}))
    with pytest.raises(TextuneError, match=r"missing .*layer\.1\.output\.dense\.weight"):
        train(cfg)


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory):
    from conftest import build_tiny_bert

    model = build_tiny_bert(tmp_path_factory.mktemp("no-dropout"))
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # same maths for any batch split
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_accumulated_micro_batches_train_like_one_big_batch_with_a_partial_last_window(no_dropout_model, tmp_path):
    """Batch 48 against 3 accumulated micro-batches of 16, on 312 rows: 6 full steps, then a last window of
    24 rows, which is 2 micro-batches (16 + 8), not 3. Each example must weigh the same in every step.

    Tolerance 1e-5, as in test_distributed.py: the same arithmetic on the same examples, summed in another
    order and padded per micro-batch, moves fp32 results by a few eps (1.2e-7); the attention key bias
    (zero gradient in exact arithmetic, rounding noise amplified by Adam) is not compared. Weighting the
    last window by micro-batches instead of examples moves the weights by about 1e-3."""
    data = write_csv(tmp_path / "train.csv", toy_rows(312, seed=4))
    validation = write_csv(tmp_path / "validation.csv", toy_rows(16, seed=5))
    runs = {}
    for name, batch, accumulate in (("big", 48, 1), ("accumulated", 16, 3)):
        over = {"model.name": str(no_dropout_model), "model.max_length": 32, "data.train": str(data),
                "data.validation": str(validation), "train.epochs": 1, "train.batch_size": batch,
                "train.gradient_accumulation_steps": accumulate, "train.lr": 2e-2, "train.logging_steps": 1,
                "train.group_by_length": False,  # its length buckets depend on the batch size
                "train.warmup_ratio": 0.0, "train.mixed_precision": "no", "train.load_best_at_end": False,
                "output_dir": str(tmp_path / name)}
        runs[name] = train(load_config(None, over))
    big, accumulated = ([r["loss"] for r in read_history(runs[n]) if r["type"] == "train"] for n in runs)
    assert len(big) == len(accumulated) == 7
    assert big == pytest.approx(accumulated, abs=1e-5)
    a = load_file(runs["big"] / "model" / "model.safetensors")
    b = load_file(runs["accumulated"] / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith("attention.self.key.bias")) < 1e-5



def instruction_rows(n: int) -> list[dict]:
    """Conversations whose answers have 1 to 6 words, so micro-batches and process shares of one step hold
    different numbers of answer tokens."""
    words = "you are a helpful assistant answer the question what is two plus three five yes no".split()
    return [{"instruction": " ".join(words[i % 7:i % 7 + 2 + i % 5]),
             "output": " ".join(words[i % 4:i % 4 + 1 + i % 6])} for i in range(n)]


def test_accumulated_instruction_micro_batches_weigh_every_answer_token_the_same(tmp_path, monkeypatch):
    """Batch 8 against 2 accumulated micro-batches of 4, for instruction tuning: the step's loss is the sum over
    its answer tokens divided by their count over the whole step, as transformers' `num_items_in_batch`, not
    the mean of the micro-batches' own means (which under-weighs a micro-batch with more answer tokens).
    Tolerance as in the test above; the per-micro-batch mean, run as a third case, is 100 times further off."""
    from conftest import build_tiny_chat_lm, write_jsonl
    from textune.tasks.instruction import InstructionInputs, answer_loss

    model = build_tiny_chat_lm(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", instruction_rows(32))

    def run(name: str, batch: int, accumulate: int) -> tuple[list[float], dict]:
        over = {"task": "instruction", "model.name": str(model), "model.max_length": 64, "data.train": str(data),
                "data.validation": str(data), "train.max_steps": 4, "train.batch_size": batch,
                "train.gradient_accumulation_steps": accumulate, "train.lr": 1e-3, "train.logging_steps": 1,
                "train.group_by_length": False, "train.warmup_ratio": 0.0, "train.mixed_precision": "no",
                "train.load_best_at_end": False, "eval.generate_samples": 0, "output_dir": str(tmp_path / name)}
        folder = train(load_config(None, over))
        return [r["loss"] for r in read_history(folder) if r["type"] == "train"], load_file(
            folder / "model" / "model.safetensors")

    def max_difference(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    big, big_weights = run("big", 8, 1)
    accumulated, accumulated_weights = run("accumulated", 4, 2)
    assert len(big) == len(accumulated) == 4
    assert big == pytest.approx(accumulated, abs=1e-5)
    assert max_difference(big_weights, accumulated_weights) < 1e-5

    def mean_per_micro_batch(model, batch):  # the weighting before: each micro-batch's own mean per token
        loss_sum, tokens = answer_loss(model, batch)
        return loss_sum / tokens

    monkeypatch.setattr(InstructionInputs, "loss_fn", staticmethod(mean_per_micro_batch))
    _, unweighted = run("unweighted", 4, 2)
    assert max_difference(big_weights, unweighted) > 1e-3

def test_off_a_terminal_progress_is_one_plain_line_per_logging_step(tiny_model, toy_data, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    over = toy_overrides(tiny_model, toy_data, tmp_path / "r", **{"train.max_steps": 6, "train.logging_steps": 2})
    cfg.write_text(json.dumps(nested(over)))
    with (tmp_path / "stderr.log").open("w") as err:
        proc = subprocess.run([sys.executable, "-m", "textune", "train", str(cfg)], stdout=subprocess.DEVNULL,
                              stderr=err, timeout=300)
    log = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "\r" not in log
    lines = [line for line in log.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], log[-3000:]
    for part in ("epoch ", "loss ", "lr ", "samples/s", "left"):
        assert part in lines[0], lines[0]


def test_a_resumed_config_with_relative_data_paths_is_not_called_changed(tmp_path, monkeypatch):
    from textune.config import save_config
    from textune.train import warn_if_config_changed

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.train": "train.csv"})
    save_config(cfg, tmp_path / "config.yaml")  # holds the resolved path
    said = []
    warn_if_config_changed(cfg, tmp_path / "config.yaml", said.append)
    assert said == []
    warn_if_config_changed(load_config(None, {"data.train": "other.csv"}), tmp_path / "config.yaml", said.append)
    assert len(said) == 1 and "(data.train)" in said[0]
