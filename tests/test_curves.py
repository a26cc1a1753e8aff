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


@pytest.mark.parametrize("task, metric, history, shown", [
    ("classification", "accuracy", ["loss", "accuracy", "f1", "mcc"], ["accuracy", "f1"]),  # as before the registry
    ("classification", "mcc", ["loss", "accuracy", "f1", "mcc"], ["mcc", "accuracy"]),  # the run's train.metric first
    (None, None, ["loss", "accuracy", "f1"], ["accuracy", "f1"]),  # a history alone: a classifier's
    ("regression", "pearson", ["loss", "pearson", "spearman", "mse", "mae"], ["pearson", "spearman"]),
    ("regression", "mse", ["loss", "pearson", "mse"], ["mse"]),  # an unbounded metric is drawn alone
    ("language-modeling", "loss", ["loss", "perplexity", "tokens"], ["perplexity"]),  # the loss has its own chart
    ("instruction", "loss", ["loss", "perplexity", "rougeL", "exact_match"], ["perplexity"]),
    ("multi-label", "f1_micro", ["loss", "f1_micro", "f1_macro", "hamming_loss"], ["f1_micro", "f1_macro"]),
    ("token-classification", "f1", ["loss", "custom"], ["custom"]),  # none of the task's: what the history holds
])
def test_the_metric_chart_shows_the_tasks_headline(task, metric, history, shown):
    from textune.curves import headline_metrics

    records = [{"type": "eval", "step": 5, **{f"eval_{k}": 0.5 for k in history}}]
    assert headline_metrics(records, task, metric) == shown


def lm_and_regression_runs(tmp_path):
    """Run folders of a language model and a regression: config.yaml (task, train.metric) and a history."""
    runs = {}
    for task, metric, keys in (("language-modeling", "loss", {"eval_perplexity": 40.0}),
                               ("regression", "pearson", {"eval_pearson": 0.3, "eval_spearman": 0.25})):
        folder = tmp_path / task
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(f"task: {task}\ntrain:\n  metric: {metric}\n")
        lines = [{"type": "eval", "step": s, "eval_loss": 3.0 / s, **{k: v * (1 + s / 10) for k, v in keys.items()}}
                 for s in (10, 20, 30)]
        (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs[task] = folder
    return runs


def test_metric_chart_of_a_regression_and_a_language_model_is_not_empty(tmp_path):
    from textune.curves import metrics_figure, run_headline_metrics
    from textune.diagnose import load_history

    for task, run in lm_and_regression_runs(tmp_path).items():
        records = load_history(run)
        fig = metrics_figure({task: records}, {task: run_headline_metrics(run, records)})
        lines = fig.axes[0].get_lines()
        expected = {"language-modeling": ["language-modeling perplexity"],
                    "regression": ["regression Pearson", "regression Spearman"]}[task]
        assert [line.get_label() for line in lines] == expected
        assert all(len(line.get_xdata()) == 3 for line in lines)
    paths = save_curves(list(lm_and_regression_runs(tmp_path / "again").values()), tmp_path / "out")
    assert imread(paths[1])[..., :3].std() > 0.05
