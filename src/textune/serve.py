"""Serve a fine-tuned classifier (or a masked/causal LM) over HTTP: a FastAPI app under uvicorn, with micro-batching.

Requests that arrive together are merged into one model call (up to `max_batch_size` texts, waiting at
most `max_wait_ms` for company), which runs in one worker thread so the event loop keeps accepting
requests; each caller gets its own results, in its input order. Limits keep one client from exhausting
the server: texts per request, characters per text, body size, and a bound on texts waiting, beyond
which the server answers 503 instead of queueing without end. Errors are JSON:
`{"error": {"status": 413, "message": "..."}}`.

Endpoints: POST /v1/classify (a token classifier: POST /v1/entities; a question answerer: POST /v1/answer), GET /v1/models, GET /health, GET /metrics (Prometheus), docs at /docs.
A masked LM is served at POST /v1/fill-mask and a causal LM at POST /v1/generate instead of /v1/classify
(chosen from the saved architecture); those requests carry their own settings (top_k, sampling), so each
is one model call of its own in the same worker thread, under the same limits and queue bound.
A causal LM also answers POST /v1/chat/completions, OpenAI's Chat Completions API (so OpenAI's client
libraries work against it), streamed as server-sent events on request; its errors take OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`. GET /v1/models carries OpenAI's `object`/`data` keys too.
With `--adapters REGISTRY` (see `textune adapters`) a request may name an adapter: the registry's adapters
share one loaded base model and are switched between model calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from textune.errors import TextuneError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CHAT_PATH = "/v1/chat/completions"  # OpenAI's API: its errors take OpenAI's shape
# task -> (endpoint under /v1/, what the API does, what the model is)
# The batched tasks' endpoints and request/response models come from their task modules (`Task.serve_*`).
TASKS = {"classification": ("classify", "Text classification", "text classifier"),
         "token-classification": ("entities", "Named-entity recognition", "token classifier"),
         "question-answering": ("answer", "Extractive question answering", "question-answering model"),
         "fill-mask": ("fill-mask", "Fill-mask (masked-LM predictions)", "masked language model"),
         "text-generation": ("generate", "Text generation", "causal language model")}


@dataclass
class ServeSettings:
    """Batching and limits of one server (the `textune serve` flags of the same names)."""

    max_batch_size: int = 32  # texts per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text
    max_body_bytes: int = 1_000_000  # request body size
    max_queue: int = 1024  # texts accepted and not yet answered; more gets 503
    max_new_tokens: int = 256  # tokens one /v1/generate request may ask for (causal LMs)
    token: str | None = None  # bearer token required on /v1/* and /metrics; None = open

    def __post_init__(self) -> None:
        problems = [f"--{k.replace('_', '-')} must be greater than 0, got {v}" for k, v in vars(self).items()
                    if k != "token" and v <= 0 and not (k == "max_wait_ms" and v == 0)]
        if self.max_queue < self.max_texts:
            problems.append(f"--max-queue ({self.max_queue}) must be at least --max-texts ({self.max_texts}), "
                            f"or a full-size request could never be accepted")
        if problems:
            raise TextuneError("; ".join(problems))


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, description="texts to classify", examples=[["a great film"]])
    text_pairs: list[str] | None = Field(None, description="second texts of a sentence-pair task, one per text")
    adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of the predicted label")
    probabilities: dict[str, float]


class Score(BaseModel):
    score: float = Field(description="regression: the predicted value, on the scale of the training labels")


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="probability of the label")


class LabelSet(BaseModel):
    labels: list[LabelScore] = Field(description="multi-label: every label at or above its threshold, most "
                                                 "probable first (empty when none is)")
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    adapter: str | None
    # A classifier's label, a regression model's score or a multi-label model's label set; tried in that order.
    results: list[Annotated[Prediction | Score | LabelSet, Field(union_mode="left_to_right")]] = Field(
        description="one per input text, in the input order")


class EntitiesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, description="texts to find entities in",
                             examples=[["Empire State Building in New York"]])
    adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")


class Entity(BaseModel):
    entity: str = Field(description="entity type (the tag without its B-/I- prefix)")
    text: str = Field(description="the entity as it stands in the input: text[start:end]")
    start: int = Field(description="character offset of the first character")
    end: int = Field(description="character offset after the last character")
    score: float = Field(description="mean probability of the predicted tags of its words")


class EntitiesResult(BaseModel):
    entities: list[Entity]


class EntitiesResponse(BaseModel):
    model: str
    adapter: str | None
    results: list[EntitiesResult] = Field(description="one per input text, in the input order")


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    questions: list[str] = Field(min_length=1, description="questions, each answered from its context",
                                 examples=[["Who wrote it?"]])
    contexts: list[str] = Field(min_length=1, description="one passage per question, in the same order",
                                examples=[["Ada Lovelace wrote it in 1843."]])
    adapter: str | None = Field(None, description="adapter of the registry to use; empty = the base model")


class Answer(BaseModel):
    answer: str = Field(description="the span of the context: context[start:end]; empty for no answer (models "
                                    "trained with unanswerable questions)")
    score: float = Field(description="probability of this span among the best candidate spans")
    start: int = Field(description="character offset of the answer's first character in the context")
    end: int = Field(description="character offset after the answer's last character")


class AnswerResponse(BaseModel):
    model: str
    adapter: str | None
    results: list[Answer] = Field(description="one per question, in the input order")


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
    results: list[list[list[Candidate]]] = Field(description="per text (input order), per mask (left to right), "
                                                             "top_k candidates by descending score")


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
    chat: bool = Field(False, description="send the prompt as a user turn of the chat template")


class GenerateResponse(BaseModel):
    model: str
    texts: list[str] = Field(description="the prompt and its continuation (with chat: the answer alone)")


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


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


class ErrorBody(BaseModel):
    status: int
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class QueueFull(Exception):
    pass


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        self.requests = Counter("textune_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=self.registry)
        self.latency = Histogram("textune_request_seconds", "request latency in seconds", ["path"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=self.registry)
        self.batch_texts = Histogram("textune_batch_texts", "texts per model call", buckets=sizes,
                                     registry=self.registry)
        self.batch_requests = Histogram("textune_batch_requests", "requests merged into one model call",
                                        buckets=sizes, registry=self.registry)
        self.model_seconds = Histogram("textune_model_seconds", "seconds per model call",
                                       buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=self.registry)
        self.queue = Gauge("textune_queue_texts", "texts accepted and not yet answered", registry=self.registry)


@dataclass
class _Job:
    texts: list[str]
    pairs: list[str] | None
    adapter: str | None
    future: asyncio.Future


class MicroBatcher:
    """Merges concurrent requests into model calls, run one at a time in a worker thread.

    `predict(texts, pairs, adapter) -> list[dict]` is the model. A batch starts with the oldest waiting
    request and takes more until it holds `max_batch_size` texts or `max_wait_ms` has passed; one request
    larger than that is a batch of its own (the predictor splits it). Requests for different adapters, or
    with and without text pairs, share a wait but not a model call.
    """

    def __init__(self, predict: Callable[[list[str], list[str] | None, str | None], list[dict]],
                 settings: ServeSettings, metrics: Metrics):
        self.predict = predict
        self.settings = settings
        self.metrics = metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.arrived = asyncio.Event()
        self.pending = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textune-model")

    async def submit(self, texts: list[str], pairs: list[str] | None, adapter: str | None) -> list[dict]:
        """Results for `texts`, in order. Raises QueueFull when accepting them would pass `max_queue`."""
        job = _Job(texts, pairs, adapter, asyncio.get_running_loop().create_future())
        with self._admitted(len(texts)):
            self.queue.put_nowait(job)
            self.arrived.set()
            return await job.future

    async def run_alone(self, n_texts: int, call: Callable[[], object]) -> object:
        """`call()` in the model thread, not merged with other requests (fill-mask and generate requests
        carry settings of their own), under the same bound on waiting texts. Raises QueueFull."""
        with self._admitted(n_texts):
            self.metrics.batch_texts.observe(n_texts)
            self.metrics.batch_requests.observe(1)
            start = time.perf_counter()
            try:
                return await asyncio.get_running_loop().run_in_executor(self.executor, call)
            finally:
                self.metrics.model_seconds.observe(time.perf_counter() - start)

    @contextmanager
    def _admitted(self, n_texts: int):
        if self.pending + n_texts > self.settings.max_queue:
            raise QueueFull
        self.pending += n_texts
        self.metrics.queue.set(self.pending)
        try:
            yield
        finally:
            self.pending -= n_texts
            self.metrics.queue.set(self.pending)

    async def run(self) -> None:
        """The batching loop; runs as a task for the life of the app."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].texts)
            deadline = loop.time() + self.settings.max_wait_ms / 1000
            while size < self.settings.max_batch_size:
                if self.queue.empty():
                    # Wait on an event, not on queue.get(): a timed-out get can drop an item on Python 3.10.
                    self.arrived.clear()
                    try:
                        await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                    continue
                jobs.append(self.queue.get_nowait())
                size += len(jobs[-1].texts)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.adapter, job.pairs is not None), []).append(job)
            for (adapter, _), group in groups.items():
                await self._call_model(loop, group, adapter)

    async def _call_model(self, loop: asyncio.AbstractEventLoop, group: list[_Job], adapter: str | None) -> None:
        group = [j for j in group if not j.future.done()]  # a caller that went away needs no answer
        if not group:
            return
        texts = [t for j in group for t in j.texts]
        pairs = [p for j in group for p in j.pairs] if group[0].pairs is not None else None
        self.metrics.batch_texts.observe(len(texts))
        self.metrics.batch_requests.observe(len(group))
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.predict, texts, pairs, adapter)
        except Exception as e:  # noqa: BLE001 - handed to each caller, who answers 500 (or 400 for a TextuneError)
            for j in group:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self.metrics.model_seconds.observe(time.perf_counter() - start)
        i = 0
        for j in group:
            if not j.future.done():
                j.future.set_result(results[i:i + len(j.texts)])
            i += len(j.texts)


class APIError(HTTPException):
    """An HTTP error naming the request field at fault (`param`) and a machine-readable `code`, as OpenAI's
    errors do; other endpoints show only the status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(status, message, headers=headers)
        self.param, self.code = param, code


def _error(status: int, message: str, headers: dict | None = None, path: str = "", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    if path == CHAT_PATH:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"message": message, "type": kind, "param": param, "code": code}
    else:
        body = {"status": status, "message": message}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def create_app(predictor, settings: ServeSettings, model_name: str, adapters=None) -> FastAPI:
    """The FastAPI app serving `predictor` (an `infer.Predictor`, or anything with its `predict` and
    `label_names`) to requests without an adapter, and `adapters` (an `adapters.AdapterPredictor`, or None)
    to requests that name one. A `predictor` whose `task` is "fill-mask" or "text-generation" (a
    `generate.LanguageModel`) is served at /v1/fill-mask or /v1/generate instead of /v1/classify."""
    metrics = Metrics()
    task = getattr(predictor, "task", "classification")

    def predict(texts: list[str], pairs: list[str] | None, adapter: str | None) -> list[dict]:
        # Runs in the one worker thread, so switching the active adapter never races a running batch.
        if adapter is None:
            return predictor.predict(texts, pairs)
        return adapters.predict(texts, pairs, adapter=adapter)

    batcher = MicroBatcher(predict, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="textune", version="1", lifespan=lifespan,
                  description=f"{TASKS[task][1]} with `{model_name}`. Errors: "
                              "`{\"error\": {\"status\": ..., \"message\": ...}}`.")
    bearer = HTTPBearer(auto_error=False, description="the token named by `textune serve --token-env`")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code in (404, 405) and exc.detail in ("Not Found", "Method Not Allowed"):  # routing, not ours
            return _error(exc.status_code, f"no endpoint {request.method} {path}; the API is listed at /docs",
                          exc.headers, path)
        code = getattr(exc, "code", None) or ("invalid_api_key" if exc.status_code == 401 else None)
        return _error(exc.status_code, str(exc.detail), exc.headers, path, getattr(exc, "param", None), code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the caller's mistake: uvicorn logs the traceback; the caller still gets JSON.
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details",
                      path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors, path = exc.errors(), request.url.path
        if any(e["type"] == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", path=path)
        fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
        message = "; ".join(f"{field}: {e['msg']}" for field, e in zip(fields, errors))
        if path == CHAT_PATH:  # OpenAI answers a malformed request with 400, which its clients raise as BadRequestError
            return _error(400, message, path=path, param=fields[0])
        return _error(422, message)

    known_paths: set[str] = set()

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        status = 500  # unless a response says otherwise: an exception passes through here to the 500 handler
        try:
            length = request.headers.get("content-length")
            if request.method == "POST" and length is None:
                # The size limit is checked before the body is read; every ordinary client sends the length.
                response = _error(411, "send a Content-Length header (chunked request bodies are not accepted)",
                                  path=request.url.path)
            elif request.method == "POST" and (not length.isdigit() or int(length) > settings.max_body_bytes):
                response = _error(413, f"request body of {length} bytes is over the limit of "
                                       f"{settings.max_body_bytes} bytes; send fewer or shorter texts per request",
                                  path=request.url.path)
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if not known_paths:
                known_paths.update(r.path for r in app.routes)
            path = request.url.path if request.url.path in known_paths else "other"  # bounded label values
            metrics.requests.labels(path, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - start)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 411, 413, 422, 503)}

    def check_texts(texts: list[str], pairs: list[str] | None = None, name: str = "texts",
                    pair_name: str = "text_pairs") -> None:
        n = len(texts)
        if n > settings.max_texts:
            raise HTTPException(413, f"got {n} {name}, at most {settings.max_texts} per request; split the request")
        if pairs is not None and len(pairs) != n:
            raise HTTPException(422, f"got {n} {name} but {len(pairs)} {pair_name}; give one per {name.rstrip('s')}")
        for i, t in enumerate(texts + (pairs or [])):
            if len(t) > settings.max_chars:
                which = f"{name}[{i}]" if i < n else f"{pair_name}[{i - n}]"
                raise HTTPException(413, f"{which} has {len(t)} characters, at most {settings.max_chars}; "
                                         f"shorten it (the model reads only its first tokens anyway)")

    async def answer(result):
        """Await the model's `result` (a coroutine), turning a full queue into 503 and bad input into 400."""
        try:
            return await result
        except QueueFull:
            raise HTTPException(503, f"the server is at its queue limit ({settings.max_queue} texts waiting); "
                                     f"retry shortly", headers={"Retry-After": "1"}) from None
        except TextuneError as e:
            raise HTTPException(400, str(e)) from None

    def check_adapter(req) -> None:
        if req.adapter is not None:
            if adapters is None:
                raise HTTPException(400, f"adapter {req.adapter!r} asked for, but no adapter registry is loaded; "
                                         f"start the server with --adapters REGISTRY or leave out 'adapter'")
            if req.adapter not in adapters.names():
                raise HTTPException(400, f"no adapter {req.adapter!r} in the registry; "
                                         f"it holds: {', '.join(adapters.names()) or 'none'}")

    async def batched(req) -> dict:
        """The task's predictions for each text, in the input order (micro-batched with other requests)."""
        pairs = getattr(req, "text_pairs", None)
        check_texts(req.texts, pairs)
        check_adapter(req)
        results = await answer(batcher.submit(req.texts, pairs, req.adapter))
        return {"model": model_name, "adapter": req.adapter, "results": results}

    def batched_endpoint(request_model: type[BaseModel], doc: str) -> Callable:
        async def endpoint(req) -> dict:
            return await batched(req)
        endpoint.__annotations__ = {"req": request_model, "return": dict}  # what FastAPI validates the body as
        endpoint.__doc__ = doc
        return endpoint

    async def answer_questions(req: AnswerRequest) -> dict:
        """The best answer to each question in its context: the span, its score and character offsets.
        Questions ride the batcher as texts and contexts as their pairs; the predictor batches their windows."""
        check_texts(req.questions, req.contexts, name="questions", pair_name="contexts")
        check_adapter(req)
        results = await answer(batcher.submit(req.questions, req.contexts, req.adapter))
        return {"model": model_name, "adapter": req.adapter, "results": results}

    async def fill_mask(req: FillMaskRequest) -> dict:
        """The top_k likeliest tokens, with probabilities, for every mask of every text."""
        check_texts(req.texts)
        results = await answer(batcher.run_alone(
            len(req.texts), lambda: predictor.fill_mask(req.texts, top_k=req.top_k)))
        return {"model": model_name, "results": results}

    async def generate(req: GenerateRequest) -> dict:
        """The prompt continued num_return_sequences times (greedy unless do_sample)."""
        check_texts([req.prompt], name="prompt")
        if req.max_new_tokens is None:
            req.max_new_tokens = min(50, settings.max_new_tokens)
        if req.max_new_tokens > settings.max_new_tokens:
            raise HTTPException(413, f"max_new_tokens {req.max_new_tokens} is over the limit of "
                                     f"{settings.max_new_tokens}; ask for fewer")
        if req.num_return_sequences > settings.max_texts:
            raise HTTPException(413, f"num_return_sequences {req.num_return_sequences} is over the limit of "
                                     f"{settings.max_texts}; ask for fewer")
        options = req.model_dump(exclude={"prompt"})
        texts = await answer(batcher.run_alone(
            req.num_return_sequences, lambda: predictor.generate(req.prompt, **options)))
        return {"model": model_name, "texts": texts}

    def chat_request(req: ChatCompletionRequest) -> tuple[list[dict], dict]:
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

    async def chat_reply(result):
        """`answer`, naming the field at fault for a conversation too long for the model (as OpenAI does)."""
        from textune.generate import ConversationTooLong

        async def too_long_named():
            try:
                return await result
            except ConversationTooLong as e:
                raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None

        return await answer(too_long_named())

    async def chat_completions(req: ChatCompletionRequest):
        """The assistant's answer to the conversation, as OpenAI's Chat Completions API gives it (`stream`:
        server-sent `chat.completion.chunk` events, then `data: [DONE]`). Greedy when temperature is 0."""
        messages, options = chat_request(req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return await stream_chat(messages, options, head, include_usage)
        reply = await chat_reply(batcher.run_alone(1, lambda: predictor.chat(messages, **options)))
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason}],
                "usage": usage(reply)}

    def usage(reply) -> dict:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens}

    async def stream_chat(messages: list[dict], options: dict, head: dict, include_usage: bool) -> StreamingResponse:
        """Generation in the model thread hands each piece of text to the event loop through a queue; the
        response begins with the first piece, so a conversation refused before any text (too long, queue
        full) still gets a plain HTTP error, not a stream."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        end = object()
        cancel = threading.Event()

        def call():
            try:
                return predictor.chat(messages, on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t),
                                      cancel=cancel, **options)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, end)

        job = asyncio.ensure_future(batcher.run_alone(1, call))
        first = asyncio.ensure_future(pieces.get())
        done, _ = await asyncio.wait({job, first}, return_when=asyncio.FIRST_COMPLETED)
        if first not in done and job.exception() is not None:  # refused before it ran: a full queue
            first.cancel()
            await chat_reply(job)
        piece = await first
        if piece is end:  # failed before any text (too long, ...): a plain HTTP error; an empty answer streams
            await chat_reply(job)

        def event(delta: dict, finish_reason: str | None = None) -> str:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield event({"role": "assistant", "content": ""})
                nonlocal piece
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

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def unsupported(path: str) -> Callable:
        async def endpoint() -> None:
            arch = type(getattr(predictor, "model", predictor)).__name__
            raise HTTPException(404, f"the served model {model_name} ({arch}) is a {TASKS[task][2]} and does not "
                                     f"support {path}; use POST /v1/{TASKS[task][0]}")
        return endpoint

    # The served model's task gets its endpoint; the others answer why they are missing, not a bare 404.
    handlers = {"classification": (batched_endpoint(ClassifyRequest, "Labels, scores and probabilities of each "
                                                                      "text, in the input order."), ClassifyResponse),
                "token-classification": (batched_endpoint(EntitiesRequest, "The entities of each text: type, text, "
                                                                           "character offsets and score."),
                                         EntitiesResponse),
                "question-answering": (answer_questions, AnswerResponse),
                "fill-mask": (fill_mask, FillMaskResponse), "text-generation": (generate, GenerateResponse)}
    for name, (path, _, _) in TASKS.items():
        handler, response = handlers[name]
        if name == task:
            app.post(f"/v1/{path}", response_model=response, responses=errors,
                     dependencies=[Depends(check_token)])(handler)
        else:
            app.post(f"/v1/{path}", status_code=404, responses={404: {"model": ErrorResponse}},
                     dependencies=[Depends(check_token)], summary=f"{path}: not supported by a {TASKS[task][2]}",
                     )(unsupported(path))
    if task == "text-generation":
        app.post(CHAT_PATH, response_model=None, dependencies=[Depends(check_token)],
                 responses={200: {"model": ChatCompletion, "content": {"text/event-stream": {}}},
                            **{s: {"model": OpenAIErrorResponse} for s in (400, 401, 413, 503)}},
                 summary="Chat completion (OpenAI's API)")(chat_completions)
    else:
        app.post(CHAT_PATH, status_code=404, responses={404: {"model": OpenAIErrorResponse}},
                 dependencies=[Depends(check_token)], summary=f"chat/completions: not supported by a {TASKS[task][2]}",
                 )(unsupported("chat/completions"))

    started = int(time.time())

    @app.get("/v1/models", dependencies=[Depends(check_token)])
    async def models() -> dict:
        """The served model and its labels, and the adapters of the registry with theirs; `object` and `data`
        list the model as OpenAI's API does (its clients' `models.list()`)."""
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "textune"}],
                "base": model_name, "task": task, "labels": list(getattr(predictor, "label_names", [])),
                "max_length": getattr(predictor, "max_length", None),
                "adapter_base": adapters.registry.base_model if adapters is not None else None,
                "adapters": [{"name": n, "labels": adapters.registry.entry(n)["labels"],
                              "method": adapters.registry.entry(n).get("method")} for n in adapters.names()]
                if adapters is not None else [],
                "limits": {k: v for k, v in vars(settings).items() if k != "token"}}

    @app.get("/health")
    async def health() -> dict:
        """Liveness: answers while the server runs; no token needed."""
        return {"status": "ok", "model": model_name, "queued_texts": batcher.pending}

    @app.get("/metrics", dependencies=[Depends(check_token)], response_class=Response)
    async def prometheus() -> Response:
        """Request counts, latency, batch sizes and queue length in the Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(run_or_model: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          adapters: str | None = None, threads: int | None = None) -> None:
    """Load the model and serve it until interrupted.

    Args:
        threads: torch intra-op threads. On a busy CPU, torch's default (one per core) competing with other
            processes can make each model call many times slower than one thread would.

    Raises:
        TextuneError: no model at `run_or_model`, bad settings, or an adapter registry that cannot be loaded.
    """
    import torch
    import uvicorn

    from textune.generate import LanguageModel, model_task

    if threads is not None:
        if threads <= 0:
            raise TextuneError(f"--threads must be greater than 0, got {threads}")
        torch.set_num_threads(threads)

    task = model_task(run_or_model)
    if task == "text-classification":  # a classifier of some textune task: its own predictor
        from textune.tasks import get_task, task_of

        predictor = get_task(task_of(run_or_model)).load_predictor(run_or_model, batch_size=settings.max_batch_size)
    elif adapters is not None:
        raise TextuneError(f"--adapters holds classifier adapters, but {run_or_model} is a {TASKS[task][2]}; "
                           f"leave out --adapters")
    else:
        predictor = LanguageModel(run_or_model, task)
    adapter_predictor = None
    if adapters is not None:
        from textune.adapters import AdapterPredictor

        adapter_predictor = AdapterPredictor(adapters, batch_size=settings.max_batch_size)
        for adapter in adapter_predictor.names():  # load each now: a broken registry fails before serving
            adapter_predictor.activate(adapter)
    name = (predictor.run_dir or Path(run_or_model)).name
    if task == "text-generation" and not predictor.tokenizer.chat_template:
        print(f"note       {name} has no chat template: /v1/chat/completions will refuse every request "
              f"(/v1/generate works)", flush=True)
    app = create_app(predictor, settings, name, adapter_predictor)
    where = "" if host in LOOPBACK else "  (reachable from other machines" + (
        ")" if settings.token else "; no --token-env, so anyone can call it)")
    print(f"serving    {name} on http://{host}:{port}  docs http://{host}:{port}/docs{where}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
