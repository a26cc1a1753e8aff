"""The defaults work together for every task (issue 30): each task trains with no optional key set, only task,
model.name, its training data and output_dir, on the tiny models, and its run predicts.

One key beyond those is set: train.max_steps, a few steps instead of the default three epochs, to keep the test
fast. It shortens the run and changes no other default (evaluation, checkpoints, the saved model all still run).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from conftest import FILLER, build_tiny_bert, build_tiny_chat_lm, toy_rows, write_csv, write_jsonl
from test_question_answering import toy_rows as qa_rows
from test_token_classification import write_conll
from textune.config import load_config
from textune.tasks import TASKS, load_predictor
from textune.train import train

STEPS = 2


def sentiment_score(text: str) -> float:
    return 5.0 if any(w in text.split() for w in ("good", "great", "love", "nice", "superb")) else 0.0


def label_set(rng: random.Random) -> dict:
    words, labels = rng.sample([w for w in FILLER if w != "story"], 3), []
    for name, word in (("pos", "good"), ("neg", "bad"), ("story", "story")):
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), word)
            labels.append(name)
    return {"text": " ".join(words), "label": "|".join(labels)}


def chat_rows() -> list[dict]:
    return [{"instruction": "what is two plus three", "input": "", "output": "five"},
            {"instruction": "translate hello", "input": "yes", "output": "hello"}] * 16


def task_data(task: str, folder: Path) -> dict:
    """The data keys of a run of `task` on toy data in the columns and format the defaults read."""
    rows = toy_rows(120, seed=1)
    if task == "classification":
        return {"data.train": str(write_csv(folder / "train.csv", rows))}
    if task == "regression":
        scored = [{"text": r["text"], "label": sentiment_score(r["text"])} for r in rows]
        return {"data.train": str(write_csv(folder / "train.csv", scored))}
    if task == "multi-label":
        rng = random.Random(2)
        return {"data.train": str(write_csv(folder / "train.csv", [label_set(rng) for _ in range(120)]))}
    if task == "token-classification":
        return {"data.train": str(write_conll(folder / "train.conll", 120, seed=1))}
    if task == "question-answering":
        # contexts of 100 words: windows of model.max_length, which must fit the model's 64 positions
        return {"data.train": str(write_jsonl(folder / "train.jsonl", qa_rows(120, seed=1, n_words=100)))}
    if task == "language-modeling":  # its training data is a corpus (textune pretrain), not labelled rows
        path = folder / "corpus.txt"  # enough for a block of model.max_length in the held-out 5%
        path.write_text("\n".join(r["text"] for r in toy_rows(2000, seed=1)) + "\n", encoding="utf-8")
        return {"pretrain.corpus": str(path)}
    if task == "instruction":
        return {"data.train": str(write_jsonl(folder / "train.jsonl", chat_rows()))}
    if task == "embedding":  # pairs: the column of positives is the one key this task cannot default
        pairs = [{"text": r["text"], "positive": " ".join(reversed(r["text"].split()))} for r in rows]
        return {"data.train": str(write_csv(folder / "train.csv", pairs)), "data.text_pair_column": "positive"}
    raise AssertionError(f"no toy data for task {task}: add it here")


def predict_something(task: str, run: Path) -> list:
    predictor = load_predictor(run)
    if task == "question-answering":
        return predictor.predict(["is it"], ["the film was good"])
    if task == "language-modeling":
        return predictor.fill_mask(["the film was [MASK]"])
    if task == "instruction":
        return predictor.predict([[{"role": "user", "content": "what is two plus three"}]], max_new_tokens=2)
    return predictor.predict(["the film was good", "a bad plot"])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_and_predicts_with_the_defaults(task, tmp_path):
    # conftest's tiny BERT holds 64 positions, fewer than the default model.max_length (128): training reads
    # what the model can (see train.fit_max_length)
    model = (build_tiny_chat_lm(tmp_path / "chat-lm") if task == "instruction"
             else build_tiny_bert(tmp_path / "bert"))
    run = tmp_path / "run"
    cfg = load_config(None, {"task": task, "model.name": str(model), "output_dir": str(run),
                             "train.max_steps": STEPS, **task_data(task, tmp_path)})
    assert train(cfg) == run
    assert (run / "metrics.json").is_file() and (run / "model").is_dir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["max_length"] == (128 if task == "instruction" else 64)  # the chat LM holds 256
    predictions = predict_something(task, run)
    assert predictions and all(p is not None for p in predictions)
