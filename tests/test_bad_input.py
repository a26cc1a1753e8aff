"""Bad input, one case per row: one clear line on stderr, exit status 2, no traceback, no run folder left.

Every case runs the real command-line entry point (in-process, for speed).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_bert, toy_rows, write_csv, write_jsonl
from textune.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, toy_data):
    d = tmp_path_factory.mktemp("bad")
    files = {
        "malformed_csv": d / "malformed.csv", "malformed_jsonl": d / "malformed.jsonl", "tsv_as_csv": d / "tabs.csv",
        "latin1": d / "latin1.csv", "empty": d / "empty.csv", "header_only": d / "header.csv",
        "nan_labels": d / "nan.csv", "huge_line": d / "huge.csv", "scores": d / "scores.csv",
    }
    files["malformed_csv"].write_text('text,label\n"an unterminated quote,positive\nfine,negative\n')
    files["malformed_jsonl"].write_text('{"text": "ok", "label": "positive"}\n{"text": "broken", "label": \n')
    write_csv(files["tsv_as_csv"], toy_rows(10, 0), delimiter="\t")
    files["latin1"].write_bytes("text,label\ncaf\xe9 cr\xe8me,positive\n".encode("latin-1"))
    files["empty"].write_bytes(b"")
    files["header_only"].write_text("text,label\n")
    files["nan_labels"].write_text("text,label\ngood,positive\nbad,\nfine,negative\n")
    files["huge_line"].write_text("x" * 5_000_000)  # 5 MB, no newline: a header and nothing else
    files["scores"].write_text("text,label\ngood,0.9\nbad,0.1\nok,0.5\n")
    write_jsonl(d / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "positive"}] * 4)
    write_csv(d / "unseen.csv", toy_rows(5, 1) + [{"text": "meh", "label": "neutral"}])
    write_csv(d / "empty_text.csv", toy_rows(5, 1) + [{"text": "", "label": "positive"}])
    write_csv(d / "ints.csv", [{"text": f"t {i}", "label": i % 3} for i in range(12)])
    write_csv(d / "one_label.csv", [{"text": f"t {i}", "label": "positive"} for i in range(12)])
    (d / "dir_as_file").mkdir()
    (d / "data.xlsx").write_text("not really")

    no_weights = d / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model / "config.json", no_weights / "config.json")
    pickled = d / "pickled"
    shutil.copytree(tiny_model, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(load_file(tiny_model / "model.safetensors"), pickled / "pytorch_model.bin")
    other_model = build_tiny_bert(d / "other-model")
    from transformers import AutoConfig, BertModel

    cfg = AutoConfig.from_pretrained(other_model)
    cfg.intermediate_size = 48
    BertModel(cfg).save_pretrained(other_model)

    # A real checkpoint to resume from with the wrong model.
    ckpt_run = d / "ckpt-run"
    config = d / "base.yaml"
    config.write_text(f"model: {{name: {tiny_model}, max_length: 32}}\n"
                      f"data: {{train: {toy_data['train']}, validation: {toy_data['validation']}}}\n"
                      f"train: {{max_steps: 2, checkpoint_steps: 1, keep_last: 2, batch_size: 16, mixed_precision: 'no'}}\n")
    assert main(["train", str(config), "--output_dir", str(ckpt_run)]) == 0
    existing = d / "existing-run"
    assert main(["train", str(config), "--output_dir", str(existing)]) == 0
    (d / "bad.yaml").write_text("train:\n  lr: [1,\n")
    (d / "list.yaml").write_text("- train\n- data\n")
    return {"d": d, "config": config, "files": files, "no_weights": no_weights, "pickled": pickled,
            "other_model": other_model, "ckpt": ckpt_run / "checkpoints" / "step-00000001", "existing": existing,
            "tiny_model": tiny_model, "toy_data": toy_data}


def T(*args):
    """A `textune train base.yaml` command with extra overrides; {name} placeholders filled from env."""
    return ("train", "{config}", "--output_dir", "{out}") + args


CASES = {
    # data files
    "malformed_csv": (T("--data.train", "{malformed_csv}"), "could not read data.train file"),
    "malformed_jsonl": (T("--data.train", "{malformed_jsonl}"), "could not read data.train file"),
    "wrong_delimiter": (T("--data.train", "{tsv_as_csv}"), "no column 'text' (data.text_column); its columns are: 'text\\tlabel'"),
    "non_utf8": (T("--data.train", "{latin1}"), "it is not UTF-8 text"),
    "empty_file": (T("--data.train", "{empty}"), "is empty"),
    "header_only": (T("--data.train", "{header_only}"), "has a header but no rows"),
    "huge_single_line": (T("--data.train", "{huge_line}"), "has a header but no rows"),
    "missing_text_column": (T("--data.text_column", "review"), "no column 'review' (data.text_column)"),
    "missing_label_column": (T("--data.label_column", "target"), "no column 'target' (data.label_column)"),
    "nan_labels": (T("--data.train", "{nan_labels}"), "label column 'label' is empty in 1 rows (first: row 2)"),
    "mixed_label_types": (T("--data.train", "{d}/mixed.jsonl"), "mixes value types"),
    "unseen_label": (T("--data.validation", "{d}/unseen.csv"), "labels that training never saw: 'neutral'"),
    "empty_text": (T("--data.validation", "{d}/empty_text.csv"), "column 'text' is empty in 1 rows"),
    "scores_not_labels": (T("--data.train", "{scores}"), "holds non-integer numbers"),
    "one_label_training": (T("--data.train", "{d}/one_label.csv"), "every training row has the label 'positive'; a "
                                                                  "classifier needs 2 or more labels"),
    "too_few_label_names": (T("--data.train", "{d}/ints.csv", "--data.label_names", "[a, b]"), "has 2 names but the labels include [2]"),
    "data_is_a_directory": (T("--data.train", "{d}/dir_as_file"), "data.train file not found"),
    "unsupported_extension": (T("--data.train", "{d}/data.xlsx"), "unsupported extension '.xlsx'"),
    "missing_data_file": (T("--data.train", "{d}/nope.csv"), "data.train file not found"),
    # config
    "missing_config": (("train", "{d}/nope.yaml"), "config file not found"),
    "yaml_syntax": (("train", "{d}/bad.yaml"), "is not valid YAML at line"),
    "config_not_mapping": (("train", "{d}/list.yaml"), "must hold a mapping of sections"),
    "config_typo": (T("--train.learning_rate", "1e-4"), "train.learning_rate: unknown key; did you mean train.lr?"),
    "unknown_section": (T("--trainer.lr", "1e-4"), "trainer: unknown key"),
    "negative_batch_size": (T("--train.batch_size", "-8"), "train.batch_size: must be greater than 0, got -8"),
    "zero_batch_size": (T("--train.batch_size", "0"), "train.batch_size: must be greater than 0, got 0"),
    "lr_as_string": (T("--train.lr", "'3e-5'"), "train.lr: expected a number, got '3e-5' (str)"),
    "zero_epochs": (T("--train.epochs", "0"), "train.epochs: must be greater than 0"),
    "bad_warmup": (T("--train.warmup_ratio", "1.5"), "train.warmup_ratio: must be in [0, 1)"),
    "bad_split": (T("--data.validation_split", "1.5"), "data.validation_split: must be between 0 and 1"),
    "unknown_method": (T("--tuning.method", "partial"), "tuning.method: expected one of"),
    "unknown_metric": (T("--train.metric", "acc"), "train.metric: 'acc' is not a metric"),
    "override_without_value": (T("--train.lr"), "override --train.lr has no value"),
    "fp16_on_cpu": (T("--train.mixed_precision", "fp16"), "fp16 needs a CUDA GPU"),
    # models and checkpoints
    "model_not_found": (T("--model.name", "{d}/no-such-model"), "model folder not found"),
    "not_a_model_folder": (T("--model.name", "{d}"), "is not a model folder: it has no config.json"),
    "model_without_weights": (T("--model.name", "{no_weights}"), "has no weights (*.safetensors)"),
    "pickle_weights": (T("--model.name", "{pickled}"), "holds only pickle weights (*.bin)"),
    "existing_run_folder": (("train", "{config}", "--output_dir", "{existing}"), "already exists; pick another output_dir or pass --overwrite"),
    "checkpoint_of_another_model": (("train", "{config}", "--output_dir", "{out}", "--model.name", "{other_model}",
                                     "--resume", "{ckpt}"), "was written for another model"),
    "resume_without_checkpoint": (T("--resume"), "--resume latest: no checkpoint in"),
    "resume_and_overwrite": (T("--resume", "--overwrite"), "--resume continues a run and --overwrite replaces it"),
    # other commands
    "evaluate_missing_run": (("evaluate", "{d}/nothing", "--data", "{d}/unseen.csv"), "no run or model folder"),
    "predict_missing_input": (("predict", "{existing}", "--input", "{d}/none.txt"), "input file not found"),
    "evaluate_unknown_label": (("evaluate", "{existing}", "--data", "{d}/unseen.csv"), "labels the model was not trained on: ['neutral']"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case, env, capsys, tmp_path):
    args, expected = CASES[case]
    names = {"config": env["config"], "out": tmp_path / "run", "d": env["d"], "no_weights": env["no_weights"],
             "pickled": env["pickled"], "other_model": env["other_model"], "ckpt": env["ckpt"],
             "existing": env["existing"], **env["files"]}
    argv = [a.format(**names) for a in args]
    before = sorted(p.name for p in env["existing"].iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("textune: error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "a partial run folder was left behind"
    assert sorted(p.name for p in env["existing"].iterdir()) == before


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_allow_pickle_loads_pickle_weights_safely(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--allow-pickle", "train", str(env["config"]), "--output_dir", str(out),
                 "--model.name", str(env["pickled"])]) == 0
    assert (out / "model" / "model.safetensors").is_file()  # what textune writes is always safetensors
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 2


# ---------------------------------------------------------------- token classification and question answering


def _squad(paragraphs) -> str:
    return json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]})


QA_OK = {"context": "Ada wrote it in 1843.", "question": "When?", "answers": {"text": ["1843"], "answer_start": [16]}}
TASK_FILES = {  # name -> (task, file name, content)
    "conll_tag_with_space": ("ner", "space.conll", "good\tB-POS O\nfilm\tO\n"),
    "conll_tag_without_word": ("ner", "noword.conll", "good\tB-POS\n\tO\n"),
    "conll_word_without_tag": ("ner", "notag.conll", "good\tB-POS\nfilm\n"),
    "conll_non_bio_tag": ("ner", "nonbio.conll", "good\tB-POS\n\nfilm\tPOS\n"),
    "ner_empty_token": ("ner", "empty.jsonl", [{"tokens": ["good", ""], "tags": ["B-POS", "O"]}]),
    "ner_blank_token": ("ner", "blank.jsonl", [{"tokens": ["good", "  "], "tags": ["B-POS", "O"]}]),
    "ner_null_token": ("ner", "nulltok.jsonl", [{"tokens": ["good", None], "tags": ["B-POS", "O"]}]),
    "ner_null_tag": ("ner", "nulltag.jsonl", [{"tokens": ["good", "film"], "tags": ["B-POS", None]}]),
    "ner_bool_tag": ("ner", "booltag.jsonl", [{"tokens": ["good"], "tags": [True]}]),
    "ner_table_tag_with_space": ("ner", "spacetag.jsonl", [{"tokens": ["good", "film"], "tags": ["B-POS O", "O"]}]),
    "qa_negative_start": ("qa", "neg.jsonl", [{**QA_OK, "answers": {"text": ["1843"], "answer_start": [-5]}}]),
    "qa_text_start": ("qa", "strstart.jsonl", [{**QA_OK, "answers": {"text": ["1843"], "answer_start": ["16a"]}}]),
    "qa_null_start": ("qa", "nullstart.jsonl", [{**QA_OK, "answers": {"text": ["1843"], "answer_start": [None]}}]),
    "qa_fraction_start": ("qa", "fracstart.jsonl", [{**QA_OK, "answers": {"text": ["1843"], "answer_start": [16.5]}}]),
    "qa_text_not_list": ("qa", "textstr.jsonl", [{**QA_OK, "answers": {"text": "1843", "answer_start": [16]}}]),
    "qa_answer_not_string": ("qa", "textint.jsonl", [{**QA_OK, "answers": {"text": [1843], "answer_start": [16]}}]),
    "qa_csv_answers_not_json": ("qa", "notjson.csv", "context,question,answers\nAda wrote it in 1843.,Who?,Ada\n"),
    "squad_paragraph_not_object": ("qa", "para.json", _squad(["Ada wrote it in 1843."])),
    "squad_qas_not_list": ("qa", "qas.json", _squad([{"context": "Ada wrote it.", "qas": {"question": "Who?"}}])),
    "squad_qa_not_object": ("qa", "qa.json", _squad([{"context": "Ada wrote it.", "qas": ["Who wrote it?"]}])),
    "squad_answers_not_list": ("qa", "ans.json", _squad([{"context": "Ada wrote it.", "qas": [
        {"id": "1", "question": "Who?", "answers": {"text": "Ada", "answer_start": 0}}]}])),
    "squad_no_question": ("qa", "noq.json", _squad([{"context": "Ada wrote it.", "qas": []}])),
}
TASK_CASES = {
    "conll_tag_with_space": r"space.conll line 1: the tag 'B-POS O' holds a space; a tag is one word",
    "conll_tag_without_word": r"noword.conll line 2: the tag 'O' has no word before it",
    "conll_word_without_tag": r"notag.conll line 2: 'film' has no tag",
    "conll_non_bio_tag": r"tags \['POS'\] are not BIO/IOB2 tags \(O, B-TYPE, I-TYPE\); the first, 'POS', is at "
                         r"\S*nonbio.conll line 3",
    "ner_empty_token": r"empty.jsonl row 1: word 2 is empty; every word needs a character",
    "ner_blank_token": r"blank.jsonl row 1: word 2 is empty",
    "ner_null_token": r"nulltok.jsonl row 1: word 2 is None \(NoneType\); a sentence is a list of words as strings",
    "ner_null_tag": r"nulltag.jsonl row 1: tag 2 is None; a tag is one BIO/IOB2 word",
    "ner_bool_tag": r"booltag.jsonl row 1: tag 1 is True; a tag is one BIO/IOB2 word",
    "ner_table_tag_with_space": r"spacetag.jsonl row 1: tag 1 is 'B-POS O'; a tag is one BIO/IOB2 word",
    "qa_negative_start": r"neg.jsonl row 1: answer_start -5 is negative",
    "qa_text_start": r"strstart.jsonl row 1: answer_start '16a' is not a whole number",
    "qa_null_start": r"nullstart.jsonl row 1: answer_start None is not a whole number",
    "qa_fraction_start": r"fracstart.jsonl row 1: answer_start 16.5 is not a whole number",
    "qa_text_not_list": r"textstr.jsonl row 1: answers.text must be a list, got str '1843'",
    "qa_answer_not_string": r"textint.jsonl row 1: the answer text 1843 is a int, not a string",
    "qa_csv_answers_not_json": r"notjson.csv row 1: 'answers' holds 'Ada', which is not JSON; write each answers cell as JSON",
    "squad_paragraph_not_object": r"para.json data\[0\].paragraphs\[0\]: expected an object with a 'context' and a "
                                  r"'qas' list",
    "squad_qas_not_list": r"qas.json data\[0\].paragraphs\[0\]: expected an object with a 'context' and a 'qas' list",
    "squad_qa_not_object": r"qa.json data\[0\].paragraphs\[0\].qas\[0\]: expected an object with 'id', 'question'",
    "squad_answers_not_list": r"ans.json data\[0\].paragraphs\[0\].qas\[0\]: answers must be a list of objects",
    "squad_no_question": r"noq.json holds no question",
}


@pytest.fixture(scope="module")
def task_env(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("bad-tasks")
    for name, (_, file, content) in TASK_FILES.items():
        if isinstance(content, list):
            write_jsonl(d / file, content)
        else:
            (d / file).write_text(content)
    (d / "val.conll").write_text("good\tB-POS\nfilm\tO\n\nbad\tB-NEG\n")
    write_jsonl(d / "val.jsonl", [QA_OK])
    configs = {"ner": d / "ner.yaml", "qa": d / "qa.yaml"}
    configs["ner"].write_text(f"task: token-classification\nmodel: {{name: {tiny_model}, max_length: 32}}\n"
                              f"data: {{validation: {d / 'val.conll'}}}\ntrain: {{max_steps: 1, mixed_precision: 'no'}}\n")
    configs["qa"].write_text(f"task: question-answering\nmodel: {{name: {tiny_model}, max_length: 32}}\n"
                             f"data: {{validation: {d / 'val.jsonl'}, doc_stride: 8}}\n"
                             f"train: {{max_steps: 1, mixed_precision: 'no'}}\n")
    return d, configs


@pytest.mark.parametrize("case", list(TASK_CASES))
def test_bad_ner_and_qa_input_gives_one_clear_line(case, task_env, capsys, tmp_path):
    import re

    d, configs = task_env
    task, file, _ = TASK_FILES[case]
    code = main(["train", str(configs[task]), "--output_dir", str(tmp_path / "run"), "--data.train", str(d / file)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("textune: error: "), err
    assert re.search(TASK_CASES[case], lines[0]), lines[0]
    assert not (tmp_path / "run").exists()
