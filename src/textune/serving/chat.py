"""POST /v1/chat/completions: OpenAI's Chat Completions API, so OpenAI's client libraries (and tools built on
them) work against `textune serve`. Streamed as server-sent events on request; errors take OpenAI's shape.

The router is shared by every task whose predictor converses (`predictor.chat(messages, **settings)` ->
`generate.ChatReply`): a causal language model, an instruction-tuned run (whose predictor puts the run's system
prompt first when a request has none). A task adds it to its router with `ctx.add_chat_route(router)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from textune.errors import TextuneError
from textune.serving.errors import CHAT_ERROR_RESPONSES, CHAT_PATH, APIError


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"; the chat template takes role and content
    role: str = Field(description="system (first message only), user or assistant", examples=["user"])
    content: str | list[TextPart] = Field(description="the text, or OpenAI's list of text parts (joined)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class ChatCompletionRequest(BaseModel):
    # OpenAI's clients send fields this server has no use for (user, frequency_penalty, logit_bias, ...):
    # ignored rather than refused, so those clients work unchanged. Null means the default, as OpenAI reads it.
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="accepted and ignored: the server has one model")
    messages: list[ChatMessage] = Field(description="the conversation so far, ending with the user's message",
                                        examples=[[{"role": "user", "content": "What is two plus three?"}]])
    max_tokens: int | None = Field(None, ge=1, description="tokens of the answer at most; default and ceiling: "
                                                           "the server's --max-new-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1 (as OpenAI)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; default 1 = off")
    seed: int | None = Field(None, description="makes sampling reproducible")
    stop: str | list[str] | None = Field(None, description="the answer ends before the first of these strings")
    n: int | None = Field(None, description="answers per request: only 1 is supported")
    stream: bool | None = Field(False, description="send the answer as server-sent events while it is written")
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="not supported: false or absent")
    tools: list[Any] | None = Field(None, description="not supported: empty or absent")


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"] = Field(description="stop: the model ended or a stop string came; "
                                                                 "length: max_tokens (or the context) ran out")


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the conversation as the chat template formats it")
    completion_tokens: int = Field(description="tokens generated, the end-of-sequence token included")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


def add_chat_route(router: APIRouter, ctx) -> None:
    """Add POST /v1/chat/completions to a task's `router`, answered by `ctx.predictor.chat` (`ctx`: a
    `ServeContext`)."""

    async def chat_completions(req: ChatCompletionRequest):
        """The assistant's answer to the conversation, as OpenAI's Chat Completions API gives it (`stream`:
        server-sent `chat.completion.chunk` events, then `data: [DONE]`). Greedy when temperature is 0."""
        messages, options = chat_request(req, ctx.settings)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": ctx.model_name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return await stream_chat(ctx, messages, options, head, include_usage)
        reply = await chat_reply(ctx, ctx.batcher.run_alone(1, lambda: ctx.predictor.chat(messages, **options)))
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason}],
                "usage": usage(reply)}

    router.post(CHAT_PATH, response_model=None, summary="Chat completion (OpenAI's API)",
                responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                           **CHAT_ERROR_RESPONSES})(chat_completions)


def chat_request(req: ChatCompletionRequest, settings) -> tuple[list[dict], dict]:
    """(messages, chat_completion settings) of a request, or the APIError that refuses it."""
    from textune.generate import check_messages

    for field, bad, why in (("n", req.n not in (None, 1), f"n is {req.n}: one answer per request is supported"),
                            ("logprobs", bool(req.logprobs), "logprobs are not supported; leave them out"),
                            ("tools", bool(req.tools), "tools (function calling) are not supported; leave "
                                                       "them out")):
        if bad:
            raise APIError(400, why, param=field)
    if len(req.messages) > settings.max_texts:
        raise APIError(400, f"got {len(req.messages)} messages, at most {settings.max_texts} per request "
                            f"(--max-texts); drop earlier turns", param="messages")
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in req.messages]
    for i, m in enumerate(messages):
        if len(m["content"]) > settings.max_chars:
            raise APIError(400, f"messages[{i}].content has {len(m['content'])} characters, at most "
                                f"{settings.max_chars} (--max-chars); shorten it", param="messages")
    try:
        messages = check_messages(messages)
    except TextuneError as e:
        raise APIError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_new_tokens
    if max_tokens > settings.max_new_tokens:
        field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{field} {max_tokens} is over the server's limit of {settings.max_new_tokens} "
                            f"(--max-new-tokens); ask for fewer", param=field)
    temperature = 1.0 if req.temperature is None else req.temperature
    return messages, {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": req.top_p or 1.0,
                      "seed": req.seed, "stop": req.stop}


async def chat_reply(ctx, result):
    """`ctx.answer`, naming the field at fault for a conversation too long for the model (as OpenAI does)."""
    from textune.generate import ConversationTooLong

    async def too_long_named():
        try:
            return await result
        except ConversationTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

    return await ctx.answer(too_long_named())


def usage(reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


async def stream_chat(ctx, messages: list[dict], options: dict, head: dict, include_usage: bool) -> StreamingResponse:
    """Generation in the model thread hands each piece of text to the event loop through a queue; the
    response begins with the first piece, so a conversation refused before any text (too long, queue
    full) still gets a plain HTTP error, not a stream."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    end = object()
    cancel = threading.Event()

    def call():
        try:
            return ctx.predictor.chat(messages, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t),
                                      cancel=cancel, **options)
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, end)

    job = asyncio.ensure_future(ctx.batcher.run_alone(1, call))
    first = asyncio.ensure_future(pieces.get())
    done, _ = await asyncio.wait({job, first}, return_when=asyncio.FIRST_COMPLETED)
    if first not in done and job.exception() is not None:  # refused before it ran: a full queue
        first.cancel()
        await chat_reply(ctx, job)
    piece = await first
    if piece is end:  # failed before any text (too long, ...): a plain HTTP error; an empty answer streams
        await chat_reply(ctx, job)
    return StreamingResponse(chat_events(piece, pieces, end, job, cancel, head, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_events(piece, pieces: asyncio.Queue, end, job, cancel: threading.Event, head: dict,
                      include_usage: bool):
    """The server-sent events of a streamed answer, from its first `piece` on."""

    def event(delta: dict, finish_reason: str | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        while piece is not end:
            yield event({"content": piece})
            piece = await pieces.get()
        try:
            reply = await job
        except Exception as e:  # the stream has begun: report in-band, as OpenAI does
            logging.getLogger(__name__).exception("chat completion failed while streaming")
            message = str(e) if isinstance(e, TextuneError) else f"internal error ({type(e).__name__})"
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        yield event({}, reply.finish_reason)
        if include_usage:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(reply)}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a client that went away stops the generation at the next token
