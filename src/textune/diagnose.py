"""Diagnose a run from its learning curves: healthy, still learning, overfitting, underfitting, unstable or
diverged.

Works on RUN/history.jsonl alone (plus, optionally, the label counts from RUN/data_stats.json and the
metric that selects the checkpoint from RUN/config.yaml), so it needs no torch and runs on a finished, a running or a copied run folder. Rules are checked from the
most to the least severe; the first that fires is the verdict, and every rule that could not be judged
for lack of points says so in the evidence. Whatever the verdict, a run whose best evaluation is worse than a
zero-shot baseline the task measured at start-up (RUN/data_stats.json's `baselines`: the majority class, the
mean target, the base model's embedding cosine of a text pair) gets a warning with both figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from textune.errors import TextuneError

VERDICTS = ("healthy", "still-learning", "overfitting", "underfitting", "unstable", "diverged", "inconclusive")

# Fewer logged training losses than this show neither a trend nor a spike (one point is a number,
# two are a line): below it the verdict is "inconclusive", for every task, however many evaluations there are
# (runs that evaluate at step 0 have two after a single logged loss, and that is not a learning curve).
MIN_TRAIN_POINTS = 3
# One evaluation says where validation ended, not where it went; trends need at least two.
MIN_EVALS = 2
# The loss "now" is the median of the last few logged values: one noisy window (the last one is often
# a short remainder of a logging interval) must not decide the verdict.
LATE_WINDOW = 3

# Diverged: a late training loss this many times its starting value. A classifier's starting loss is
# about ln(K) (chance); three times that means it is confidently wrong, which noise never produces.
DIVERGENCE_FACTOR = 3.0
# Diverged (collapse): the loss first fell below this share of its start, then climbed back to at
# least COLLAPSE_RETURN_SHARE of it. Too high a learning rate often collapses a fine-tuned encoder to
# predicting one class, whose loss is the starting loss again, not an explosion.
COLLAPSE_LOW_SHARE = 0.6
COLLAPSE_RETURN_SHARE = 0.9

# Unstable: a spike is a logged loss above the median of the SPIKE_WINDOW values before it by more than
# SPIKE_RISE_SHARE of the starting loss. Logged losses are means over `train.logging_steps` batches, so
# ordinary batch noise moves them by a few percent of the start; a quarter of the start is a real jump.
SPIKE_WINDOW = 5
SPIKE_RISE_SHARE = 0.25
# One spike can be a single odd batch the run recovered from; two or more mean the optimizer is too hot.
UNSTABLE_MIN_SPIKES = 2
# Unstable (swings): the median step-to-step change after the first quarter of training (the steep
# early fall is expected) as a share of the starting loss. Healthy fine-tuning runs sit near 0.05.
SWING_SHARE = 0.15

# Overfitting: validation loss above its minimum for this many evaluations in a row, up to the last one,
# while training loss keeps falling. One higher evaluation is noise; two in a row is a trend
# (the same patience early stopping would need).
OVERFIT_PATIENCE = 2
# ... each higher than the minimum by at least this share, so a flat validation curve is not "rising".
OVERFIT_MIN_RISE = 0.02

# Underfitting: a loss that is still at least this share of the loss of a model that ignores the text
# (the entropy of the label frequencies, or without them the starting loss) has learnt little.
UNDERFIT_LOSS_SHARE = 0.8
# Underfitting: best validation accuracy within this margin of always predicting the majority class.
UNDERFIT_ACCURACY_MARGIN = 0.03

# Healthy but noted: a validation loss this much above the training loss is a large generalisation gap.
LARGE_GAP = 0.3
# "Levelled off": the median training loss of the last quarter of logged points is below that of the
# quarter before by less than this share of the start (medians ignore single noisy points); a bigger
# fall means the run was stopped while still learning: the verdict is then "still-learning", not "healthy"
# (a few steps of a run leave its metrics wherever they were; train longer and look again).
LEVEL_OFF_SHARE = 0.05


@dataclass
class Diagnosis:
    """What the curves say: a verdict, the numbers behind it, and what to try next."""

    verdict: str
    evidence: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    best_epoch: float | None = None  # of the lowest validation loss
    best_step: int | None = None
    # Said whatever the verdict, above it: the model scores worse than a rule that needs no training (a
    # zero-shot baseline), which the curves alone cannot show (a healthy curve can end below it).
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "warnings": self.warnings, "evidence": self.evidence,
                "remedies": self.remedies, "best_epoch": self.best_epoch, "best_step": self.best_step}


def diagnose_curves(history_records: list[dict], label_counts: dict[str, int] | None = None,
                    metric: str | None = None, greater_is_better: bool = True,
                    baselines: dict | None = None) -> Diagnosis:
    """The verdict of `judge_curves`, plus a warning for each zero-shot baseline the run did not beat.

    Args:
        baselines: what the task measured without training at start-up (`TaskInputs.baselines`, kept in
            RUN/data_stats.json): name -> {"rule", "metrics", "advice"?} or {"rule", "skipped"}. A baseline whose
            metrics hold `metric` is compared with the best evaluation of it; the others are not judged.
        The rest: as `judge_curves`.
    """
    d = judge_curves(history_records, label_counts, metric, greater_is_better)
    _below_baselines(history_records, baselines or {}, metric, greater_is_better, d)
    return d


def judge_curves(history_records: list[dict], label_counts: dict[str, int] | None = None,
                 metric: str | None = None, greater_is_better: bool = True) -> Diagnosis:
    """Judge a run from its history records (the lines of RUN/history.jsonl).

    Args:
        history_records: dicts with `type` "train" (`step`, `epoch`, `loss`, `lr`) or "eval"
            (`step`, `epoch`, `eval_loss`, `eval_accuracy`, ...), in the order they were logged.
        label_counts: validation label counts `{name: count}`; they give the majority-class accuracy and
            the loss of a model that ignores the text. Without them the starting loss stands in.
        metric, greater_is_better: the metric that selects the checkpoint (`train.metric`, read from the
            records' `eval_<metric>`). Rising validation loss is judged against it: while it keeps improving,
            the rise is overconfidence, not overfitting. Empty or `loss`: the verdict rests on the loss alone.

    Returns:
        A `Diagnosis`. Its verdict is one of VERDICTS; "inconclusive" when there are too few points.
    """
    train = [r for r in history_records if r.get("type") == "train" and r.get("loss") is not None]
    evals = [r for r in history_records if r.get("type") == "eval" and r.get("eval_loss") is not None]
    losses = [float(r["loss"]) for r in train]
    eval_losses = [float(r["eval_loss"]) for r in evals]
    d = Diagnosis("healthy")
    if evals:
        best = min(range(len(evals)), key=lambda i: eval_losses[i] if math.isfinite(eval_losses[i]) else math.inf)
        d.best_step, d.best_epoch = evals[best].get("step"), evals[best].get("epoch")

    if _diverged(train, losses, evals, eval_losses, d):
        return d
    if len(losses) < MIN_TRAIN_POINTS:
        d.verdict = "inconclusive"
        d.evidence.append(f"only {len(losses)} training-loss point(s) and {len(evals)} evaluation(s): too few to "
                          f"judge (need {MIN_TRAIN_POINTS} training-loss points)")
        d.remedies.append("train longer, or log more often: lower train.logging_steps (and set train.eval_steps)")
        return d
    if _unstable(train, losses, d):
        return d
    if len(evals) < MIN_EVALS:
        d.evidence.append(f"only {len(evals)} evaluation(s): overfitting cannot be judged "
                          "(set train.eval_steps to evaluate during an epoch)")
    elif _overfitting(train, evals, eval_losses, d, _selection(evals, metric), greater_is_better):
        return d
    if _still_learning(losses, d) or _underfitting(losses, evals, eval_losses, label_counts, d):
        return d
    _healthy(losses, evals, eval_losses, d)
    return d


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _late(values: list[float]) -> float:
    return _median(values[-LATE_WINDOW:])


def _diverged(train, losses, evals, eval_losses, d: Diagnosis) -> bool:
    bad_train = [r["step"] for r, v in zip(train, losses) if not math.isfinite(v)]
    bad_eval = [r["step"] for r, v in zip(evals, eval_losses) if not math.isfinite(v)]
    if bad_train or bad_eval:
        where = bad_train[0] if bad_train else bad_eval[0]
        kind = "training" if bad_train else "validation"
        d.evidence.append(f"{kind} loss is not a finite number (nan/inf) from step {where}")
    elif len(losses) >= 2 and _late(losses) > DIVERGENCE_FACTOR * losses[0]:
        d.evidence.append(f"training loss exploded: {_late(losses):.3g} at the end, {_late(losses) / losses[0]:.1f}x "
                          f"its start ({losses[0]:.3g})")
    elif len(losses) >= MIN_TRAIN_POINTS and min(losses) < COLLAPSE_LOW_SHARE * losses[0] \
            and _late(losses) >= COLLAPSE_RETURN_SHARE * losses[0]:
        low = min(range(len(losses)), key=losses.__getitem__)
        d.evidence.append(f"training loss fell to {losses[low]:.3g} (step {train[low]['step']}) and climbed back to "
                          f"{_late(losses):.3g}, its starting level: the model collapsed (often to one class)")
    else:
        return False
    d.verdict = "diverged"
    d.remedies += ["lower the learning rate (train.lr), e.g. by 3-10x",
                   "warm up for longer (train.warmup_ratio 0.1)",
                   "clip gradients (train.max_grad_norm 1.0)",
                   "with fp16, use bf16 or no mixed precision (train.mixed_precision)"]
    return True


def _unstable(train, losses, d: Diagnosis) -> bool:
    start = losses[0]
    spikes = []
    for i in range(1, len(losses)):
        if losses[i] - _median(losses[max(0, i - SPIKE_WINDOW):i]) > SPIKE_RISE_SHARE * start:
            spikes.append(i)
    tail = losses[len(losses) // 4:]
    moves = [abs(b - a) for a, b in zip(tail, tail[1:])]
    swing = _median(moves) / start if moves and start > 0 else 0.0
    if len(spikes) < UNSTABLE_MIN_SPIKES and swing <= SWING_SHARE:
        if spikes:
            d.evidence.append(f"one loss spike at step {train[spikes[0]]['step']}, recovered from")
        return False
    d.verdict = "unstable"
    if len(spikes) >= UNSTABLE_MIN_SPIKES:
        steps = ", ".join(str(train[i]["step"]) for i in spikes[:5]) + (" ..." if len(spikes) > 5 else "")
        d.evidence.append(f"{len(spikes)} training-loss spikes (rises of more than {SPIKE_RISE_SHARE:.0%} of the "
                          f"starting loss) at steps {steps}")
    if swing > SWING_SHARE:
        d.evidence.append(f"training loss swings by {swing:.0%} of its starting value from one logged point to "
                          f"the next (median; healthy runs: about 5%)")
    d.remedies += ["lower the learning rate (train.lr)",
                   "warm up for longer (train.warmup_ratio 0.1) and clip gradients (train.max_grad_norm 1.0)",
                   "use larger batches (train.batch_size or train.gradient_accumulation_steps)"]
    return True


def _selection(evals: list[dict], metric: str | None) -> tuple[str, list[float]] | None:
    """(name, value per evaluation) of the selection metric, or None where the loss selects (or a record lacks it)."""
    if metric is None or metric in ("loss", "perplexity"):
        return None
    values = [r.get(f"eval_{metric}") for r in evals]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return metric, [float(v) for v in values]


def _overfitting(train, evals, eval_losses, d: Diagnosis, selection: tuple[str, list[float]] | None = None,
                 greater_is_better: bool = True) -> bool:
    best = min(range(len(eval_losses)), key=eval_losses.__getitem__)
    after = eval_losses[best + 1:]
    floor = eval_losses[best] * (1 + OVERFIT_MIN_RISE)
    if len(after) < OVERFIT_PATIENCE or not all(v > floor for v in after[-OVERFIT_PATIENCE:]) \
            or not all(v > eval_losses[best] for v in after):
        return False
    best_step = evals[best]["step"]
    at_best = [float(r["loss"]) for r in train if r["step"] <= best_step]
    later = [float(r["loss"]) for r in train if r["step"] > best_step]
    if not at_best or not later or _late(later) >= _late(at_best):
        return False  # validation got worse but training did not get better: not the overfitting shape
    loss_epoch = evals[best].get("epoch")
    stop = best
    if selection is not None:
        name, values = selection
        # The first best value, as the loop keeps it (only a strictly better evaluation replaces the checkpoint).
        chosen = (max if greater_is_better else min)(range(len(values)), key=values.__getitem__)
        if chosen > best:
            _overconfident(evals, eval_losses, best, name, values, chosen, d)
            return False
        stop = chosen
    d.verdict = "overfitting"
    epoch = evals[stop].get("epoch")
    d.evidence.append(f"validation loss was lowest at epoch {loss_epoch:g} (step {best_step}, {eval_losses[best]:.4f}) "
                      f"and rose over the {len(after)} evaluation(s) after it, to {eval_losses[-1]:.4f}")
    d.evidence.append(f"training loss kept falling meanwhile: {_late(at_best):.4f} -> {_late(later):.4f}")
    if selection is not None:
        worse = "fell" if greater_is_better else "rose"
        d.evidence.append(f"{name}, which selects the checkpoint, was best at epoch {epoch:g} ({values[stop]:.4f}) and "
                          f"{worse} to {values[-1]:.4f}")
    accs = [r.get("eval_accuracy") for r in evals]
    if all(a is not None for a in accs):
        d.evidence.append(f"validation accuracy at the best-loss epoch {accs[best]:.4f}, at the end {accs[-1]:.4f}")
    d.remedies += [f"stop at epoch {epoch:g}: train.epochs {max(1, math.ceil(epoch))}, or early stopping "
                   f"(train.early_stopping_patience {OVERFIT_PATIENCE}, train.load_best_at_end true)",
                   "regularise: more weight decay (train.weight_decay 0.05-0.1) or more dropout "
                   "(hidden_dropout_prob in the model's config.json)",
                   "more training data, or fewer epochs / a lower learning rate"]
    return True


def _overconfident(evals, eval_losses, best: int, name: str, values: list[float], chosen: int, d: Diagnosis) -> None:
    """Validation loss rose after its minimum while the selection metric kept improving: note it and advise
    from the metric. The usual cause is overconfidence (the few wrong predictions grow more confident, and
    each costs more loss, while more predictions are right), which calibration fixes and stopping does not."""
    loss_epoch, chosen_epoch = evals[best].get("epoch"), evals[chosen].get("epoch")
    d.evidence.append(f"validation loss rose after epoch {loss_epoch:g} ({eval_losses[best]:.4f} -> {eval_losses[-1]:.4f}) "
                      f"while {name}, which selects the checkpoint, kept improving: {values[best]:.4f} at epoch "
                      f"{loss_epoch:g} -> {values[chosen]:.4f} at epoch {chosen_epoch:g}")
    d.evidence.append(f"rising loss with an improving {name} is the usual overconfidence of a fine-tuned classifier "
                      f"(its remaining mistakes grow more confident), not overfitting and not a reason to stop")
    d.remedies += [f"keep the checkpoint {name} selects (epoch {chosen_epoch:g}, train.load_best_at_end true), not "
                   f"the lowest-loss one; early stopping should watch {name} (train.metric), not the loss",
                   "if the probabilities are read as confidences, check their calibration (textune report) and "
                   "calibrate them, e.g. temperature scaling on validation, rather than stopping early"]


def _late_fall(losses: list[float]) -> float | None:
    """How much the median training loss fell from the second-last to the last quarter of the logged points, as
    a share of the starting loss (None below 4 points)."""
    if len(losses) < 4 or losses[0] <= 0:
        return None
    q = len(losses) // 4
    return (_median(losses[-2 * q:-q]) - _median(losses[-q:])) / losses[0]


def _still_learning(losses, d: Diagnosis) -> bool:
    fall = _late_fall(losses)
    if fall is None or fall <= LEVEL_OFF_SHARE:
        return False
    d.verdict = "still-learning"
    d.evidence.append(f"training loss was still falling at the end: by {fall:.0%} of its start in the last quarter "
                      f"of the run ({losses[0]:.4f} at the start, {_late(losses):.4f} at the end)")
    d.evidence.append("the metrics are those of a model part way through learning; judge it once the loss levels off")
    d.remedies += ["train longer: more train.epochs (or a higher train.max_steps)",
                   "then run textune diagnose again"]
    return True


def _underfitting(losses, evals, eval_losses, label_counts, d: Diagnosis) -> bool:
    total = sum(label_counts.values()) if label_counts else 0
    if total:
        shares = [c / total for c in label_counts.values() if c]
        reference = -sum(p * math.log(p) for p in shares)  # entropy of the labels: the loss of ignoring the text
        what = "the loss of predicting the label frequencies"
    else:
        reference = losses[0] if losses else None
        what = "the starting loss"
    findings = []
    if reference and losses and len(losses) >= 2 and _late(losses) >= UNDERFIT_LOSS_SHARE * reference:
        if not evals or eval_losses[-1] >= UNDERFIT_LOSS_SHARE * reference:
            findings.append(f"training loss {_late(losses):.4f}"
                            + (f" and validation loss {eval_losses[-1]:.4f}" if evals else "")
                            + f" are still {_late(losses) / reference:.0%} of {reference:.4f}, {what}")
    accs = [r["eval_accuracy"] for r in evals if r.get("eval_accuracy") is not None]
    if total and accs:
        majority = max(label_counts.values()) / total
        if max(accs) - majority < UNDERFIT_ACCURACY_MARGIN:
            relation = (f"within {UNDERFIT_ACCURACY_MARGIN:.0%} of" if max(accs) >= majority else "below")
            findings.append(f"best validation accuracy {max(accs):.4f} is {relation} always predicting the "
                            f"majority class ({majority:.4f})")
    if not findings:
        return False
    d.verdict = "underfitting"
    d.evidence += findings
    d.remedies += ["train longer (train.epochs)",
                   "raise the learning rate (train.lr, e.g. 2-3x)",
                   "with tuning.method head, train the full model (tuning.method full)",
                   "use a bigger model (model.name), or a longer model.max_length if texts are truncated"]
    return True


def _below_baselines(history_records: list[dict], baselines: dict, metric: str | None, greater_is_better: bool,
                     d: Diagnosis) -> None:
    """A warning (both figures, what to try) for each baseline whose `metric` the run's best evaluation did not
    beat. The best, not the last: the kept checkpoint is the best, and if even it loses, training did not pay."""
    values = [float(r[f"eval_{metric}"]) for r in history_records if r.get("type") == "eval"
              and isinstance(r.get(f"eval_{metric}"), (int, float)) and math.isfinite(r[f"eval_{metric}"])]
    if not values:
        return
    best = max(values) if greater_is_better else min(values)
    for name, baseline in baselines.items():
        figure = (baseline.get("metrics") or {}).get(metric)
        if figure is None or (best >= figure if greater_is_better else best <= figure):
            continue
        d.warnings.append(f"below its zero-shot baseline: the best validation {metric}, {best:.4f}, is worse than "
                          f"the {name}'s {figure:.4f} ({baseline['rule']}; no training)")
        d.remedies.insert(0, baseline.get("advice") or f"fine-tuning made {metric} worse than the {name}: check the "
                          "data and the learning rate, or keep the baseline")


def _healthy(losses, evals, eval_losses, d: Diagnosis) -> None:
    if _late_fall(losses) is None:  # healthy means it levelled off, which needs a quarter to compare with
        d.verdict = "inconclusive"
        d.evidence.append(f"only {len(losses)} training-loss points: too few to judge whether the loss levelled "
                          f"off (need 4)")
        d.remedies.append("train longer, or log more often: lower train.logging_steps")
        return
    d.verdict = "healthy"
    if len(losses) >= 2:
        d.evidence.append(f"training loss fell from {losses[0]:.4f} to {_late(losses):.4f}")
    if evals:
        d.evidence.append(f"validation loss lowest at epoch {d.best_epoch:g} (step {d.best_step}): "
                          f"{min(eval_losses):.4f}; last {eval_losses[-1]:.4f}")
    d.evidence.append("training loss levelled off")  # else _still_learning would have given the verdict
    if evals and losses:
        gap = eval_losses[-1] - _late(losses)
        d.evidence.append(f"validation - training loss gap {gap:+.4f}")
        if gap > LARGE_GAP:
            d.remedies.append("the gap is large: watch for overfitting (weight decay, early stopping)")


# ---------------------------------------------------------------- run folders and printing


def load_history(run_dir: str | Path) -> list[dict]:
    """The records of RUN/history.jsonl. Raises `TextuneError` if there is no such file."""
    path = Path(run_dir) / "history.jsonl"
    if not path.is_file():
        raise TextuneError(f"{run_dir} has no history.jsonl; pass a run folder written by `textune train`")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # A run killed mid-write leaves a half line at the end; anything earlier is corruption.
            if n < len(lines):
                raise TextuneError(f"{path} line {n} is not JSON; was the file edited by hand?") from None
    return records


def run_label_counts(run_dir: str | Path) -> dict[str, int] | None:
    """Validation (else training) label counts from RUN/data_stats.json, or None."""
    path = Path(run_dir) / "data_stats.json"
    if not path.is_file():
        return None
    counts = json.loads(path.read_text(encoding="utf-8")).get("label_counts") or {}
    return counts.get("validation") or counts.get("train")


def run_baselines(run_dir: str | Path) -> dict:
    """The zero-shot baselines measured at the run's start (RUN/data_stats.json's `baselines`), or {}."""
    path = Path(run_dir) / "data_stats.json"
    return (json.loads(path.read_text(encoding="utf-8")).get("baselines") or {}) if path.is_file() else {}


def format_baselines(baselines: dict) -> list[str]:
    """The start-up summary's lines: each baseline's figures on the validation split, or why it was skipped."""
    lines = []
    for name, b in baselines.items():
        if b.get("skipped"):
            lines.append(f"baseline   {name}: not measured: {b['skipped']}")
        else:
            figures = " | ".join(f"{k} {v:.4f}" for k, v in b["metrics"].items())
            lines.append(f"baseline   {name}: {figures} on validation without training, for fine-tuning to beat "
                         f"({b['rule']})")
    return lines


def selection_from_config(config: dict | None) -> dict:
    """`metric` and `greater_is_better` for `diagnose_curves` from a run's config mapping (RUN/config.yaml);
    {} when it has none (the verdict then rests on the validation loss)."""
    train = (config or {}).get("train") or {}
    if not train.get("metric"):
        return {}
    return {"metric": train["metric"], "greater_is_better": bool(train.get("greater_is_better", True))}


def diagnose_run(run_dir: str | Path) -> Diagnosis:
    """The diagnosis of a run folder: its history, label counts and selection metric (RUN/config.yaml)."""
    config_path = Path(run_dir) / "config.yaml"
    config = None
    if config_path.is_file():
        import yaml

        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    return diagnose_curves(load_history(run_dir), run_label_counts(run_dir), **selection_from_config(config),
                           baselines=run_baselines(run_dir))


def format_diagnosis(d: Diagnosis) -> str:
    """A few lines for the terminal: the verdict, its evidence and what to try."""
    lines = [f"diagnosis  {d.verdict}"]
    lines += [f"  ! {w}" for w in d.warnings]
    lines += [f"  - {e}" for e in d.evidence]
    if d.remedies:
        lines.append("  try:")
        lines += [f"  - {r}" for r in d.remedies]
    return "\n".join(lines)
