"""The UI's pages, server-rendered: the runs table, a run, compare, new run, and the playground.

The pages are f-strings with `html.escape` (`report_html.esc`), as the report is: a few small pages do not need a
template engine. The table rows and config tables are rendered here, so a page shows its content on first paint;
static/ui.js adds what needs the browser (sorting and filtering the table, the live curves, the form's checks),
reading the JSON API. Curves are drawn by uPlot (static/uPlot.*, MIT, vendored from npm `uplot` 1.6.32): 50 KB,
no dependencies, draws thousands of points per series on a canvas, and overlays runs logged at different steps
(`uPlot.join`), which hand-written SVG would have to re-implement.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, HTMLResponse

from textune.errors import TextuneError
from textune.report_html import esc
from textune.ui.actions import ACTIONS, refusal
from textune.ui.form import shipped_configs
from textune.ui.launcher import flatten
from textune.ui.runs import RunsFolder, UIError, run_path

WORST_SECTION = re.compile(r'<section id="errors">.*?</section>', re.DOTALL)
COLUMNS = (("name", "run"), ("task", "task"), ("model", "model"), ("method", "method"), ("data", "data"),
           ("value", "metric"), ("best_step", "best step"), ("status", "status"), ("duration_s", "duration"),
           ("date", "date"))


def layout(title: str, body: str, page: str, data: dict | None = None, charts: bool = False) -> HTMLResponse:
    """A page: the nav bar, `body`, and the page's data for static/ui.js as JSON (escaped for a script tag);
    uPlot only where the page draws curves. Scripts are deferred: the page paints before they run."""
    payload = json.dumps(data or {}).replace("<", "\\u003c")
    uplot = ('<link rel="stylesheet" href="/static/uPlot.min.css"><script defer src="/static/uPlot.iife.min.js">'
             '</script>') if charts else ""
    return HTMLResponse(f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)} - textune</title>
{uplot}<link rel="stylesheet" href="/static/ui.css"><script defer src="/static/ui.js"></script></head>
<body data-page="{page}"><nav><a class="brand" href="/">textune</a><a href="/">Runs</a><a href="/new">New run</a>
<a href="/playground">Playground</a><a href="/docs">API</a></nav><main>{body}</main>
<script id="page-data" type="application/json">{payload}</script></body></html>""")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def fmt_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def runs_table(rows: list[dict]) -> str:
    """The runs table; each cell carries its raw value (data-v) for sorting in the browser."""
    head = "".join(f'<th data-key="{key}">{esc(label)}</th>' for key, label in COLUMNS)
    body = []
    for r in rows:
        cells = {"name": f'<a href="/runs/{esc(r["name"])}">{esc(r["name"])}</a>',
                 "value": f'{esc(r["metric"] or "")} {fmt_value(r["value"])}',
                 "status": f'<span class="status {esc(r["status"])}" title="{esc(r["reason"] or "")}">'
                           f'{esc(r["status"])}</span>',
                 "duration_s": fmt_duration(r["duration_s"]), "date": esc(r["date"].replace("T", " ")[:16])}
        tds = "".join(f'<td data-v="{esc(fmt_value(r[key]))}">{cells.get(key, esc(fmt_value(r[key])))}</td>'
                      for key, _ in COLUMNS)
        body.append(f'<tr><td><input type="checkbox" name="run" value="{esc(r["name"])}"></td>{tds}</tr>')
    return (f'<table id="runs" class="runs"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def config_table(configs: dict[str, dict]) -> str:
    """Configs side by side, one column per run, a row per key; rows whose values differ are marked."""
    flat = {name: flatten(config) for name, config in configs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    head = "".join(f"<th>{esc(name)}</th>" for name in flat)
    rows = []
    for key in keys:
        values = [json.dumps(f.get(key)) for f in flat.values()]
        differ = len(set(values)) > 1
        cells = "".join(f"<td>{esc(v)}</td>" for v in values)
        rows.append(f'<tr class="{"diff" if differ else "same"}"><th class="key">{esc(key)}</th>{cells}</tr>')
    return (f'<label><input type="checkbox" id="only-diff" checked> differences only</label>'
            f'<table class="config diffs"><thead><tr><th>key</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def fresh_report(runs: RunsFolder, name: str) -> Path:
    """RUN/report.html, written (`textune report`) when missing or older than the run's metrics."""
    path = run_path(runs.root, name)
    report, metrics = path / "report.html", path / "metrics.json"
    if not (path / "history.jsonl").is_file():
        raise UIError(409, f"run {name} has no history yet, so no report")
    if not report.is_file() or (metrics.is_file() and metrics.stat().st_mtime > report.stat().st_mtime):
        from textune.report import write_report

        write_report(path)
    return report


def report_file(runs: RunsFolder, name: str) -> FileResponse:
    return FileResponse(fresh_report(runs, name), media_type="text/html")


def worst_section(runs: RunsFolder, name: str) -> str:
    """The report's section of the validation predictions the model got most wrong (each task's report writes
    it as <section id="errors">, picked by the task's own code): shown as the report shows it, not picked a
    second time here. Empty where the report has none."""
    found = WORST_SECTION.search(fresh_report(runs, name).read_text(encoding="utf-8"))
    return found.group(0) if found else ""


def runs_page(runs: RunsFolder) -> HTMLResponse:
    rows = runs.summaries()
    body = (f'<h1>Runs <small>{esc(str(runs.root))}</small></h1><div class="toolbar">'
            f'<input id="filter" type="search" placeholder="filter: any text of a row">'
            f'<button id="compare" disabled>Compare selected</button> <a href="/new">New run</a></div>'
            + (runs_table(rows) if rows else '<p class="empty">No runs yet. <a href="/new">Launch one</a>, or run '
               '<code>textune train CONFIG</code> with output_dir in this folder.</p>'))
    return layout("Runs", body, "runs")


def run_page(runs: RunsFolder, name: str) -> HTMLResponse:
    path = run_path(runs.root, name)
    body = (f'<h1>{esc(name)} <span id="status" class="status"></span></h1><p id="reason" class="reason"></p>'
            f'<div class="toolbar"><button id="stop">Stop</button><button id="resume">Resume</button>'
            f'<a id="report" href="/runs/{esc(name)}/report">Report</a>'
            f'<a href="/playground?run={esc(name)}">Playground</a>'
            f'<label>x axis <select id="xaxis"><option>step</option><option>epoch</option></select></label></div>'
            f'<div class="progress"><div id="bar"></div></div><p id="progress-text"></p>'
            f'<div class="charts"><div id="loss-chart"></div><div id="metric-chart"></div></div>'
            f'<div class="grid2"><section><h2>Metrics</h2><div id="metrics"></div></section>'
            f'<section><h2>Diagnosis</h2><div id="diagnosis"></div></section></div>'
            f'{actions_html()}<section><h2>Worst predictions</h2><div id="worst" class="report-section">'
            f'</div></section><section><h2>Config</h2><pre id="config"></pre></section>')
    return layout(name, body, "run", {"name": name, "not_applicable": not_applicable(runs, name, path)},
                  charts=True)


def actions_html() -> str:
    """Export, merge and push buttons, each with its last launch's status and output line (static/ui.js)."""
    rows = "".join(f'<tr data-action="{a}"><td><button class="action" data-action="{a}">{label}</button></td>'
                   f'<td class="action-status"></td><td class="action-line"></td></tr>'
                   for a, label in (("export", "Export to ONNX"), ("merge", "Merge the adapter"), ("push", "Push")))
    return (f'<section><h2>Actions</h2><div class="toolbar"><label>push to <input id="push-repo" '
            f'placeholder="USER/NAME"></label><label>token from the variable <input id="push-token-env" '
            f'value="HF_TOKEN" size="12"></label><label><input type="checkbox" id="push-private"> private</label>'
            f'<label><input type="checkbox" id="action-overwrite"> export and merge replace an earlier '
            f'folder</label></div><table class="actions">{rows}</table></section>')


def not_applicable(runs: RunsFolder, name: str, path: Path) -> dict[str, str]:
    """{action: why} for the actions that can never apply to this run (a full model's merge, an export of a
    task without one): their buttons stay disabled with the reason as their title."""
    if not (path / "model").is_dir():
        return {}
    out = {}
    for action in ACTIONS:
        try:
            refused = refusal(runs.root, name, action)
        except TextuneError as e:  # a config naming no known task: the page still shows the run
            refused = UIError(400, str(e))
        if refused is not None and refused.status == 400:
            out[action] = str(refused)
    return out


def compare_page(runs: RunsFolder, names: list[str]) -> HTMLResponse:
    if len(names) < 2:
        raise UIError(400, "compare needs two or more runs: /compare?run=A&run=B")
    configs = {name: runs.detail(name)["config"] for name in names}
    body = (f'<h1>Compare {esc(", ".join(names))}</h1><div class="toolbar"><label>x axis <select id="xaxis">'
            f'<option>step</option><option>epoch</option></select></label></div>'
            f'<div class="charts"><div id="loss-chart"></div><div id="metric-chart"></div></div>'
            f'<section><h2>Configs</h2>{config_table(configs)}</section>')
    return layout("Compare", body, "compare", {"runs": names}, charts=True)


def new_page(runs: RunsFolder, base: str | None) -> HTMLResponse:
    """The form; it starts from the defaults, a shipped config or a run's config (`base`: a file name, or
    run:NAME)."""
    options = "".join(f'<option{" selected" if n == base else ""}>{esc(n)}</option>' for n in shipped_configs())
    copies = "".join(f'<option value="run:{esc(n)}"{" selected" if f"run:{n}" == base else ""}>{esc(n)}</option>'
                     for n in runs.names())
    body = (f'<h1>New run</h1><div class="toolbar"><label>start from <select id="base"><option value="">'
            f'defaults</option><optgroup label="shipped configs">{options}</optgroup><optgroup label="a run\'s '
            f'config">{copies}</optgroup></select></label><label>run name <input id="name" required '
            f'pattern="[A-Za-z0-9][A-Za-z0-9._-]*"></label></div><p class="hint">Every key of textune\'s config '
            f'with its default; only the values you change go into the YAML. Paths are read from '
            f'the directory textune ui runs in.</p><div id="problems" class="problems"></div>'
            f'<form id="config-form"></form><section><h2>YAML</h2><pre id="yaml"></pre><h2>Command</h2>'
            f'<pre id="command"></pre></section><div class="toolbar"><label>upload a data file as <select '
            f'id="upload-key"><option>data.train</option><option>data.validation</option><option>data.test'
            f'</option></select> <input type="file" id="upload"></label><span id="upload-status" class="hint">'
            f'</span></div><div class="toolbar"><button id="validate-data" type="button">Check the data</button>'
            f'<button id="launch" type="button">Launch</button></div><pre id="data-report"></pre>')
    return layout("New run", body, "new", {"base": base})


def playground_page(runs: RunsFolder, run: str | None, model: str | None) -> HTMLResponse:
    choices = [r for r in runs.summaries() if (runs.root / r["name"] / "model").is_dir()]
    options = "".join(f'<option{" selected" if r["name"] == run else ""}>{esc(r["name"])}</option>'
                      for r in choices)
    body = (f'<h1>Playground</h1><div class="toolbar"><label>run <select id="run"><option value="">'
            f'</option>{options}</select></label><label>or model folder <input id="model" size="40" '
            f'value="{esc(model or "")}"></label></div><p id="about" class="hint"></p>'
            f'<div class="playground"><div id="inputs"></div><div class="toolbar"><button id="predict">'
            f'Predict</button></div><div id="output"></div></div>')
    return layout("Playground", body, "playground", {"run": run, "model": model})


def router(runs: RunsFolder) -> APIRouter:
    """The pages: runs table, a run, its report, compare, new run, playground."""
    pages = APIRouter(include_in_schema=False)
    pages.get("/")(lambda: runs_page(runs))
    pages.get("/runs/{name}")(lambda name: run_page(runs, name))
    pages.get("/runs/{name}/report")(lambda name: report_file(runs, name))

    @pages.get("/compare")
    def compare(run: list[str] = Query(default=[])) -> HTMLResponse:
        return compare_page(runs, run)

    @pages.get("/new")
    def new(base: str | None = None) -> HTMLResponse:
        return new_page(runs, base)

    @pages.get("/playground")
    def playground(run: str | None = None, model: str | None = None) -> HTMLResponse:
        return playground_page(runs, run, model)

    return pages
