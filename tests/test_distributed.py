"""Multi-process training: 2 CPU processes (gloo, launched by `textune train --num-processes 2`, i.e. through
`accelerate launch`) against one process with the same global batch, on a tiny BERT with dropout off.

Tolerance, 1e-5 absolute on every logged loss and every final weight but one kind. The two runs do the same
arithmetic on the same batches, not in the same order: each process averages the loss over its half of the
batch and DDP averages the two gradients (one process averages the whole batch at once), each half is padded
to its own longest example, and a process with 1 thread blocks its matrix products differently than one with
2. Each changes fp32 results in the last bit or two (float32 eps = 1.2e-7; measured: losses within 2e-7,
weights within 1e-6 over 16 steps at lr 2e-2). The exception is the attention key bias: adding q.b_k to every
score of a query shifts them all equally, which softmax ignores, so its gradient is zero in exact arithmetic
and only rounding noise in fp32; Adam divides by the gradient's own scale and turns that noise into steps of
order lr (measured: up to 5e-5). It is not compared. A real fault (a process training on other examples,
gradients not averaged, a different global batch) moves the losses by 1e-3 or more, which
`test_the_tolerance_separates_a_different_global_batch` shows.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_bert, nested, toy_rows, write_csv
from textune.config import TrainConfig, load_config
from textune.errors import TextuneError
from textune.train import check_process_count, enable_gradient_checkpointing, train

TOLERANCE = 1e-5
NOISE_ONLY = "attention.self.key.bias"  # zero gradient in exact arithmetic: see the module docstring
TRAIN_ROWS, VALIDATION_ROWS = 256, 37  # 256 = 8 full batches of 32; 37 leaves uneven last evaluation batches


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("distributed")
    model = build_tiny_bert(d / "model")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout masks differ per process
    (model / "config.json").write_text(json.dumps(config))
    train_file = write_csv(d / "train.csv", toy_rows(TRAIN_ROWS, seed=1))
    validation = write_csv(d / "validation.csv", toy_rows(VALIDATION_ROWS, seed=2))
    cfg = d / "toy.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "model": {"name": str(model), "max_length": 32},
        "data": {"train": str(train_file), "validation": str(validation)},
        "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 8, "lr": 2e-2, "logging_steps": 1,
                  "warmup_ratio": 0.1, "mixed_precision": "no", "load_best_at_end": False, "checkpoint_steps": 4,
                  "keep_last": 8}}))
    return {"dir": d, "config": cfg, "validation": validation}


@pytest.fixture(scope="module")
def two_processes(setup) -> dict:
    run = setup["dir"] / "two"
    proc = subprocess.run([sys.executable, "-m", "textune", "train", str(setup["config"]), "--num-processes", "2",
                           "--output_dir", str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    return train(load_config(setup["config"], {"output_dir": str(setup["dir"] / "one")}))


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


def max_weight_difference(run_a: Path, run_b: Path) -> float:
    a, b = load_file(run_a / "model" / "model.safetensors"), load_file(run_b / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith(NOISE_ONLY))


def test_two_processes_match_one_process_with_the_same_global_batch(two_processes, one_process):
    one, two = losses(one_process), losses(two_processes["run"])
    assert len(one) == len(two) == 16  # 2 epochs of 8 steps: the schedule does not depend on the process count
    assert one[-1] < one[0] / 2  # the model learns, so the curves have something to agree on
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE
    assert max_weight_difference(one_process, two_processes["run"]) < TOLERANCE


def test_the_tolerance_separates_a_different_global_batch(setup, one_process):
    # What "batch_size per process" would have meant with 2 processes of 16: another training run.
    half = train(load_config(setup["config"], {"output_dir": str(setup["dir"] / "half"), "train.batch_size": 16,
                                               "train.max_steps": 4, "train.checkpoint_steps": None}))
    assert max(abs(a - b) for a, b in zip(losses(one_process), losses(half))) > 100 * TOLERANCE


def test_only_the_main_process_writes_and_logs(two_processes, one_process):
    run, out = two_processes["run"], two_processes["stdout"]
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [
        (json.loads(line)["type"], json.loads(line)["step"]) for line in (one_process / "history.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in one_process.iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000008", "step-00000012"]
    assert out.count("model      ") == 1 and out.count("eval  step") == 2  # printed once, not once per process
    assert "over 2 process(es)" in out


def test_evaluation_counts_every_validation_example_once(two_processes, one_process, setup):
    metrics = json.loads((two_processes["run"] / "metrics.json").read_text())["validation"]
    assert metrics["examples"] == VALIDATION_ROWS
    predictions = (two_processes["run"] / "validation_predictions.jsonl").read_text().splitlines()
    texts = [r["text"] for r in toy_rows(VALIDATION_ROWS, seed=2)]
    assert [json.loads(p)["text"] for p in predictions] == texts
    assert metrics["accuracy"] == json.loads((one_process / "metrics.json").read_text())["validation"]["accuracy"]


def test_a_two_process_checkpoint_resumes_in_one_process(setup, two_processes, one_process):
    checkpoint = two_processes["run"] / "checkpoints" / "step-00000008"
    resumed = train(load_config(setup["config"], {"output_dir": str(setup["dir"] / "resumed")}),
                    resume=str(checkpoint))
    assert losses(resumed)[8:] == pytest.approx(losses(one_process)[8:], abs=TOLERANCE)
    assert max_weight_difference(resumed, one_process) < TOLERANCE


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_launch(setup, capsys):
    from textune.cli import main

    assert main(["train", str(setup["config"]), "--num-processes", "3",
                 "--output_dir", str(setup["dir"] / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.batch_size: 32" in err and "3 processes" in err
    assert not (setup["dir"] / "never").exists()


def test_adamw_8bit_is_refused_off_cuda():
    from accelerate import Accelerator

    with pytest.raises(TextuneError, match="train.optimizer: adamw_8bit .* CUDA"):
        check_process_count(TrainConfig(optimizer="adamw_8bit"), Accelerator(cpu=True))


def test_gradient_checkpointing_is_switched_on_and_changes_no_gradient(setup):
    from textune.models import load_classifier

    batch = {"input_ids": torch.randint(5, 30, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same new classification head both times
        model = load_classifier(str(setup["dir"] / "model"), ["negative", "positive"])
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_gradient_checkpointing_on_a_model_without_it_names_the_key():
    with pytest.raises(TextuneError, match="train.gradient_checkpointing: Linear does not support it"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_the_launcher_command_gives_each_process_its_share_of_the_cores(monkeypatch):
    from textune.launch import launcher_command

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cmd = launcher_command(4, ["train", "c.yaml"])
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "2"
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[-4:] == ["-m", "textune", "train", "c.yaml"]
    one = launcher_command(1, ["train", "c.yaml"], accelerate_config="configs/accelerate/one-gpu.yaml")
    assert "--multi_gpu" not in one and one[one.index("--config_file") + 1] == "configs/accelerate/one-gpu.yaml"


def test_an_accelerate_config_without_a_process_count_is_refused(setup, capsys):
    from textune.cli import main

    assert main(["train", str(setup["config"]), "--accelerate-config", "configs/accelerate/cpu-gloo.yaml"]) == 2
    assert "--accelerate-config needs --num-processes" in capsys.readouterr().err


def eval_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if r["type"] == "eval"]


def test_evaluation_loss_is_reduced_over_the_processes_without_the_padding_rows(two_processes, one_process):
    # 37 validation rows in batches of 8 split over 2 processes: the last batch has 5 rows, padded to 8 by
    # repeating rows. Each process must report the loss of all 37 rows once, not of its own share.
    one, two = eval_losses(one_process), eval_losses(two_processes["run"])
    assert len(one) == len(two) == 2
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE
    final_one = json.loads((one_process / "metrics.json").read_text())["validation"]
    final_two = json.loads((two_processes["run"] / "metrics.json").read_text())["validation"]
    assert abs(final_one["loss"] - final_two["loss"]) < TOLERANCE
    assert final_two["examples"] == VALIDATION_ROWS and final_one["accuracy"] == final_two["accuracy"]


# ---------------------------------------------------------------- instruction tuning (issue 30 item 6)

INSTRUCTION_VALIDATION = 13  # in evaluation batches of 8 over 2 processes: the last batch of 5 is padded to 8


@pytest.fixture(scope="module")
def instruction_runs(tmp_path_factory) -> dict:
    """Instruction tuning of a tiny Llama, once in one process and once in two, with the same global batch;
    validation conversations of different lengths, so a repeated row would change the mean loss."""
    from conftest import build_tiny_chat_lm, write_jsonl

    d = tmp_path_factory.mktemp("distributed-instruction")
    model = build_tiny_chat_lm(d / "model")
    words = "you are a helpful assistant answer the question what is two plus three five yes no".split()
    rows = [{"instruction": " ".join(words[i % 7:i % 7 + 2 + i % 5]),
             "output": " ".join(words[i % 4:i % 4 + 1 + i % 6])} for i in range(32 + INSTRUCTION_VALIDATION)]
    config = d / "instruction.yaml"
    config.write_text(json.dumps({
        "task": "instruction", "model": {"name": str(model), "max_length": 64},
        "data": {"train": str(write_jsonl(d / "train.jsonl", rows[:32])),
                 "validation": str(write_jsonl(d / "validation.jsonl", rows[32:]))},
        "train": {"max_steps": 4, "batch_size": 8, "eval_batch_size": 8, "lr": 1e-3, "logging_steps": 1,
                  "mixed_precision": "no", "load_best_at_end": False, "checkpoint_steps": None},
        "eval": {"generate_samples": 3, "max_new_tokens": 4}}))
    two = launch_two([str(config), "--output_dir", str(d / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    return {"one": train(load_config(config, {"output_dir": str(d / "one")})), "two": d / "two"}


def test_instruction_evaluation_over_two_processes_equals_one_process(instruction_runs):
    one, two = instruction_runs["one"], instruction_runs["two"]
    evals = {}
    for name, run in (("one", one), ("two", two)):
        evals[name] = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        evals[name] = [r for r in evals[name] if r["type"] == "eval"]
    assert [r["step"] for r in evals["one"]] == [r["step"] for r in evals["two"]] == [0, 4]
    # Step 0 evaluates the same weights in both runs (the training that follows is compared below).
    start_one, start_two = evals["one"][0], evals["two"][0]
    assert abs(start_one["eval_loss"] - start_two["eval_loss"]) < TOLERANCE
    assert (start_one["eval_exact_match"], start_one["eval_rougeL"]) == (start_two["eval_exact_match"],
                                                                         start_two["eval_rougeL"])
    for a, b in zip(evals["one"], evals["two"]):  # every answer token counted once, at every evaluation
        assert a["eval_tokens"] == b["eval_tokens"] and a["eval_generated"] == b["eval_generated"] == 3
    final_one, final_two = (json.loads((run / "metrics.json").read_text())["validation"] for run in (one, two))
    assert final_one["tokens"] == final_two["tokens"] == evals["one"][0]["eval_tokens"]


def test_instruction_training_over_two_processes_equals_one_process(instruction_runs):
    """2 processes x 4 conversations against 1 x 8: the same losses and weights. Each step's loss is the sum
    over the answer tokens of the whole batch divided by their count over both processes (the shares hold
    different numbers of answer tokens); a mean per process, averaged by DDP, was 2e-3 off after 4 steps."""
    one, two = instruction_runs["one"], instruction_runs["two"]
    assert len(losses(one)) == len(losses(two)) == 4
    assert losses(one) == pytest.approx(losses(two), abs=TOLERANCE)
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE


# ---------------------------------------------------------------- every task evaluates alike (issue 30 item 6)

EVERY_TASK_VALIDATION = 13  # rows (sentences, questions, conversations; 26 question windows; 13 blocks of text)
# in evaluation batches of 4 over 2 processes: no multiple of 2 x 4, so Accelerate repeats rows to fill the last.

EVALUATE_FIRST_SCRIPT = '''
"""Train each (config, output folder) pair given, every task evaluating at step 0 (the same weights in any
number of processes), in one launch: starting the processes once for all tasks keeps the test short."""
import sys

from textune.config import load_config
from textune.tasks.base import TaskInputs
from textune.train import train

TaskInputs.evaluate_first = True
for config, output_dir in zip(sys.argv[1::2], sys.argv[2::2]):
    train(load_config(config, {"output_dir": output_dir}))
'''


def every_task_overrides(d: Path) -> dict[str, dict]:
    """A tiny model and data for each task, with 13 validation rows; one optimizer step."""
    from conftest import build_tiny_chat_lm, build_tiny_lm, toy_overrides, write_jsonl
    from test_instruction import instruction_overrides
    from test_multi_label import ml_overrides
    from test_multi_label import toy_row as ml_row
    from test_pretrain import lm_overrides
    from test_question_answering import qa_overrides
    from test_question_answering import toy_rows as qa_rows
    from test_regression import reg_overrides, toy_pair
    from test_token_classification import ner_overrides, write_conll

    bert, rng = build_tiny_bert(d / "bert"), random.Random(7)
    n = EVERY_TASK_VALIDATION
    tables = {name: {"train": write_csv(d / f"{name}-train.csv", [row(rng) for _ in range(16)]),
                     "validation": write_csv(d / f"{name}-validation.csv", [row(rng) for _ in range(n)])}
              for name, row in (("regression", toy_pair), ("multi-label", ml_row))}
    pairs = [(a, b) for a in ("two", "three", "five") for b in ("two", "three", "five", "yes", "no")]
    chat = [{"instruction": f"what is {a} plus {b}", "output": " ".join(["five"] * (1 + i % 4))}
            for i, (a, b) in enumerate(pairs)]  # answers of 1 to 4 tokens
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in toy_rows(150, seed=5)) + "\n", encoding="utf-8")
    toy = {"train": write_csv(d / "train.csv", toy_rows(16, seed=1)),
           "validation": write_csv(d / "validation.csv", toy_rows(n, seed=2))}
    return {
        "classification": toy_overrides(bert, toy, d),
        "regression": reg_overrides(bert, tables["regression"], d),
        "multi-label": ml_overrides(bert, tables["multi-label"], d),
        "token-classification": ner_overrides(bert, {"train": write_conll(d / "train.conll", 16, seed=1),
                                                     "validation": write_conll(d / "val.conll", n, seed=2)}, d),
        "question-answering": qa_overrides(bert, {
            "train": write_jsonl(d / "qa-train.jsonl", qa_rows(16, seed=1)),
            "validation": write_jsonl(d / "qa-validation.jsonl", qa_rows(n, seed=2, n_words=30))}, d),
        # 150 documents, a fifth held out: 13 blocks of 16 tokens
        "language-modeling": {**lm_overrides(build_tiny_lm(d / "mlm", "mlm"), corpus, d),
                              "task": "language-modeling"},
        "instruction": instruction_overrides(build_tiny_chat_lm(d / "chat"), write_jsonl(d / "chat-train.jsonl", chat),
                                             write_jsonl(d / "chat-validation.jsonl", chat[:n]), d,
                                             **{"eval.generate_samples": 3, "eval.max_new_tokens": 4}),
    }


@pytest.fixture(scope="module")
def every_task_runs(tmp_path_factory) -> dict:
    """Each task trained one step, in 1 process and in 2 (one launch for all), evaluating at step 0."""
    from textune.launch import launcher_command
    from textune.tasks.base import TaskInputs

    d = tmp_path_factory.mktemp("every-task")
    configs = {}
    for task, overrides in every_task_overrides(d).items():
        overrides = {**overrides, "train.max_steps": 1, "train.batch_size": 8, "train.eval_batch_size": 4,
                     "train.logging_steps": 1, "train.load_best_at_end": False, "train.checkpoint_steps": None,
                     "train.mixed_precision": "no"}
        overrides.pop("output_dir")
        configs[task] = d / f"{task}.yaml"
        configs[task].write_text(json.dumps(nested(overrides)))  # JSON is YAML
    script = d / "evaluate_first.py"
    script.write_text(EVALUATE_FIRST_SCRIPT)
    pairs = [str(x) for task in configs for x in (configs[task], d / "two" / task)]
    proc = subprocess.run(launcher_command(2, [])[:-2] + [str(script), *pairs], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskInputs, "evaluate_first", True)
        one = {task: train(load_config(config, {"output_dir": str(d / "one" / task)}))
               for task, config in configs.items()}
    return {"one": one, "two": {task: d / "two" / task for task in configs}}


def step_zero_evaluation(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return next(r for r in records if r["type"] == "eval" and r["step"] == 0)


@pytest.mark.parametrize("task", ["classification", "regression", "multi-label", "token-classification",
                                  "question-answering", "language-modeling", "instruction"])
def test_every_task_evaluates_the_same_over_two_processes(every_task_runs, task):
    """The same weights (step 0) evaluated in 1 process and in 2 give the same metrics: each validation row
    counted once, the rows Accelerate repeats to fill the last batch left out (`gather_for_metrics`), the
    loss included. Tolerance relative 1e-5: the rows are padded per batch, and the batches differ. Pearson's r
    gets 1e-4: the untrained regression head's scores are nearly equal (mean squared error agrees to 1e-9, r
    moved by 1e-5), and a correlation divides their rounding by their small spread."""
    one, two = (step_zero_evaluation(every_task_runs[n][task]) for n in ("one", "two"))
    assert sorted(one) == sorted(two)
    numbers = {k: v for k, v in one.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numbers) > 3, one  # step, epoch, loss and the task's own metrics
    for key, value in numbers.items():
        assert two[key] == pytest.approx(value, rel=1e-4 if key == "eval_pearson" else 1e-5, abs=1e-6), key
    assert {k: v for k, v in one.items() if k not in numbers} == {k: v for k, v in two.items() if k not in numbers}


def launch_two(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textune", "train", *args, "--num-processes", "2"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dropout_runs(setup) -> dict:
    """2 processes with dropout on (each process draws its own masks): one run straight through, one resumed
    from a checkpoint in the middle of the epoch."""
    d = setup["dir"]
    model = build_tiny_bert(d / "dropout-model")  # BERT's default dropout, 0.1
    cfg = d / "dropout.yaml"
    config = json.loads(setup["config"].read_text())
    config["model"]["name"] = str(model)
    config["train"].update(epochs=1, checkpoint_steps=3)  # 8 steps; step 3 is mid-epoch
    cfg.write_text(json.dumps(config))
    straight = launch_two([str(cfg), "--output_dir", str(d / "dropout-straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = d / "dropout-straight" / "checkpoints" / "step-00000003"
    resumed = launch_two([str(cfg), "--output_dir", str(d / "dropout-resumed"), "--resume", str(checkpoint)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"straight": d / "dropout-straight", "resumed": d / "dropout-resumed", "checkpoint": checkpoint}


def test_two_process_resume_with_dropout_is_bit_identical(dropout_runs):
    straight = load_file(dropout_runs["straight"] / "model" / "model.safetensors")
    resumed = load_file(dropout_runs["resumed"] / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert losses(dropout_runs["straight"])[3:] == losses(dropout_runs["resumed"])[3:]


SCALER_SCRIPT = '''
"""Run textune.train with a gradient scaler on CPU: Accelerate only keeps one on GPUs (fp16)."""
import sys

import torch
from accelerate import Accelerator

import textune.train
from textune.config import load_config


class ScalerAccelerator(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)


textune.train.Accelerator = ScalerAccelerator
textune.train.train(load_config(sys.argv[1], {"output_dir": sys.argv[2]}))
'''


def test_a_nan_loss_on_one_process_is_skipped_by_every_process_under_a_gradient_scaler(setup):
    """One training row gives a NaN loss; it lands in one process's half of a batch once per epoch. Under a
    gradient scaler (fp16) the gradient-norm check is off, so the loss itself must be checked, on every
    process together: a process that skipped alone would leave the other waiting in a collective (the
    timeout catches that). Skipping, not stopping, is tested: when one process raises, the launcher kills
    the other, which would hide whether it stopped by itself."""
    from conftest import POSITIVE
    from textune.launch import launcher_command

    d = setup["dir"] / "nan"
    d.mkdir()
    model = build_tiny_bert(d / "model")
    weights = load_file(model / "model.safetensors")
    poisoned = 5 + POSITIVE.index("superb")  # its id in the tiny vocabulary (5 special tokens first)
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][poisoned] = float("nan")
    from safetensors.torch import save_file
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    rows = toy_rows(64, seed=1)
    for r in rows:
        r["text"] = r["text"].replace("superb", "great")
    rows[5]["text"] = "superb movie"  # the one row with a NaN loss: it lands in one process's half of a batch
    config = json.loads(setup["config"].read_text())
    config["model"]["name"] = str(model)
    config["data"]["train"] = str(write_csv(d / "train.csv", rows))
    config["train"].update(epochs=1, checkpoint_steps=None, skip_nonfinite_steps=5)  # 2 steps of 32 rows
    (d / "nan.yaml").write_text(json.dumps(config))
    (d / "run_with_scaler.py").write_text(SCALER_SCRIPT)
    # the launcher's command for `-m textune`, running the script instead
    cmd = launcher_command(2, [])[:-2] + [str(d / "run_with_scaler.py"), str(d / "nan.yaml"), str(d / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the batch with the bad row (the 2nd of epoch 1 with this seed) is skipped by both processes, once
    assert proc.stdout.count("skipped step 2 (epoch 1, batch 2): non-finite loss") == 2, proc.stdout[-3000:]
    assert proc.stdout.count("skipped step") == 2
    weights = load_file(d / "run" / "model" / "model.safetensors")
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))  # now under bert.
    weights[key] = torch.cat([weights[key][:poisoned], weights[key][poisoned + 1:]])  # NaN since the start
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN reached the weights


def test_a_deepspeed_launch_without_deepspeed_is_one_clear_line(setup, capsys):
    from textune.cli import main

    if __import__("importlib").util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    assert main(["train", str(setup["config"]), "--num-processes", "2", "--accelerate-config",
                 "configs/accelerate/deepspeed-zero2.yaml", "--output_dir", str(setup["dir"] / "deepspeed")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DeepSpeed is not installed; pip install deepspeed" in err


def test_fsdp_config_on_a_machine_without_gpus_is_one_clear_line(setup, capsys, monkeypatch):
    """Accelerate (1.16) chooses FSDP only for GPU-like devices: on CPU the launch becomes DDP over gloo while
    fsdp_cpu_ram_efficient_loading leaves the model empty (meta) on all but the main process, and the run
    crashed in prepare() ("Cannot copy out of meta tensor"). So FSDP cannot be tested here; textune refuses
    it in one line, before launching and (for `accelerate launch` by hand) in every process."""
    from accelerate import Accelerator

    from textune.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU machine can run FSDP")
    assert main(["train", str(setup["config"]), "--num-processes", "2", "--accelerate-config",
                 "configs/accelerate/fsdp.yaml", "--output_dir", str(setup["dir"] / "fsdp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FSDP runs on GPUs only in Accelerate" in err and "cpu-gloo.yaml" in err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(TextuneError, match="FSDP runs on GPUs only in Accelerate"):
        check_process_count(TrainConfig(), Accelerator(cpu=True))
