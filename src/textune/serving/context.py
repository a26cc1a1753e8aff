"""What a task's router is built with: `Task.router(ctx)` receives a `ServeContext`.

A task module defines its request and response models and its handlers; the context gives it the served
predictor, the server's limits, the micro-batcher (errors already turned into HTTP answers), the adapter
registry and the bearer-token check, so a task's serving section holds only what is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Depends, HTTPException

from textune.errors import TextuneError
from textune.serving.batching import MicroBatcher, QueueFull, ServeSettings
from textune.serving.chat import add_chat_route
from textune.serving.errors import ERROR_RESPONSES


@dataclass
class ServeContext:
    """The served model and the plumbing its task's handlers share.

    `predictor`: the task's predictor (`predict(texts, pairs)` is what `batched` calls); `adapters`: an
    `adapters.AdapterPredictor` for requests that name an adapter, or None; `model_name`: how responses and
    /v1/models name the model; `check_token`: the bearer-token dependency every route carries.
    """

    predictor: Any
    settings: ServeSettings
    model_name: str
    batcher: MicroBatcher
    check_token: Callable
    adapters: Any = None

    def router(self) -> APIRouter:
        """An empty router whose routes all require the bearer token (when the server has one)."""
        return APIRouter(dependencies=[Depends(self.check_token)])

    def post(self, router: APIRouter, path: str, handler: Callable[[Any], Awaitable], request: type,
             response: type | None, **route) -> None:
        """Route POST `path` to `handler(req)`, the body validated as `request`, the answer as `response`.

        Task modules write `from __future__ import annotations`, and FastAPI resolves string annotations in the
        handler's module globals only, where a request model built inside a function is not: so the types are
        given here and set on the handler as real objects.
        """
        handler.__annotations__ = {"req": request, "return": dict}
        route.setdefault("responses", ERROR_RESPONSES)
        router.post(path, response_model=response, **route)(handler)

    def check_texts(self, texts: list[str], pairs: list[str] | None = None, name: str = "texts",
                    pair_name: str = "text_pairs", pairs_limited: bool = True, texts_limited: bool = True,
                    chars_scale: int = 1) -> None:
        """Refuse more texts than --max-texts, pairs that do not pair up, and texts over --max-chars (unless
        `texts_limited` is False), pairs too (unless `pairs_limited` is False): a task that reads them whole,
        however long (in windows), lifts the limit, and the body size bounds them. `chars_scale`: the limit of
        texts is that many times --max-chars (a model that reads several windows of a text: data.max_chunks).

        Raises:
            HTTPException: 413 or 422 with the field at fault.
        """
        n, limit = len(texts), self.settings.max_chars * chars_scale
        if n > self.settings.max_texts:
            raise HTTPException(413, f"got {n} {name}, at most {self.settings.max_texts} per request; split the "
                                     f"request")
        if pairs is not None and len(pairs) != n:
            raise HTTPException(422, f"got {n} {name} but {len(pairs)} {pair_name}; give one per {name.rstrip('s')}")
        checked = [(f"{name}[{i}]", t) for i, t in enumerate(texts)] if texts_limited else []
        if pairs_limited:
            checked += [(f"{pair_name}[{i}]", t) for i, t in enumerate(pairs or [])]
        for which, text in checked:
            if len(text) > limit:
                raise HTTPException(413, f"{which} has {len(text)} characters, at most {limit}; shorten it (the "
                                         f"model reads only its first tokens anyway)" if chars_scale == 1 else
                                    f"{which} has {len(text)} characters, at most {limit} ({chars_scale} x "
                                    f"--max-chars: the model reads {chars_scale} windows of a text at most); shorten "
                                    f"it or split it")

    def check_adapter(self, adapter: str | None) -> None:
        """Refuse an adapter name the server cannot serve (no registry, or not in it) with 400."""
        if adapter is None:
            return
        if self.adapters is None:
            raise HTTPException(400, f"adapter {adapter!r} asked for, but no adapter registry is loaded; "
                                     f"start the server with --adapters REGISTRY or leave out 'adapter'")
        if adapter not in self.adapters.names():
            raise HTTPException(400, f"no adapter {adapter!r} in the registry; "
                                     f"it holds: {', '.join(self.adapters.names()) or 'none'}")

    async def batched(self, texts: list, pairs: list | None, adapter: str | None) -> list:
        """The predictions for `texts` (with their `pairs`), micro-batched with other requests, in order."""
        return await self.answer(self.batcher.submit(texts, pairs, adapter))

    async def alone(self, n_texts: int, call: Callable[[], Any]) -> Any:
        """`call()` in the model thread as a model call of its own, counting `n_texts` against the queue."""
        return await self.answer(self.batcher.run_alone(n_texts, call))

    async def answer(self, result: Awaitable) -> Any:
        """Await the model's `result`, turning a full queue into 503 and bad input into 400."""
        try:
            return await result
        except QueueFull:
            raise HTTPException(503, f"the server is at its queue limit ({self.settings.max_queue} texts waiting); "
                                     f"retry shortly", headers={"Retry-After": "1"}) from None
        except TextuneError as e:
            raise HTTPException(400, str(e)) from None

    def add_chat_route(self, router: APIRouter) -> None:
        """Add POST /v1/chat/completions (OpenAI's API), answered by `predictor.chat`, for tasks that converse."""
        add_chat_route(router, self)
