"""Typed run configuration: YAML file + dotted CLI overrides, validated once at start-up.

Every field carries a one-line help text (shown by `textune train --help-config`). Validation reports
all problems together, each naming the key, what was got and what is allowed; an unknown key names the
closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from textune.errors import ConfigError, TextuneError, is_onnx_export, onnx_export_error
from textune.tasks import TASKS


def _f(default: Any, help: str, choices: tuple[str, ...] = (), **kw: Any) -> Any:
    """A config field with its help text; `choices` for a string key whose values come from elsewhere (the task
    registry) rather than from its annotation."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class ModelConfig:
    """The pretrained model and how it reads text."""

    name: str | None = _f(None, "local model folder or Hugging Face Hub id; empty = the packaged MiniLM-L6-H384")
    max_length: int = _f(128, "tokens per example after truncation (pairs are truncated longest-first); lowered "
                              "to the model's position table where that holds fewer")
    trust_remote_code: bool = _f(False, "allow model code from the model folder/Hub to run (off: only built-in architectures)")
    attention: Literal["auto", "sdpa", "eager"] = _f(
        "auto", "auto: sdpa where the architecture has it, else eager; sdpa: PyTorch's fused "
                "scaled_dot_product_attention; eager: transformers' plain matmul-softmax-matmul")
    init: Literal["pretrained", "scratch"] = _f(
        "pretrained", "pretrained: start from model.name's weights; scratch (textune pretrain only): random weights "
                      "of model.architecture sized by model.layers/heads/hidden_size, tokenizer from model.name")
    architecture: Literal["gpt2", "llama", "bert"] = _f("gpt2", "model.init scratch: the architecture to build")
    layers: int = _f(4, "model.init scratch: number of Transformer layers")
    heads: int = _f(4, "model.init scratch: attention heads per layer (must divide model.hidden_size)")
    hidden_size: int = _f(256, "model.init scratch: width of the hidden states")
    chat_template: str | None = _f(None, "instruction: a Jinja chat template (the text, or a .jinja/.txt file) for a "
                                         "model whose tokenizer has none, or to replace its own; saved with the model")


AUGMENT_METHODS = ("synonym", "insert", "swap", "delete", "eda", "backtranslate")


@dataclass
class AugmentConfig:
    """Extra training copies (EDA, back-translation) and embedding mixup."""

    methods: list[str] = _f([], "extra training copies, each made by one of these drawn at random: synonym, insert, "
                                "swap, delete (EDA), eda (= those four), backtranslate; empty = none")
    n: int = _f(1, "augmented copies per training example (the originals are kept; training split only)")
    synonym_rate: float = _f(0.1, "synonym: share of words replaced by a WordNet synonym (at least one)")
    insert_rate: float = _f(0.1, "insert: a synonym of a random word is inserted this share of the length times")
    swap_rate: float = _f(0.1, "swap: two random words are swapped this share of the length times")
    delete_rate: float = _f(0.1, "delete: each word is deleted with this probability (one word always stays)")
    mixup_alpha: float = _f(0.0, "embedding mixup: interpolate input embeddings and one-hot labels of pairs in a "
                                 "batch, lambda ~ Beta(alpha, alpha); 0 = off (evaluation never mixes)")
    backtranslate_forward: str | None = _f(None, "backtranslate: local seq2seq model folder translating into a "
                                                 "pivot language (none is shipped)")
    backtranslate_back: str | None = _f(None, "backtranslate: local seq2seq model folder translating back")


@dataclass
class DataConfig:
    """Files or a named data set, their columns and format, splits and checks."""

    name: str | None = _f(None, "a named data set shipped in a Python package (rotten_tomatoes), a Hub dataset id, "
                                "or a folder (written by DatasetDict.save_to_disk, or a dataset repository)")
    config: str | None = _f(None, "data.name: the Hub dataset's configuration (subset), e.g. mrpc for glue")
    revision: str | None = _f(None, "data.name: the Hub dataset's revision (branch, tag or commit); empty = main")
    split_train: str = _f("train", "data.name: the split to train on")
    split_validation: str = _f("validation", "data.name: the split to validate on; if the dataset has none by "
                                             "this default name, a stratified split of training")
    split_test: str = _f("test", "data.name: the split tested at the end (rows labelled -1 are unlabelled; an "
                                 "all-unlabelled split is not evaluated)")
    train: str | None = _f(None, "training file: .csv, .tsv, .jsonl/.json or .parquet")
    validation: str | None = _f(None, "validation file; empty = a stratified split of the training data")
    test: str | None = _f(None, "optional test file, evaluated once with the best model at the end")
    format: Literal["auto", "table", "conll", "alpaca", "chat", "sharegpt"] = _f(
        "auto", "auto: by extension (.conll/.bio: CoNLL token-per-line files, else a table; instruction: from the "
                "columns); table: .csv/.tsv/.jsonl/.json/.parquet; conll: one `token TAG` per line, a blank line "
                "between sentences; instruction: alpaca (instruction, input, output), chat (messages: [{role, "
                "content}]) or sharegpt (conversations: [{from, value}])")
    text_column: str = _f("text", "column holding the text (the first text for pair tasks)")
    text_pair_column: str | None = _f(None, "column holding the second text of a sentence-pair task (MRPC)")
    label_column: str = _f("label", "column holding the label (ints or strings)")
    label_names: list[str] | None = _f(None, "names for integer labels (or integer tags) 0..K-1, e.g. [negative, positive]")
    label_scale: list[float] | None = _f(None, "regression, embedding: [low, high] of the target (embedding: of "
                                               "scored pairs' scores); the model learns (y - low) / "
                                               "(high - low) and predictions come back on your scale; empty = the "
                                               "training labels' range")
    negative_column: str | None = _f(None, "embedding: column holding a hard negative for each (anchor, positive) "
                                           "pair (triplets); empty = pairs, whose negatives are the other pairs of "
                                           "the batch")
    label_separator: str = _f("|", "multi-label, CSV/TSV files: the character joining a row's labels in the label "
                                   "column (\"sports|politics\"); JSONL/Parquet label columns hold lists")
    tokens_column: str = _f("tokens", "token-classification, table files: column holding each sentence's list of words")
    tags_column: str = _f("tags", "token-classification, table files: column holding each sentence's list of tags "
                                  "(BIO/IOB2 strings, or ints named by data.label_names)")
    label_all_tokens: bool = _f(False, "token-classification: every sub-token of a word carries the word's tag (B- "
                                       "becomes I- after the first); false: only the first, the rest are ignored")
    context_column: str = _f("context", "question-answering, table files: column holding the passage answers are in")
    question_column: str = _f("question", "question-answering, table files: column holding the question")
    answers_column: str = _f("answers", "question-answering, table files: column holding {text: [...], "
                                        "answer_start: [...]} (character offsets into the context), the HF squad layout")
    doc_stride: int | None = _f(None, "question-answering: tokens shared by consecutive windows of a context longer "
                                      "than model.max_length (below model.max_length minus the question); empty = "
                                      "a quarter of model.max_length")
    max_answer_length: int = _f(30, "question-answering: longest answer predicted, in tokens")
    allow_unanswerable: bool = _f(False, "question-answering: questions without an answer (SQuAD v2.0) are kept; "
                                         "the model learns to point at [CLS] and a null threshold is chosen on validation")
    fix_answer_starts: bool = _f(False, "question-answering: an answer whose text is not at its answer_start is moved "
                                        "to the nearest exact occurrence (counted) instead of being an error")
    instruction_column: str = _f("instruction", "instruction, alpaca rows: column holding the instruction")
    input_column: str = _f("input", "instruction, alpaca rows: column holding the optional input, appended to the "
                                    "instruction after a blank line")
    output_column: str = _f("output", "instruction, alpaca rows: column holding the response")
    messages_column: str = _f("messages", "instruction, chat rows: column holding [{role, content}] turns")
    conversations_column: str = _f("conversations", "instruction, sharegpt rows: column holding [{from, value}] turns")
    system_prompt: str | None = _f(None, "instruction: a system turn put first in every conversation that has none")
    packing: bool = _f(False, "instruction: several short examples per sequence of model.max_length tokens, each "
                              "attending only to itself (refused where the model's attention cannot separate them)")
    validation_split: float = _f(0.1, "share of training rows held out when no validation file is given")
    max_train_samples: int | None = _f(None, "use only the first N training rows (after shuffling with the seed)")
    max_eval_samples: int | None = _f(None, "evaluate on a seeded sample of N validation rows, stratified by label")
    max_train_per_class: int | None = _f(None, "classification: train on at most N rows of each label, drawn by the "
                                               "seed (few-shot); a label with fewer rows keeps all of them")
    strict: bool = _f(False, "treat leakage (evaluation texts also in train) and conflicting labels as errors")
    streaming: bool = _f(False, "read data.train lazily as a stream (files bigger than memory), tokenised on the fly; "
                                "needs train.max_steps and a data.validation file; checks and statistics use its "
                                "first 1,000 rows, so set data.label_names unless those hold every label")
    shuffle_buffer: int = _f(10_000, "data.streaming: rows held in memory to shuffle the stream (0 = read in file order)")
    cache: bool = _f(True, "reuse the tokenised data from the datasets cache when the file, tokenizer and "
                           "model.max_length are unchanged (false: tokenise again)")
    long_text: Literal["truncate", "head_tail", "chunks"] = _f(
        "truncate", "classification, regression, multi-label: a text longer than model.max_length: truncate = its "
                    "first tokens; head_tail = its first quarter and last three quarters of the room (Sun et al. "
                    "2019); chunks = windows of model.max_length, each trained on with the text's label, their "
                    "logits pooled into one prediction (single texts only; pairs keep truncate)")
    chunk_stride: int | None = _f(None, "classification, regression, multi-label, data.long_text chunks: tokens "
                                        "shared by consecutive windows (below model.max_length); empty = a quarter "
                                        "of model.max_length")
    max_chunks: int = _f(8, "classification, regression, multi-label, data.long_text chunks: windows read per text "
                            "at most, spread from its first to its last (training, evaluation and prediction alike)")
    chunk_pooling: Literal["mean", "max"] = _f("mean", "classification, regression, multi-label, data.long_text "
                                                       "chunks: how the windows' logits make the text's: mean or max")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TuningConfig:
    """Which parameters train: all of them, the head, or a PEFT adapter."""

    method: Literal["full", "head", "lora", "adalora", "qlora", "prefix", "ia3"] = _f(
        "full", "full: train every parameter; head: freeze the encoder, train the classifier and the pooler it reads "
                "(BERT); lora, prefix, ia3: "
                "train a small PEFT adapter (and the classifier) on the frozen encoder, saved alone; adalora: LoRA "
                "whose ranks are moved during training to the layers that matter (from tuning.r down to "
                "tuning.target_r on average); qlora: LoRA on the base model quantised to 4 bits (bitsandbytes NF4, "
                "CUDA only)")
    r: int = _f(8, "lora, qlora: rank of the low-rank update of each target layer; adalora: the starting rank")
    alpha: float = _f(16.0, "lora, qlora, adalora: scale of the update, which is multiplied by alpha / r "
                            "(alpha / sqrt(r) with use_rslora)")
    dropout: float = _f(0.1, "lora, qlora, adalora: dropout on the input of the low-rank update")
    target_modules: list[str] | None = _f(
        None, "lora, qlora, adalora, ia3: layers to adapt, by name (e.g. [query, value]); empty = the "
              "architecture's default (query/value for BERT-family models, c_attn for GPT-2)")
    use_dora: bool = _f(False, "lora, qlora: DoRA, which learns each adapted weight's magnitude apart from its "
                               "direction (slower steps, often closer to full fine-tuning at low rank)")
    use_rslora: bool = _f(False, "lora, qlora: rank-stabilised LoRA, which scales the update by alpha / sqrt(r) "
                                 "instead of alpha / r, so higher ranks keep learning")
    loraplus_lr_ratio: float | None = _f(
        None, "lora, qlora: LoRA+, the learning rate of the B matrices as a multiple of A's (train.lr); the "
              "LoRA+ paper suggests 16; empty = the same rate")
    target_r: int | None = _f(None, "adalora: the average rank per layer that the budget ends at (at most "
                                    "tuning.r); empty = half of tuning.r")
    num_virtual_tokens: int = _f(20, "prefix: learned key/value vectors prepended to every attention layer")


@dataclass
class PretrainConfig:
    """Textune pretrain: the corpus and the objective."""

    objective: Literal["mlm", "clm"] = _f(
        "mlm", "mlm: masked-token prediction (BERT-style encoders); clm: next-token prediction under the causal mask "
               "(GPT-2, Llama)")
    corpus: str | None = _f(None, "textune pretrain: a .txt file (one document per line) or a .csv/.tsv/.jsonl/.parquet "
                                  "file whose pretrain.text_column holds the documents")
    text_column: str = _f("text", "column of documents in a tabular corpus file")
    validation: str | None = _f(None, "held-out corpus file (same formats); empty = pretrain.validation_share of the documents")
    validation_share: float = _f(0.05, "share of documents held out for evaluation when pretrain.validation is empty")
    max_documents: int | None = _f(None, "use only the first N documents of the corpus (after shuffling with the seed)")
    mlm_probability: float = _f(0.15, "mlm: share of tokens chosen for prediction (of those 80% -> [MASK], 10% random, 10% kept)")
    whole_word_mask: bool = _f(False, "mlm: choose whole words (all their sub-word tokens); transformers then masks every "
                                      "chosen token with [MASK] (no random/kept tokens)")
    tokenizer_vocab_size: int | None = _f(
        None, "model.init scratch: train a new tokenizer of this many tokens on the training documents (the "
              "algorithm of model.name's tokenizer); empty = use model.name's tokenizer as it is")
    nsp: bool = _f(False, "mlm, BERT only, legacy: add next-sentence prediction on pairs of consecutive documents "
                          "(50% the next one, 50% a random one)")


@dataclass
class TrainConfig:
    """The training loop: optimizer, schedule, precision, evaluation, checkpoints."""

    epochs: float = _f(3.0, "passes over the training data (fractions allowed)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _f(32, "examples per optimizer step before gradient accumulation, summed over all processes "
                             "(each of N processes takes batch_size / N, so it must divide by N)")
    eval_batch_size: int = _f(128, "examples per evaluation batch, summed over all processes (rounded up to a multiple of N)")
    gradient_accumulation_steps: int = _f(1, "micro-batches summed before each optimizer step")
    lr: float = _f(5e-5, "peak learning rate of AdamW")
    layer_lr_decay: float | None = _f(
        None, "layer-wise lr decay, e.g. 0.9: the top encoder layer trains at lr, each lower layer at this times "
              "the one above, the embeddings lowest; empty = one lr for all")
    head_lr: float | None = _f(None, "learning rate of the classification head; empty = train.lr")
    weight_decay: float = _f(0.01, "AdamW weight decay (never applied to biases and LayerNorm weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate decay after warm-up")
    warmup_ratio: float = _f(0.06, "share of training steps spent warming up")
    warmup_steps: int | None = _f(None, "warm-up steps (overrides warmup_ratio)")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this value; empty = no clipping")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f(
        "auto", "auto: bf16 where the CPU/GPU runs it fast, else fp32; fp16 needs a GPU")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding, still shuffled)")
    fused_optimizer: bool = _f(True, "AdamW as one fused kernel where PyTorch has one (CPU, CUDA); false: the "
                                     "multi-tensor foreach version")
    compile: Literal["auto"] | bool = _f(
        "auto", "torch.compile the training step: true, false, or auto (where shapes are fixed or bucketed and the "
                "run is long enough, time the first batch eager and compiled here and compile if it pays; says "
                "which and why at start-up)")
    pad_to_multiple_of: int | None = _f(
        None, "pad training batches to a multiple of N tokens (bounds the shapes to compile); empty = 16 when "
              "compiling, else no rounding")
    eval_steps: int | None = _f(None, "evaluate every N optimizer steps; empty = at the end of every epoch")
    logging_steps: int = _f(50, "write training loss and lr to history.jsonl every N optimizer steps")
    metric: str | None = _f(None, "validation metric that picks the best checkpoint and drives early stopping; "
                                  "empty = the task's headline (classification: accuracy, token-classification: "
                                  "f1, regression: pearson, multi-label: f1_micro, language-modeling: loss, "
                                  "question-answering: f1, instruction: loss)")
    class_weights: Literal["none", "balanced"] | dict[str, float] = _f(
        "none", "classification: weight each class's cross-entropy; balanced: n / (classes * count of the class) "
                "from the training labels; or {label: weight} (unlisted labels weigh 1); none: plain loss")
    method: Literal["standard", "contrastive"] = _f(
        "standard", "classification: standard = fine-tune the encoder and its head on cross-entropy; contrastive = "
                    "SetFit's few-shot method: the encoder learns from pairs of training rows (same label or not), "
                    "then a logistic-regression head is fitted on its embeddings")
    num_iterations: int | None = _f(None, "classification, train.method contrastive: draw 2 x N x (training rows) "
                                          "pairs, half of each kind (SetFit's num_iterations); empty = every pair "
                                          "of rows, the rarer kind repeated to match (SetFit's oversampling)")
    loss: Literal["auto", "mnrl", "cosent", "cosine"] = _f(
        "auto", "embedding: mnrl = in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss), for "
                "pairs and triplets; cosent (CoSENTLoss) or cosine (CosineSimilarityLoss) for scored pairs; auto = "
                "mnrl for pairs, cosent for scored pairs")
    threshold: float | None = _f(None, "multi-label: one probability threshold for every label; empty = one per "
                                       "label, chosen on validation at the end of training for the best F1")
    loss_on: Literal["assistant", "all"] = _f("assistant", "instruction: assistant = the loss counts the "
                                                           "assistant turns only; all = every token of the "
                                                           "conversation")
    greater_is_better: bool | None = _f(None, "whether a larger metric value is better; empty = false for loss and "
                                              "perplexity, true for the others")
    early_stopping_patience: int | None = _f(None, "stop after N evaluations without improvement; empty = never")
    load_best_at_end: bool = _f(True, "save and report the best evaluated model, not the last one")
    checkpoint_steps: int | None = _f(500, "write a resumable checkpoint every N optimizer steps (and at every evaluation)")
    keep_last: int | None = _f(None, "how many checkpoints to keep, older ones deleted, also once training "
                                     "finished; empty = the last 2 while training, none once the model is saved")
    skip_nonfinite_steps: int = _f(0, "skip up to N steps whose loss or gradient is NaN/inf before stopping the run")
    device: Literal["auto", "cpu", "cuda", "mps"] = _f("auto", "auto picks CUDA, then MPS, then CPU")
    num_workers: int = _f(0, "DataLoader worker processes (0: load in the training process)")
    optimizer: Literal["adamw", "adamw_8bit"] = _f(
        "adamw", "adamw: torch AdamW (fused where available); adamw_8bit: bitsandbytes 8-bit AdamW, CUDA only "
                 "(pip install 'textune[bnb]'), optimizer state in a quarter of the memory")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass: less memory, about a third "
                                             "more compute (models that support it, e.g. BERT)")


SPACE_TYPES = {"uniform": ("low", "high", "step"), "loguniform": ("low", "high"),
               "int": ("low", "high", "step", "log"), "categorical": ("choices",)}


@dataclass
class SearchConfig:
    """Textune search: the hyper-parameter space and how trials are compared."""

    space: dict[str, dict] = _f({}, "keys `textune search` tries, e.g. train.lr: {type: loguniform, low: 1e-5, high: 1e-4}; "
                                    "types: uniform/loguniform/int (low, high) and categorical (choices)")
    metric: str | None = _f(None, "validation metric the search optimises (read from each trial's best checkpoint); empty = train.metric")
    direction: Literal["maximize", "minimize"] | None = _f(None, "empty = minimize for loss, perplexity, mse, mae and hamming_loss, maximize for the others")
    pruner: Literal["median", "none"] = _f("median", "median: stop a trial whose evaluation is worse than the median of earlier trials at that evaluation")
    startup_trials: int = _f(2, "trials that always run to the end before pruning starts")
    warmup_evals: int = _f(0, "evaluations every trial gets before it can be pruned")


@dataclass
class EvalConfig:
    """Instruction: answers generated at every evaluation."""

    generate_samples: int = _f(32, "instruction: validation prompts (a fixed, seeded sample) answered greedily at "
                                   "every evaluation for exact match and ROUGE-L; 0 = loss only")
    max_new_tokens: int = _f(64, "instruction: longest answer generated at evaluation, in tokens")


# Experiment trackers `logging.report_to` may name (Accelerate's trackers) -> (package, how to install it).
TRACKERS = {"tensorboard": ("tensorboard", "pip install 'textune[tensorboard]'"),
            "mlflow": ("mlflow", "pip install 'textune[mlflow]'"),
            "wandb": ("wandb", "pip install wandb")}


@dataclass
class LoggingConfig:
    """Experiment trackers besides history.jsonl."""

    report_to: list[str] = _f([], "experiment trackers that also get the config, every training and evaluation record "
                                  "and the final metrics: tensorboard (RUN/tensorboard), mlflow (RUN/mlflow.db, or "
                                  "MLFLOW_TRACKING_URI), wandb (offline unless WANDB_MODE is set); empty = "
                                  "history.jsonl only")
    tensorboard: bool = _f(False, "deprecated: true is the same as report_to: [tensorboard]")


@dataclass
class Config:
    """The run itself (task, run folder, seed)."""

    task: str | None = _f(None, "what the run learns: " + ", ".join(TASKS) + "; empty = classification, or "
                                "language-modeling when pretrain.corpus is set", choices=(*TASKS, "empty"))
    output_dir: str = _f("runs/run", "run folder to create (refused if it exists, unless --overwrite)")
    seed: int = _f(42, "seed for python, numpy and torch, the data split and shuffling")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Names users bring from transformers.TrainingArguments, pointed at textune's key in error messages.
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
           "per_device_eval_batch_size": "eval_batch_size", "warmup": "warmup_ratio", "lr_scheduler_type": "scheduler",
           "metric_for_best_model": "metric", "load_best_model_at_end": "load_best_at_end",
           "model_name_or_path": "name", "max_seq_length": "max_length", "epoch": "epochs"}

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae", "hamming_loss")


# PyYAML follows YAML 1.1, where `3e-5` (no dot) is a string. Everybody writes learning rates that way,
# so teach the loader the YAML 1.2 float syntax; a quoted "3e-5" stays a string and is rejected.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides (`{"train.lr": 3e-5}`), validate, return a `Config`.

    Raises:
        TextuneError: the file is missing or not YAML.
        ConfigError: unknown keys or wrong types/values (all listed at once).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if is_onnx_export(path):
            raise onnx_export_error(path, "a YAML config", "train with the config of the run it was exported from")
        if not path.is_file():
            raise TextuneError(f"config file not found: {path}")
        try:
            raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise TextuneError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise TextuneError(f"config file {path} must hold a mapping of sections (model:, data:, train:), got {type(raw).__name__}")
    return _validated(raw, overrides or {})


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """Turn `["--train.lr", "3e-5", "--data.train=x.csv"]` into `{"train.lr": 3e-05, "data.train": "x.csv"}`."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise TextuneError(f"unexpected argument {arg!r}: overrides look like --section.key value (e.g. --train.lr 3e-5)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise TextuneError(f"override --{key} has no value: write --{key} VALUE")
            value = args[i + 1]
            i += 1
        out[key] = parse_yaml(value) if value.strip() else None
        i += 1
    return out


def _set_dotted(raw: dict, key: str, value: Any, problems: list[str]) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            problems.append(f"{key}: cannot set a key below {part!r}, which is not a section")
            return
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a section (mapping), got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            candidates = list(fields) + [a for a, target in ALIASES.items() if target in fields]
            close = difflib.get_close_matches(str(key), candidates, n=3, cutoff=0.6)
            close = list(dict.fromkeys(ALIASES.get(c, c) for c in close))
            hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.", problems)
        else:
            ok, value, expected = _coerce(raw[name], tp)
            if ok:
                kwargs[name] = value
            else:
                problems.append(f"{prefix}{name}: expected {expected}, got {raw[name]!r} ({type(raw[name]).__name__})")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Check `value` against a simple type annotation; return (ok, value, description of what is expected)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        tried = [_coerce(value, a) for a in inner]
        ok, v, _ = next((t for t in tried if t[0]), tried[0])
        return ok, v, " or ".join(exp for _, _, exp in tried) + (" or empty" if type(None) in args else "")
    if origin is Literal:
        allowed = typing.get_args(tp)
        return value in allowed, value, "one of " + ", ".join(map(str, allowed))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, value, f"a list of {inner.__name__}"
        items = [_coerce(v, inner) for v in value]
        return all(ok for ok, _, _ in items), [v for _, v, _ in items], f"a list of {inner.__name__}"
    if origin is dict or tp is dict:
        # Only str keys are used (search.space); the values' contents are checked where they are used.
        key_tp, value_tp = typing.get_args(tp) or (str, dict)
        if value_tp is float:  # train.class_weights: {label: weight}, labels may be ids
            if not isinstance(value, dict):
                return False, value, "a mapping of label to number"
            items = [(k, _coerce(v, float)) for k, v in value.items()]
            ok = all(isinstance(k, (str, int)) and not isinstance(k, bool) and c[0] for k, c in items)
            return ok, {str(k): c[1] for k, c in items} if ok else value, "a mapping of label to number"
        ok = isinstance(value, dict) and all(isinstance(k, key_tp) and isinstance(v, value_tp) for k, v in value.items())
        return ok, dict(value) if ok else value, f"a mapping of {key_tp.__name__} to {value_tp.__name__}"
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if tp is str:
        # Numbers are fine where a string is expected (a column named 2, a model path like 123).
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return ok, str(value) if ok else value, "a string"
    raise TypeError(f"unsupported config annotation {tp}")  # a textune bug, not a user mistake


def _check_values(cfg: Config, problems: list[str]) -> None:
    t, d, m = cfg.train, cfg.data, cfg.model
    positive = {"train.batch_size": t.batch_size, "train.eval_batch_size": t.eval_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.logging_steps": t.logging_steps, "model.max_length": m.max_length,
                "train.epochs": t.epochs, "train.lr": t.lr}
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key}: must be greater than 0, got {value}")
    for key, value in {"train.max_steps": t.max_steps, "train.eval_steps": t.eval_steps,
                       "train.early_stopping_patience": t.early_stopping_patience,
                       "data.max_train_samples": d.max_train_samples, "data.max_eval_samples": d.max_eval_samples,
                       "data.max_train_per_class": d.max_train_per_class, "train.num_iterations": t.num_iterations,
                       "train.pad_to_multiple_of": t.pad_to_multiple_of}.items():
        if value is not None and value <= 0:
            problems.append(f"{key}: must be greater than 0 or empty, got {value}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be 0 or more, got {t.warmup_steps}")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be 0 or more, got {t.weight_decay}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm: must be greater than 0 or empty, got {t.max_grad_norm}")
    if t.keep_last is not None and t.keep_last < 1:
        problems.append(f"train.keep_last: must be 1 or more or empty, got {t.keep_last}")
    if t.skip_nonfinite_steps < 0:
        problems.append(f"train.skip_nonfinite_steps: must be 0 or more, got {t.skip_nonfinite_steps}")
    if t.checkpoint_steps is not None and t.checkpoint_steps <= 0:
        problems.append(f"train.checkpoint_steps: must be greater than 0 or empty, got {t.checkpoint_steps}")
    if t.num_workers < 0:
        problems.append(f"train.num_workers: must be 0 or more, got {t.num_workers}")
    if t.layer_lr_decay is not None and not 0 < t.layer_lr_decay <= 1:
        problems.append(f"train.layer_lr_decay: must be in (0, 1] or empty, got {t.layer_lr_decay}")
    if t.head_lr is not None and t.head_lr <= 0:
        problems.append(f"train.head_lr: must be greater than 0 or empty, got {t.head_lr}")
    _check_tuning(cfg.tuning, problems)
    if cfg.tuning.method == "qlora" and t.device == "cpu":
        problems.append("tuning.method: qlora quantises the model on a CUDA GPU, and train.device is cpu; use "
                        "tuning.method: lora on a CPU, or train.device auto or cuda")
    _check_augment(cfg, problems)
    if d.max_answer_length <= 0:
        problems.append(f"data.max_answer_length: must be greater than 0, got {d.max_answer_length}")
    if cfg.task == "question-answering" and d.doc_stride is not None and not 0 < d.doc_stride < m.max_length:
        problems.append(f"data.doc_stride: must be greater than 0 and below model.max_length ({m.max_length}), got "
                        f"{d.doc_stride}: windows overlap by doc_stride tokens, so a context longer than one window "
                        f"could never be read to its end; e.g. doc_stride {m.max_length // 3}")
    if not 0 < d.validation_split < 1:
        problems.append(f"data.validation_split: must be between 0 and 1, got {d.validation_split}")
    _resolve_task(cfg, problems)
    for key, what, value in (("data.config", "configuration", d.config), ("data.revision", "revision", d.revision)):
        if value is not None and d.name is None:
            problems.append(f"{key}: names a {what} of a Hub dataset, but data.name is empty; set data.name or "
                            f"remove {key}")
    if cfg.pretrain.corpus is not None:
        _check_pretrain(cfg, problems)
    elif d.name is None and d.train is None:
        problems.append("data.train: no training data; set data.train to a file or data.name to a named data set")
    elif m.init == "scratch":
        problems.append("model.init: scratch is for textune pretrain (set pretrain.corpus); fine-tuning starts from "
                        "pretrained weights, so use pretrained")
    if m.max_length > 8192:
        problems.append(f"model.max_length: {m.max_length} is beyond any supported encoder; use 512 or less for BERT-family models")
    _check_logging(cfg, problems)
    _check_scale(cfg, problems)
    _check_search(cfg, problems)


def _resolve_task(cfg: Config, problems: list[str]) -> None:
    """Fill in the task and its headline metric where the config leaves them empty (so the saved config.yaml
    records what ran), and check that train.metric is one the task computes."""
    t = cfg.train
    if cfg.task is None:
        cfg.task = "language-modeling" if cfg.pretrain.corpus is not None else "classification"
    if cfg.task not in TASKS:
        close = difflib.get_close_matches(cfg.task, list(TASKS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"task: {cfg.task!r} is not a task{hint}; choose one of {', '.join(TASKS)}")
        return
    spec = TASKS[cfg.task]
    if cfg.pretrain.corpus is not None and cfg.task != "language-modeling":
        problems.append(f"task: {cfg.task} trains on labelled data, but pretrain.corpus is set (a language-modeling "
                        f"corpus); remove one of them")
    if t.metric is None:
        t.metric = spec.default_metric
    if t.metric not in spec.metrics:
        close = difflib.get_close_matches(t.metric, spec.metrics, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"train.metric: {t.metric!r} is not a metric of task {cfg.task}{hint}; choose one of "
                        f"{', '.join(spec.metrics)}")
    _check_target_keys(cfg, problems)
    _check_long_text(cfg, problems)
    _check_instruction_keys(cfg, problems)
    _check_training_method(cfg, problems)
    _check_embedding_keys(cfg, problems)
    if t.greater_is_better is None:
        t.greater_is_better = t.metric not in LOWER_IS_BETTER
    elif t.metric in LOWER_IS_BETTER and t.greater_is_better:
        problems.append(f"train.greater_is_better: must be false when train.metric is {t.metric}")


def _check_target_keys(cfg: Config, problems: list[str]) -> None:
    """The keys of one sequence-level task each: label_scale (regression), label_separator and threshold
    (multi-label), class_weights (classification, not together with mixup)."""
    d, t = cfg.data, cfg.train
    if d.label_scale is not None:
        if cfg.task not in ("regression", "embedding"):
            problems.append(f"data.label_scale: is for task regression or embedding, not {cfg.task}; remove it")
        elif len(d.label_scale) != 2 or d.label_scale[0] >= d.label_scale[1]:
            problems.append(f"data.label_scale: expected [low, high] with low < high, got {d.label_scale}")
    if not d.label_separator:
        problems.append("data.label_separator: must be one or more characters, e.g. '|'")
    if t.threshold is not None:
        if cfg.task != "multi-label":
            problems.append(f"train.threshold: is for task multi-label, not {cfg.task}; remove it")
        elif not 0 < t.threshold < 1:
            problems.append(f"train.threshold: must be between 0 and 1 (a probability), got {t.threshold}")
    if d.augment.mixup_alpha > 0 and cfg.task not in ("classification", "language-modeling"):
        problems.append(f"data.augment.mixup_alpha: mixup mixes class labels, which task {cfg.task} does not have; "
                        f"set it to 0")
    if t.class_weights != "none":
        if cfg.task != "classification":
            problems.append(f"train.class_weights: is for task classification, not {cfg.task}; remove it")
        elif d.augment.mixup_alpha > 0:
            problems.append("train.class_weights: cannot be combined with data.augment.mixup_alpha (mixup mixes the "
                            "labels the weights are for); turn one of them off")
        elif isinstance(t.class_weights, dict):
            bad = {k: v for k, v in t.class_weights.items() if v <= 0}
            if bad or not t.class_weights:
                problems.append(f"train.class_weights: weights must be greater than 0 and at least one given, got "
                                f"{t.class_weights}")


def _check_embedding_keys(cfg: Config, problems: list[str]) -> None:
    """data.negative_column and train.loss: only for task embedding, which needs a pair column and trains the
    encoder whole (its saved folder is a sentence-transformers model: an adapter folder would not be)."""
    d, t = cfg.data, cfg.train
    embedding = cfg.task == "embedding"
    for key, is_set in (("data.negative_column", d.negative_column is not None), ("train.loss", t.loss != "auto")):
        if is_set and not embedding:
            problems.append(f"{key}: is for task embedding, not {cfg.task}; remove it")
    if not embedding:
        return
    if not d.text_pair_column:
        problems.append("data.text_pair_column: task embedding reads pairs; set it to the column of positives (or "
                        "of second texts), and data.text_column to the anchors (or first texts)")
    if cfg.tuning.method != "full":
        problems.append(f"tuning.method: {cfg.tuning.method} cannot be used with task embedding, whose saved model is "
                        f"a whole sentence-transformers folder; use tuning.method: full")
    if t.loss == "mnrl" and t.batch_size < 2:
        problems.append("train.batch_size: 1 leaves in-batch negatives (train.loss mnrl) with no negatives: each "
                        "pair's negatives are the other pairs of its batch; use 16 or more")


def _check_training_method(cfg: Config, problems: list[str]) -> None:
    """train.method contrastive and data.max_train_per_class: only for the tasks their help names (key_tasks),
    and contrastive only with what its pair loss and fitted head can honour."""
    d, t = cfg.data, cfg.train
    for key, is_set in (("data.max_train_per_class", d.max_train_per_class is not None),
                        ("train.method", t.method != "standard")):
        tasks = key_tasks(key)
        if is_set and cfg.task not in tasks:
            value = "" if key.startswith("data.") else f" {t.method}"
            problems.append(f"{key}:{value} is for task {', '.join(tasks)}, not {cfg.task}; remove it")
            return
    if t.method == "standard":
        if t.num_iterations is not None:
            problems.append("train.num_iterations: counts the pairs of train.method contrastive, but train.method is "
                            "standard; remove it or set train.method: contrastive")
        return
    # The encoder learns from pairs and the head is fitted, not trained: nothing reads class logits in training.
    refused = (("tuning.method", cfg.tuning.method != "full", f"{cfg.tuning.method} (the encoder is fine-tuned "
                "whole on pairs, then the head is fitted); use tuning.method: full"),
               ("data.augment.mixup_alpha", d.augment.mixup_alpha > 0, "mixes class labels, which contrastive pairs "
                "do not have; set it to 0"),
               ("train.class_weights", t.class_weights != "none", "weights a cross-entropy that contrastive training "
                "does not use; remove it"),
               ("data.streaming", d.streaming, "pairs are drawn from training rows held in memory (a few-shot set); "
                "set it to false"),
               ("data.long_text", d.long_text == "chunks", "a pair compares two texts' embeddings, not their "
                "windows'; use truncate or head_tail"))
    for key, bad, why in refused:
        if bad:
            problems.append(f"{key}: cannot be used with train.method contrastive: {why}")


def _check_long_text(cfg: Config, problems: list[str]) -> None:
    """data.long_text and its chunk keys: only for tasks that pool a text's rows into one prediction (the
    registry's `document_pooling`; QA and NER window long texts their own way), single texts only, and windows
    that each hold new tokens."""
    d, max_length = cfg.data, cfg.model.max_length
    if d.chunk_stride is not None and not 0 <= d.chunk_stride < max_length:
        problems.append(f"data.chunk_stride: must be 0 or more and below model.max_length ({max_length}), got "
                        f"{d.chunk_stride}: consecutive windows share chunk_stride tokens, so each must also hold new "
                        f"ones; e.g. chunk_stride {max_length // 4}")
    if d.max_chunks < 1:
        problems.append(f"data.max_chunks: must be 1 or more (windows read per text), got {d.max_chunks}")
    if d.long_text == "truncate":
        for key, is_set in (("data.chunk_stride", d.chunk_stride is not None), ("data.max_chunks", d.max_chunks != 8),
                            ("data.chunk_pooling", d.chunk_pooling != "mean")):
            if is_set:
                problems.append(f"{key}: is for data.long_text chunks, but data.long_text is truncate; remove it or "
                                f"set data.long_text: chunks")
        return
    pooling = [name for name, spec in TASKS.items() if spec.document_pooling]
    if cfg.task not in pooling:
        problems.append(f"data.long_text: {d.long_text} is for tasks that make one prediction per text "
                        f"({', '.join(pooling)}), not {cfg.task}, which reads long texts its own way; set "
                        f"data.long_text: truncate")
    elif d.text_pair_column is not None:
        problems.append(f"data.long_text: {d.long_text} reads single texts, but data.text_pair_column is set "
                        f"({d.text_pair_column!r}); text pairs keep truncation (longest first): set data.long_text: "
                        f"truncate")
    elif cfg.train.method != "standard":
        problems.append(f"data.long_text: {d.long_text} cannot be used with train.method {cfg.train.method}, which "
                        f"learns from pairs of whole training rows; set data.long_text: truncate")


def _check_instruction_keys(cfg: Config, problems: list[str]) -> None:
    """The keys of instruction tuning: only for that task, and sizes that make sense."""
    d, e = cfg.data, cfg.eval
    instruction = cfg.task == "instruction"
    if d.format in ("alpaca", "chat", "sharegpt") and not instruction:
        problems.append(f"data.format: {d.format} is a format of instruction data, not of task {cfg.task}; "
                        f"set task: instruction or data.format: auto")
    if d.format == "conll" and instruction:
        problems.append("data.format: conll is for token classification; instruction data is alpaca, chat or "
                        "sharegpt (auto detects them from the columns)")
    for key, value, default in (("data.packing", d.packing, False), ("train.loss_on", cfg.train.loss_on, "assistant"),
                                ("model.chat_template", cfg.model.chat_template, None),
                                ("data.system_prompt", d.system_prompt, None)):
        if value != default and not instruction:
            problems.append(f"{key}: is for task instruction, not {cfg.task}; remove it")
    if e.generate_samples < 0:
        problems.append(f"eval.generate_samples: must be 0 or more, got {e.generate_samples}")
    if e.max_new_tokens < 1:
        problems.append(f"eval.max_new_tokens: must be 1 or more, got {e.max_new_tokens}")
    if instruction and cfg.tuning.method == "head":
        problems.append("tuning.method: head trains a classification head, which a causal LM does not have; use "
                        "lora (the usual choice for instruction tuning) or full")


def _check_logging(cfg: Config, problems: list[str]) -> None:
    """logging.report_to: known trackers whose packages are installed; the deprecated logging.tensorboard: true
    is folded into it (so the saved config.yaml says what ran)."""
    import importlib.util

    lg = cfg.logging
    if lg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("logging.tensorboard: true needs the tensorboard package, which is not installed; "
                        "pip install 'textune[tensorboard]' or set it to false")
        return
    if lg.tensorboard and "tensorboard" not in lg.report_to:
        lg.report_to.append("tensorboard")
    for name in lg.report_to:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), TRACKERS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"logging.report_to: {name!r} is not a tracker{hint}; choose from {', '.join(TRACKERS)}")
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            problems.append(f"logging.report_to: {name} needs the {TRACKERS[name][0]} package, which is not "
                            f"installed; {TRACKERS[name][1]} or remove it from logging.report_to")
    lg.report_to = list(dict.fromkeys(lg.report_to))  # a tracker named twice logs once


def _check_scale(cfg: Config, problems: list[str]) -> None:
    """Streaming data and the optional 8-bit optimizer: what each needs from the rest of the config."""
    import importlib.util

    d, t = cfg.data, cfg.train
    if d.shuffle_buffer < 0:
        problems.append(f"data.shuffle_buffer: must be 0 or more, got {d.shuffle_buffer}")
    if d.streaming:
        if d.train is None:
            problems.append("data.streaming: needs data.train to be a file (named data sets are read whole)")
        if d.validation is None:
            problems.append("data.streaming: needs a data.validation file (a stream cannot be split into train and "
                            "validation)")
        if t.max_steps is None:
            problems.append("train.max_steps: data.streaming needs a fixed number of optimizer steps (a stream has "
                            "no length to count epochs); set train.max_steps")
        if d.augment.methods:
            problems.append("data.augment.methods: augmented copies are made of a training set held in memory, not "
                            "of a stream; remove them or set data.streaming: false (mixup_alpha works with both)")
    if t.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("train.optimizer: adamw_8bit needs the bitsandbytes package, which is not installed; "
                        "pip install 'textune[bnb]' (CUDA GPUs) or use adamw")


def _check_pretrain(cfg: Config, problems: list[str]) -> None:
    """A pretraining run: corpus instead of labelled data, a language-model metric, objective-specific options."""
    p, m = cfg.pretrain, cfg.model
    if cfg.data.train is not None or cfg.data.name is not None:
        problems.append("pretrain.corpus: set together with data.train/data.name; a run either pretrains on a corpus "
                        "(textune pretrain) or fine-tunes on labelled data (textune train): remove one")
    if not 0 < p.validation_share < 1:
        problems.append(f"pretrain.validation_share: must be between 0 and 1, got {p.validation_share}")
    if p.max_documents is not None and p.max_documents < 2:
        problems.append(f"pretrain.max_documents: must be 2 or more (one to train on, one held out) or empty, got {p.max_documents}")
    if not 0 < p.mlm_probability < 1:
        problems.append(f"pretrain.mlm_probability: must be between 0 and 1, got {p.mlm_probability}")
    if p.objective == "clm" and (p.whole_word_mask or p.nsp):
        key = "pretrain.whole_word_mask" if p.whole_word_mask else "pretrain.nsp"
        problems.append(f"{key}: only for pretrain.objective mlm; set it to false for clm")
    if p.tokenizer_vocab_size is not None and (m.init != "scratch" or p.tokenizer_vocab_size < 100):
        problems.append(f"pretrain.tokenizer_vocab_size: needs model.init scratch (a pretrained model's embeddings "
                        f"fit its own tokenizer) and 100 or more tokens, got {p.tokenizer_vocab_size} with "
                        f"model.init {m.init}")
    if p.nsp and p.whole_word_mask:
        problems.append("pretrain.nsp: cannot be combined with pretrain.whole_word_mask; turn one of them off")
    if m.init == "scratch":
        for key, value in {"model.layers": m.layers, "model.heads": m.heads, "model.hidden_size": m.hidden_size}.items():
            if value < 1:
                problems.append(f"{key}: must be 1 or more, got {value}")
        if m.heads >= 1 and m.hidden_size % m.heads:
            problems.append(f"model.hidden_size: {m.hidden_size} is not divisible by model.heads {m.heads}")
        allowed = ("bert",) if p.objective == "mlm" else ("gpt2", "llama")
        if m.architecture not in allowed:
            problems.append(f"model.architecture: {m.architecture} cannot be trained with pretrain.objective "
                            f"{p.objective}; use {' or '.join(allowed)}")


def _check_tuning(tu: TuningConfig, problems: list[str]) -> None:
    """PEFT settings: positive sizes, a dropout probability, target layers only where a method has them."""
    if tu.r < 1:
        problems.append(f"tuning.r: must be 1 or more, got {tu.r}")
    if tu.alpha <= 0:
        problems.append(f"tuning.alpha: must be greater than 0, got {tu.alpha}")
    if not 0 <= tu.dropout < 1:
        problems.append(f"tuning.dropout: must be in [0, 1), got {tu.dropout}")
    if tu.num_virtual_tokens < 1:
        problems.append(f"tuning.num_virtual_tokens: must be 1 or more, got {tu.num_virtual_tokens}")
    if tu.target_modules is not None:
        if not tu.target_modules:
            problems.append("tuning.target_modules: the list is empty; name layers (e.g. [query, value]) or leave "
                            "it out for the architecture's default")
        if tu.method not in ("lora", "qlora", "adalora", "ia3"):
            problems.append(f"tuning.target_modules: only lora and ia3 (and lora's variants adalora, qlora) adapt "
                            f"named layers, but tuning.method is {tu.method}; remove it or choose one of those "
                            f"methods")
    _check_lora_variants(tu, problems)


QLORA_UNAVAILABLE = "tuning.method: qlora needs a CUDA GPU and bitsandbytes; on this machine use tuning.method: lora"


def _check_lora_variants(tu: TuningConfig, problems: list[str]) -> None:
    """DoRA, rsLoRA and LoRA+ change LoRA (and QLoRA), target_r AdaLoRA; set for another method, a key is a
    mistake. QLoRA's bitsandbytes is checked here; its GPU at start-up (`adapters.load_quantized`), where torch
    is loaded anyway."""
    lora = tu.method in ("lora", "qlora")
    for key, is_set in (("use_dora", tu.use_dora), ("use_rslora", tu.use_rslora),
                        ("loraplus_lr_ratio", tu.loraplus_lr_ratio is not None)):
        if is_set and not lora:
            problems.append(f"tuning.{key}: applies to tuning.method lora or qlora, but tuning.method is "
                            f"{tu.method}; remove it or choose one of those methods")
    if tu.loraplus_lr_ratio is not None and tu.loraplus_lr_ratio <= 0:
        problems.append(f"tuning.loraplus_lr_ratio: must be greater than 0 or empty, got {tu.loraplus_lr_ratio}")
    if tu.target_r is not None:
        if tu.method != "adalora":
            problems.append(f"tuning.target_r: applies to tuning.method adalora, but tuning.method is {tu.method}; "
                            f"remove it or use adalora")
        elif not 1 <= tu.target_r <= tu.r:
            problems.append(f"tuning.target_r: must be between 1 and tuning.r ({tu.r}), got {tu.target_r}")
    import importlib.util

    if tu.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(QLORA_UNAVAILABLE)


def _check_augment(cfg: Config, problems: list[str]) -> None:
    """data.augment: known methods, probabilities, copies, and both translation models for backtranslate."""
    a = cfg.data.augment
    if (a.methods or a.mixup_alpha > 0) and cfg.pretrain.corpus is not None:
        problems.append("data.augment: augmentation is for fine-tuning a classifier, not for pretraining on "
                        "pretrain.corpus; remove data.augment.methods and mixup_alpha")
    for m in a.methods:
        if m not in AUGMENT_METHODS:
            close = difflib.get_close_matches(m, AUGMENT_METHODS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"data.augment.methods: {m!r} is not a method{hint}; choose from {', '.join(AUGMENT_METHODS)}")
    if a.methods and a.n < 1:
        problems.append(f"data.augment.n: must be 1 or more when methods are given, got {a.n}")
    for key in ("synonym_rate", "insert_rate", "swap_rate", "delete_rate"):
        if not 0 <= getattr(a, key) <= 1:
            problems.append(f"data.augment.{key}: must be between 0 and 1, got {getattr(a, key)}")
    if a.mixup_alpha < 0:
        problems.append(f"data.augment.mixup_alpha: must be 0 (off) or more, got {a.mixup_alpha}")
    if "backtranslate" in a.methods:
        for key in ("backtranslate_forward", "backtranslate_back"):
            if getattr(a, key) is None:
                problems.append(f"data.augment.{key}: method backtranslate needs a local translation model "
                                f"folder here (textune ships none)")


def _check_search(cfg: Config, problems: list[str]) -> None:
    """The search section: metric, direction and every entry of the space (key path, type, bounds, choices)."""
    s = cfg.search
    metrics = TASKS[cfg.task].metrics if cfg.task in TASKS else ()
    if s.metric is not None and s.metric not in metrics:
        problems.append(f"search.metric: {s.metric!r} is not a metric of task {cfg.task}; choose one of "
                        f"{', '.join(metrics)}")
    if (s.metric or cfg.train.metric) == "loss" and s.direction == "maximize":
        problems.append("search.direction: must be minimize (or empty) when the search metric is loss")
    for key, value in {"search.startup_trials": s.startup_trials, "search.warmup_evals": s.warmup_evals}.items():
        if value < 0:
            problems.append(f"{key}: must be 0 or more, got {value}")
    for key, spec in s.space.items():
        where = f"search.space.{key}"
        tp = _searchable_type(key, where, problems)
        if tp is None:
            continue
        kind = spec.get("type")
        if kind not in SPACE_TYPES:
            problems.append(f"{where}.type: expected one of {', '.join(SPACE_TYPES)}, got {kind!r}")
            continue
        unknown = sorted(set(spec) - {"type", *SPACE_TYPES[kind]})
        if unknown:
            problems.append(f"{where}: unknown entries {unknown} for type {kind}; allowed: {', '.join(SPACE_TYPES[kind])}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                problems.append(f"{where}.choices: expected a non-empty list of values, got {choices!r}")
                continue
            for c in choices:
                ok, _, expected = _coerce(c, tp)
                if not ok or not (c is None or isinstance(c, (str, int, float, bool))):
                    problems.append(f"{where}.choices: {key} expects {expected or 'a single value'}, got {c!r}")
            continue
        low, high = spec.get("low"), spec.get("high")
        number = int if kind == "int" else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
            what = "integers" if kind == "int" else "numbers"
            problems.append(f"{where}: type {kind} needs low and high {what}, got low={low!r}, high={high!r}")
            continue
        if not low < high:
            problems.append(f"{where}: low must be below high, got low={low}, high={high}")
        if kind == "loguniform" and low <= 0:
            problems.append(f"{where}: loguniform needs low > 0, got {low}")
        ok, _, expected = _coerce(low if kind == "int" else float(low), tp)
        if not ok:
            hint = "; use type int" if "integer" in expected else "; use type categorical"
            problems.append(f"{where}: {key} expects {expected}, which type {kind} does not give{hint}")


def _searchable_type(key: str, where: str, problems: list[str]) -> Any:
    """The annotation of the config field `key` names (e.g. train.lr -> float), or None after noting the problem."""
    if key == "output_dir" or key.split(".")[0] == "search":
        problems.append(f"{where}: {key} cannot be searched (each trial sets its own output_dir)")
        return None
    cls: Any = Config
    for i, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(cls):
            problems.append(f"{where}: {'.'.join(key.split('.')[:i])} is a single key, not a section")
            return None
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            prefix = ".".join(key.split(".")[:i] + [""])
            close = difflib.get_close_matches(ALIASES.get(part, part), names, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else f"; known keys: {', '.join(prefix + n for n in names)}"
            problems.append(f"{where}: no config key {key}{hint}")
            return None
        cls = typing.get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        problems.append(f"{where}: {key} is a section; name one of its keys, e.g. {key}.{dataclasses.fields(cls)[0].name}")
        return None
    return cls


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted overrides (`{"train.lr": 3e-5}`) applied and validated like `load_config`.

    Raises:
        ConfigError: unknown keys or wrong types/values (all listed at once).
    """
    return _validated(cfg.to_dict(), overrides)


def _validated(raw: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """Apply dotted overrides to a raw mapping, build the typed config, check values; all problems at once."""
    problems: list[str] = []
    for key, value in overrides.items():
        _set_dotted(raw, key, value, problems)
    cfg = _build(Config, raw, "", problems)
    if not problems:
        _check_values(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_help() -> str:
    """Every key, section by section under a heading, with its default, its choices where they are fixed
    (from the annotation) and its help text, for `--help-config`."""
    lines = ["Config keys, by section: set them in the YAML file (train: {lr: 3e-5}) or override one with "
             "--section.key VALUE."]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        title = prefix.rstrip(".") or "top level"
        about = (cls.__doc__ or "").strip().rstrip(".")
        lines.extend(["", f"{title}: {about[:1].lower()}{about[1:]}"])
        sections = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                sections.append((tp, f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = list(f.metadata.get("choices") or ()) or _choices(tp)
            shown = f"default: {_yaml_value(default)}" + (f"; choices: {', '.join(choices)}" if choices else "")
            lines.append(f"  {prefix}{f.name} ({shown}): {f.metadata.get('help', '')}")
        for tp, sub_prefix in sections:  # a section's own keys first, then its sub-sections
            walk(tp, sub_prefix)

    walk(Config, "")
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    """A default as a YAML file would write it: empty, true/false, 'text', 3e-05, []."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _choices(tp: Any) -> list[str] | None:
    """The values a key annotated `tp` may take when they are a fixed set (Literal, bool, optionally empty),
    as YAML spells them; None when any value of a type is allowed."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    choices: list[str] = []
    other: list[str] = []  # open-ended types beside named values (train.class_weights: none, balanced or a mapping)
    for a in args:
        if typing.get_origin(a) is Literal:
            choices += [str(v).lower() if isinstance(v, bool) else str(v) for v in typing.get_args(a)]
        elif a is bool:
            choices += ["true", "false"]
        elif a is type(None):
            choices.append("empty")
        else:
            other.append(_coerce(object(), a)[2])
    if other and not any(typing.get_origin(a) is Literal for a in args):
        return None
    return choices + [f"or {o}" for o in other] if len(choices) > 1 and choices != ["true", "false"] else None


# Keys naming files the run reads, and keys that may name a local folder or file instead of a Hub id or a text.
PATH_KEYS = ("data.train", "data.validation", "data.test", "pretrain.corpus", "pretrain.validation")
LOCAL_PATH_KEYS = ("model.name", "data.name", "model.chat_template")


def with_resolved_paths(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A config mapping whose file paths (and local model, data set and template paths) are absolute, resolved
    against the working directory; and {key: path as given} for those that changed."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    given: dict[str, str] = {}
    for key in PATH_KEYS + LOCAL_PATH_KEYS:
        section, name = key.split(".")
        value = (raw.get(section) or {}).get(name)
        if not isinstance(value, str) or (key in LOCAL_PATH_KEYS and not Path(value).expanduser().exists()):
            continue
        resolved = str(Path(value).expanduser().resolve())
        if resolved != value:
            raw[section][name], given[key] = resolved, value
    return raw, given


def save_config(cfg: Config, path: Path) -> None:
    """RUN/config.yaml: the resolved config, with paths resolved so that commands run from another directory
    (evaluate, export, a resumed run) find the run's data; a comment keeps the paths as given."""
    raw, given = with_resolved_paths(cfg.to_dict())
    header = ""
    if given:
        header = (f"# paths resolved against {Path.cwd()}, where training ran; as given: "
                  + ", ".join(f"{k}: {v}" for k, v in given.items()) + "\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------- which keys a task reads (the report's config panel)

# A section that only one task reads: textune pretrain's corpus and objective.
SECTION_TASKS = {"pretrain": ("language-modeling",)}


def _fields_by_key(cls: type = Config, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of the config (sections' keys included) -> its dataclass field."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        out[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_fields_by_key(hints[f.name], f"{prefix}{f.name}."))
    return out


def key_tasks(key: str) -> tuple[str, ...]:
    """The tasks that read config key `key` (dotted, "data.label_scale"): those its help text begins with
    ("regression: ...", "token-classification, table files: ..."; the checks above refuse such a key set on
    another task), else its section's (SECTION_TASKS); () for a key of every task, or a name the config lacks."""
    f = _fields_by_key().get(key)
    if f is None:
        return ()
    lead = f.metadata.get("help", "").split(":", 1)[0]
    named = tuple(t for t in (w.strip() for w in lead.split(",")) if t in TASKS)
    return named or SECTION_TASKS.get(key.split(".", 1)[0], ())


def task_defaults(task: str) -> dict[str, Any]:
    """The config a run of `task` that sets nothing would save (as `Config.to_dict`), with what training fills in
    from the task (train.metric, train.greater_is_better) filled in the same way."""
    cfg = Config(task=task)
    _resolve_task(cfg, [])  # its problems are those of data not given, which do not matter here
    return cfg.to_dict()
