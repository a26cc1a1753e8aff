"""Hyper-parameter search with Optuna over the keys a config's `search.space` declares.

Each trial is an ordinary training run in `OUTPUT_DIR/trial-N`, made from the config with the sampled
values applied. Its objective is a validation metric of the run's best checkpoint; a median pruner stops
a trial early when one of its evaluations is worse than the median of earlier trials at the same
evaluation. The study lives in `OUTPUT_DIR/search.db` (SQLite), so running the same command again after
an interruption continues it: `--trials N` counts finished trials, old and new. At the end the results
table is printed and written to `OUTPUT_DIR/trials.csv`, and `OUTPUT_DIR/best.yaml` holds the best
trial's config, ready for `textune train`.

A search folder is used by one process at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from textune.config import LOWER_IS_BETTER, Config, with_overrides
from textune.errors import TextuneError, TrainingInterrupted

STUDY_NAME = "textune-search"
DB_NAME = "search.db"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def search_direction(cfg: Config) -> tuple[str, str]:
    """(metric, "maximize" | "minimize") of the search."""
    metric = cfg.search.metric or cfg.train.metric
    return metric, cfg.search.direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")


def suggest(trial: optuna.Trial, space: dict[str, dict]) -> dict[str, Any]:
    """Sample one value per key of a validated `search.space` (see `config._check_search`)."""
    values = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            values[key] = trial.suggest_categorical(key, spec["choices"])
        elif kind == "int":
            values[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                            log=spec.get("log", False))
        else:
            values[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"),
                                              log=kind == "loguniform")
    return values


def prepare_search_folder(output_dir: str, overwrite: bool) -> Path:
    """Create the search folder, or reuse one that holds a study; refuse anything else."""
    folder = Path(output_dir).expanduser().resolve()
    if folder.exists() and any(folder.iterdir()) and not (folder / DB_NAME).is_file():
        raise TextuneError(f"{folder} exists and holds no {DB_NAME}, so it is not a textune search folder; "
                           f"pick another output_dir")
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_study(cfg: Config, folder: Path) -> optuna.Study:
    """Create the study in `folder/search.db`, or load it and check it searches the same space and metric."""
    metric, direction = search_direction(cfg)
    s = cfg.search
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_evals)
              if s.pruner == "median" else optuna.pruners.NopPruner())
    resuming = (folder / DB_NAME).is_file()
    study = optuna.create_study(storage=f"sqlite:///{folder / DB_NAME}", study_name=STUDY_NAME, load_if_exists=True,
                                direction=direction, pruner=pruner)
    # Seeded for repeatable searches; offset by the trials already made, or a resumed search would
    # replay the first search's random start-up values.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials))
    identity = {"space": s.space, "metric": metric, "direction": direction}
    if not resuming:
        for k, v in identity.items():
            study.set_user_attr(k, v)
        return study
    stored = {k: study.user_attrs.get(k) for k in identity}
    if json.dumps(stored, sort_keys=True) != json.dumps(identity, sort_keys=True):
        changed = [k for k in identity if json.dumps(stored[k], sort_keys=True) != json.dumps(identity[k], sort_keys=True)]
        raise TextuneError(f"{folder / DB_NAME} holds a search with a different {' and '.join(changed)} "
                           f"(stored: {', '.join(f'{k}={stored[k]}' for k in changed)}); restore the config "
                           f"or pass --overwrite to start a new search")
    # A trial still marked running was cut off (the process was killed): it will never finish.
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    return study


def run_search(cfg: Config, trials: int, timeout: float | None = None, overwrite: bool = False) -> optuna.Study:
    """Run (or continue) the search until `trials` trials have finished or `timeout` seconds have passed.

    `timeout` is checked between trials; a running trial is not cut short. Returns the study.

    Raises:
        TextuneError: no search space, a search folder of another search, or a trial's user error.
    """
    if not cfg.search.space:
        raise TextuneError("search.space is empty: declare the keys to search, e.g. "
                           "search: {space: {train.lr: {type: loguniform, low: 1e-5, high: 1e-4}}}")
    if trials <= 0:
        raise TextuneError(f"--trials must be a positive number of trials, got {trials}")
    metric, direction = search_direction(cfg)
    folder = prepare_search_folder(cfg.output_dir, overwrite)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # textune prints its own line per trial
    study = open_study(cfg, folder)
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    todo = max(0, trials - done)
    print(f"search     {folder} | {metric} ({direction}) | {len(cfg.search.space)} keys | "
          + (f"resuming: {done} trials finished, {todo} to run" if done else f"{todo} trials"))

    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, cfg.search.space)
        trial_cfg = with_overrides(cfg, {**values, "output_dir": str(folder / f"trial-{trial.number}"), "search": None})
        evaluations = 0

        def on_evaluate(record: dict) -> None:
            nonlocal evaluations
            evaluations += 1
            # Report by evaluation index, not optimizer step: trials with other batch sizes have other steps.
            trial.report(record[f"eval_{metric}"], evaluations)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {record[f'eval_{metric}']:.4f} at evaluation {evaluations}")

        from textune.checkpoint import CHECKPOINTS  # torch and transformers load only when a trial runs
        from textune.train import train

        trial.set_user_attr("run", trial_cfg.output_dir)
        print(f"\n--- trial {trial.number}: {_format_values(values)}", flush=True)
        try:
            run = train(trial_cfg, overwrite=True, on_evaluate=on_evaluate)
        finally:
            # A trial is never resumed (an interrupted one is run anew), so its checkpoints only take disk.
            shutil.rmtree(Path(trial_cfg.output_dir) / CHECKPOINTS, ignore_errors=True)
        return json.loads((run / "metrics.json").read_text())["validation"][metric]

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        outcome = (f"{metric} {trial.value:.4f}" if trial.state == TrialState.COMPLETE
                   else f"pruned at evaluation {trial.last_step}" if trial.state == TrialState.PRUNED
                   else trial.state.name.lower())
        best = study.best_trial if any(t.state == TrialState.COMPLETE for t in study.trials) else None
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        print(f"trial {trial.number:>3} ({finished}/{trials} finished) | {outcome} | {seconds:.0f}s | "
              + (f"best so far: trial {best.number} ({best.value:.4f})" if best else "no finished trial yet"),
              flush=True)

    try:
        if todo:
            study.optimize(objective, n_trials=todo, timeout=timeout, callbacks=[progress], gc_after_trial=True)
    except (TrainingInterrupted, KeyboardInterrupt):
        write_results(study, cfg, folder, metric)
        raise TrainingInterrupted(f"search stopped during a trial; the finished trials are kept in "
                                  f"{folder / DB_NAME}: run the same command again to continue") from None
    write_results(study, cfg, folder, metric)
    return study


def _format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def results_table(study: optuna.Study, metric: str) -> pd.DataFrame:
    """One row per trial: number, state, objective, evaluations made, seconds, sampled values."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"trial": t.number, "state": t.state.name.lower(), metric: t.value,
                     "evaluations": len(t.intermediate_values), "seconds": seconds and round(seconds, 1),
                     **t.params})
    return pd.DataFrame(rows)


def write_results(study: optuna.Study, cfg: Config, folder: Path, metric: str) -> None:
    """Print the table, write trials.csv, and best.yaml when a trial completed."""
    table = results_table(study, metric)
    table.to_csv(folder / "trials.csv", index=False)
    print("\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
    print(f"results    {folder / 'trials.csv'}")
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        print("best       no trial completed, so no best.yaml")
        return
    best = study.best_trial
    best_cfg = with_overrides(cfg, {**best.params, "output_dir": str(Path(cfg.output_dir) / "best"), "search": None})
    path = folder / "best.yaml"
    body = {k: v for k, v in best_cfg.to_dict().items() if k != "search"}  # a plain training config
    header = (f"# Best of {len(table)} trials of {folder.name}: trial {best.number}, {metric} "
              f"{best.value:.4f}\n# with {_format_values(best.params)}. Run: textune train {path}\n")
    path.write_text(header + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    print(f"best       trial {best.number}: {metric} {best.value:.4f} | config {path}")
