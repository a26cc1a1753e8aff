"""Experiment trackers (`logging.report_to`): TensorBoard, MLflow and Weights & Biases, through Accelerate.

The loop hands each record it writes to history.jsonl to `Accelerator.log` too, so there is one way to log:
Accelerate's trackers, which log on the main process only. textune builds the tracker objects itself
rather than passing their names to `Accelerator(log_with=...)`, because each must write inside the run folder
and Accelerate's name-based set-up gives all of them one project name: TensorBoard would write to
`logging_dir/<project>` and MLflow would use that name for the experiment too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker, on_main_process

from textune.errors import TextuneError

PROJECT = "textune"  # MLflow experiment and W&B project; each run is named after its folder


class RunFolderMLflowTracker(MLflowTracker):
    """Accelerate's MLflow tracker with the run's own local store, RUN/mlflow.db, unless MLFLOW_TRACKING_URI
    names another. (MLflow 3 refuses the plain-folder `file:` store, so the local store is SQLite.)"""

    def __init__(self, run: Path):
        super().__init__(experiment_name=PROJECT, run_name=run.name)
        self.run_dir = run

    @on_main_process
    def start(self):
        import mlflow
        from mlflow.exceptions import MlflowException

        # Set every time, also to the environment's URI: an earlier run in this process set its own store, which
        # MLflow would otherwise keep using.
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri or f"sqlite:///{self.run_dir / 'mlflow.db'}")
        if not uri:  # the experiment's artifact folder, beside its store (a server keeps its own default)
            self.logging_dir = str(self.run_dir / "mlartifacts")
        try:
            super().start()  # the store is opened here
        except MlflowException as e:
            raise mlflow_start_error(uri, e) from e


def mlflow_start_error(uri: str | None, error: Exception) -> TextuneError:
    """What MLflow wants, in one line, for a store it refused to open (its own message is a paragraph)."""
    where = f"MLFLOW_TRACKING_URI={uri}" if uri else "its store in the run folder"
    if "MLFLOW_ALLOW_FILE_STORE" in str(error):  # MLflow 3 keeps the plain-folder store for those who opt in
        return TextuneError(f"logging.report_to: mlflow refuses {where}, a file store, unless "
                            f"MLFLOW_ALLOW_FILE_STORE=true; set that, point MLFLOW_TRACKING_URI at a database "
                            f"(sqlite:///mlflow.db) or a server, or unset it (the run then logs to RUN/mlflow.db)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TextuneError(f"logging.report_to: mlflow could not open {where}: {first}; fix MLFLOW_TRACKING_URI or "
                        f"remove mlflow from logging.report_to")


def build_trackers(names: list[str], run: Path) -> list[GeneralTracker]:
    """Accelerate trackers for `logging.report_to` (config validation checked the names and packages), not yet
    started: `start_trackers` starts them once the run folder exists, before any of its files is written."""
    trackers: list[GeneralTracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", str(run)))  # -> RUN/tensorboard
        elif name == "mlflow":
            trackers.append(RunFolderMLflowTracker(run))
        elif name == "wandb":
            # Offline (synced later with `wandb sync RUN/wandb/...`) unless the user chose with WANDB_MODE.
            mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
            trackers.append(WandBTracker(PROJECT, name=run.name, dir=str(run), **mode))
    return trackers


def start_trackers(accelerator, project: str, config: dict[str, Any]) -> None:
    """Start the trackers given to `accelerator` (on the main process) and log the config to each.

    Raises:
        TextuneError: a tracker could not start; it says which and, for MLflow's stores, what MLflow wants.
    """
    try:
        accelerator.init_trackers(project, config=config)
    except TextuneError:
        raise
    except Exception as e:  # a tracker library's own error: one line, not its traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        names = ", ".join(getattr(t, "name", type(t).__name__) for t in accelerator.log_with or [])
        raise TextuneError(f"logging.report_to: a tracker ({names}) could not start: {type(e).__name__}: {first}; "
                           f"fix its settings or remove it from logging.report_to") from e


def finish_trackers(trackers: list[GeneralTracker]) -> None:
    """Close the trackers that were started (files flushed, the MLflow run ended). Not `end_training`, which
    also destroys the process group that later runs in this process (a search's trials) still use."""
    for tracker in trackers:
        # A tracker's `tracker` property reads what start() made: unset before it, and on other processes.
        if getattr(tracker, "tracker", None) is not None:
            tracker.finish()


def flat_config(section: Any, prefix: str = "") -> dict[str, Any]:
    """A config (or one of its sections) as tracker parameters: `{"train.lr": 3e-05, "data.augment.methods":
    "[]", ...}`. Lists and mappings become JSON text: TensorBoard's hyper-parameters hold only numbers, strings
    and booleans."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def record_values(record: dict) -> dict[str, float]:
    """A history record as tracker metrics: train/loss, train/lr, eval/accuracy, ... (its step is logged apart)."""
    return {f"{record['type']}/{key.removeprefix('eval_')}": value for key, value in record.items()
            if key not in ("type", "step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def final_values(metrics: dict) -> dict[str, float]:
    """metrics.json's scalar results as tracker metrics: final/validation_accuracy, final/test_f1, ..."""
    return {f"final/{split}_{key}": value for split in ("validation", "test") for key, value in
            (metrics.get(split) or {}).items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
