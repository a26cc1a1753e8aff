"""Sentence embeddings from an encoder: which pooling a model uses, pooling itself, and batched encoding.

A leaf module (torch, numpy, json, pathlib, textune.errors) shared by the embedding task, few-shot
contrastive classification and the zero-shot baselines, so that all three pool a model the way
sentence-transformers does for the same folder:

- `PoolingSpec`: the pooling mode, whether vectors are L2-normalised, and where that came from;
- `read_pooling(model_dir_or_name)`: the spec a sentence-transformers folder states (modules.json,
  1_Pooling/config.json, a Normalize module), or mean pooling without normalisation where the folder says
  nothing (sentence-transformers' own fallback for a plain transformers model), saying so in `source`;
- `pool(last_hidden_state, attention_mask, spec)`: one vector per row;
- `encode(model, tokenizer, texts, spec, ...)`: vectors for a list of texts, as a float32 numpy array;
- `write_pooling(model_dir, spec, dimension, max_seq_length)`: the files that make a saved encoder a
  sentence-transformers folder (`SentenceTransformer(model_dir)` then pools and normalises like textune).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from textune.errors import TextuneError

# The single-mode names of sentence-transformers' Pooling module (6.x `pooling_mode`), and the boolean keys
# older folders (2.x, such as all-MiniLM-L6-v2) write instead, in sentence-transformers' own order.
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_MODE_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                     "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                     "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
NO_POOLING_INFO = "no pooling information: mean pooling, as sentence-transformers assumes"


@dataclass(frozen=True)
class PoolingSpec:
    """How token vectors become one sentence vector.

    mode: one of POOLING_MODES. normalize: L2-normalise the pooled vector (a Normalize module).
    source: where the spec came from, said to the user ("the model's 1_Pooling/config.json" or
    NO_POOLING_INFO)."""
    mode: str = "mean"
    normalize: bool = False
    source: str = NO_POOLING_INFO


def _mode_from_config(config: dict, where: Path) -> str:
    mode = config.get("pooling_mode")
    if mode is None:  # the 2.x boolean keys; none set means mean, as sentence-transformers reads them
        modes = [name for key, name in _LEGACY_MODE_KEYS.items() if config.get(key)]
        mode = modes if len(modes) > 1 else (modes[0] if modes else "mean")
    if isinstance(mode, (list, tuple)):
        mode = mode[0] if len(mode) == 1 else list(mode)
    if not isinstance(mode, str) or mode not in POOLING_MODES:
        raise TextuneError(f"{where} asks for pooling {mode!r}; textune pools with one of {', '.join(POOLING_MODES)} "
                           f"(concatenated modes are not supported): edit pooling_mode in that file")
    return mode


def read_pooling(model_dir_or_name) -> PoolingSpec:
    """The pooling a sentence-transformers folder states, or mean pooling (source NO_POOLING_INFO) for a folder
    or Hub name without a modules.json. Raises TextuneError for a pooling config textune cannot follow."""
    root = Path(str(model_dir_or_name)).expanduser()
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return PoolingSpec()
    modules = json.loads(modules_file.read_text())
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    normalize = "Normalize" in types
    if "Pooling" not in types:
        return PoolingSpec(normalize=normalize, source=NO_POOLING_INFO)
    config_path = root / types["Pooling"].get("path", "1_Pooling") / "config.json"
    if not config_path.is_file():
        return PoolingSpec(normalize=normalize, source=NO_POOLING_INFO)
    mode = _mode_from_config(json.loads(config_path.read_text()), config_path)
    rel = config_path.relative_to(root).as_posix()
    source = f"the model's {rel}" + (" and its Normalize module" if normalize else "")
    return PoolingSpec(mode=mode, normalize=normalize, source=source)


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """(batch, tokens, dim) -> (batch, dim), over the tokens attention_mask keeps; normalised if spec says so.
    The arithmetic follows sentence-transformers' Pooling so that a saved folder gives the same vectors."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    if spec.mode == "cls":
        first = attention_mask.to(torch.int).argmax(dim=1)  # the first kept token, also under left padding
        pooled = last_hidden_state[torch.arange(len(first), device=first.device), first]
    elif spec.mode == "max":
        pooled = last_hidden_state.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    elif spec.mode == "lasttoken":
        values, flipped = attention_mask.flip(1).max(1)
        last = torch.where(values == 0, 0, attention_mask.shape[1] - flipped - 1)
        pooled = (last_hidden_state * mask)[torch.arange(len(last), device=last.device), last]
    else:
        weights = mask
        if spec.mode == "weightedmean":  # position weights from the first kept token, as sentence-transformers
            start = attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype).view(1, -1, 1)
            weights = mask * (positions - start)
        acc = torch.float32 if last_hidden_state.dtype in (torch.float16, torch.bfloat16) else last_hidden_state.dtype
        total = (last_hidden_state * weights).sum(dim=1, dtype=acc)
        count = torch.clamp(weights.sum(dim=1, dtype=acc), min=1e-9)
        pooled = total / (count.sqrt() if spec.mode == "mean_sqrt_len_tokens" else count)
    if spec.normalize:
        pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
    return pooled


def hidden_states(model, batch: dict) -> torch.Tensor:
    """The last layer's token vectors of an encoder body (AutoModel) or of a model with a head on top."""
    out = model(**batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden


@torch.no_grad()
def encode(model, tokenizer, texts, spec: PoolingSpec, batch_size: int = 32, max_length: int | None = None):
    """Vectors for `texts` (float32 numpy, one row per text, in input order). Batches are formed from texts of
    similar length (less padding, same vectors) and the model is put in eval mode for the call."""
    texts = list(texts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 0), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        vectors = pool(hidden_states(model, batch), batch["attention_mask"], spec).float().cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
    model.train(was_training)
    return out


def write_pooling(model_dir, spec: PoolingSpec, dimension: int, max_seq_length: int | None = None) -> None:
    """Write modules.json, 1_Pooling/config.json (and 2_Normalize when spec.normalize) and
    sentence_bert_config.json next to a saved encoder, so `SentenceTransformer(model_dir)` loads it with the
    same pooling and normalisation as `pool`."""
    root = Path(model_dir)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (root / "modules.json").write_text(json.dumps(modules, indent=2))
    # The 2.x boolean keys: read by every sentence-transformers version (6.x converts them on load).
    legacy = {key: name == spec.mode for key, name in _LEGACY_MODE_KEYS.items()}
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dimension, **legacy},
                                                               indent=2))
    bert_config = {"do_lower_case": False}
    if max_seq_length:
        bert_config["max_seq_length"] = max_seq_length
    (root / "sentence_bert_config.json").write_text(json.dumps(bert_config, indent=2))
