"""The FastAPI app: the operational routes, the served task's router, and a 404 that explains itself on the
paths of every other task.

Operational routes: GET /health (no token), GET /v1/models (the model, its task, labels, adapters, limits; also in
OpenAI's `object`/`data` shape), GET /metrics (Prometheus), and the docs at /docs. The served model's task
(`predictor.task`, a name of `textune.tasks`) adds its own routes (`Task.router`); a POST to a path another task
serves answers 404 saying what the served model is and which endpoints it has.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from textune.serving.batching import Metrics, MicroBatcher, ServeSettings
from textune.serving.context import ServeContext
from textune.serving.errors import CHAT_PATH, OPENAI_PATHS, ErrorResponse, OpenAIErrorResponse, error_response, \
    install_error_handlers, token_check
from textune.tasks import DEFAULT_TASK, TASKS, get_task


def create_app(predictor, settings: ServeSettings, model_name: str, adapters=None) -> FastAPI:
    """The FastAPI app serving `predictor` (a task's predictor: its `task` names the task whose router serves
    it, classification when it has none) to requests without an adapter, and `adapters` (an
    `adapters.AdapterPredictor`, or None) to requests that name one."""
    metrics = Metrics()
    task = get_task(getattr(predictor, "task", DEFAULT_TASK))

    def predict(texts: list, pairs: list | None, adapter: str | None) -> list[dict]:
        # Runs in the one worker thread, so switching the active adapter never races a running batch.
        if adapter is None:
            return predictor.predict(texts, pairs)
        return adapters.predict(texts, pairs, adapter=adapter)

    batcher = MicroBatcher(predict, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.create_task(batcher.run())
        yield
        loop.cancel()
        batcher.executor.shutdown(wait=False, cancel_futures=True)

    described = task.serve_description(predictor)
    app = FastAPI(title="textune", version="1", lifespan=lifespan,
                  description=f"`{model_name}`, {described}. Errors: `{{\"error\": {{\"status\": ..., "
                              f"\"message\": ...}}}}` (OpenAI's shape on {CHAT_PATH}).")
    install_error_handlers(app)
    check_token = token_check(settings.token)
    ctx = ServeContext(predictor, settings, model_name, batcher, check_token, adapters)
    served = task.router(ctx) or APIRouter()
    app.include_router(served)
    # A task's router holds routes only (no included routers), so its paths are its routes'.
    app.include_router(unsupported_router(ctx, described, [r.path for r in served.routes]))
    app.include_router(operations_router(ctx, task.name, metrics))
    add_limits_and_metrics(app, settings, metrics)
    return app


def unsupported_router(ctx: ServeContext, described: str, served: list[str]) -> APIRouter:
    """POST routes for the paths other tasks serve, each answering 404 with what the served model does."""
    router = APIRouter(dependencies=[Depends(ctx.check_token)])
    others = sorted({path for name in TASKS for path in get_task(name).serve_paths} - set(served))
    use = " or ".join(f"POST {path}" for path in served) or "GET /v1/models"
    arch = type(getattr(ctx.predictor, "model", ctx.predictor)).__name__

    def refuse(path: str) -> Callable:
        name = path.removeprefix("/v1/")

        async def endpoint() -> None:
            raise HTTPException(404, f"the served model {ctx.model_name} ({arch}) is {described} and does not "
                                     f"support {name}; use {use}")
        return endpoint

    for path in others:
        error = OpenAIErrorResponse if path in OPENAI_PATHS else ErrorResponse
        router.post(path, status_code=404, responses={404: {"model": error}},
                    summary=f"{path.removeprefix('/v1/')}: not supported by {described}")(refuse(path))
    return router


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class AdapterEntry(BaseModel):
    name: str
    labels: list[str] | None
    method: str | None


class ModelsResponse(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry] = Field(description="the served model, as OpenAI's API lists models")
    base: str = Field(description="the served model's name")
    task: str = Field(description="its task: the `task:` name of the registry that trained it (textune.tasks.TASKS, "
                                  "built-in or registered)")
    labels: list[str] = Field(description="the labels it predicts (empty where it predicts none)")
    max_length: int | None = Field(description="tokens it reads at most, where it truncates")
    adapter_base: str | None = Field(description="the base model of the adapter registry, if one is loaded")
    adapters: list[AdapterEntry]
    limits: dict[str, int | float] = Field(description="the server's limits (textune serve's flags)")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    queued_texts: int = Field(description="texts accepted and not yet answered")


def operations_router(ctx: ServeContext, task_name: str, metrics: Metrics) -> APIRouter:
    """GET /v1/models, /health and /metrics."""
    router = APIRouter()
    started = int(time.time())
    adapters, settings = ctx.adapters, ctx.settings

    @router.get("/v1/models", dependencies=[Depends(ctx.check_token)], response_model=ModelsResponse,
                responses={401: {"model": ErrorResponse}})
    async def models() -> dict:
        """The served model, its task and labels, and the adapters of the registry with theirs; `object` and
        `data` list the model as OpenAI's API does (its clients' `models.list()`)."""
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": started,
                                            "owned_by": "textune"}],
                "base": ctx.model_name, "task": task_name, "labels": list(getattr(ctx.predictor, "label_names", [])),
                "max_length": getattr(ctx.predictor, "max_length", None),
                "adapter_base": adapters.registry.base_model if adapters is not None else None,
                "adapters": [{"name": n, "labels": adapters.registry.entry(n)["labels"],
                              "method": adapters.registry.entry(n).get("method")} for n in adapters.names()]
                if adapters is not None else [],
                "limits": {k: v for k, v in vars(settings).items() if k != "token"}}

    @router.get("/health", response_model=HealthResponse)
    async def health() -> dict:
        """Liveness: answers while the server runs; no token needed."""
        return {"status": "ok", "model": ctx.model_name, "queued_texts": ctx.batcher.pending}

    @router.get("/metrics", dependencies=[Depends(ctx.check_token)], response_class=Response)
    async def prometheus() -> Response:
        """Request counts, latency, batch sizes and queue length in the Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


def add_limits_and_metrics(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    """Refuse bodies over --max-body-bytes (or of unknown length) before they are read; count every request."""
    known_paths: set[str] = set()

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        status = 500  # unless a response says otherwise: an exception passes through here to the 500 handler
        try:
            length = request.headers.get("content-length")
            if request.method == "POST" and length is None:
                # The size limit is checked before the body is read; every ordinary client sends the length.
                response = error_response(411, "send a Content-Length header (chunked request bodies are not "
                                               "accepted)", path=request.url.path)
            elif request.method == "POST" and (not length.isdigit() or int(length) > settings.max_body_bytes):
                response = error_response(413, f"request body of {length} bytes is over the limit of "
                                               f"{settings.max_body_bytes} bytes; send fewer or shorter texts per "
                                               f"request", path=request.url.path)
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            if not known_paths:
                known_paths.update(app.openapi()["paths"], (app.docs_url, app.redoc_url, app.openapi_url))
            path = request.url.path if request.url.path in known_paths else "other"  # bounded label values
            metrics.requests.labels(path, str(status)).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - start)
