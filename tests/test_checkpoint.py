"""Checkpoints: exact resume after SIGKILL, clean stop on SIGTERM, crash-safe writes, NaN guard."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import toy_overrides
from textune.checkpoint import find_checkpoint, list_checkpoints, save_checkpoint
from textune.config import load_config
from textune.errors import TextuneError
from textune.train import train

RESUME_OVERRIDES = {"train.epochs": 3, "train.checkpoint_steps": 2, "train.logging_steps": 1, "train.keep_last": 3,
                    "train.eval_steps": 7}


def write_config(path, overrides):
    nested = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(nested))
    return path


def start_train(config, *extra):
    return subprocess.Popen([sys.executable, "-m", "textune", "train", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run, min_step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list_checkpoints(run)
        if found and int(found[-1].name.split("-")[1]) >= min_step:
            return found[-1]
        if proc.poll() is not None:
            pytest.fail(f"training ended before checkpoint {min_step}: {proc.stderr.read()}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


def final_state(run):
    return load_file(run / "model" / "model.safetensors"), json.loads((run / "metrics.json").read_text())


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_model, toy_data, tmp_path):
    ref_cfg = write_config(tmp_path / "ref.yaml", toy_overrides(tiny_model, toy_data, tmp_path / "ref", **RESUME_OVERRIDES))
    ref = start_train(ref_cfg)
    cfg = write_config(tmp_path / "cut.yaml", toy_overrides(tiny_model, toy_data, tmp_path / "cut", **RESUME_OVERRIDES))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    kill_after = random.Random().randint(3, 50)  # 60 steps in all: anywhere in epochs 1-3
    proc = start_train(cfg)
    wait_for_checkpoint(tmp_path / "cut", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "metrics.json").exists()

    resumed = start_train(cfg, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resume     from" in resumed.stdout.read()

    ref_weights, ref_metrics = final_state(tmp_path / "ref")
    cut_weights, cut_metrics = final_state(tmp_path / "cut")
    assert ref_weights.keys() == cut_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], cut_weights[name]), f"{name} differs (killed after step {kill_after})"
    assert ref_metrics["validation"] == cut_metrics["validation"]
    assert ref_metrics["best_step"] == cut_metrics["best_step"]
    ref_hist = [json.loads(x) for x in (tmp_path / "ref" / "history.jsonl").read_text().splitlines()]
    cut_hist = [json.loads(x) for x in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    strip = lambda h: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in h]
    assert strip(ref_hist) == strip(cut_hist)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tiny_model, toy_data, tmp_path):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{**RESUME_OVERRIDES, "train.checkpoint_steps": 10,
                                                                    "train.epochs": 20})
    cfg = write_config(tmp_path / "c.yaml", over)
    proc = start_train(cfg)
    wait_for_checkpoint(tmp_path / "run", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM at step" in err and f"textune train {cfg} --resume latest" in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step-{step:08d}"


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model, toy_data, tmp_path, monkeypatch):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{"train.max_steps": 5, "train.checkpoint_steps": 2,
                                                                    "train.keep_last": 2})
    run = train(load_config(None, over))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]

    from accelerate import Accelerator
    from transformers import get_scheduler

    from textune.models import load_classifier

    model = load_classifier(str(run / "model"), ["negative", "positive"])
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    calls = []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        raise OSError("No space left on device")

    monkeypatch.setattr("textune.checkpoint.torch.save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint(run, 6, model, optimizer, scheduler, Accelerator(cpu=True), {}, [], keep_last=2)
    monkeypatch.undo()
    assert calls and (run / "checkpoints" / ".tmp-step-00000006").exists()  # the half-written one stays hidden
    assert find_checkpoint(run, "latest").name == "step-00000004"
    resumed = train(load_config(None, {**over, "train.max_steps": 6}), resume="latest")
    assert json.loads((resumed / "metrics.json").read_text())["train"]["steps"] == 6


def test_resuming_with_another_model_is_refused(tiny_model, toy_data, tmp_path, trained_run):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{"train.max_steps": 3, "train.checkpoint_steps": 2,
                                                                    "train.keep_last": 1})
    train(load_config(None, over))
    with pytest.raises(TextuneError, match="written with other trainable parameters"):
        train(load_config(None, {**over, "tuning.method": "head"}), resume="latest")
    from conftest import build_tiny_bert
    import transformers

    wide = tmp_path / "wide"
    build_tiny_bert(wide)
    cfg = transformers.AutoConfig.from_pretrained(wide)
    cfg.intermediate_size = 48
    transformers.BertModel(cfg).save_pretrained(wide)
    with pytest.raises(TextuneError, match="was written for another model"):
        train(load_config(None, {**over, "model.name": str(wide)}), resume=str(list_checkpoints(tmp_path / "run")[-1]))


def test_resume_without_checkpoints_is_a_clear_error(tiny_model, toy_data, tmp_path):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run")
    with pytest.raises(TextuneError, match="--resume latest: no checkpoint in"):
        train(load_config(None, over), resume="latest")
    with pytest.raises(TextuneError, match="not a textune checkpoint folder"):
        train(load_config(None, over), resume=str(tmp_path))


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model, toy_data, tmp_path):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "train.lr": 1e30, "train.warmup_ratio": 0.0, "train.checkpoint_steps": 1, "train.max_grad_norm": None})
    with pytest.raises(TextuneError, match=r"non-finite loss or gradient .* at step 2 .*last good checkpoint is .*step-00000001"):
        train(load_config(None, over))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000001"]


def test_skip_nonfinite_steps_skips_then_stops(tiny_model, toy_data, tmp_path, capsys):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "train.lr": 1e30, "train.warmup_ratio": 0.0, "train.skip_nonfinite_steps": 2, "train.max_grad_norm": None})
    with pytest.raises(TextuneError, match="non-finite"):
        train(load_config(None, over))
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("skipped step 2") == 2


def test_a_checkpoint_with_one_rng_state_for_all_processes_still_resumes(tiny_model, toy_data, tmp_path):
    """Checkpoints written before they held one RNG state per process (rng.safetensors + state.json's rng)."""
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{"train.max_steps": 4, "train.checkpoint_steps": 2,
                                                                    "train.logging_steps": 1, "train.keep_last": 2})
    ref = train(load_config(None, over))
    ref_losses = [json.loads(x)["loss"] for x in (ref / "history.jsonl").read_text().splitlines() if '"train"' in x]
    checkpoint = list_checkpoints(ref)[0]
    state = json.loads((checkpoint / "state.json").read_text())
    state["rng"] = json.loads((checkpoint / "rng-0.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps(state))
    (checkpoint / "rng-0.safetensors").rename(checkpoint / "rng.safetensors")
    (checkpoint / "rng-0.json").unlink()
    resumed = train(load_config(None, {**over, "output_dir": str(tmp_path / "resumed")}), resume=str(checkpoint))
    losses = [json.loads(x)["loss"] for x in (resumed / "history.jsonl").read_text().splitlines() if '"train"' in x]
    assert losses == ref_losses


def test_a_finished_run_deletes_its_checkpoints_unless_keep_last_asks_and_resume_says_why(tiny_model, toy_data,
                                                                                          tmp_path, capsys):
    over = toy_overrides(tiny_model, toy_data, tmp_path / "run", **{"train.max_steps": 5, "train.checkpoint_steps": 2})
    run = train(load_config(None, over))
    assert not (run / "checkpoints").exists() and (run / "model" / "model.safetensors").is_file()
    assert "cleanup    2 checkpoint(s) deleted now that the model is saved (train.keep_last N keeps" in capsys.readouterr().out
    with pytest.raises(TextuneError, match=r"--resume latest: .* is a finished run, and its checkpoints were deleted "
                                           r"once its model was saved, so there is nothing to resume; .*train.keep_last N"):
        train(load_config(None, over), resume="latest")

    kept = train(load_config(None, {**over, "output_dir": str(tmp_path / "kept"), "train.keep_last": 1}))
    assert [p.name for p in list_checkpoints(kept)] == ["step-00000004"]
    assert "cleanup" not in capsys.readouterr().out
    train(load_config(None, {**over, "output_dir": str(tmp_path / "kept"), "train.keep_last": 1}), resume="latest")
    assert "resume     from " + str(kept / "checkpoints" / "step-00000004") + " (the run had finished: the steps after it are trained again)" in capsys.readouterr().out
