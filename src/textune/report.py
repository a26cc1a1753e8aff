"""`textune report RUN`: one self-contained HTML page about a run, written to RUN/report.html.

Everything is inline (CSS in a <style> block, figures as base64 `data:` PNGs, no script, no web font), so
the file opens offline, survives being mailed or attached to a ticket, and makes no network request.
Sections: summary, diagnosis, learning curves, the task's own sections (`Task.report_sections`; for a
classifier: final metrics with the confusion matrix as a heat map, calibration, the most confidently wrong
validation examples; for a token classifier: per-type F1, type confusions, the worst sentences with spans
marked), data statistics and the config. A section whose input file is missing (a run still going) says so
instead of failing. The HTML helpers here (`esc`, `fmt`, `cards_html`, ...) are what task modules build
their sections with.

The page is built with f-strings and `html.escape`: a dozen small sections do not need a template engine
(jinja2 is not a textune dependency).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from textune.curves import figure_png, loss_figure, lr_figure, metrics_figure
from textune.diagnose import Diagnosis, diagnose_curves, load_history, selection_from_config
from textune.errors import TextuneError, is_onnx_export, onnx_export_error
from textune.tasks import get_task, task_of

ECE_BINS = 10
WORST_EXAMPLES = 12
# Mean token lengths of training and validation differing by more than this factor hint that the two
# splits are different kinds of text (e.g. phrases vs whole sentences), which metrics alone do not show.
LENGTH_MISMATCH = 1.5
VERDICT_COLORS = {"healthy": "#1a7f37", "overfitting": "#bc4c00", "underfitting": "#9a6700",
                  "unstable": "#cf222e", "diverged": "#a40e26", "inconclusive": "#57606a"}


# ---------------------------------------------------------------- calibration


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width confidence bins over [0, 1]: (count, mean confidence, accuracy) per bin.

    Bin b holds confidences in (b/n, (b+1)/n]; empty bins have mean confidence and accuracy 0.
    """
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    safe = np.maximum(count, 1)
    mean_conf = np.bincount(idx, weights=confidence, minlength=n_bins) / safe
    accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / safe
    return count, mean_conf, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error (Guo et al., 2017) with equal-width bins.

        ECE = sum over bins b of  (n_b / N) * | accuracy(b) - mean confidence(b) |

    where confidence is the predicted class's probability, accuracy(b) the share of correct predictions
    among the n_b examples whose confidence falls in bin b, N all examples. 0 is perfectly calibrated.
    Written here because scikit-learn's `calibration_curve` is for one class's probability in binary
    tasks, not the top-label confidence of any number of classes.
    """
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    count, mean_conf, accuracy = reliability_bins(confidence, correct, n_bins)
    return float(np.sum(count / len(labels) * np.abs(accuracy - mean_conf)))


def reliability_figure(probs: np.ndarray, labels: np.ndarray, ece: float) -> Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration; counts underneath."""
    confidence = probs.max(axis=1)
    count, mean_conf, accuracy = reliability_bins(confidence, probs.argmax(axis=1) == labels)
    width = 1.0 / ECE_BINS
    centers = np.arange(ECE_BINS) * width + width / 2
    full = count > 0
    fig = Figure(figsize=(5.2, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(centers[full], accuracy[full], width=width * 0.92, color="#1f77b4", alpha=0.85, label="accuracy")
    over = full & (mean_conf > accuracy)  # shade over-confidence above the bar; under-confidence shows as the tick
    if over.any():
        top.bar(centers[over], (mean_conf - accuracy)[over], bottom=accuracy[over], width=width * 0.92,
                color="#d62728", alpha=0.25, hatch="//", edgecolor="#d62728", linewidth=0, label="over-confidence")
    top.hlines(mean_conf[full], centers[full] - width * 0.46, centers[full] + width * 0.46, color="#d62728",
               linewidth=2, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability (ECE {ece:.3f}, {ECE_BINS} bins)", fontsize=11, loc="left")
    top.legend(fontsize=8, frameon=False, loc="upper left")
    bottom.bar(centers, count, width=width * 0.92, color="#888")
    bottom.set_ylabel("examples")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    # No prediction is less confident than 1/K: start the axis at the bin holding 1/K.
    bottom.set_xlim(np.floor(ECE_BINS / probs.shape[1]) / ECE_BINS, 1)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- reading the run folder


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prediction_arrays(rows: list[dict], label_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = {n: i for i, n in enumerate(label_names)}
    rows = [r for r in rows if r.get("label") in ids and r.get("probs")]
    return np.array([r["probs"] for r in rows], dtype=float), np.array([ids[r["label"]] for r in rows])


# ---------------------------------------------------------------- HTML pieces

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
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""


def esc(value) -> str:
    return html.escape(str(value))


def img_html(fig: Figure, alt: str) -> str:
    data = base64.b64encode(figure_png(fig)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return esc(value)


def cards_html(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{v}</div></div>' for k, v in items) + "</div>"


def missing_html(what: str, why: str) -> str:
    return f'<p class="note">No {esc(what)}: {esc(why)}.</p>'


def _diagnosis_html(d: Diagnosis) -> str:
    color = VERDICT_COLORS.get(d.verdict, "#57606a")
    out = [f'<section id="diagnosis"><h2>Diagnosis <span class="badge" style="background:{color}">'
           f"{esc(d.verdict)}</span></h2>"]
    out.append("<ul>" + "".join(f"<li>{esc(e)}</li>" for e in d.evidence) + "</ul>")
    if d.remedies:
        out.append("<h3>What to try</h3><ul>" + "".join(f"<li>{esc(r)}</li>" for r in d.remedies) + "</ul>")
    out.append("</section>")
    return "".join(out)


def _confusion_html(cm: dict) -> str:
    """Rows: true label, columns: predicted. Shade = share of the row (recall), so classes of any size compare."""
    names, matrix = cm["labels"], np.asarray(cm["matrix"], dtype=float)
    rows = ['<table class="cm"><tr><th></th><th class="axis" colspan="%d">predicted</th></tr>' % len(names),
            "<tr><th>true \u2193</th>" + "".join(f'<th class="axis">{esc(n)}</th>' for n in names) + "</tr>"]
    for i, name in enumerate(names):
        total = matrix[i].sum() or 1.0
        cells = []
        for j, value in enumerate(matrix[i]):
            share = value / total
            ink = "#fff" if share > 0.55 else "#1f2328"
            diag = ' class="diag"' if i == j else ""
            cells.append(f'<td{diag} style="background:rgba(31,119,180,{0.06 + 0.94 * share:.3f});color:{ink}">'
                         f'{int(value):,}<span class="pct">{share:.0%}</span></td>')
        rows.append(f'<tr><th class="l">{esc(name)}</th>{"".join(cells)}</tr>')
    rows.append("</table>")
    return "".join(rows)


def _per_class_html(per_class: dict, names: list[str]) -> str:
    rows = ['<table><tr><th class="l">class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>']
    for name in [*names, "macro avg", "weighted avg"]:
        r = per_class.get(name)
        if isinstance(r, dict):
            rows.append(f'<tr><td class="l">{esc(name)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
                        f'<td>{r["f1-score"]:.3f}</td><td>{int(r["support"]):,}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def metrics_html(metrics: dict | None) -> str:
    out = ['<section id="metrics"><h2>Final validation metrics</h2>']
    if metrics is None:
        out.append(missing_html("metrics", "metrics.json is missing (the run has not finished)") + "</section>")
        return "".join(out)
    v = metrics.get("validation") or {}
    note = f"best model from step {metrics.get('best_step')}" if metrics.get("best_step") is not None else "last model"
    out.append(f'<p class="muted">{esc(note)}, picked by validation {esc(metrics.get("metric", "accuracy"))}'
               + (", stopped early" if metrics.get("stopped_early") else "") + ".</p>")
    cm = v.get("confusion_matrix")
    out.append('<div class="grid2"><div><h3>Confusion matrix</h3>'
               + (_confusion_html(cm) if cm else missing_html("confusion matrix", "not in metrics.json")) + "</div>")
    out.append("<div><h3>Per class</h3>" + (_per_class_html(v.get("per_class") or {}, cm["labels"]) if cm else "")
               + "</div></div>")
    if metrics.get("test"):
        t = metrics["test"]
        out.append("<h3>Test</h3>" + cards_html([("test " + k, fmt(t.get(k))) for k in ("loss", "accuracy", "f1", "f1_macro")
                                             if t.get(k) is not None]))
    out.append("</section>")
    return "".join(out)


def calibration_html(probs: np.ndarray, labels: np.ndarray) -> tuple[str, float | None]:
    out = ['<section id="calibration"><h2>Calibration</h2>']
    if len(labels) == 0:
        out.append(missing_html("calibration", "validation_predictions.jsonl is missing") + "</section>")
        return "".join(out), None
    ece = expected_calibration_error(probs, labels)
    confidence = probs.max(axis=1)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    over = "over-confident" if confidence.mean() > accuracy else "under-confident"
    out.append('<div class="grid2"><div>' + img_html(reliability_figure(probs, labels, ece), "reliability plot") + "</div>")
    out.append(f"<div><p>Expected calibration error <b>{ece:.3f}</b> over {len(labels):,} validation examples "
               f"({ECE_BINS} equal-width bins).</p><p>Mean confidence {confidence.mean():.3f} against accuracy "
               f"{accuracy:.3f}: on average the model is <b>{over}</b> by {abs(confidence.mean() - accuracy):.3f}.</p>"
               '<p class="muted">ECE = &Sigma;<sub>b</sub> (n<sub>b</sub>/N) &middot; |accuracy(b) &minus; '
               "confidence(b)|, the gap between how sure the model is and how often it is right, weighted by how "
               "many predictions fall in each confidence bin. A bar below its red tick: the model is more sure than "
               "it should be there; above it: less sure.</p></div></div></section>")
    return "".join(out), ece


def wrong_html(rows: list[dict]) -> str:
    out = ['<section id="errors"><h2>Most confidently wrong validation examples</h2>']
    if not rows:
        out.append(missing_html("examples", "validation_predictions.jsonl is missing") + "</section>")
        return "".join(out)
    wrong = [r for r in rows if r.get("label") != r.get("pred") and r.get("probs")]
    wrong.sort(key=lambda r: max(r["probs"]), reverse=True)
    if not wrong:
        out.append('<p class="note">Every validation example is predicted correctly.</p></section>')
        return "".join(out)
    out.append(f'<p class="muted">{len(wrong):,} of {len(rows):,} validation examples are wrong; the '
               f"{min(WORST_EXAMPLES, len(wrong))} below are the ones the model was surest about, often label noise "
               "or a pattern the model has not learnt.</p>")
    out.append('<table class="wrong"><tr><th class="l">text</th><th class="l">true</th><th class="l">predicted</th>'
               "<th>confidence</th></tr>")
    for r in wrong[:WORST_EXAMPLES]:
        text = esc(clip(r.get("text", "")))
        if r.get("text_pair") is not None:
            text += f'<span class="pair">{esc(clip(r["text_pair"]))}</span>'
        out.append(f'<tr><td class="text">{text}</td><td class="l">{esc(r["label"])}</td>'
                   f'<td class="l">{esc(r["pred"])}</td><td class="conf">{max(r["probs"]):.1%}</td></tr>')
    out.append("</table></section>")
    return "".join(out)


def clip(text, limit: int = 400) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + " …"


def _data_html(stats: dict | None) -> str:
    out = ['<section id="data"><h2>Data</h2>']
    if stats is None:
        out.append(missing_html("data statistics", "data_stats.json is missing") + "</section>")
        return "".join(out)
    sizes = stats.get("sizes", {})
    out.append(cards_html([(f"{split} examples", fmt(n)) for split, n in sizes.items()]))
    out.append('<div class="grid2"><div><h3>Label balance</h3><table><tr><th class="l">split</th>'
               '<th class="l">label</th><th>examples</th><th>share</th><th class="l"></th></tr>')
    for split, counts in (stats.get("label_counts") or {}).items():
        total = sum(counts.values()) or 1
        for i, (name, n) in enumerate(counts.items()):
            out.append(f'<tr><td class="l">{esc(split) if i == 0 else ""}</td><td class="l">{esc(name)}</td>'
                       f"<td>{n:,}</td><td>{n / total:.1%}</td>"
                       f'<td class="l"><div class="bar"><span style="width:{100 * n / total:.1f}%"></span></div></td></tr>')
    out.append("</table></div>")
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
    if truncated > 0.05:
        out.append(f'<p class="note">{truncated:.0%} of some split is cut at model.max_length {max_length}: '
                   "the model never sees the end of those texts.</p>")
    out.append("</div></div></section>")
    return "".join(out)


def _yaml_value(value) -> str:
    """A config value as the user would write it in YAML (true, 5e-05, [a, b]); empty as a dash."""
    if value is None:
        return "—"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _config_html(config: dict | None) -> str:
    out = ['<section id="config"><h2>Config</h2>']
    if config is None:
        out.append(missing_html("config", "config.yaml is missing") + "</section>")
        return "".join(out)
    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    sections = {"run": top, **{k: v for k, v in config.items() if isinstance(v, dict)}}
    out.append('<div class="cfg">')
    for name, values in sections.items():
        rows = "".join(f'<tr><td class="k">{esc(k)}</td><td class="v">{esc(_yaml_value(v))}</td></tr>'
                       for k, v in values.items())
        out.append(f"<div><h3>{esc(name)}</h3><table>{rows}</table></div>")
    out.append("</div></section>")
    return "".join(out)


# ---------------------------------------------------------------- the page


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
                                **selection_from_config(config))
    task_cards, task_sections = get_task(task_of(run)).report_sections(run, metrics, stats)

    runs = {run.name: records}
    train = (metrics or {}).get("train") or {}
    color = VERDICT_COLORS.get(diagnosis.verdict, "#57606a")
    summary = [("verdict", f'<span class="badge" style="background:{color}">{esc(diagnosis.verdict)}</span>'),
               *task_cards,
               ("steps", fmt(train.get("steps"))),
               ("training time", f"{train['seconds'] / 60:.1f} min" if train.get("seconds") is not None else "—"),
               ("samples / s", fmt(train.get("samples_per_s"), 1))]
    model = ((config or {}).get("model") or {}).get("name") or "packaged MiniLM-L6-H384"
    method = ((config or {}).get("tuning") or {}).get("method", "")
    curves = ['<section id="curves"><h2>Learning curves</h2>']
    if records:
        losses = loss_figure(runs)
        if diagnosis.best_step is not None:
            ax = losses.axes[0]
            ax.axvline(diagnosis.best_step, color="#888", linestyle=":", linewidth=1.5, label="lowest validation loss")
            ax.legend(fontsize=8, frameon=False)
        curves.append(img_html(losses, "training and validation loss"))
        curves.append('<div class="grid2"><div>' + img_html(metrics_figure(runs), "validation accuracy and F1")
                      + "</div><div>" + img_html(lr_figure(runs), "learning rate") + "</div></div>")
    else:
        curves.append(missing_html("curves", "history.jsonl is empty"))
    curves.append("</section>")
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>textune report: {esc(run.name)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{esc(run.name)}</h1><div class='sub'>{esc(model)} &middot; {esc(method)} fine-tuning &middot; "
        f"{esc(run.resolve())} &middot; report of {now}</div></header>",
        cards_html(summary),
        _diagnosis_html(diagnosis),
        "".join(curves),
        task_sections,
        _data_html(stats),
        _config_html(config),
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
