"""The playground: try a run's model (or any model folder) on text typed in the page.

What the page asks for and how it shows an answer come from the model's task (`Task.playground`, a
`tasks.base.PlaygroundSpec`; `Task.playground_predict` runs it), so the UI names no task. Loading a model
takes seconds, so the last few loaded predictors are kept.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from textune.errors import TextuneError
from textune.ui.runs import RunsFolder, UIError, run_path

KEEP_LOADED = 2


class PlaygroundRequest(BaseModel):
    run: str | None = Field(None, description="a run in the runs folder")
    model: str | None = Field(None, description="or a model folder's path")
    fields: dict[str, str] = Field(description="the text boxes by name (GET /api/playground lists them)")


class ChatRequest(BaseModel):
    run: str | None = None
    model: str | None = None
    system: str | None = Field(None, description="the system prompt, before the conversation")
    messages: list[dict[str, str]] = Field(description="the conversation so far, ending with the user's turn: "
                                                       "[{\"role\": \"user\", \"content\": ...}, ...]")
    max_new_tokens: int = Field(256, ge=1, le=2048)


class Playground:
    def __init__(self, runs: RunsFolder):
        self.runs = runs
        self.loaded: OrderedDict[Path, object] = OrderedDict()
        self.lock = threading.Lock()  # one model call at a time: predictors are not thread-safe

    def target(self, run: str | None, model: str | None) -> Path:
        """The folder to load: a run under the runs folder (by name only), or a model folder's path."""
        if (run is None) == (model is None):
            raise UIError(400, "give either run (a run's name) or model (a model folder's path)")
        if run is not None:
            path = run_path(self.runs.root, run)
            if not (path / "model").is_dir():
                raise UIError(409, f"run {run} has no model yet: it saves one at its first evaluation")
            return path
        path = Path(model).expanduser().resolve()
        if not path.is_dir():
            raise UIError(404, f"model: {model} is not a folder; give a model or run folder")
        return path

    def describe(self, path: Path) -> dict:
        from textune.tasks import get_task, task_of

        task = get_task(task_of(path))
        spec = task.playground
        if spec is None:
            return {"task": task.name, "inputs": [], "render": None,
                    "message": f"the {task.name} task describes no playground (Task.playground)"}
        return {"task": task.name, "render": spec.render, "chat": spec.chat,
                "inputs": [{"name": n, "label": label, "optional": optional} for n, label, optional in spec.inputs]}

    def predict(self, path: Path, fields: dict[str, str]) -> dict:
        from textune.tasks import get_task, task_of

        task = get_task(task_of(path))
        if task.playground is None:
            raise UIError(409, f"the {task.name} task describes no playground (Task.playground)")
        with self.lock:
            task, predictor = self.loaded_predictor(path)
            try:
                row = task.playground_predict(predictor, fields)
            except TextuneError as e:
                raise UIError(400, str(e)) from None
        return {"task": task.name, "render": task.playground.render, "row": row}


    def loaded_predictor(self, path: Path):
        """The task and predictor of `path`, loaded once and kept (call with `self.lock` held)."""
        from textune.tasks import get_task, task_of

        task = get_task(task_of(path))
        predictor = self.loaded.pop(path, None) or task.load_predictor(path, batch_size=8)
        self.loaded[path] = predictor
        while len(self.loaded) > KEEP_LOADED:
            self.loaded.popitem(last=False)
        return task, predictor

    def chat(self, path: Path, request: ChatRequest):
        """The answer to the conversation, piece by piece as the model writes it (a generator of text). Generation
        runs in a thread of its own and stops when the client goes away (the generator is closed)."""
        with self.lock:
            task, predictor = self.loaded_predictor(path)
        if task.playground is None or not task.playground.chat or not getattr(predictor.tokenizer, "chat_template",
                                                                                None):
            raise UIError(409, f"{path.name} cannot chat: its task ({task.name}) or its tokenizer has no chat "
                               f"template; use the boxes above")
        system = [{"role": "system", "content": request.system}] if (request.system or "").strip() else []
        pieces: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def generate() -> None:
            try:
                with self.lock:
                    predictor.chat(system + request.messages, max_new_tokens=request.max_new_tokens,
                                   on_text=pieces.put, cancel=cancel)
            except TextuneError as e:
                pieces.put(f"\n[{e}]")
            finally:
                pieces.put(None)

        threading.Thread(target=generate, daemon=True).start()

        def stream():
            try:
                while (piece := pieces.get()) is not None:
                    yield piece
            finally:
                cancel.set()
        return stream()


def playground_router(runs: RunsFolder) -> APIRouter:
    playground = Playground(runs)
    api = APIRouter(prefix="/api", tags=["playground"])

    @api.get("/playground")
    def describe(run: str | None = Query(None), model: str | None = Query(None)) -> dict:
        """The model's task, the text boxes its playground shows and how it renders an answer."""
        return playground.describe(playground.target(run, model))

    @api.post("/playground")
    def predict(request: PlaygroundRequest) -> dict:
        """The model's prediction for the text boxes: {task, render, row} (row: as `textune predict` writes)."""
        return playground.predict(playground.target(request.run, request.model), request.fields)

    @api.post("/playground/chat")
    def chat(request: ChatRequest) -> StreamingResponse:
        """A chat model's answer to the conversation, streamed as plain text while it is written."""
        pieces = playground.chat(playground.target(request.run, request.model), request)
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    return api
