import pytest

from conftest import toy_rows, write_csv
from textune.config import DataConfig
from textune.data import load_task_data
from textune.data_checks import check_task_data, enforce, normalise
from textune.errors import TextuneError


def load(tmp_path, train_rows, val_rows=None, **kw):
    train = write_csv(tmp_path / "t.csv", train_rows)
    val = write_csv(tmp_path / "v.csv", val_rows) if val_rows else None
    return load_task_data(DataConfig(train=str(train), validation=str(val) if val else None, **kw), seed=0)


def kinds(report):
    return {f.kind: f for f in report.findings}


def test_clean_data_has_no_findings(tmp_path):
    rows = [{"text": f"sentence number {i}", "label": "a" if i % 2 else "b"} for i in range(40)]
    val = [{"text": f"another sentence {i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    report = check_task_data(load(tmp_path, rows, val))
    assert report.findings == [] and report.rows == {"train": 40, "validation": 10}
    assert "no empty texts, duplicates, leakage" in report.format()


def test_eight_sentences_repeated_125_times_then_split_is_leakage(tmp_path):
    rows = [{"text": f"Sentence  number {i % 8}", "label": "pos" if i % 8 < 4 else "neg"} for i in range(1000)]
    report = check_task_data(load(tmp_path, rows, validation_split=0.2))
    found = kinds(report)
    assert found["leakage"].count == 200 and "200 of 200 validation rows (100%)" in found["leakage"].message
    assert found["duplicate"].count == 800 - 8  # 800 training rows after the split, 8 distinct texts
    with pytest.raises(TextuneError, match=r"data check failed \(--strict\): leakage: 200 of 200"):
        enforce(report, strict=True)
    enforce(report, strict=False)  # a warning only


def test_leakage_ignores_case_and_whitespace(tmp_path):
    report = check_task_data(load(tmp_path, toy_rows(20, 0) + [{"text": "A  Great Film", "label": "positive"}],
                                  [{"text": "a great film", "label": "positive"}, {"text": "unseen", "label": "negative"}]))
    assert kinds(report)["leakage"].count == 1 and normalise(" A  Great\tFilm ") == "a great film"


def test_conflicting_labels_and_empty_texts(tmp_path):
    rows = toy_rows(20, 0) + [{"text": "so so", "label": "positive"}, {"text": "So so", "label": "negative"},
                              {"text": "   ", "label": "negative"}]
    report = check_task_data(load(tmp_path, rows, toy_rows(5, 3)))
    found = kinds(report)
    assert found["conflict"].count == 1 and found["empty"].count == 1
    with pytest.raises(TextuneError, match="1 texts appear with different labels"):
        enforce(report, strict=True)


def test_rare_class_is_flagged(tmp_path):
    rows = [{"text": f"t {i}", "label": "common"} for i in range(99)] + [{"text": "rare one", "label": "rare"}]
    report = check_task_data(load(tmp_path, rows, [{"text": "x", "label": "rare"}]))
    assert "rare (1)" in kinds(report)["imbalance"].message


def test_validate_data_command(tmp_path, capsys):
    from textune.cli import main

    rows = [{"text": f"s {i % 8}", "label": "p" if i % 2 else "n"} for i in range(200)]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {write_csv(tmp_path / 'd.csv', rows)}}}\n")
    assert main(["validate-data", str(cfg)]) == 0
    assert "leakage:" in capsys.readouterr().out
    assert main(["validate-data", str(cfg), "--strict"]) == 2
    assert "data check failed (--strict)" in capsys.readouterr().err


def test_many_balanced_classes_are_not_rare_but_a_small_one_among_them_is(tmp_path):
    # 25 classes of 40 rows: each is 4% of the rows, under a fixed 5% but exactly its balanced share 1/K.
    rows = [{"text": f"text {i}", "label": f"class{i % 25:02d}"} for i in range(1000)]
    val = [{"text": f"held out {i}", "label": f"class{i % 25:02d}"} for i in range(50)]
    assert "imbalance" not in kinds(check_task_data(load(tmp_path, rows, val)))
    rows = [r for r in rows if r["label"] != "class07"] + [{"text": f"few {i}", "label": "class07"} for i in range(3)]
    message = kinds(check_task_data(load(tmp_path, rows, val))).get("imbalance").message
    assert "class07 (3)" in message and "class08" not in message
