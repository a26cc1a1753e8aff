"""A new task is one file: a toy task, "polarity" (does a text say something positive? a yes/no detector with
one output and a probability), is defined in this module as a task author would write `tasks/polarity.py`,
added to the registry from the test, and then trained, evaluated, predicted, served, diagnosed and reported
through textune's public entry points (the CLI's `main` in-process, `train`, `load_predictor`, `create_app`)
with no change to textune for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import toy_rows, write_jsonl
from textune.data import column_values, length_stats, load_regression_data, parse_numeric_labels, tokenize_splits
from textune.data_checks import DataReport, enforce
from textune.errors import ConfigError, TextuneError
from textune.evaluate import predict_logits
from textune.models import load_tokenizer, resolve_model
from textune.report_html import esc, fmt, read_predictions, text_cell_html
from textune.tasks import SEQUENCE_HEAD, TaskSpec, get_task, register_task, task_of, unregister_task
from textune.tasks.base import ExportSpec, Task
from textune.tasks.sequence import (SequenceInputs, SequencePredictor, load_sequence_model, read_labelled_file,
                                    read_sequence_inputs, target_data_report)

NAME = "polarity"
# The registry entry a `tasks/__init__.py` line would hold: this module holds the task's `TASK`.
SPEC = TaskSpec(__name__, ("balanced_accuracy", "accuracy", "loss"), "balanced_accuracy", (SEQUENCE_HEAD,))


# ================================================================ the task (what tasks/polarity.py would hold)


def polarity_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Balanced accuracy (the mean of the recall of each answer, so always answering one scores 0.5) and
    accuracy of deciding "positive" at probability 0.5."""
    preds, truth = np.asarray(probs) >= 0.5, np.asarray(labels) >= 0.5
    recalls = [float((preds[truth == side] == side).mean()) for side in (True, False) if (truth == side).any()]
    return {"balanced_accuracy": float(np.mean(recalls)), "accuracy": float((preds == truth).mean()),
            "examples": int(len(truth))}


def checked_labels(values: np.ndarray, where: str, column: str) -> np.ndarray:
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        raise TextuneError(f"{where} row {bad[0] + 1}: label column {column!r} holds {values[bad[0]]:g}; a polarity "
                           f"label is 1 (positive) or 0 (not)")
    return values


def counts(labels) -> dict[str, int]:
    positive = int(np.sum(np.asarray(labels) >= 0.5))
    return {"not positive": len(labels) - positive, "positive": positive}


@dataclass
class PolarityInputs(SequenceInputs):
    """One output per text: the logit of "positive" (BCE, the head's multi-label loss with one label)."""

    def summary(self, cfg) -> str:
        sizes = " | ".join(f"{split} {len(ds):,}" for split, ds in self.tokenized.items())
        return "\n".join([f"model      {cfg.model.name} (polarity: 1 output)", f"data       {sizes}",
                          *self.summary_footer(cfg)])

    def label_stats(self) -> dict:
        return {"label_counts": {k: counts(column_values(getattr(self.data, k), "labels")) for k in self.tokenized}}

    def label_counts(self) -> dict[str, int]:
        return counts(column_values(self.data.validation, "labels"))

    def evaluate(self, model, loader, accelerator=None):
        logits, labels, loss = predict_logits(model, loader, accelerator)
        probs = 1 / (1 + np.exp(-logits[:, 0]))
        metrics = {**polarity_metrics(probs, labels[:, 0]), "loss": loss}
        metrics.update(self.extra_metrics(probs, labels[:, 0]))
        return metrics, (probs, labels[:, 0])

    def write_predictions(self, predictions, path: Path) -> None:
        probs, labels = predictions
        self.write_validation_rows(({"label": int(y), "probability": round(float(p), 6)}
                                    for p, y in zip(probs, labels)), path)


class PolarityPredictor(SequencePredictor):
    """`predict(texts)` -> [{"positive": bool, "probability": float}]."""

    task = NAME

    def probabilities(self, texts: list[str], text_pairs: list[str] | None = None) -> np.ndarray:
        return 1 / (1 + np.exp(-self.logits(texts, text_pairs)[:, 0]))

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        return [{"positive": bool(p >= 0.5), "probability": round(float(p), 6)}
                for p in self.probabilities(texts, text_pairs)]


class Polarity(Task):
    name = NAME
    predictor_class = PolarityPredictor
    serve_paths = ("/v1/polarity",)

    def read_data(self, cfg):
        data = load_regression_data(cfg.data, cfg.seed, self.name)  # the label column read as numbers
        for split in ("train", "validation", "test"):
            if getattr(data, split) is not None:
                checked_labels(np.asarray(column_values(getattr(data, split), "labels")), f"data.{split}",
                               cfg.data.label_column)
        return data

    def check_data(self, cfg) -> DataReport:
        data = self.read_data(cfg)
        return target_data_report(data, {"train": counts(column_values(data.train, "labels"))})

    def load_inputs(self, cfg) -> PolarityInputs:
        model_path = resolve_model(cfg.model.name)
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code, for_classifier=True)
        data = self.read_data(cfg)
        report = target_data_report(data, {"train": counts(column_values(data.train, "labels"))})
        enforce(report, cfg.data.strict)
        tokenized = tokenize_splits(data, tokenizer, cfg.model.max_length, cache=cfg.data.cache)
        # BCE wants a (batch, 1) target for the one output
        tokenized = {k: ds.map(lambda b: {"labels": [[y] for y in b["labels"]]}, batched=True,
                               load_from_cache_file=cfg.data.cache)
                     for k, ds in tokenized.items()}
        stats = {split: length_stats(ds["length"], cfg.model.max_length) for split, ds in tokenized.items()}
        model = load_sequence_model(cfg, model_path, ["positive"], "multi_label_classification")
        return PolarityInputs(model_path, tokenizer, data, report, tokenized, stats, model)

    def read_inputs(self, source: str, columns: dict, predictor):
        return read_sequence_inputs(source, columns)

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        ds, texts, pairs, column = read_labelled_file(path, columns)
        labels = checked_labels(parse_numeric_labels(column_values(ds, column), path, column), path, column)
        probs = np.clip(predictor.probabilities(texts, pairs), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))
        return {**polarity_metrics(probs, labels), "loss": loss}

    def format_metrics(self, metrics: dict) -> str:
        return f"balanced accuracy {metrics['balanced_accuracy']:.4f} | {metrics['examples']:,} examples"

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        v = (metrics or {}).get("validation") or {}
        rows = read_predictions(run / "validation_predictions.jsonl")
        wrong = sorted((r for r in rows if (r["probability"] >= 0.5) != bool(r["label"])),
                       key=lambda r: -abs(r["probability"] - 0.5))[:10]
        table = "".join(f'<tr><td class="text">{text_cell_html(r)}</td><td>{r["label"]}</td>'
                        f'<td>{r["probability"]:.3f}</td></tr>' for r in wrong)
        section = ('<section id="polarity"><h2>Polarity: the most confident mistakes</h2><table class="wrong">'
                   f'<tr><th class="l">text</th><th>true</th><th>probability</th></tr>{table}</table>'
                   f"<p>{esc(len(wrong))} shown of {len(rows):,} validation texts.</p></section>")
        return [("balanced accuracy", fmt(v.get("balanced_accuracy")))], section

    def serve_description(self, predictor) -> str:
        return "a polarity detector (is each text positive?)"

    def router(self, ctx):
        from pydantic import BaseModel, ConfigDict, Field

        class PolarityRequest(BaseModel):
            model_config = ConfigDict(extra="forbid")
            texts: list[str] = Field(min_length=1, description="texts to read")

        class PolarityResult(BaseModel):
            positive: bool
            probability: float = Field(ge=0, le=1, description="the probability the text is positive")

        class PolarityResponse(BaseModel):
            model: str
            results: list[PolarityResult] = Field(description="one per text, in order")

        router = ctx.router()

        async def polarity(req) -> dict:
            """Whether each text is positive."""
            ctx.check_texts(req.texts)
            return {"model": ctx.model_name, "results": await ctx.batched(req.texts, None, None)}

        ctx.post(router, "/v1/polarity", polarity, PolarityRequest, PolarityResponse)
        return router


TASK = Polarity()

# export: one logit per text; an int8 export reports how many yes/no decisions agree with PyTorch's
Polarity.export_spec = ExportSpec(decide=lambda logits, mask: logits[:, 0] > 0, decisions="polarity decisions")


# ================================================================ the tests


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_task(NAME, SPEC)
    yield
    unregister_task(NAME)


def polarity_rows(n: int, seed: int) -> list[dict]:
    return [{"text": r["text"], "positive": int(r["label"] == "positive")} for r in toy_rows(n, seed)]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """`textune train CONFIG` (in this process, where the task is registered) on the toy data."""
    from textune.cli import main

    d = tmp_path_factory.mktemp("polarity")
    config = {"task": NAME, "output_dir": str(d / "run"),
              "model": {"name": str(tiny_model), "max_length": 32},
              "data": {"train": str(write_jsonl(d / "train.jsonl", polarity_rows(320, 1))),
                       "validation": str(write_jsonl(d / "validation.jsonl", polarity_rows(64, 2))),
                       "label_column": "positive"},
              "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.1, "logging_steps": 5,
                        "mixed_precision": "no"}}
    (d / "polarity.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate-data", str(d / "polarity.yaml")]) == 0  # the task's own check_data
    assert main(["train", str(d / "polarity.yaml")]) == 0
    return d / "run"


def test_the_registry_knows_the_task():
    from textune.config import load_config

    cfg = load_config(None, {"task": NAME, "data.train": "x.jsonl"})
    assert cfg.train.metric == "balanced_accuracy" and cfg.train.greater_is_better
    with pytest.raises(ConfigError, match=r"train\.metric: 'f1' is not a metric of task polarity; choose one of "
                                          r"balanced_accuracy, accuracy, loss"):
        load_config(None, {"task": NAME, "data.train": "x.jsonl", "train.metric": "f1"})
    assert get_task(NAME) is TASK
    with pytest.raises(TextuneError, match=r"task 'polarity' is already registered \(by test_new_task\)"):
        register_task(NAME, SPEC)
    with pytest.raises(TextuneError, match=r"task 'polarty' is not registered; the tasks are classification, .*"
                                           r"polarity \(a task defined outside textune is added with"):
        get_task("polarty")
    with pytest.raises(TextuneError, match=r"task 'other': default_metric 'f1' must be one of its metrics"):
        register_task("other", TaskSpec(__name__, ("accuracy",), "f1", (SEQUENCE_HEAD,)))
    with pytest.raises(TextuneError, match="built into textune and cannot be unregistered"):
        unregister_task("regression")


def test_trains_beyond_chance(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text())["validation"]
    assert metrics["balanced_accuracy"] > 0.8, metrics  # chance is 0.5
    assert task_of(run) == NAME and yaml.safe_load((run / "config.yaml").read_text())["train"]["metric"] == \
        "balanced_accuracy"
    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and set(rows[0]) == {"text", "label", "probability"}
    stats = json.loads((run / "data_stats.json").read_text())
    assert sum(stats["label_counts"]["validation"].values()) == 64
    card = (run / "model" / "README.md").read_text()
    assert "polarity" in card and "balanced_accuracy" in card


def test_a_lora_run_with_a_metrics_hook(run, tmp_path):
    from textune.config import load_config
    from textune.tasks import load_predictor
    from textune.train import train

    config = yaml.safe_load((run / "config.yaml").read_text())
    overrides = {"task": NAME, "model.name": config["model"]["name"], "model.max_length": 32,
                 "data.train": config["data"]["train"], "data.validation": config["data"]["validation"],
                 "data.label_column": "positive", "tuning.method": "lora", "train.epochs": 1,
                 "train.mixed_precision": "no", "output_dir": str(tmp_path / "lora")}
    seen = []

    def hook(probs, labels):
        seen.append((probs.shape, sorted(set(labels.tolist()))))
        return {"mean_probability": float(probs.mean())}

    lora = train(load_config(None, overrides), compute_metrics=hook)
    assert seen[-1] == ((64,), [0.0, 1.0])  # the task's predictions: one probability per validation text
    assert "mean_probability" in json.loads((lora / "metrics.json").read_text())["validation"]
    assert (lora / "model" / "adapter_config.json").is_file()
    (row,) = load_predictor(lora).predict(["a great film"])
    assert set(row) == {"positive", "probability"}


def test_evaluate_and_predict_through_the_cli(run, tmp_path, capsys):
    from textune.cli import main

    data = write_jsonl(tmp_path / "held_out.jsonl", polarity_rows(40, 7))
    assert main(["evaluate", str(run), "--data", str(data), "--output", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "balanced accuracy" in out, out  # the headline names the task's metric
    assert json.loads((tmp_path / "m.json").read_text())["balanced_accuracy"] > 0.8

    (tmp_path / "in.txt").write_text("a great film\n\nthe plot was boring\n")
    assert main(["predict", str(run), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert "positive" not in rows[1] and rows[0]["text"] == "a great film"  # a blank line: a row, no prediction
    assert (rows[0]["positive"], rows[2]["positive"]) == (True, False) and 0 <= rows[0]["probability"] <= 1

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good", "positive": 3}])
    assert main(["evaluate", str(run), "--data", str(bad)]) == 2  # a user error: one line, exit 2
    assert "row 1: label column 'positive' holds 3; a polarity label is 1" in capsys.readouterr().err


def test_serves_its_own_route(run):
    from fastapi.testclient import TestClient

    from openapi_check import assert_matches_schema
    from textune.serving import ServeSettings, create_app
    from textune.tasks import load_predictor

    predictor = load_predictor(run)
    assert type(predictor) is PolarityPredictor
    with TestClient(create_app(predictor, ServeSettings(), "polarity-toy")) as client:
        r = client.post("/v1/polarity", json={"texts": ["a great film", "the plot was boring"]})
        assert r.status_code == 200, r.text
        assert_matches_schema(client, "POST", "/v1/polarity", r)
        assert [x["positive"] for x in r.json()["results"]] == [True, False]
        spec = client.get("/openapi.json").json()
        assert "/v1/polarity" in spec["paths"] and "polarity detector" in spec["info"]["description"]
        assert client.get("/v1/models").json()["task"] == NAME
        other = client.post("/v1/classify", json={"texts": ["x"]})  # another task's path: a 404 that explains
        assert other.status_code == 404 and "polarity detector" in other.json()["error"]["message"]
        assert "POST /v1/polarity" in other.json()["error"]["message"]

    class Classifier:  # a classifier's server knows the new task's path too, and says what it serves instead
        label_names = ["negative", "positive"]

        def predict(self, texts, pairs=None):
            return [{"label": "positive", "score": 1.0,
                     "probabilities": {"negative": 0.0, "positive": 1.0}}] * len(texts)

    with TestClient(create_app(Classifier(), ServeSettings(), "classifier")) as client:
        r = client.post("/v1/polarity", json={"texts": ["a"]})
        assert r.status_code == 404 and "use POST /v1/classify" in r.json()["error"]["message"]


def test_exports_to_onnx_and_predicts_the_same(run, tmp_path, capsys):
    from textune.cli import main
    from textune.tasks import load_predictor

    assert main(["export", str(run), "--output", str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "textune_onnx.json").read_text())["task"] == NAME
    texts = ["a great film", "the plot was boring", "it was nice and the acting was poor"]
    on_export = load_predictor(tmp_path / "onnx")
    assert type(on_export) is PolarityPredictor
    assert np.allclose(on_export.probabilities(texts), load_predictor(run).probabilities(texts), atol=1e-5)


def test_diagnose_curves_and_report(run, capsys):
    from textune.cli import main

    assert main(["diagnose", str(run)]) == 0
    assert capsys.readouterr().out.startswith("diagnosis  ")
    assert main(["curves", str(run)]) == 0
    assert (run / "curves" / "metrics.png").is_file()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert '<section id="polarity">' in page and "balanced accuracy" in page
    assert "not positive" in page  # the task's label counts in the data section
