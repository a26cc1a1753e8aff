"""Learning-curve PNGs for one and several runs, the `curves` command, and TensorBoard logging."""

import json

import pytest
from matplotlib.image import imread

from conftest import toy_overrides
from textune.cli import main
from textune.curves import run_names, save_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, scale=1.0):
    """A run folder holding only a history: what `curves` needs."""
    folder.mkdir(parents=True)
    lines = [{"type": "train", "step": s, "epoch": s / 100, "loss": scale * 0.7 / (1 + s / 50), "lr": 1e-4 * (1 - s / 300)}
             for s in range(10, 301, 10)]
    lines += [{"type": "eval", "step": s, "epoch": s / 100, "eval_loss": scale * 0.5 / (1 + s / 200),
               "eval_accuracy": 0.7 + s / 2000, "eval_f1": 0.68 + s / 2000} for s in (100, 200, 300)]
    (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_save_curves_writes_three_pngs_for_several_runs(trained_run, tmp_path):
    other = fake_run(tmp_path / "other", scale=1.3)
    paths = save_curves([trained_run, other], tmp_path / "out")
    assert [p.name for p in paths] == ["loss.png", "metrics.png", "lr.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
        pixels = imread(p)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        assert pixels[..., :3].std() > 0.05  # lines were drawn, not a blank canvas


def test_run_names_disambiguate_same_folder_names(tmp_path):
    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == ["a/run", "b/run", "c"]


def test_cli_curves_default_and_explicit_out(tmp_path, capsys):
    run = fake_run(tmp_path / "solo")
    assert main(["curves", str(run)]) == 0
    assert (run / "curves" / "loss.png").is_file()
    assert main(["curves", str(run), str(fake_run(tmp_path / "two")), "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["loss.png", "lr.png", "metrics.png"]
    capsys.readouterr()
    assert main(["curves", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("textune: error: ") and "has no history.jsonl" in err


def test_tensorboard_logging_writes_event_files_and_train_prints_a_verdict(tiny_model, toy_data, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from textune.config import load_config
    from textune.train import train

    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "train.max_steps": 6, "train.logging_steps": 2, "train.eval_steps": 3, "logging.tensorboard": True}))
    run = train(cfg)
    assert "diagnosis  " in capsys.readouterr().out
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/accuracy"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


def test_tensorboard_off_by_default_writes_nothing(trained_run):
    assert not (trained_run / "tensorboard").exists()


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from textune.config import load_config
    from textune.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.tensorboard: true needs the tensorboard package.*"
                                          r"pip install 'textune\[tensorboard\]' or set it to false"):
        load_config(None, {"data.train": "x.csv", "logging.tensorboard": True})
