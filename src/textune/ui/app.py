"""The `textune ui` app: a JSON API under /api (documented at /docs) and the pages built on it.

FastAPI with server-rendered pages rather than Gradio: FastAPI is textune's server already (`textune serve`),
Gradio would add a large dependency that fetches fonts and checks for updates online unless configured
otherwise, and the API a script uses is then the very one the pages poll. Everything the pages load is in the
package (textune/ui/static/): no CDN, web font or analytics.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from textune.errors import TextuneError
from textune.serving.errors import install_error_handlers
from textune.ui import pages
from textune.ui.actions import action_states
from textune.ui.form import config_fields, read_shipped, shipped_configs, yaml_text
from textune.ui.launcher import Launcher, command_of, data_check, validate_config
from textune.ui.playground import playground_router
from textune.ui.runs import RunsFolder, UIError, run_path
from textune.ui.uploads import store_upload

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "textune_ui_token"


class LaunchRequest(BaseModel):
    config: dict = Field(description="the run's config: the YAML's mapping as JSON ({\"model\": {...}, \"data\": "
                                     "{...}, \"train\": {...}})")
    name: str | None = Field(None, description="the run folder's name under the runs folder; default: the "
                                               "config's output_dir's name, else the task and the time")


Status = Literal["running", "finished", "failed", "stopped"]


class RunRow(BaseModel):
    name: str
    task: str | None
    model: str = Field(description="model.name's last part, or the packaged MiniLM")
    method: str | None = Field(description="tuning.method")
    data: str = Field(description="data.name or data.train's file name (pretrain.corpus for pretraining)")
    metric: str | None = Field(description="the metric that selects the checkpoint (train.metric)")
    value: float | None = Field(description="its best value (finished), else its last evaluation's")
    best_step: int | None
    status: Status
    reason: str | None = Field(description="why a run launched here failed or stopped: its log's last line")
    duration_s: float
    date: str = Field(description="when it started (config.yaml written), ISO 8601, UTC")
    step: int | None = Field(description="steps trained (finished), else the last logged step")


class RunList(BaseModel):
    root: str
    runs: list[RunRow]


class Progress(BaseModel):
    step: int
    epoch: float | None
    fraction: float = Field(description="share of the planned epochs (or train.max_steps) done")
    eta_s: float | None = Field(description="seconds left at the pace so far, while it runs")


class ActionState(BaseModel):
    status: Literal["running", "finished", "failed"]
    line: str | None = Field(description="the last line of its output (textune's error, when it failed)")
    command: str = Field(description="the command it runs (`textune export RUN`), as you would type it")


class RunDetail(BaseModel):
    name: str
    status: Status
    reason: str | None
    config: dict
    metrics: dict | None = Field(description="RUN/metrics.json, once the run has finished")
    data_stats: dict | None
    history: list[dict] = Field(description="RUN/history.jsonl's records from `since` on")
    since: int
    next: int = Field(description="the `since` that fetches only newer records")
    report: bool = Field(description="RUN/report.html exists")
    resumable: bool = Field(description="a checkpoint to resume from exists")
    progress: Progress
    actions: dict[str, ActionState | None] = Field(description="export, merge, push: the last one launched from the "
                                                               "UI (None: never)")


class ExportRequest(BaseModel):
    quantize: Literal["int8"] | None = Field(None, description="int8: dynamic quantisation of the weights")
    overwrite: bool = Field(False, description="replace an existing RUN/onnx folder")


class MergeRequest(BaseModel):
    overwrite: bool = Field(False, description="replace an existing RUN/merged folder")


class PushRequest(BaseModel):
    repo: str = Field(description="the Hub model repository, USER/NAME, created if missing")
    token_env: str = Field("HF_TOKEN", description="the environment variable of the `textune ui` process that "
                                                   "holds the Hub token; the token itself is never sent, stored "
                                                   "or logged")
    private: bool = Field(False, description="create the repository private")


class ActionStarted(BaseModel):
    name: str
    action: str
    status: str


class RunState(BaseModel):
    name: str
    status: str = Field(description="running, stopping, finished, failed or stopped")


class CheckRequest(BaseModel):
    config: dict
    name: str | None = None
    base: str | None = Field(None, description="the shipped config the form started from, for the command shown")


def create_ui_app(runs_dir: str | Path, token: str | None = None) -> FastAPI:
    """The app showing the runs under `runs_dir`; with `token`, every request needs it (header
    `Authorization: Bearer <token>`, or the cookie set by opening any page once with `?token=<token>`)."""
    runs = RunsFolder(runs_dir)
    launcher = Launcher(runs)
    app = FastAPI(title="textune ui", version="1",
                  description=f"Launch, watch and compare the textune runs in `{runs.root}`. Errors: "
                              f"`{{\"error\": {{\"status\": ..., \"message\": ...}}}}` (a config error adds "
                              f"`problems`: [{{key, message}}]).")
    install_error_handlers(app)

    @app.exception_handler(UIError)
    async def ui_error(request: Request, exc: UIError) -> JSONResponse:
        body = {"status": exc.status, "message": str(exc)}
        if getattr(exc, "problems", None):
            body["problems"] = exc.problems
        return JSONResponse({"error": body}, status_code=exc.status)

    @app.exception_handler(TextuneError)
    async def textune_error(request: Request, exc: TextuneError) -> JSONResponse:
        return JSONResponse({"error": {"status": 400, "message": str(exc)}}, status_code=400)

    if token is not None:
        add_token_check(app, token)
    app.state.runs, app.state.launcher = runs, launcher
    app.include_router(api_router(runs, launcher))
    app.include_router(playground_router(runs))
    app.include_router(pages.router(runs))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def add_token_check(app: FastAPI, token: str) -> None:
    """Every request needs the token, as `textune serve --token-env` asks it: a browser cannot send a header
    when it follows a link, so a page opened once with ?token= sets a same-site cookie holding it."""

    def matches(value: str | None) -> bool:
        return value is not None and secrets.compare_digest(value.encode(), token.encode())

    @app.middleware("http")
    async def check(request: Request, call_next):
        header = request.headers.get("authorization", "")
        given = request.query_params.get("token")
        if matches(header.removeprefix("Bearer ").strip() or None) or matches(request.cookies.get(TOKEN_COOKIE)):
            return await call_next(request)
        if matches(given):
            response = await call_next(request)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        return JSONResponse({"error": {"status": 401, "message": "missing or wrong token: open the page with "
                                                                 "?token=<token> or send 'Authorization: Bearer "
                                                                 "<token>'"}},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})


def api_router(runs: RunsFolder, launcher: Launcher) -> APIRouter:
    """The JSON API: runs (list, one, launch, stop, resume, diagnosis) and the config form's helpers."""
    api = APIRouter(prefix="/api", tags=["runs"])

    @api.get("/runs", response_model=RunList)
    def list_runs() -> dict:
        """Every run in the runs folder, one row each: task, model, method, data, headline metric (`metric`,
        `value`), best step, status, duration, date."""
        launcher.reap()
        return {"root": str(runs.root), "runs": runs.summaries()}

    @api.get("/runs/{name}", response_model=RunDetail)
    def get_run(name: str, since: int = Query(0, ge=0, description="history records to skip (a poller's "
                                                                   "`next`)")) -> dict:
        """A run's status, config, metrics, data statistics, history records (from `since` on) and progress."""
        launcher.reap()
        return {**runs.detail(name, since), "actions": action_states(runs.root, name)}

    @api.post("/runs", status_code=201, response_model=RunState)
    def launch(request: LaunchRequest) -> dict:
        """Validate the config as `textune train` does and launch it in its own process into RUNS/NAME.
        422: invalid config (`problems` names each key); 409: the run folder exists."""
        return launcher.launch(request.config, request.name)

    @api.post("/runs/{name}/stop", status_code=202, response_model=RunState)
    def stop(name: str) -> dict:
        """Stop a running run as Ctrl-C does (it writes a checkpoint); 409 if it is not running."""
        return launcher.stop(name)

    @api.post("/runs/{name}/resume", status_code=202, response_model=RunState)
    def resume(name: str) -> dict:
        """Resume a stopped run from its newest checkpoint; 409 if it runs or has no checkpoint."""
        return launcher.resume(name)

    api.include_router(actions_router(runs, launcher))

    @api.get("/runs/{name}/diagnosis")
    def diagnosis(name: str) -> dict:
        """The run's diagnosis (`textune diagnose`): verdict, evidence, what to try."""
        from textune.diagnose import diagnose_run

        path = run_path(runs.root, name)
        if not (path / "history.jsonl").is_file():
            raise UIError(409, f"run {name} has no history yet: it has not logged a step")
        return diagnose_run(path).to_dict()

    api.include_router(config_router(runs))
    return api


def actions_router(runs: RunsFolder, launcher: Launcher) -> APIRouter:
    """A finished run's actions, each the CLI command in its own process; GET /api/runs/{name} shows their
    `actions` (status, last line). 409 while the run trains, has no model, or the action runs already; 400 where
    the action does not apply to the run."""
    api = APIRouter(tags=["run actions"])

    @api.post("/runs/{name}/export", status_code=202, response_model=ActionStarted)
    def export(name: str, request: ExportRequest | None = None) -> dict:
        """`textune export RUN` (ONNX, checked against PyTorch) into RUN/onnx; 400 for a task with no export."""
        return launcher.act(name, "export", (request or ExportRequest()).model_dump())

    @api.post("/runs/{name}/merge", status_code=202, response_model=ActionStarted)
    def merge(name: str, request: MergeRequest | None = None) -> dict:
        """`textune merge RUN`: the adapter folded into its base, in RUN/merged; 400 for a full-model run."""
        return launcher.act(name, "merge", (request or MergeRequest()).model_dump())

    @api.post("/runs/{name}/push", status_code=202, response_model=ActionStarted)
    def push(name: str, request: PushRequest) -> dict:
        """`textune push RUN --repo USER/NAME` with the token of the environment variable `token_env` (of the
        `textune ui` process, handed to the push's process only); 400 if that variable is not set."""
        return launcher.act(name, "push", request.model_dump())

    @api.get("/runs/{name}/worst")
    def worst(name: str) -> dict:
        """The validation predictions the model got most wrong, as the run's report shows them: {html} (empty
        where the report has no such section: a run without validation predictions, or a task whose report has
        none)."""
        return {"html": pages.worst_section(runs, name)}

    return api


def config_router(runs: RunsFolder) -> APIRouter:
    """What the new-run form reads: the config's keys, the shipped configs, a config's check, its data's check."""
    api = APIRouter(tags=["new run"])

    @api.get("/config/fields")
    def fields() -> dict:
        """Every config key by section, with its kind, default, choices and help text (textune's typed config)."""
        return {"sections": config_fields()}

    @api.get("/configs")
    def configs() -> dict:
        """The shipped configs (configs/*.yaml) to start from."""
        return {"configs": sorted(shipped_configs())}

    @api.get("/configs/{file}")
    def shipped(file: str) -> dict:
        config = read_shipped(file)
        if config is None:
            raise UIError(404, f"no shipped config {file!r}; GET /api/configs lists them")
        return {"name": file, "config": config}

    @api.post("/config/check")
    def check(request: CheckRequest) -> dict:
        """Validate a config as `textune train` does: {ok, problems: [{key, message}], yaml, command}."""
        problems: list[dict] = []
        try:
            validate_config(request.config)
        except UIError as e:
            problems = getattr(e, "problems", None) or [{"key": None, "message": str(e)}]
        name = request.name or "run"
        return {"ok": not problems, "problems": problems, "yaml": yaml_text(request.config),
                "command": f"textune {command_of(request.config)} {name}.yaml  "
                           f"# the YAML above, saved as {name}.yaml"}

    @api.post("/validate-data")
    def validate_data(config: dict = Body(..., embed=True)) -> dict:
        """`textune validate-data` on a config's data: {ok, report (its text), findings (warnings found), message
        (why it fails; a launch of it is refused with this message)}."""
        return data_check(validate_config(config))

    @api.post("/uploads", status_code=201)
    async def upload(request: Request, filename: str = Query(..., description="the file's name: its extension "
                                                                              "says its format (.csv, .jsonl, ...)")
                     ) -> dict:
        """A data file, sent as the raw request body (no multipart form: python-multipart is not a textune
        dependency), stored as RUNS/.textune-ui/uploads/NAME; answers {path, bytes} to put in data.train (or
        data.validation, data.test). 413 over the size limit, 400 a name that is not a data file's."""
        return await store_upload(runs.root, filename, request)

    return api
