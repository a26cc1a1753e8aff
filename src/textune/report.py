"""`textune report RUN`: one self-contained HTML page about a run, written to RUN/report.html.

Everything is inline (CSS in a <style> block, figures as base64 `data:` PNGs, no script, no web font), so
the file opens offline, survives being mailed or attached to a ticket, and makes no network request.
Sections: summary, diagnosis, zero-shot baselines (where the task measured any at start-up), learning curves (the metric chart shows the task's headline metric), the task's
own sections (`Task.report_sections`; for a classifier: final metrics with the confusion matrix as a heat map,
calibration, the most confidently wrong validation examples; for a token classifier: per-type F1, type
confusions, the worst sentences with spans marked), data statistics and the config. A section whose input file
is missing (a run still going) says so instead of failing. The HTML helpers (`esc`, `fmt`, `cards_html`, ...)
are in `textune.report_html`, which task modules build their sections with.

The page is built with f-strings and `html.escape`: a dozen small sections do not need a template engine
(jinja2 is not a textune dependency).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import yaml

from textune.config import key_tasks, task_defaults
from textune.curves import headline_metrics, loss_figure, lr_figure, metrics_figure
from textune.diagnose import Diagnosis, diagnose_curves, load_history, selection_from_config
from textune.errors import TextuneError, is_onnx_export, onnx_export_error
from textune.report_html import CSS, badge_html, cards_html, esc, fmt, img_html, missing_html
from textune.tasks import get_task, task_of

# Mean token lengths of training and validation differing by more than this factor hint that the two
# splits are different kinds of text (e.g. phrases vs whole sentences), which metrics alone do not show.
LENGTH_MISMATCH = 1.5
VERDICT_COLORS = {"healthy": "#1a7f37", "overfitting": "#bc4c00", "underfitting": "#9a6700",
                  "unstable": "#cf222e", "diverged": "#a40e26", "inconclusive": "#57606a"}


# ---------------------------------------------------------------- reading the run folder


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ---------------------------------------------------------------- HTML pieces


def _diagnosis_html(d: Diagnosis) -> str:
    color = VERDICT_COLORS.get(d.verdict, "#57606a")
    out = [f'<section id="diagnosis"><h2>Diagnosis {badge_html(d.verdict, color)}</h2>']
    out += [f'<p class="note"><b>Warning:</b> {esc(w)}</p>' for w in d.warnings]
    out.append("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in d.evidence) + "</ul>")
    if d.remedies:
        out.append("<h3>What to try</h3><ul>" + "".join(f"<li>{esc(r)}</li>" for r in d.remedies) + "</ul>")
    out.append("</section>")
    return "".join(out)


def _baselines_html(baselines: dict | None, metrics: dict | None) -> str:
    """The zero-shot baselines measured at start-up beside the run's final validation figures; empty where the
    task has none."""
    if not baselines:
        return ""
    final = (metrics or {}).get("validation") or {}
    out = ['<section id="baselines"><h2>Zero-shot baselines</h2><p class="muted">What a rule that needs no '
           "training scores on the same validation rows, measured when the run started: the fine-tuned model "
           'should beat each.</p><table><tr><th class="l">baseline</th><th class="l">rule</th><th class="l">metric'
           "</th><th>baseline</th><th>this run</th></tr>"]
    for name, b in baselines.items():
        if b.get("skipped"):
            out.append(f'<tr><td class="l">{esc(name)}</td><td class="l">{esc(b.get("rule", ""))}</td>'
                       f'<td class="l" colspan="3">not measured: {esc(b["skipped"])}</td></tr>')
            continue
        for i, (metric, value) in enumerate(b["metrics"].items()):
            head = (f'<td class="l">{esc(name)}</td><td class="l">{esc(b["rule"])}</td>' if i == 0
                    else '<td class="l"></td><td class="l"></td>')
            out.append(f'<tr>{head}<td class="l">{esc(metric)}</td><td>{fmt(value)}</td>'
                       f"<td>{fmt(final.get(metric))}</td></tr>")
    return "".join(out) + "</table></section>"


def _label_balance_html(label_counts: dict[str, dict[str, int]]) -> str:
    """Examples per label of each split, with their share as a bar."""
    out = ['<div><h3>Label balance</h3><table><tr><th class="l">split</th>'
           '<th class="l">label</th><th>examples</th><th>share</th><th class="l"></th></tr>']
    for split, counts in label_counts.items():
        total = sum(counts.values()) or 1
        for i, (name, n) in enumerate(counts.items()):
            out.append(f'<tr><td class="l">{esc(split) if i == 0 else ""}</td><td class="l">{esc(name)}</td>'
                       f"<td>{n:,}</td><td>{n / total:.1%}</td>"
                       f'<td class="l"><div class="bar"><span style="width:{100 * n / total:.1f}%"></span></div></td></tr>')
    return "".join(out) + "</table></div>"


def _data_html(stats: dict | None) -> str:
    out = ['<section id="data"><h2>Data</h2>']
    if stats is None:
        out.append(missing_html("data statistics", "data_stats.json is missing") + "</section>")
        return "".join(out)
    sizes = stats.get("sizes", {})
    out.append(cards_html([(f"{split} examples", fmt(n)) for split, n in sizes.items()]))
    out.append('<div class="grid2">')
    # Only a task with one label per example writes label_counts; the others show their own balance in their
    # section (token classification: entities per type), so no empty table here.
    if stats.get("label_counts"):
        out.append(_label_balance_html(stats["label_counts"]))
    max_length = stats.get("max_length")
    out.append(f"<div><h3>Token lengths (before truncation at {fmt(max_length)})</h3><table>"
               '<tr><th class="l">split</th><th>mean</th><th>p95</th><th>max</th><th>truncated</th></tr>')
    for split, s in (stats.get("token_lengths") or {}).items():
        out.append(f'<tr><td class="l">{esc(split)}</td><td>{s["mean"]}</td><td>{s["p95"]}</td><td>{s["max"]}</td>'
                   f'<td>{s["truncated_share"]:.1%}</td></tr>')
    out.append("</table>")
    lengths = stats.get("token_lengths") or {}
    if "train" in lengths and "validation" in lengths:
        a, b = lengths["train"]["mean"], lengths["validation"]["mean"]
        if max(a, b) > LENGTH_MISMATCH * min(a, b):
            out.append(f'<p class="note">Training and validation texts differ in length (mean {a} vs {b} tokens): '
                       "check that they come from the same kind of text.</p>")
    truncated = max((s.get("truncated_share", 0) for s in (stats.get("token_lengths") or {}).values()), default=0)
    long_text = (stats.get("long_text") or {}).get("mode")
    if truncated > 0.05 and long_text:  # data.long_text head_tail or chunks: the ends are read, say how
        out.append(f'<p class="note">{truncated:.0%} of some split is longer than model.max_length {max_length}: '
                   + ("each keeps its first and last tokens (data.long_text head_tail)." if long_text == "head_tail"
                      else "each is read in windows whose logits are pooled (data.long_text chunks).") + "</p>")
    elif truncated > 0.05:
        out.append(f'<p class="note">{truncated:.0%} of some split is cut at model.max_length {max_length}: '
                   "the model never sees the end of those texts.</p>")
    out.append("</div></div></section>")
    return "".join(out)


def _yaml_value(value) -> str:
    """A config value as the user would write it in YAML (true, 5e-05, [a, b]); empty as a dash."""
    if value is None:
        return "—"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _config_html(config: dict | None, task: str) -> str:
    """The run's config, section by section: only the keys `task` reads (config.key_tasks), values changed from
    the defaults of a run of the task in bold with the default beside them, defaults dimmed."""
    out = ['<section id="config"><h2>Config</h2>']
    if config is None:
        out.append(missing_html("config", "config.yaml is missing") + "</section>")
        return "".join(out)
    defaults = task_defaults(task)
    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    sections = {"run": ("", top), **{k: (f"{k}.", v) for k, v in config.items() if isinstance(v, dict)}}
    out.append(f'<p class="note">The keys a {esc(task)} run reads; <b>changed</b> from the defaults in bold, with the '
               f"default beside them; defaults dimmed.</p>")
    out.append('<div class="cfg">')
    for name, (prefix, values) in sections.items():
        rows = []
        for key, value in values.items():
            tasks = key_tasks(prefix + key)
            if tasks and task not in tasks:
                continue
            default = (defaults.get(name) or {}).get(key, value) if prefix else defaults.get(key, value)
            cells = (f'<td class="k">{esc(key)}</td><td class="v">{esc(_yaml_value(value))}</td>'
                     f'<td class="d">{"" if value == default else "default " + esc(_yaml_value(default))}</td>')
            rows.append(f'<tr class="{"changed" if value != default else "default"}">{cells}</tr>')
        if rows:
            out.append(f"<div><h3>{esc(name)}</h3><table>{''.join(rows)}</table></div>")
    out.append("</div></section>")
    return "".join(out)


# ---------------------------------------------------------------- the page


def _curves_html(name: str, records: list[dict], best_step: int | None, task: str, metric: str | None) -> str:
    """Loss (with the diagnosis's best step marked), the task's headline metrics and the learning rate."""
    out = ['<section id="curves"><h2>Learning curves</h2>']
    if not records:
        return "".join(out) + missing_html("curves", "history.jsonl is empty") + "</section>"
    runs = {name: records}
    losses = loss_figure(runs)
    if best_step is not None:
        ax = losses.axes[0]
        ax.axvline(best_step, color="#888", linestyle=":", linewidth=1.5, label="lowest validation loss")
        ax.legend(fontsize=8, frameon=False)
    out.append(img_html(losses, "training and validation loss"))
    shown = {name: headline_metrics(records, task, metric)}
    out.append('<div class="grid2"><div>' + img_html(metrics_figure(runs, shown), "validation metrics")
               + "</div><div>" + img_html(lr_figure(runs), "learning rate") + "</div></div>")
    return "".join(out) + "</section>"


def build_report(run_dir: str | Path) -> str:
    """The report page of a run folder as one HTML string.

    Raises:
        TextuneError: `run_dir` is not a run folder (no history.jsonl).
    """
    run = Path(run_dir)
    records = load_history(run)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) if (run / "config.yaml").is_file() else None
    stats = _read_json(run / "data_stats.json")
    metrics = _read_json(run / "metrics.json")
    counts = (stats or {}).get("label_counts") or {}
    diagnosis = diagnose_curves(records, counts.get("validation") or counts.get("train"),
                                **selection_from_config(config), baselines=(stats or {}).get("baselines"))
    task = task_of(run)
    task_cards, task_sections = get_task(task).report_sections(run, metrics, stats)

    train = (metrics or {}).get("train") or {}
    color = VERDICT_COLORS.get(diagnosis.verdict, "#57606a")
    summary = [("verdict", badge_html(diagnosis.verdict, color)),
               *task_cards,
               ("steps", fmt(train.get("steps"))),
               ("training time", f"{train['seconds'] / 60:.1f} min" if train.get("seconds") is not None else "—"),
               ("samples / s", fmt(train.get("samples_per_s"), 1))]
    model = ((config or {}).get("model") or {}).get("name") or "packaged MiniLM-L6-H384"
    method = ((config or {}).get("tuning") or {}).get("method", "")
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>textune report: {esc(run.name)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{esc(run.name)}</h1><div class='sub'>{esc(model)} &middot; {esc(method)} fine-tuning &middot; "
        f"{esc(run.resolve())} &middot; report of {now}</div></header>",
        cards_html(summary),
        _diagnosis_html(diagnosis),
        _baselines_html((stats or {}).get("baselines"), metrics),
        _curves_html(run.name, records, diagnosis.best_step, task, ((config or {}).get("train") or {}).get("metric")),
        task_sections,
        _data_html(stats),
        _config_html(config, task),
        "<footer>Written by <b>textune report</b>. Self-contained: no scripts, no network.</footer>",
        "</main></body></html>",
    ])


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of `run_dir` (default: RUN/report.html); return its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise TextuneError(f"run folder not found: {run}")
    if is_onnx_export(run):  # it holds config.yaml and metrics.json, but no history or predictions to show
        raise onnx_export_error(run, "a training run folder")
    path = Path(output) if output else run / "report.html"
    path.write_text(build_report(run), encoding="utf-8")
    return path
