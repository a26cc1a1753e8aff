"""Few-shot classification with SetFit's method (`train.method: contrastive` of `task: classification`): the
encoder first learns from pairs of labelled rows (same label: cosine 1, different: cosine 0, sentence-
transformers' CosineSimilarityLoss on pooled embeddings), then a logistic-regression head is fitted on its
embeddings (Tunstall et al., 2022, "Efficient Few-Shot Learning Without Prompts").

Design, and why:
- The saved model is `SentenceEncoderForSequenceClassification`, a small `PreTrainedModel` registered with
  transformers' `AutoConfig` / `AutoModelForSequenceClassification` (model_type `textune-contrastive`): encoder ->
  pooling (`textune.pooling`, as the base sentence-transformers folder states it) -> Linear -> logits. So
  `ClassifierPredictor`, `textune evaluate`, `serve` (/v1/classify), `export` (ONNX) and the report load it
  like any sequence classifier (its name ends in ForSequenceClassification: the registry's SEQUENCE_HEAD row),
  and the weights are one safetensors file. SetFit pickles a scikit-learn head with joblib; textune refuses
  pickle, so the fitted coefficients are copied into the Linear layer instead (a binary logistic regression
  becomes the logits [0, w.x + b], whose softmax is its sigmoid: the same probabilities).
- Training goes through textune's one loop: the task's inputs hand it pairs (`contrastive_pairs`, SetFit's
  sampler), a collator that stacks both sides of each pair into one batch, and `CosineSimilarityLoss` as
  `TaskInputs.loss_fn`. The head is fitted where the loop evaluates (`ContrastiveInputs.evaluate` in
  classification.py calls `fit_head` first): every evaluation scores the encoder as it is then, with its own
  head, the best checkpoint is saved with the head that went with it, and the loop needs no hook of its own.
  Fitting takes milliseconds on a few-shot set (a few hundred rows at most).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, DataCollatorWithPadding,
                          PreTrainedConfig, PreTrainedModel)
from transformers.utils import ModelOutput

from textune.errors import TextuneError
from textune.pooling import PoolingSpec, pool, read_pooling

MODEL_TYPE = "textune-contrastive"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(rows) -> list[dict]:
    """Tokenised rows (a datasets.Dataset) as the dicts the model reads: labels and statistics columns dropped."""
    return rows.select_columns([c for c in rows.column_names if c in MODEL_INPUTS]).to_list()


# ------------------------------------------------------------ pairs (SetFit's sampler)


def contrastive_pairs(labels, label_names: list[str], seed: int, num_iterations: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first row, second row, target cosine) of the training pairs, SetFit's `ContrastiveDataset`: every pair
    of rows (a row with itself included), in an order drawn by `seed`, split into positives (same label, target
    1) and negatives (0); both kinds are cycled to the same count, the larger kind's ("oversampling"), or to
    `num_iterations` x rows each; positives and negatives alternate.

    Raises:
        TextuneError: a label has one training row (its only positive pair is the row with itself).
    """
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=len(label_names))
    single = [name for name, n in zip(label_names, counts) if n == 1]
    if single:
        raise TextuneError(f"train.method contrastive learns from pairs of rows with the same label, and "
                           f"{', '.join(map(repr, single))} {'has' if len(single) == 1 else 'have'} one training row; "
                           f"give each label 2 or more rows (data.max_train_per_class of 2 or more), or use "
                           f"train.method: standard")
    first, second = np.triu_indices(len(labels))
    order = np.random.default_rng(seed).permutation(len(first))
    first, second = first[order], second[order]
    same = labels[first] == labels[second]
    pos, neg = np.flatnonzero(same), np.flatnonzero(~same)
    each = num_iterations * len(labels) if num_iterations else max(len(pos), len(neg))
    chosen = np.empty(2 * each, dtype=int)
    chosen[0::2], chosen[1::2] = np.resize(pos, each), np.resize(neg, each)
    return first[chosen], second[chosen], same[chosen].astype(np.float32)


class PairCollator:
    """A batch of pairs as one batch of texts: the pairs' first rows, then their second rows (one forward pass
    for both sides), padded together, with `labels` the pairs' target cosines."""

    def __init__(self, tokenizer, rows, pad_to_multiple_of: int | None = None):
        self.rows = model_inputs(rows)
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, pairs: list[dict]) -> dict:
        texts = [self.rows[p["first"]] for p in pairs] + [self.rows[p["second"]] for p in pairs]
        batch = self.pad(texts)
        batch["labels"] = torch.tensor([p["target"] for p in pairs], dtype=torch.float32)
        return dict(batch)


class CosineSimilarityLoss:
    """sentence-transformers' CosineSimilarityLoss (SetFit's default): the squared error between the cosine of
    a pair's two embeddings and its target (1 same label, 0 not). Returns (summed over the batch's pairs, their
    number), so every pair of a step weighs the same (`TaskInputs.loss_fn`)."""

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        targets = batch["labels"]
        embeddings = model(**{k: v for k, v in batch.items() if k != "labels"}).embeddings.float()
        first, second = embeddings.split(len(targets))
        return ((F.cosine_similarity(first, second) - targets) ** 2).sum(), len(targets)


# ------------------------------------------------------------ the model


class SentenceEncoderConfig(PreTrainedConfig):
    """An encoder's config (`encoder`, any AutoModel's) with the pooling that turns its tokens into one vector."""

    model_type = MODEL_TYPE
    sub_configs = {"encoder": AutoConfig}

    encoder: PreTrainedConfig | dict | None = None
    pooling_mode: str = "mean"
    normalize: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.encoder, dict):
            encoder = dict(self.encoder)
            self.encoder = AutoConfig.for_model(encoder.pop("model_type"), **encoder)
        super().__post_init__(**kwargs)
        if self.encoder is not None:  # how many tokens the model reads (textune.models.model_position_limit)
            self.max_position_embeddings = getattr(self.encoder, "max_position_embeddings", None)


@dataclass
class SentenceEncoderOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # the pooled (and, where the base model does, normalised) vectors


class SentenceEncoderForSequenceClassification(PreTrainedModel):
    """encoder -> pooling -> (normalise) -> Linear -> logits; `labels` give the cross-entropy `evaluate` reports."""

    config_class = SentenceEncoderConfig
    base_model_prefix = "encoder"

    def __init__(self, config: SentenceEncoderConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder)
        self.classifier = torch.nn.Linear(config.encoder.hidden_size, config.num_labels)
        self.post_init()

    @property
    def pooling(self) -> PoolingSpec:
        return PoolingSpec(self.config.pooling_mode, self.config.normalize)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        embeddings = pool(hidden, attention_mask, self.pooling)
        logits = self.classifier(embeddings.to(self.classifier.weight.dtype))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SentenceEncoderOutput(loss=loss, logits=logits, embeddings=embeddings)


AutoConfig.register(MODEL_TYPE, SentenceEncoderConfig, exist_ok=True)
AutoModelForSequenceClassification.register(SentenceEncoderConfig, SentenceEncoderForSequenceClassification,
                                            exist_ok=True)


def load_contrastive_model(cfg, model_path: str, label_names: list[str]) -> SentenceEncoderForSequenceClassification:
    """The base encoder (AutoModel weights of `model_path`) under a head of one output per label, pooling as the
    base's sentence-transformers files say (mean pooling where it has none, as sentence-transformers assumes)."""
    from textune.models import safetensors_only, set_attention

    spec = read_pooling(model_path)
    encoder = AutoModel.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code,
                                        **safetensors_only())
    config = SentenceEncoderConfig(encoder=encoder.config, pooling_mode=spec.mode, normalize=spec.normalize,
                                   id2label=dict(enumerate(label_names)),
                                   label2id={n: i for i, n in enumerate(label_names)})
    model = SentenceEncoderForSequenceClassification(config)
    model.encoder = set_attention(encoder, cfg.model.attention)
    model.pooling_source = spec.source  # said at start-up
    return model


# ------------------------------------------------------------ the head


@torch.no_grad()
def embed_rows(model, rows, collator, batch_size: int = 64) -> np.ndarray:
    """The pooled embeddings of tokenised rows (`rows`: a datasets.Dataset), in order, in eval mode."""
    was_training = model.training
    model.eval()
    features = model_inputs(rows)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(features), batch_size):
        batch = collator(features[start:start + batch_size])
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).embeddings.float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def fit_head(model, rows, labels, collator) -> None:
    """Fit SetFit's head, scikit-learn's LogisticRegression with its defaults, on the embeddings of the
    training rows, and copy it into `model.classifier`. A label without training rows gets a bias far below
    the others (never predicted), as the regression cannot know it."""
    from sklearn.linear_model import LogisticRegression  # ~1 s to import: only where a head is fitted

    labels = np.asarray(labels)
    head = LogisticRegression().fit(embed_rows(model, rows, collator), labels)
    weight = np.zeros(tuple(model.classifier.weight.shape), dtype=np.float32)
    bias = np.full(weight.shape[0], -1e4, dtype=np.float32)
    if len(head.classes_) == 2:  # one decision function: the logit of the second class against the first
        weight[head.classes_[1]], bias[head.classes_[0]], bias[head.classes_[1]] = head.coef_[0], 0, head.intercept_[0]
    else:
        weight[head.classes_], bias[head.classes_] = head.coef_, head.intercept_
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(weight))
        model.classifier.bias.copy_(torch.from_numpy(bias))


def pairs_summary(targets: np.ndarray, rows: int, num_iterations: int | None) -> str:
    """The start-up line of a contrastive run: how many pairs of which kind, drawn how."""
    positives = int(targets.sum())
    how = f"num_iterations {num_iterations}" if num_iterations else "every pair, the rarer kind repeated"
    return (f"method     contrastive (SetFit): {len(targets):,} pairs ({positives:,} same label, "
            f"{len(targets) - positives:,} different) from {rows:,} rows, {how}; then a logistic-regression head "
            f"fitted on the embeddings at every evaluation")
