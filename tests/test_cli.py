"""The real `textune` command: sub-commands on the tiny model, and one clear line for user mistakes."""

import json

import pytest

from conftest import run_textune, toy_rows, write_csv
from textune.cli import main


def run_cli(*args):
    """Run textune in a subprocess, as a user would; return (exit code, stdout, stderr)."""
    proc = run_textune(*args)
    return proc.returncode, proc.stdout, proc.stderr


def run_in_process(capsys, *args):
    """Run `textune` in this process (cheaper than a subprocess); return (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, stderr, match):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("textune: error: "), stderr
    assert "Traceback" not in stderr
    assert match in lines[0], lines[0]


def test_train_evaluate_predict_inspect_end_to_end(tiny_model, toy_data, tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path / 'run'}
model: {{name: {tiny_model}, max_length: 32}}
data: {{train: {toy_data['train']}, validation: {toy_data['validation']}}}
train: {{epochs: 1, batch_size: 16, lr: 3e-3, mixed_precision: "no"}}
""")
    code, out, err = run_cli("train", cfg, "--train.epochs", "3")
    assert code == 0, err
    assert "tuning     full:" in out and "best       step" in out
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 60

    code, out, err = run_cli("evaluate", run, "--data", toy_data["test"])
    assert code == 0, err
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.8 and metrics["examples"] == 48
    assert {"precision", "recall", "f1", "f1_macro", "confusion_matrix", "per_class"} <= set(metrics)
    assert "true \\ pred" in out

    texts = tmp_path / "texts.txt"
    texts.write_text("the film was superb\nbad and boring\n")
    code, out, err = run_cli("predict", run, "--input", texts)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert rows[0]["text"] == "the film was superb" and set(rows[0]["probabilities"]) == {"negative", "positive"}

    code, out, err = run_cli("inspect", tiny_model, "--text", "good movie", "--pair", "bad film", "--json")
    info = json.loads(out)
    assert info["num_hidden_layers"] == 2 and info["text"]["tokens"] == ["[CLS]", "good", "movie", "[SEP]", "bad", "film", "[SEP]"]
    assert info["text"]["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_predict_from_stdin_in_process(trained_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("great\nawful\n"))
    assert main(["predict", str(trained_run), "--input", "-"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]


@pytest.mark.parametrize("case", ["missing_config", "config_typo", "wrong_type", "missing_data", "unknown_column",
                                  "not_a_model", "unseen_label"])
def test_user_mistakes_give_one_clear_line(case, tiny_model, toy_data, tmp_path, capsys):
    base = ["train", tmp_path / "c.yaml", "--model.name", tiny_model, "--data.train", toy_data["train"],
            "--data.validation", toy_data["validation"], "--output_dir", tmp_path / "run"]
    (tmp_path / "c.yaml").write_text("train: {max_steps: 1}\n")
    bad_val = write_csv(tmp_path / "v.csv", toy_rows(5, 1) + [{"text": "meh", "label": "neutral"}])
    args, match = {
        "missing_config": (["train", tmp_path / "nope.yaml"], "config file not found"),
        "config_typo": (base + ["--train.bach_size", "8"], "train.bach_size: unknown key; did you mean train.batch_size"),
        "wrong_type": (base + ["--train.lr", "fast"], "train.lr: expected a number, got 'fast'"),
        "missing_data": (base + ["--data.train", tmp_path / "missing.csv"], "data.train file not found"),
        "unknown_column": (base + ["--data.text_column", "review"], "no column 'review' (data.text_column); its columns are: 'text', 'label'"),
        "not_a_model": (base + ["--model.name", tmp_path], "is not a model folder: it has no config.json"),
        "unseen_label": (base + ["--data.validation", bad_val], "labels that training never saw: 'neutral'"),
    }[case]
    code, _, err = run_in_process(capsys, *args)
    assert_one_line_error(code, err, match)
    assert not (tmp_path / "run").exists()


def test_a_real_process_prints_one_line_and_debug_the_traceback(tmp_path):
    code, _, err = run_cli("train", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found")
    code, _, err = run_cli("--debug", "train", tmp_path / "nope.yaml")
    assert code != 0 and "Traceback" in err


def test_evaluate_and_predict_mistakes(trained_run, tmp_path, capsys):
    code, _, err = run_in_process(capsys, "evaluate", tmp_path / "nothing", "--data", "x.csv")
    assert_one_line_error(code, err, "no run or model folder")
    bad = write_csv(tmp_path / "b.csv", [{"text": "good", "label": "meh"}])
    code, _, err = run_in_process(capsys, "evaluate", trained_run, "--data", bad)
    assert_one_line_error(code, err, "labels the model was not trained on: ['meh']")
    code, _, err = run_in_process(capsys, "predict", trained_run, "--input", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "input file not found")


def test_version_and_a_bare_textune_print_what_it_is(capsys):
    from textune import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"textune {__version__}"
    code, out, err = run_in_process(capsys)
    assert code == 0 and not err
    assert out.startswith("usage: textune") and "fine-tune a model" in out and "COMMAND --help" in out


def test_command_summaries_say_what_each_does_for_every_task(capsys):
    code, out, _ = run_in_process(capsys)
    summary = " ".join(out.split())  # argparse wraps the help column
    assert "predict labels, scores, entities or answers for each input line" in summary
    assert "serve serve a model over HTTP (classify, entities, answer, generate, chat" in summary


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("train:\n  lrr: 3e-5\n")
    check = ("import sys; from textune.cli import main; code = main(['train', sys.argv[1]]); "
             "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", check, str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert_one_line_error(2, proc.stderr, "train.lrr: unknown key; did you mean train.lr?")


def test_predict_keeps_one_output_line_per_input_line(trained_run, tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("great\n\n   \nawful\n"))
    code, out, _ = run_in_process(capsys, "predict", trained_run, "--input", "-")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 4
    assert [r.get("label") for r in rows] == ["positive", None, None, "negative"]
    assert rows[1] == {"text": ""} and rows[2] == {"text": "   "}  # empty results: the model never saw them
    (tmp_path / "in.txt").write_text("great\n\nawful\n")
    code, _, err = run_in_process(capsys, "predict", trained_run, "--input", tmp_path / "in.txt", "--output",
                                  tmp_path / "out.jsonl")
    assert code == 0 and "2 predictions written" in err and "1 empty rows for blank input lines" in err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_blank_lines_drop_out_of_every_input_list_and_settings_pass_through():
    from textune.infer import BlankLine, predict_rows, text_echo

    class Echo:  # a predictor that returns what it was given
        def predict(self, texts, extra=None, top_k=1):
            return [{"got": t, "extra": e, "top_k": top_k} for t, e in zip(texts, extra or texts)]

    texts = ["a", "", "b"]
    echo = text_echo(texts, "-")
    assert isinstance(echo[1], BlankLine) and echo[0] == {"text": "a"}
    rows = predict_rows(Echo(), (texts, ["x", "y", "z"], 3), echo)
    assert rows == [{"text": "a", "got": "a", "extra": "x", "top_k": 3}, {"text": ""},
                    {"text": "b", "got": "b", "extra": "z", "top_k": 3}]
    assert text_echo(["", "a"], "in.csv") == [{"text": ""}, {"text": "a"}]  # an empty table cell is still predicted
