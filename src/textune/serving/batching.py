"""Micro-batching, limits and metrics of one server.

Requests that arrive together are merged into one model call (up to `max_batch_size` texts, waiting at most
`max_wait_ms` for company), which runs in one worker thread so the event loop keeps accepting requests; each
caller gets its own results, in its input order. A bound on texts waiting (`max_queue`) turns requests away
(503) instead of queueing without end. Requests that carry settings of their own (fill-mask, generation, chat)
are model calls of their own in the same thread, under the same bound.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from textune.errors import TextuneError


@dataclass
class ServeSettings:
    """Batching and limits of one server (the `textune serve` flags of the same names)."""

    max_batch_size: int = 32  # texts per model call
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text (a task exempts what it reads whole: QA contexts, NER texts)
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


class QueueFull(Exception):
    """Accepting a request would pass `max_queue` texts waiting: the caller answers 503."""


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

