"""`textune search`: Optuna trials on the tiny model, median pruning, resuming from search.db, best.yaml."""

import contextlib
import io
from pathlib import Path

import optuna
import pandas as pd
import pytest

from textune.cli import main
from textune.config import load_config
from textune.errors import ConfigError, TextuneError, TrainingInterrupted
from textune.search import DB_NAME, STUDY_NAME, run_search

ROOT = Path(__file__).resolve().parents[1]


def search_yaml(tiny_model, toy_data, folder: Path, space: str = "{type: loguniform, low: 1.0e-6, high: 1.0e-2}") -> Path:
    """A search config on the toy task: lr from hopeless to good, two epochs, pruning after one finished trial."""
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(f"""
output_dir: {folder}
model: {{name: {tiny_model}, max_length: 32}}
data: {{train: {toy_data['train']}, validation: {toy_data['validation']}}}
train: {{epochs: 2, batch_size: 16, lr: 3e-3, logging_steps: 5, mixed_precision: "no"}}
search:
  space:
    train.lr: {space}
  startup_trials: 1
""")
    return path


@pytest.fixture(scope="module")
def searched(tiny_model, toy_data, tmp_path_factory):
    """(config path, search folder, printed output) of a finished 3-trial search."""
    folder = tmp_path_factory.mktemp("search") / "toy-search"
    config = search_yaml(tiny_model, toy_data, folder)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", str(config), "--trials", "3"]) == 0
    return config, folder, out.getvalue()


def test_search_runs_trials_prunes_bad_ones_and_writes_results(searched):
    config, folder, output = searched
    table = pd.read_csv(folder / "trials.csv")
    assert list(table["trial"]) == [0, 1, 2]
    assert set(table["state"]) <= {"complete", "pruned"} and "pruned" in set(table["state"]), table
    pruned = table[table["state"] == "pruned"]
    assert (pruned["evaluations"] < 2).all()  # stopped before its last evaluation
    for n in range(3):
        assert (folder / f"trial-{n}" / "history.jsonl").is_file()
        assert not (folder / f"trial-{n}" / "checkpoints").exists()  # trials are never resumed: no dead weight
    assert "pruned at evaluation 1" in output and "best so far" in output
    assert f"results    {folder / 'trials.csv'}" in output


def test_best_yaml_is_a_ready_to_run_config_of_the_best_trial(searched):
    config, folder, _ = searched
    table = pd.read_csv(folder / "trials.csv")
    best = table.loc[table["accuracy"].idxmax()]
    cfg = load_config(folder / "best.yaml")
    assert cfg.train.lr == pytest.approx(best["train.lr"])
    assert cfg.output_dir == str(folder / "best") and cfg.search.space == {}
    assert "\nsearch:" not in (folder / "best.yaml").read_text()


def test_second_invocation_resumes_the_study(searched, capsys):
    config, folder, _ = searched
    before = {n: (folder / f"trial-{n}" / "history.jsonl").stat().st_mtime_ns for n in range(3)}
    # A trial left running by a killed process: the resumed search marks it failed and moves on.
    optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{folder / DB_NAME}").ask()
    assert main(["search", str(config), "--trials", "4"]) == 0
    assert "resuming: 3 trials finished, 1 to run" in capsys.readouterr().out
    table = pd.read_csv(folder / "trials.csv")
    assert list(table["trial"]) == [0, 1, 2, 3, 4]
    assert list(table["state"])[3] == "fail" and list(table["state"])[4] in ("complete", "pruned")
    assert (folder / "trial-4" / "history.jsonl").is_file() and not (folder / "trial-3").exists()
    assert before == {n: (folder / f"trial-{n}" / "history.jsonl").stat().st_mtime_ns for n in range(3)}
    assert main(["search", str(config), "--trials", "4"]) == 0  # nothing left to do
    assert "4 trials finished, 0 to run" in capsys.readouterr().out


def test_interrupted_search_says_how_to_continue(tiny_model, toy_data, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("textune.train.train", interrupted)
    config = search_yaml(tiny_model, toy_data, tmp_path / "cut")
    with pytest.raises(TrainingInterrupted, match="run the same command again to continue"):
        run_search(load_config(config), trials=2)
    assert list(pd.read_csv(tmp_path / "cut" / "trials.csv")["state"]) == ["fail"]


def test_resume_refuses_a_changed_space(searched, tiny_model, toy_data):
    _, folder, _ = searched
    config = search_yaml(tiny_model, toy_data, folder, space="{type: categorical, choices: [1.0e-3]}")
    with pytest.raises(TextuneError, match=r"holds a search with a different space .* pass --overwrite"):
        run_search(load_config(config), trials=5)


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}},
     r"search\.space\.train\.lrr: no config key train\.lrr; did you mean train\.lr\?"),
    ({"train": {"type": "int", "low": 1, "high": 2}}, r"search\.space\.train: train is a section"),
    ({"output_dir": {"type": "categorical", "choices": ["a"]}}, r"output_dir cannot be searched"),
    ({"train.lr": {"type": "log", "low": 1e-5, "high": 1e-4}},
     r"search\.space\.train\.lr\.type: expected one of uniform, loguniform, int, categorical, got 'log'"),
    ({"train.lr": {"type": "loguniform", "low": 0, "high": 1e-4}}, r"loguniform needs low > 0"),
    ({"train.lr": {"type": "uniform", "low": 1e-4, "high": 1e-5}}, r"low must be below high"),
    ({"train.batch_size": {"type": "uniform", "low": 8, "high": 64}},
     r"train\.batch_size expects an integer, which type uniform does not give; use type int"),
    ({"train.scheduler": {"type": "categorical", "choices": ["linear", "cosin"]}},
     r"train\.scheduler expects one of linear, cosine, constant, got 'cosin'"),
    ({"train.lr": {"type": "categorical", "choices": []}}, r"choices: expected a non-empty list"),
    ({"train.lr": 3e-5}, r"search\.space: expected a mapping of str to dict"),
])
def test_bad_search_spaces_name_the_key(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data.train": "x.csv", "search.space": space})


def test_search_needs_a_space_and_its_own_folder(tmp_path):
    with pytest.raises(TextuneError, match="search.space is empty"):
        run_search(load_config(None, {"data.train": "x.csv"}), trials=2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cfg = load_config(None, {"data.train": "x.csv", "output_dir": str(tmp_path / "other"),
                             "search.space": {"train.lr": {"type": "categorical", "choices": [1e-4]}}})
    with pytest.raises(TextuneError, match="holds no search.db, so it is not a textune search folder"):
        run_search(cfg, trials=2)


def test_shipped_search_config_declares_a_valid_space():
    cfg = load_config(ROOT / "configs" / "sst2-minilm-search.yaml")
    assert {"train.lr", "train.batch_size"} <= set(cfg.search.space)
