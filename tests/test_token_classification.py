"""Token classification (NER): reading, sub-token alignment, seqeval figures, entity grouping and offsets, the
pipeline round trip, bad input, and train -> evaluate -> predict -> serve on a tiny random BERT."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FILLER, NEGATIVE, POSITIVE, write_jsonl
from textune.config import load_config
from textune.errors import TextuneError
from textune.tasks import get_task, task_of
from textune.tasks.token_classification import (align_labels, entity_metrics, group_entities, orphan_inside_tags,
                                                read_conll, span_confusions, tag_names)


def toy_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    """Filler words, one positive or negative word (B-POS / B-NEG); 'very' before it joins the entity."""
    words = rng.sample([w for w in FILLER if w != "very"], rng.randint(2, 5))
    tags = ["O"] * len(words)
    kind = rng.choice(["POS", "NEG"])
    entity = [rng.choice(POSITIVE if kind == "POS" else NEGATIVE)]
    if rng.random() < 0.4:
        entity = ["very", *entity]
    at = rng.randint(0, len(words))
    words[at:at] = entity
    tags[at:at] = [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
    return words, tags


def write_conll(path: Path, n: int, seed: int, sep: str = "\t") -> Path:
    rng = random.Random(seed)
    lines = ["-DOCSTART- O", ""]
    for _ in range(n):
        words, tags = toy_sentence(rng)
        lines += [f"{w}{sep}{t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ner-data")
    return {"train": write_conll(d / "train.conll", 240, seed=1), "validation": write_conll(d / "val.conll", 40, seed=2)}


def ner_overrides(tiny_model: Path, data: dict, out: Path, **extra) -> dict:
    return {"task": "token-classification", "model.name": str(tiny_model), "model.max_length": 32,
            "data.train": str(data["train"]), "data.validation": str(data["validation"]), "train.epochs": 8,
            "train.batch_size": 16, "train.lr": 5e-3, "train.warmup_ratio": 0.1, "train.logging_steps": 5,
            "train.mixed_precision": "no", "output_dir": str(out), **extra}


@pytest.fixture(scope="module")
def ner_run(tiny_model, ner_data, tmp_path_factory) -> Path:
    from textune.train import train

    return train(load_config(None, ner_overrides(tiny_model, ner_data, tmp_path_factory.mktemp("runs") / "ner")))


# ---------------------------------------------------------------- pure pieces


@pytest.mark.parametrize("word_ids, tags, all_tokens, expected", [
    ([None, 0, 1, 1, 2, None], [1, 3, 0], False, [-100, 1, 3, -100, 0, -100]),  # first sub-token only
    ([None, 0, 1, 1, 2, None], [1, 3, 0], True, [-100, 1, 3, 4, 0, -100]),  # B-X (3) continues as I-X (4)
    ([None, 0, 0, 0, None], [2], True, [-100, 2, 2, 2, -100]),  # an I- tag stays I-
])
def test_align_labels(word_ids, tags, all_tokens, expected):
    b_to_i = [0, 2, 2, 4, 4]  # O, B-A, I-A, B-B, I-B
    assert align_labels(word_ids, tags, all_tokens, b_to_i) == expected


def test_seqeval_counts_wrong_type_and_partial_span_as_wrong():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]  # right, wrong type, partial span
    m = entity_metrics(gold, pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3) and m["entities"] == 3
    assert m["per_type"]["PER"]["f1"] == 1.0 and m["per_type"]["LOC"]["recall"] == 0.0
    assert m["accuracy"] == pytest.approx(5 / 7)


@pytest.mark.parametrize("words, expected", [
    ([("B-PER", 0.9, 0, 4), ("I-PER", 0.7, 5, 9), ("O", 0.9, 10, 12), ("B-LOC", 0.8, 13, 18)],
     [("PER", 0, 9, 0.8), ("LOC", 13, 18, 0.8)]),
    ([("B-PER", 1.0, 0, 2), ("B-PER", 0.5, 3, 5)], [("PER", 0, 2, 1.0), ("PER", 3, 5, 0.5)]),  # B starts anew
    ([("I-LOC", 0.6, 0, 3), ("I-LOC", 0.8, 4, 6)], [("LOC", 0, 6, 0.7)]),  # an I- without B- still opens one
    ([("B-PER", 1.0, 0, 2), ("I-LOC", 0.5, 3, 5)], [("PER", 0, 2, 1.0), ("LOC", 3, 5, 0.5)]),  # type change
    ([("O", 1.0, 0, 2)], []),
])
def test_group_entities(words, expected):
    got = [(e["entity"], e["start"], e["end"], round(e["score"], 6)) for e in group_entities(words)]
    assert got == [(t, s, e, pytest.approx(sc)) for t, s, e, sc in expected]


def test_orphan_inside_tags_and_confusions():
    assert orphan_inside_tags(["O", "I-PER", "I-PER", "B-LOC", "I-PER"]) == 2
    c = span_confusions(["B-PER", "O", "B-LOC", "I-LOC"], ["B-ORG", "O", "B-LOC", "O"])
    assert c == {("PER", "ORG"): 1, ("LOC", "(missed)"): 1, ("(none)", "LOC"): 1}


# ---------------------------------------------------------------- reading


def test_conll_docstart_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\n\nEmpire NNP B-facility\nState\tI-facility\n\n\n\nhi O\n\n\n")
    s = read_conll(path, "data.train")
    assert s.tokens == [["Empire", "State"], ["hi"]] and s.tags == [["B-facility", "I-facility"], ["O"]]
    assert s.where[0].endswith("line 4")


def test_tag_names_and_scheme_errors():
    from textune.tasks.token_classification import Sentences

    s = Sentences([["a", "b"]], [["B-PER", "O"]], ["f line 1"])
    assert tag_names(s, None) == ["O", "B-PER", "I-PER"]
    with pytest.raises(TextuneError, match=r"\['PERSON'\] are not BIO/IOB2 tags"):
        tag_names(Sentences([["a"]], [["PERSON"]], ["f line 1"]), None)
    with pytest.raises(TextuneError, match="every tag is O"):
        tag_names(Sentences([["a"]], [["O"]], ["f line 1"]), None)


@pytest.mark.parametrize("make, message", [
    (lambda d: d["bad_line"], r"line 2: 'State' has no tag"),
    (lambda d: d["lengths"], r"row 1: 2 tokens but 1 tags; give one tag per token"),
    (lambda d: d["empty"], r"row 1: the sentence is empty"),
    (lambda d: d["csv"], r"a CSV/TSV of sentences with one label each is for task: classification"),
])
def test_bad_ner_training_files(make, message, tmp_path, tiny_model, ner_data):
    files = {"bad_line": tmp_path / "bad.conll", "lengths": tmp_path / "len.jsonl", "empty": tmp_path / "empty.jsonl",
             "csv": tmp_path / "sentences.csv"}
    files["bad_line"].write_text("Empire\tB-facility\nState\n")
    write_jsonl(files["lengths"], [{"tokens": ["a", "b"], "tags": ["O"]}])
    write_jsonl(files["empty"], [{"tokens": [], "tags": []}])
    files["csv"].write_text("text,label\na film,positive\n")
    out = tmp_path / "run"
    cfg = load_config(None, ner_overrides(tiny_model, ner_data, out, **{"data.train": str(make(files))}))
    with pytest.raises(TextuneError, match=message):
        get_task(cfg.task).load_inputs(cfg)
    assert not out.exists()


def test_a_tag_training_never_saw_and_a_conll_file_for_a_classifier(tmp_path, tiny_model, ner_data):
    val = tmp_path / "val.conll"
    val.write_text("good\tB-POS\nfilm\tB-GENRE\n")
    cfg = load_config(None, ner_overrides(tiny_model, ner_data, tmp_path / "r", **{"data.validation": str(val)}))
    with pytest.raises(TextuneError, match=r"val.conll line 2: tag 'B-GENRE' never occurs in training"):
        get_task(cfg.task).load_inputs(cfg)
    cfg = load_config(None, {**ner_overrides(tiny_model, ner_data, tmp_path / "r"), "task": "classification"})
    with pytest.raises(TextuneError, match="is a CoNLL file of tagged tokens.*set task: token-classification"):
        get_task(cfg.task).load_inputs(cfg)


def test_jsonl_with_integer_tags_named_by_label_names(tmp_path, tiny_model, ner_data):
    train = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["the", "good", "film"], "ner": [0, 1, 0]}] * 8)
    cfg = load_config(None, ner_overrides(tiny_model, ner_data, tmp_path / "r", **{
        "data.train": str(train), "data.validation": str(train), "data.tags_column": "ner",
        "data.label_names": ["O", "B-POS", "I-POS"]}))
    inputs = get_task(cfg.task).load_inputs(cfg)
    assert inputs.names == ["O", "B-POS", "I-POS"]
    assert inputs.model.config.id2label == {0: "O", 1: "B-POS", 2: "I-POS"}
    first = inputs.tokenized["train"][0]
    assert first["labels"] == [-100, 0, 1, 0, -100]  # [CLS] the good film [SEP]


# ---------------------------------------------------------------- a trained run


def test_training_learns_the_toy_entities(ner_run):
    metrics = json.loads((ner_run / "metrics.json").read_text())
    assert metrics["metric"] == "f1" and metrics["validation"]["f1"] > 0.8
    assert set(metrics["validation"]["per_type"]) == {"POS", "NEG"}
    assert task_of(ner_run) == "token-classification"
    rows = [json.loads(line) for line in (ner_run / "validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["tokens"]) == len(r["tags"]) == len(r["pred"]) for r in rows)


def test_predicted_offsets_slice_the_input(ner_run):
    predictor = get_task("token-classification").load_predictor(ner_run)
    texts = ["the film was very good", "  awful   acting , really", "this is a plot"]
    rows = predictor.predict(texts)
    found = [(e["entity"], e["text"]) for r in rows for e in r["entities"]]
    assert ("POS", "very good") in found and ("NEG", "awful") in found
    for text, row in zip(texts, rows):
        for e in row["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1


def test_the_saved_folder_loads_in_the_transformers_pipeline(ner_run):
    from transformers import pipeline

    ner = pipeline("token-classification", model=str(ner_run / "model"), aggregation_strategy="simple", device="cpu")
    ours = get_task("token-classification").load_predictor(ner_run).predict(["the film was very good"])[0]["entities"]
    theirs = ner("the film was very good")
    assert [(e["entity_group"], e["start"], e["end"]) for e in theirs] == \
        [(e["entity"], e["start"], e["end"]) for e in ours]


def test_cli_evaluate_predict_and_report(ner_run, ner_data, tmp_path):
    from textune.cli import main

    out = tmp_path / "m.json"
    assert main(["evaluate", str(ner_run), "--data", str(ner_data["validation"]), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"f1", "precision", "recall", "per_type"} <= set(metrics)
    texts = tmp_path / "in.txt"
    texts.write_text("the film was very good\nawful acting\n")
    pred = tmp_path / "p.jsonl"
    assert main(["predict", str(ner_run), "--input", str(texts), "--output", str(pred)]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert rows[1]["text"] == "awful acting" and rows[1]["entities"][0]["entity"] == "NEG"
    assert main(["predict", str(ner_run), "--input", str(ner_data["validation"]), "--output", str(pred)]) == 0
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 40 and len(rows[0]["tags"]) == len(rows[0]["tokens"])
    assert main(["report", str(ner_run)]) == 0
    page = (ner_run / "report.html").read_text()
    assert "entity F1" in page and "Which types are confused" in page and "the most entity errors" in page
    assert "Label balance: entities per type" in page and "<td class=\"l\">NEG</td>" in page


def test_serve_entities_and_refuse_classify(ner_run):
    from fastapi.testclient import TestClient

    from openapi_check import assert_matches_schema
    from textune.serving import ServeSettings, create_app

    predictor = get_task("token-classification").load_predictor(ner_run)
    with TestClient(create_app(predictor, ServeSettings(), "ner")) as client:
        r = client.post("/v1/entities", json={"texts": ["the film was very good", "a plot"]})
        assert r.status_code == 200
        assert_matches_schema(client, "POST", "/v1/entities", r)
        assert client.get("/v1/models").json()["task"] == "token-classification"
        results = r.json()["results"]
        assert results[0]["entities"][0]["text"] == "very good" and results[1]["entities"] == []
        r = client.post("/v1/classify", json={"texts": ["x"]})
        assert r.status_code == 404 and "token classifier" in r.json()["error"]["message"]
        assert_matches_schema(client, "POST", "/v1/classify", r)
        r = client.post("/v1/entities", json={"texts": []})
        assert r.status_code == 422
        assert_matches_schema(client, "POST", "/v1/entities", r)


def test_lora_token_classification_and_adapter_registry(tiny_model, ner_data, tmp_path):
    from textune.adapters import AdapterPredictor, AdapterRegistry, merge_adapter
    from textune.tasks import load_predictor
    from textune.train import train

    run = train(load_config(None, ner_overrides(tiny_model, ner_data, tmp_path / "lora", **{
        "tuning.method": "lora", "tuning.target_modules": ["query", "value"], "train.epochs": 2})))
    assert (run / "model" / "adapter_config.json").is_file()
    assert json.loads((run / "model" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    direct = get_task("token-classification").load_predictor(run).predict(["the film was very good"])
    registry = AdapterRegistry(tmp_path / "adapters")
    registry.add(run, "ner")
    via_registry = AdapterPredictor(registry.root).predict(["the film was very good"], adapter="ner")
    assert [e["entity"] for e in via_registry[0]["entities"]] == [e["entity"] for e in direct[0]["entities"]]
    merged = merge_adapter(run)
    assert task_of(merged) == "token-classification"
    assert load_predictor(merged).predict(["the film was very good"]) == direct


def test_end_to_end_cli_train(tiny_model, ner_data, tmp_path):
    cfg = tmp_path / "ner.yaml"
    cfg.write_text(json.dumps({"task": "token-classification", "output_dir": str(tmp_path / "run"),
                               "model": {"name": str(tiny_model), "max_length": 32},
                               "data": {"train": str(ner_data["train"]), "validation": str(ner_data["validation"])},
                               "train": {"epochs": 1, "batch_size": 16, "mixed_precision": "no"}}))
    proc = subprocess.run([sys.executable, "-m", "textune", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BertForTokenClassification" in proc.stdout and "f1" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "textune", "validate-data", str(cfg)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "entities   train: NEG" in proc.stdout


# ---------------------------------------------------------------- other tokenizers, long texts, saved forms


def build_tiny_roberta(folder: Path) -> Path:
    """A 2-layer, 32-wide RoBERTa encoder with a byte-level BPE tokenizer trained here on the toy words, small
    enough that most words split into several sub-tokens."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(FILLER + POSITIVE + NEGATIVE)], vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    state = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = RobertaTokenizer(vocab=state["vocab"], merges=merges)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def left_padding_copy(model: Path, folder: Path) -> Path:
    """The model folder with its tokenizer saved to pad on the left, as Llama's, Mistral's and Gemma's do."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model, folder)
    AutoTokenizer.from_pretrained(folder, padding_side="left").save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
    return folder


@pytest.mark.parametrize("windows, step, expected", [
    # one window: each word from its first sub-token
    ([([None, 0, 0, 1, None], [(0, 0), (0, 2), (2, 4), (5, 7), (0, 0)], "xabcx")], 3,
     {0: ("a", 0, 4), 1: ("c", 5, 7)}),
    # two windows of 4 sub-tokens moving by 2: words 2 and 3 are in both; each is read where it has more context
    # on the side the window cuts (word 2 in the first, word 3 in the second)
    ([([None, 0, 1, 2, 3, None], [(0, 0), (0, 1), (2, 3), (4, 5), (6, 7), (0, 0)], "xabcdx"),
      ([None, 2, 3, 4, 5, None], [(0, 0), (4, 5), (6, 7), (8, 9), (10, 11), (0, 0)], "xCDefx")], 2,
     {0: ("a", 0, 1), 1: ("b", 2, 3), 2: ("c", 4, 5), 3: ("D", 6, 7), 4: ("e", 8, 9), 5: ("f", 10, 11)}),
    # a word cut between windows: its first sub-token is in the first window, its end in the second
    ([([None, 0, 1, None], [(0, 0), (0, 3), (4, 6), (0, 0)], "xabx"),
      ([None, 1, 1, None], [(0, 0), (4, 6), (6, 9), (0, 0)], "xcdx")], 1,
     {0: ("a", 0, 3), 1: ("b", 4, 9)}),
])
def test_words_of_windows(windows, step, expected):
    from textune.tasks.token_classification import words_of_windows

    got = words_of_windows([(w, o, list(p)) for w, o, p in windows], step)
    assert {w: (p, s, e) for w, (p, s, e) in got.items()} == expected


def test_conll_messages_name_the_tag_line(tmp_path):
    from textune.tasks.token_classification import TASK, Sentences

    path = tmp_path / "iob1.conll"
    path.write_text("the\tO\ngood\tB-POS\nfilm\tO\nvery\tI-NEG\n\nbad\tB-NEG\n")
    splits = {"train": read_conll(path, "data.train")}
    finding = next(f for f in TASK.data_report(splits).findings if f.kind == "scheme")
    assert f"first at {path} line 4" in finding.message
    table = Sentences([["a", "b"], ["c", "d"]], [["O", "O"], ["B-X", "PERSON"]], ["t.jsonl row 1", "t.jsonl row 2"])
    with pytest.raises(TextuneError, match=r"the first, 'PERSON', is at t.jsonl row 2, word 2"):
        tag_names(table, None)


def test_left_padding_tokenizer_trains_and_predicts_as_right_padding(tiny_model, ner_data, tmp_path):
    from transformers import AutoTokenizer

    from textune.tasks.token_classification import TokenClassifierPredictor
    from textune.train import train

    left = left_padding_copy(tiny_model, tmp_path / "left-model")
    runs = {name: train(load_config(None, ner_overrides(model, ner_data, tmp_path / name, **{"train.epochs": 2})))
            for name, model in (("right", tiny_model), ("left", left))}
    metrics = {k: json.loads((run / "metrics.json").read_text())["validation"] for k, run in runs.items()}
    assert metrics["left"]["f1"] == metrics["right"]["f1"]
    assert metrics["left"]["loss"] == pytest.approx(metrics["right"]["loss"], rel=1e-5)
    assert AutoTokenizer.from_pretrained(runs["left"] / "model").padding_side == "right"  # saved as the task needs
    # A left-padding tokenizer given to the predictor directly (as the adapter registry does): rows of
    # different lengths in one batch read the same sub-tokens as with right padding.
    right = get_task("token-classification").load_predictor(runs["right"])
    left_tokenizer = AutoTokenizer.from_pretrained(left)
    around = TokenClassifierPredictor.around(right.model, left_tokenizer, max_length=32)
    texts = ["the film was very good", "awful", "this plot is boring and the acting is superb really"]
    assert around.predict(texts) == right.predict(texts)
    words = [t.split() for t in texts]
    assert around.predict(words) == right.predict(words)


@pytest.fixture(scope="module")
def bpe_models(tmp_path_factory) -> dict[str, Path]:
    from conftest import build_tiny_chat_lm

    d = tmp_path_factory.mktemp("bpe")
    return {"roberta": build_tiny_roberta(d / "roberta"), "gpt2": build_tiny_chat_lm(d / "gpt2", "gpt2")}


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_byte_level_bpe_words_get_the_sub_tokens_of_raw_text(kind, bpe_models, ner_data, tmp_path):
    from transformers import AutoTokenizer

    from textune.train import train

    cfg = load_config(None, ner_overrides(bpe_models[kind], ner_data, tmp_path / "run", **{
        "model.max_length": 64, "train.max_steps": 2}))
    inputs = get_task(cfg.task).load_inputs(cfg)
    words = inputs.splits["train"].tokens[0]
    trained_ids = inputs.tokenized["train"][0]["input_ids"]
    plain = AutoTokenizer.from_pretrained(bpe_models[kind])
    assert plain(words, is_split_into_words=True)["input_ids"] != trained_ids  # what transformers 5 does unasked
    pieces = inputs.tokenizer.convert_ids_to_tokens(trained_ids)
    assert sum(p.startswith("Ġ") for p in pieces) == len(words)  # every word begins with its space marker
    run = train(cfg)
    predictor = get_task("token-classification").load_predictor(run)
    assert predictor.tokenizer(" ".join(words))["input_ids"] == trained_ids  # raw text: the same sub-tokens
    assert predictor.tokenizer(words, is_split_into_words=True)["input_ids"] == trained_ids
    text = "  the film was very good and awful"
    for e in predictor.predict([text])[0]["entities"]:
        assert text[e["start"]:e["end"]] == e["text"] and e["text"] == e["text"].strip()


def test_label_all_tokens_scores_words(bpe_models, ner_data, tmp_path):
    """Training labels every sub-token; evaluation, metrics.json and the report's rows are per word."""
    from textune.train import train

    run = train(load_config(None, ner_overrides(bpe_models["roberta"], ner_data, tmp_path / "run", **{
        "model.max_length": 64, "train.epochs": 2, "data.label_all_tokens": True})))
    saved = json.loads((run / "metrics.json").read_text())["validation"]
    predictor = get_task("token-classification").load_predictor(run)
    per_word = get_task("token-classification").evaluate_file(predictor, str(ner_data["validation"]), {})
    for key in ("f1", "precision", "recall", "accuracy", "entities"):
        assert saved[key] == pytest.approx(per_word[key]), key
    gold = read_conll(ner_data["validation"], "v")
    rows = [json.loads(line) for line in (run / "validation_predictions.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == gold.tokens and [r["tags"] for r in rows] == gold.tags
    assert all(len(r["pred"]) == len(r["tokens"]) for r in rows)


def test_long_texts_are_read_in_windows(ner_run):
    predictor = get_task("token-classification").load_predictor(ner_run)
    assert predictor.max_length == 32
    rng = random.Random(3)
    words = [rng.choice([w for w in FILLER if w != "very"]) for _ in range(90)]
    words[80] = "awful"  # far past the first window of 30 sub-tokens
    tags = predictor.predict([words])[0]["tags"]
    assert len(tags) == 90 and tags[80] == "B-NEG"
    text = " ".join(words)
    entities = predictor.predict([text])[0]["entities"]
    assert ("NEG", "awful") in [(e["entity"], e["text"]) for e in entities]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)


def test_serve_reads_texts_longer_than_max_chars_whole(ner_run):
    from fastapi.testclient import TestClient

    from textune.serving import ServeSettings, create_app

    predictor = get_task("token-classification").load_predictor(ner_run)
    text = " ".join(["the film was"] * 40 + ["awful"])  # past --max-chars and past the first window
    with TestClient(create_app(predictor, ServeSettings(max_chars=100), "ner")) as client:
        r = client.post("/v1/entities", json={"texts": [text]})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["entities"] == predictor.predict([text])[0]["entities"]
        assert ("NEG", "awful") in [(e["entity"], e["text"]) for e in r.json()["results"][0]["entities"]]
        r = client.post("/v1/entities", json={"texts": [text] * 65})  # --max-texts still holds
        assert r.status_code == 413


def test_predictors_load_from_runs_and_model_folders_and_refuse_other_tasks(ner_run, trained_run):
    from textune.tasks import load_predictor
    from textune.tasks.token_classification import TokenClassifierPredictor

    texts = ["the film was very good", "awful acting"]
    assert load_predictor(ner_run / "model").predict(texts) == load_predictor(ner_run).predict(texts)
    with pytest.raises(TextuneError, match=r"holds a classification model, not a token-classification one; load it "
                                           r"with textune.tasks.load_predictor"):
        TokenClassifierPredictor(trained_run)


def test_tags_outside_label_names_and_predict_input_without_word_lists(tmp_path):
    from textune.tasks.token_classification import TASK, Sentences

    table = Sentences([["a", "b"]], [["O", "B-LOC"]], ["t.jsonl row 1"])
    with pytest.raises(TextuneError, match=r"tags \['B-LOC'\] are not in data.label_names .*\(the first at t.jsonl "
                                           r"row 1, word 2\)"):
        tag_names(table, ["O", "B-PER", "I-PER"])
    source = write_jsonl(tmp_path / "in.jsonl", [{"tokens": "the film"}])
    with pytest.raises(TextuneError, match=r"in.jsonl row 1: 'tokens' must hold a list of words, got 'the film'"):
        TASK.read_inputs(str(source), {}, None)
