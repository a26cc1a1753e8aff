import io
import json

import numpy as np
import pytest

from conftest import toy_rows, write_jsonl
from textune.errors import TextuneError
from textune.infer import read_inputs, write_jsonl as write_predictions
from textune.tasks.classification import ClassifierPredictor


@pytest.fixture(scope="module")
def predictor(trained_run):
    return ClassifierPredictor(trained_run, batch_size=4)


def test_batched_length_sorted_predictions_keep_input_order(predictor):
    texts = [r["text"] for r in toy_rows(23, seed=9)] + ["good", "the movie was really very bad and boring"]
    batched = predictor.predict_proba(texts)
    one_by_one = np.concatenate([predictor.predict_proba([t]) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert batched.shape == (25, 2) and np.allclose(batched.sum(1), 1, atol=1e-5)


def test_predict_rows_have_label_score_and_probabilities(predictor):
    rows = predictor.predict(["great superb film", "awful and poor"])
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert set(rows[0]["probabilities"]) == {"negative", "positive"}
    assert rows[0]["score"] == max(rows[0]["probabilities"].values())


def test_empty_input_and_mismatched_pairs(predictor):
    assert predictor.predict_proba([]).shape == (0, 2)
    with pytest.raises(TextuneError, match="got 2 texts but 1 text pairs"):
        predictor.predict_proba(["a", "b"], ["c"])


def test_read_inputs_from_txt_stdin_and_data_files(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_text("first text\n\nsecond text\n")
    assert read_inputs(str(tmp_path / "in.txt")) == (["first text", "second text"], None)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert read_inputs("-") == (["one", "two"], None)
    write_jsonl(tmp_path / "in.jsonl", [{"sentence": "a", "other": "b"}])
    assert read_inputs(str(tmp_path / "in.jsonl"), "sentence", "other") == (["a"], ["b"])
    with pytest.raises(TextuneError, match="has no column 'text'; its columns are: 'sentence', 'other'"):
        read_inputs(str(tmp_path / "in.jsonl"))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(TextuneError, match="no texts to predict"):
        read_inputs(str(tmp_path / "blank.txt"))


def test_output_file_is_written_whole(tmp_path):
    out = tmp_path / "preds.jsonl"
    write_predictions([{"a": 1}, {"a": 2}], str(out))
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]


def test_an_interrupted_output_file_keeps_the_previous_one(tmp_path):
    out = tmp_path / "preds.jsonl"
    write_predictions([{"a": 1}], str(out))

    def rows():
        yield {"a": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_predictions(rows(), str(out))
    assert out.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]
