"""Recorded losses (torchtune's recipe tests): a few optimizer steps of four tasks on the tiny random models,
the training losses compared with values recorded before the task contract was reorganised. A change in
tokenisation, collation, labels, loss or optimizer set-up shows here as a changed number.

To re-record after an intended change: `RECORD_LOSSES=1 pytest tests/test_recorded_losses.py -s` prints them."""

from __future__ import annotations

import json
import os

import pytest

from conftest import build_tiny_chat_lm, toy_overrides, write_jsonl
from test_instruction import ROWS, instruction_overrides
from test_question_answering import qa_overrides
from test_question_answering import toy_rows as qa_rows
from test_token_classification import ner_overrides, write_conll
from textune.config import load_config

STEPS = 6
COMMON = {"train.max_steps": STEPS, "train.logging_steps": 1, "train.warmup_ratio": 0.0, "seed": 7}

# Recorded at commit 0e61df5, before the contract moved serving, export and prediction into tasks, with PyTorch's
# own dropout: they still hold with it (`torch_dropout`), which shows that nothing but the dropout masks moved
# when textune.speedups began drawing them from 16-bit draws (RECORDED_BITS_DROPOUT, recorded then).
RECORDED = {
    "classification": [0.689779, 0.689298, 0.702658, 0.712249, 0.713923, 0.696036],
    "token-classification": [1.612369, 1.407376, 1.269435, 1.171052, 1.122691, 1.064445],
    "question-answering": [2.659441, 2.522548, 2.392292, 2.261208, 2.116679, 2.068699],
    "instruction": [5.985605, 5.711695, 5.530041, 5.405398, 5.311284, 5.248801],
}
RECORDED_BITS_DROPOUT = {
    "classification": [0.69293, 0.687024, 0.705212, 0.713356, 0.714132, 0.703235],
    "token-classification": [1.615357, 1.402765, 1.26763, 1.176191, 1.110127, 1.075283],
    "question-answering": [2.647953, 2.526069, 2.381033, 2.254101, 2.121211, 2.059474],
    "instruction": [5.985605, 5.711695, 5.530041, 5.405398, 5.311284, 5.248801],  # the tiny chat model has none
}


def losses_of(run) -> list[float]:
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [round(h["loss"], 6) for h in history if h["type"] == "train"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_tiny_chat_lm(tmp_path_factory.mktemp("chat-llama"), "llama")


def overrides_for(task: str, tiny_model, toy_data, chat_model, d) -> dict:
    if task == "classification":
        return toy_overrides(tiny_model, toy_data, d / "run")
    if task == "token-classification":
        data = {"train": write_conll(d / "train.conll", 64, seed=1), "validation": write_conll(d / "v.conll", 16, 2)}
        return ner_overrides(tiny_model, data, d / "run")
    if task == "question-answering":
        data = {"train": write_jsonl(d / "train.jsonl", qa_rows(64, seed=1)),
                "validation": write_jsonl(d / "validation.jsonl", qa_rows(16, seed=2, n_words=30))}
        return qa_overrides(tiny_model, data, d / "run")
    data = write_jsonl(d / "train.jsonl", ROWS)
    return instruction_overrides(chat_model, data, data, d / "run", **{"eval.generate_samples": 0})


@pytest.mark.parametrize("dropout", ["bits", "torch"])
@pytest.mark.parametrize("task", list(RECORDED))
def test_losses_match_the_recorded_values(task, dropout, tiny_model, toy_data, chat_model, tmp_path, monkeypatch):
    import textune.speedups
    from textune.train import train

    if dropout == "torch":  # the model keeps nn.Dropout, as before the speed-up
        monkeypatch.setattr(textune.speedups, "use_bits_dropout", lambda model: 0)
    cfg = load_config(None, {**overrides_for(task, tiny_model, toy_data, chat_model, tmp_path), **COMMON})
    losses = losses_of(train(cfg))
    if os.environ.get("RECORD_LOSSES"):
        print(f"\n    {task!r}: {losses},  # {dropout}")
    assert len(losses) == STEPS
    assert losses == pytest.approx((RECORDED if dropout == "torch" else RECORDED_BITS_DROPOUT)[task], rel=1e-4)
