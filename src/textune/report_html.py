"""The HTML pieces of `textune report`'s page: the style sheet, escaping, number formatting, summary cards,
badges, inline PNG figures and the run folder's prediction rows.

Task modules build their report sections (`Task.report_sections`) with these, and `textune.report` builds the
page around them. This module imports nothing from textune, so a task module that draws its sections never
imports the report (which imports the task registry).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib takes ~0.5 s to import; predictors import task modules that import this one
    from matplotlib.figure import Figure

CSS = """
:root { --ink:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --card:#fff; --accent:#1f77b4; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { font-size: 24px; margin: 0 0 2px; }
header .sub { color: var(--muted); font-size: 13px; word-break: break-all; }
h2 { font-size: 17px; margin: 0 0 12px; }
h3 { font-size: 14px; margin: 14px 0 8px; color: var(--muted); font-weight: 600; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 20px; margin:18px 0; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap:10px; margin-top:18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 14px; }
.card .k { color:var(--muted); font-size:12px; }
.card .v { font-size:21px; font-weight:600; font-variant-numeric: tabular-nums; }
.badge { display:inline-block; padding:2px 12px; border-radius:999px; color:#fff; font-weight:600; font-size:13px;
  letter-spacing:.02em; text-transform:uppercase; }
.grid2 { display:grid; grid-template-columns: 1fr 1fr; gap: 18px; align-items: start; }
@media (max-width: 860px) { .grid2 { grid-template-columns: 1fr; } }
img { max-width:100%; height:auto; display:block; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; text-align: right; border-bottom: 1px solid #eaeef2; vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.l, th.l { text-align: left; }
table.cm td { text-align:center; border:2px solid #fff; min-width: 78px; padding: 10px 8px; border-radius: 4px; }
table.cm td .pct { display:block; font-size:11px; opacity:.85; }
table.cm td.diag { outline: 2px solid #1f2328; outline-offset: -3px; }
table.cm th.axis { text-align:center; }
table.cm th.l { vertical-align: middle; }
ul { margin: 6px 0; padding-left: 20px; }
li { margin: 3px 0; }
.muted { color: var(--muted); }
.note { color: var(--muted); font-style: italic; }
.bar { background:#eaeef2; border-radius:4px; height:10px; min-width:120px; position:relative; }
.bar span { position:absolute; left:0; top:0; bottom:0; background:var(--accent); border-radius:4px; }
table.wrong { width: 100%; }
table.wrong td.text { text-align:left; }
table.wrong .pair { color: var(--muted); display:block; margin-top: 3px; }
.conf { font-weight: 600; color: #cf222e; }
.cfg { columns: 2 380px; column-gap: 28px; }
.cfg > div { break-inside: avoid; margin-bottom: 14px; }
.cfg h3 { margin-top: 0; }
.cfg table { width: 100%; }
.cfg td { font-size: 12.5px; }
.cfg td.v { text-align:left; word-break: break-all; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cfg td.k { text-align:left; color: var(--muted); white-space: nowrap; }
.cfg td.d { text-align:left; color: var(--muted); font-size: 11.5px; }
.cfg tr.default td { opacity: .55; }
.cfg tr.changed td.k, .cfg tr.changed td.v { font-weight: 600; color: var(--ink); }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def fmt(value, digits: int = 4) -> str:
    """A metric for a card or table cell: floats to `digits` decimals, integers with thousands separators, a dash
    for a value that is missing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return esc(value)


def clip(text, limit: int = 400) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + " …"


def figure_png(fig: Figure, dpi: int = 144) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def img_html(fig: Figure, alt: str) -> str:
    """The figure inline, as a base64 `data:` PNG: the page stays one file that makes no request."""
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def cards_html(items: list[tuple[str, str]]) -> str:
    """Summary cards from (name, HTML value) pairs; the values are HTML already (escape them with `fmt`/`esc`)."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>' for k, v in items) + "</div>"


def badge_html(text: str, color: str) -> str:
    return f'<span class="badge" style="background:{color}">{esc(text)}</span>'


def missing_html(what: str, why: str) -> str:
    """The note a section shows instead of its content where the file it reads is missing (a run still going)."""
    return f'<p class="note">No {esc(what)}: {esc(why)}.</p>'


def text_cell_html(row: dict) -> str:
    """A prediction row's text, clipped, with its pair (if any) underneath, for a `table.wrong` cell."""
    text = esc(clip(row.get("text", "")))
    if row.get("text_pair") is not None:
        text += f'<span class="pair">{esc(clip(row["text_pair"]))}</span>'
    return text


def read_predictions(path: Path) -> list[dict]:
    """The rows of a run's validation_predictions.jsonl; [] where the file is missing."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
