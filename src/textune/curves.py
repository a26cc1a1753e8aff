"""Learning-curve figures (PNG, matplotlib): loss, validation metrics and learning rate against step.

Several runs share one figure, each in its own colour and labelled by its folder name. Figures are
built on `matplotlib.figure.Figure`, which renders with the Agg backend and never touches pyplot's global
state, so this works on servers without a display and inside long-lived processes.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from textune.diagnose import load_history

# Smoothing of the raw training loss: an exponential moving average with TensorBoard's default weight
# (smoothing 0.6, i.e. alpha 0.4): a memory of about 2.5 logged points, enough to see the trend through
# batch noise while still following the steep fall of the first few hundred steps.
EMA_ALPHA = 0.4
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# Inches at 144 dpi. The loss figure spans the report's width; the others sit two to a row, so they are
# smaller and their text keeps a readable size when the browser scales them down.
WIDE, HALF = (10.0, 3.8), (5.2, 3.4)


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


def metrics_figure(runs: dict[str, list[dict]]) -> Figure:
    """Validation accuracy (solid) and F1 (dashed; binary for two classes, else macro) per run."""
    fig = Figure(figsize=HALF)
    ax = fig.add_subplot()
    for color, (name, records) in zip(_cycle(), runs.items()):
        for key, style, label in (("eval_accuracy", "-", "accuracy"), ("eval_f1", "--", "F1")):
            steps, values = _series(records, "eval", key)
            if steps:
                ax.plot(steps, values, color=color, linestyle=style, marker="o", markersize=4,
                        label=f"{name} {label}")
    _finish(fig, ax, "Validation accuracy and F1", "score")
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


def figure_png(fig: Figure, dpi: int = 144) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_curves(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write loss.png, metrics.png and lr.png for one or more runs into `out_dir`; return their paths.

    Raises:
        TextuneError: a folder has no history.jsonl.
    """
    run_dirs = [Path(r) for r in run_dirs]
    runs = {name: load_history(r) for name, r in zip(run_names(run_dirs), run_dirs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("loss", loss_figure), ("metrics", metrics_figure), ("lr", lr_figure)):
        path = out / f"{name}.png"
        path.write_bytes(figure_png(make(runs)))
        paths.append(path)
    return paths
