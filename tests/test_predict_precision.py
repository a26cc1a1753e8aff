"""Faster prediction: bf16 and int8 `ClassifierPredictor`s keep the input order and mostly agree with fp32."""

import json

import numpy as np
import pytest
import torch

from conftest import toy_rows
from textune.cli import main
from textune.errors import TextuneError
from textune.tasks.classification import ClassifierPredictor

TEXTS = [r["text"] for r in toy_rows(40, seed=11)] + ["good", "the movie was really very bad and boring"]


@pytest.fixture(scope="module")
def fp32_probs(trained_run):
    return ClassifierPredictor(trained_run, batch_size=8).predict_proba(TEXTS)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_keeps_order_and_agrees_with_fp32(trained_run, fp32_probs, precision):
    predictor = ClassifierPredictor(trained_run, batch_size=8, precision=precision)
    probs = predictor.predict_proba(TEXTS)
    assert probs.shape == fp32_probs.shape and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-3)
    # Order: a text predicted alone gets the row it got in the batch (batches are sorted by length).
    one_by_one = np.concatenate([predictor.predict_proba([t]) for t in TEXTS[:6]])
    np.testing.assert_allclose(probs[:6], one_by_one, atol=0.02)
    assert (probs.argmax(1) == fp32_probs.argmax(1)).mean() >= 0.9
    assert np.abs(probs - fp32_probs).max() < 0.1


def test_int8_quantises_linear_layers_and_bf16_casts_weights(trained_run):
    int8 = ClassifierPredictor(trained_run, precision="int8").model
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    bf16 = ClassifierPredictor(trained_run, precision="bf16").model
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_unknown_precision_is_refused(trained_run):
    with pytest.raises(TextuneError, match="precision 'fp8' is not one of fp32, bf16, int8"):
        ClassifierPredictor(trained_run, precision="fp8")


@pytest.mark.parametrize("flag", ["int8", "bf16"])
def test_cli_quantize_flag(trained_run, tmp_path, capsys, flag):
    texts = tmp_path / "in.txt"
    texts.write_text("great superb film\nawful and poor\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(trained_run), "--input", str(texts), "--output", str(out), "--quantize", flag]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["great superb film", "awful and poor"]
    assert [r["label"] for r in rows] == ["positive", "negative"]


def test_cli_quantize_with_adapter_is_one_clear_error(trained_run, tmp_path, capsys):
    code = main(["predict", str(trained_run), "--input", "-", "--adapter", "a", "--quantize", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and "--quantize works on a full model, not with --adapter" in err
