"""Learning-curve figures (PNG, matplotlib): loss, validation metrics and learning rate against step.

The metric figure draws each run's headline (`headline_metrics`): its train.metric and its task's default
metric (accuracy and F1 for a classifier, Pearson for regression, perplexity for a language model), so every
task's chart has something to show.

Several runs share one figure, each in its own colour and labelled by its folder name. Figures are
built on `matplotlib.figure.Figure`, which renders with the Agg backend and never touches pyplot's global
state, so this works on servers without a display and inside long-lived processes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml
from matplotlib.figure import Figure

from textune.diagnose import load_history
from textune.report_html import figure_png
from textune.tasks import DEFAULT_TASK, TASKS

# Smoothing of the raw training loss: an exponential moving average with TensorBoard's default weight
# (smoothing 0.6, i.e. alpha 0.4): a memory of about 2.5 logged points, enough to see the trend through
# batch noise while still following the steep fall of the first few hundred steps.
EMA_ALPHA = 0.4
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# Inches at 144 dpi. The loss figure spans the report's width; the others sit two to a row, so they are
# smaller and their text keeps a readable size when the browser scales them down.
WIDE, HALF = (10.0, 3.8), (5.2, 3.4)
# Metrics without a fixed range (a perplexity in the hundreds) would flatten a 0-1 score drawn beside them: one of
# them is drawn alone.
UNBOUNDED = frozenset({"loss", "perplexity", "mse", "mae"})
DISPLAY_NAMES = {"f1": "F1", "f1_macro": "macro F1", "f1_micro": "micro F1", "f1_weighted": "weighted F1",
                 "mcc": "MCC", "roc_auc": "ROC-AUC", "rougeL": "ROUGE-L", "mse": "MSE", "mae": "MAE",
                 "pearson": "Pearson", "spearman": "Spearman"}


def run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names as labels; parent/name where two runs share a folder name."""
    names = [Path(r).name for r in run_dirs]
    return [f"{Path(r).parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(run_dirs, names)]


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in records if r.get("type") == kind and r.get(key) is not None]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def _finish(fig: Figure, ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()


def loss_figure(runs: dict[str, list[dict]]) -> Figure:
    """Training loss (raw, faint; EMA-smoothed, solid) and validation loss (dashed, dots) per run."""
    fig = Figure(figsize=WIDE)
    ax = fig.add_subplot()
    for color, (name, records) in zip(_cycle(), runs.items()):
        steps, loss = _series(records, "train", "loss")
        if steps:
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=1)
            smooth = pd.Series(loss).ewm(alpha=EMA_ALPHA).mean()  # debiased EMA: no pull toward 0 at the start
            ax.plot(steps, smooth, color=color, linewidth=2, label=f"{name} train (EMA)")
        steps, loss = _series(records, "eval", "eval_loss")
        if steps:
            ax.plot(steps, loss, color=color, linestyle="--", marker="o", markersize=4, label=f"{name} validation")
    _finish(fig, ax, "Loss", "cross-entropy")
    return fig


def headline_metrics(records: list[dict], task: str | None = None, metric: str | None = None,
                     most: int = 2) -> list[str]:
    """The validation metrics a run's metric chart shows, at most `most` of those its history holds: `metric`
    (the run's train.metric) and the task's default metric first, then the task's other metrics in the registry's
    order. The loss has its own chart: perplexity stands in for it. A metric without a fixed range is shown alone.
    Without a task: classification's (accuracy and F1)."""
    held = {k.removeprefix("eval_") for r in records if r.get("type") == "eval" for k in r if k.startswith("eval_")}
    spec = TASKS.get(task or DEFAULT_TASK, TASKS[DEFAULT_TASK])
    wanted = [metric, spec.default_metric, *spec.metrics]
    chosen: list[str] = []
    for name in ("perplexity" if name == "loss" else name for name in wanted):
        if name in held and name not in chosen:
            chosen.append(name)
    if not chosen:  # a history of other metrics (a compute_metrics hook), or of the loss alone
        chosen = [k for k in sorted(held) if k != "loss"] or sorted(held)
    first_unbounded = chosen[0] in UNBOUNDED if chosen else False
    return [k for k in chosen if (k in UNBOUNDED) == first_unbounded][:1 if first_unbounded else most]


def run_headline_metrics(run_dir: Path, records: list[dict]) -> list[str]:
    """`headline_metrics` of a run folder: its task and train.metric from its config.yaml, where it has one."""
    path = Path(run_dir) / "config.yaml"
    config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    return headline_metrics(records, config.get("task"), (config.get("train") or {}).get("metric"))


def display_name(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric.replace("_", " "))


def metrics_figure(runs: dict[str, list[dict]], shown: dict[str, list[str]] | None = None) -> Figure:
    """Each run's headline validation metrics (`shown`: run name -> metric names; `headline_metrics` of its
    history where not given), the first solid, the second dashed."""
    fig = Figure(figsize=HALF)
    ax = fig.add_subplot()
    shown = {name: (shown or {}).get(name) or headline_metrics(records) for name, records in runs.items()}
    for color, (name, records) in zip(_cycle(), runs.items()):
        for key, style in zip(shown[name], ("-", "--", ":")):
            steps, values = _series(records, "eval", f"eval_{key}")
            if steps:
                ax.plot(steps, values, color=color, linestyle=style, marker="o", markersize=4,
                        label=f"{name} {display_name(key)}")
    keys = list(dict.fromkeys(k for names in shown.values() for k in names))
    title = " and ".join(map(display_name, keys)) if 0 < len(keys) <= 2 else "metrics"
    unbounded = len(keys) == 1 and keys[0] in UNBOUNDED
    _finish(fig, ax, f"Validation {title}", display_name(keys[0]) if unbounded else "score")
    return fig


def lr_figure(runs: dict[str, list[dict]]) -> Figure:
    fig = Figure(figsize=HALF)
    ax = fig.add_subplot()
    for color, (name, records) in zip(_cycle(), runs.items()):
        steps, lr = _series(records, "train", "lr")
        if steps:
            ax.plot(steps, lr, color=color, linewidth=2, label=name)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _finish(fig, ax, "Learning rate", "lr")
    return fig


def _cycle():
    while True:
        yield from COLORS


def save_curves(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write loss.png, metrics.png and lr.png for one or more runs into `out_dir`; return their paths.

    Raises:
        TextuneError: a folder has no history.jsonl.
    """
    run_dirs = [Path(r) for r in run_dirs]
    runs = {name: load_history(r) for name, r in zip(run_names(run_dirs), run_dirs)}
    shown = {name: run_headline_metrics(r, runs[name]) for name, r in zip(runs, run_dirs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (("loss", loss_figure(runs)), ("metrics", metrics_figure(runs, shown)), ("lr", lr_figure(runs))):
        path = out / f"{name}.png"
        path.write_bytes(figure_png(fig))
        paths.append(path)
    return paths
