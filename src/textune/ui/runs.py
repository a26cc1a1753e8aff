"""Reading the runs folder for `textune ui`: which folders are runs, their status, the runs table's rows and
one run's details. Pure file reading: no FastAPI, no ML library, so the runs page stays fast.

A run is a folder directly under the runs folder holding config.yaml (what `textune train` writes first).

Status (the liveness rule):
- `running`: the process `textune ui` launched for it is alive (its pid, in RUNS/.textune-ui/NAME.json, answers
  and its command line is textune's, so a reused pid is not taken for it); or, for a run started elsewhere
  (the CLI: no pid known), no metrics.json newer than its history and a file of it written in the last
  `FRESH_SECONDS`.
- `finished`: metrics.json written after the last history record (a run writes it last).
- `stopped`: not running, not finished, and a checkpoint to resume from (Ctrl-C, the stop button, a kill),
  or its process exited with 130, textune's status for an interrupted run.
- `failed`: anything else (an error before the first checkpoint, a crash); a run launched by the UI gives
  the last line of its log as the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from pathlib import Path

import yaml

from textune.errors import TextuneError, is_onnx_export

# A run started from the CLI is taken as running while one of its files changed this recently (a logging step
# or an evaluation longer than this makes it look stopped until its next write).
FRESH_SECONDS = 120.0
STATE_DIR = ".textune-ui"  # under the runs folder: pid files, launch configs and logs of the UI's processes
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
EXIT_INTERRUPTED = 130  # textune's status for a run stopped by SIGINT/SIGTERM (cli.EXIT_INTERRUPTED)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on 200 configs


class UIError(TextuneError):
    """A request the UI refuses: `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_name(name: str) -> str:
    """`name` if it can name a folder directly under the runs folder, else UIError 400."""
    if not NAME_RE.match(name or "") or name in (".", ".."):
        raise UIError(400, f"run name {name!r}: use letters, digits, '.', '_' and '-' only (a folder directly "
                           f"under the runs folder, no '/' or '..')")
    return name


def run_path(root: Path, name: str, must_exist: bool = True) -> Path:
    """The folder of run `name` under `root`, refusing names that leave it (`..`, '/', a symlink out).

    Raises:
        UIError: 400 for a name that is not a plain folder name or a symlink; 404 for no such run (or a folder
            that is not a textune run) when `must_exist`.
    """
    path = root / check_name(name)
    if path.is_symlink() or (path.exists() and path.resolve().parent != root.resolve()):
        raise UIError(400, f"run {name!r} is a link out of the runs folder {root}; the UI reads only folders in it")
    launched = (root / STATE_DIR / f"{name}.json").is_file()  # launched, maybe not started (or failed) yet
    if must_exist and not (path / "config.yaml").is_file() and not launched:
        what = "is not a textune run (no config.yaml)" if path.is_dir() else "does not exist"
        raise UIError(404, f"run {name!r} {what} in {root}")
    return path


def is_run(path: Path) -> bool:
    return (not path.name.startswith(".") and not path.is_symlink() and (path / "config.yaml").is_file()
            and not is_onnx_export(path))


def read_yaml(path: Path) -> dict:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader
    return data if isinstance(data, dict) else {}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or being written
        return None


def read_history(run: Path, since: int = 0) -> list[dict]:
    """History records from the `since`-th on; a half-written last line (a run mid-write) is left out."""
    path = run / "history.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines()[since:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_records(run: Path, size: int = 8192) -> list[dict]:
    """The last few history records, read from the file's end only (the table of a long run's history)."""
    path = run / "history.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            lines = f.read().decode("utf-8", "replace").splitlines()[1:] if f.tell() > size else None
    except FileNotFoundError:
        return []
    if lines is None:
        lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def has_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def process_state(root: Path, name: str) -> dict | None:
    """What the UI recorded about the process it launched for run `name` (pid, command, log, returncode)."""
    return read_state(root / STATE_DIR / name)


def read_state(stem: Path) -> dict | None:
    """STEM.json, the UI's record of a process it launched, with the exit status the process wrote to STEM.exit
    itself (`exit_status.record_exit`) where the JSON has none: only a process's parent can wait for it, so a UI
    restarted while a run or an action went on would otherwise never learn how it ended."""
    state = read_json(Path(f"{stem}.json"))
    if state is not None and state.get("returncode") is None:
        try:
            state["returncode"] = int(Path(f"{stem}.exit").read_text())
        except (OSError, ValueError):  # still running, or killed before it could write
            pass
    return state


def pid_alive(pid: int | None) -> bool:
    """The process is alive and runs textune (a pid reused by another program does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, PermissionError):
        return False
    except FileNotFoundError:  # no /proc (macOS): the signal answered
        return True
    return b"textune" in cmdline and stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has exited


def run_status(root: Path, run: Path) -> tuple[str, str | None]:
    """(status, reason) of a run folder by the liveness rule in the module docstring."""
    state = process_state(root, run.name)
    if state is not None and pid_alive(state.get("pid")) and state.get("returncode") is None:
        return "running", None
    history, metrics = _mtime(run / "history.jsonl"), _mtime(run / "metrics.json")
    if metrics is not None and (history is None or metrics >= history):
        return "finished", None
    if state is None:
        newest = max(m for m in (history, _mtime(run / "config.yaml"), _mtime(run / "checkpoints"), 0.0)
                     if m is not None)
        if time.time() - newest < FRESH_SECONDS:
            return "running", None
    reason = log_reason(root, run.name) if state is not None else None
    if has_checkpoint(run) or (state or {}).get("returncode") == EXIT_INTERRUPTED:
        return "stopped", reason
    return "failed", reason


def log_reason(root: Path, name: str) -> str | None:
    """The last line of the launched process's log that says something (textune's one-line error)."""
    return last_line(root / STATE_DIR / f"{name}.log")


def last_line(path: Path) -> str | None:
    """The last line of a log that says something, textune's one-line error where there is one."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("textune:")]
    return (errors or lines or [None])[-1]


def describe_model(config: dict) -> str:
    name = (config.get("model") or {}).get("name")
    return Path(str(name)).name if name else "MiniLM-L6-H384 (packaged)"


def describe_data(config: dict) -> str:
    data, corpus = config.get("data") or {}, (config.get("pretrain") or {}).get("corpus")
    source = data.get("name") or data.get("train") or corpus
    if source is None:
        return ""
    return Path(str(source)).name + (f" ({data['config']})" if data.get("config") else "")


def headline_metric(config: dict, metrics: dict | None, records: list[dict]) -> tuple[str | None, float | None]:
    """(name, value) of the metric that selects the checkpoint: the best one for a finished run, the last
    evaluation's while it runs."""
    name = (metrics or {}).get("metric") or (config.get("train") or {}).get("metric")
    if metrics is not None and metrics.get("best_metric") is not None:
        return name, metrics["best_metric"]
    evals = [r for r in records if r.get("type") == "eval"]
    if evals and name and f"eval_{name}" in evals[-1]:
        return name, evals[-1][f"eval_{name}"]
    return name, None


class RunsFolder:
    """The runs folder the UI shows. Parsed config.yaml and metrics.json files are kept by modification time,
    so a reload of the runs page re-reads only what changed (the status is worked out afresh every time)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._cache: dict[tuple[str, str], tuple[float, object]] = {}

    def _cached(self, path: Path, read) -> object:
        mtime = _mtime(path)
        if mtime is None:
            return None
        key = (str(path.parent), path.name)
        hit = self._cache.get(key)
        if hit is None or hit[0] != mtime:
            hit = (mtime, read(path))
            self._cache[key] = hit
        return hit[1]

    def names(self) -> list[str]:
        """Run folders, and runs the UI launched whose folder is not written yet (or never was: they failed)."""
        if not self.root.is_dir():
            return []
        names = {p.name for p in self.root.iterdir() if is_run(p)}
        state = self.root / STATE_DIR
        if state.is_dir():
            names.update(p.stem for p in state.glob("*.json") if not (self.root / p.stem).exists())
        return sorted(names)

    def config(self, name: str) -> dict:
        """RUN/config.yaml, or the config the UI launched the run with while the run has not written its own."""
        run_config = self.root / name / "config.yaml"
        path = run_config if run_config.is_file() else self.root / STATE_DIR / f"{name}.yaml"
        return self._cached(path, read_yaml) or {}

    def summary(self, name: str) -> dict:
        """One row of the runs table: what it needs and no more (no full history)."""
        run = self.root / name
        config = self.config(name)
        metrics = self._cached(run / "metrics.json", read_json)
        status, reason = run_status(self.root, run)
        records = last_records(run) if metrics is None else []
        metric, value = headline_metric(config, metrics, records)
        started = _mtime(run / "config.yaml") or _mtime(self.root / STATE_DIR / f"{name}.json") or time.time()
        last = max(m for m in (_mtime(run / "history.jsonl"), _mtime(run / "metrics.json"), started) if m is not None)
        duration = (metrics or {}).get("train", {}).get("seconds") if status == "finished" else None
        if duration is None:
            duration = (time.time() if status == "running" else last) - started
        last_record = records[-1] if records else {}
        return {"name": name, "task": config.get("task"), "model": describe_model(config),
                "method": (config.get("tuning") or {}).get("method"), "data": describe_data(config),
                "metric": metric, "value": value, "best_step": (metrics or {}).get("best_step"),
                "status": status, "reason": reason, "duration_s": round(duration, 1),
                "date": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
                "step": (metrics or {}).get("train", {}).get("steps") or last_record.get("step")}

    def summaries(self) -> list[dict]:
        return [self.summary(name) for name in self.names()]

    def detail(self, name: str, since: int = 0) -> dict:
        """Everything about one run the run page shows: status, config, metrics, history (from record `since`
        on, so a page polling a live run fetches only the new ones), progress."""
        run = run_path(self.root, name)
        config = self.config(name)
        status, reason = run_status(self.root, run)
        history = read_history(run, since)
        out = {"name": name, "status": status, "reason": reason, "config": config,
               "metrics": read_json(run / "metrics.json"), "data_stats": read_json(run / "data_stats.json"),
               "history": history, "since": since, "next": since + len(history),
               "report": (run / "report.html").is_file(), "resumable": has_checkpoint(run)}
        out["progress"] = progress(config, run, history if since == 0 else last_records(run), status)
        return out


def progress(config: dict, run: Path, records: list[dict], status: str) -> dict:
    """Step, epoch, share done and time left of a run, from its last training record and its planned epochs
    (train.max_steps, where set, is read from the step instead)."""
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        return {"step": 0, "epoch": 0.0, "fraction": 0.0 if status != "finished" else 1.0, "eta_s": None}
    last, t = train[-1], config.get("train") or {}
    if t.get("max_steps"):
        fraction = last["step"] / t["max_steps"]
    else:
        fraction = last.get("epoch", 0.0) / float(t.get("epochs") or 1.0)
    fraction = 1.0 if status == "finished" else min(fraction, 1.0)
    started = _mtime(run / "config.yaml") or time.time()
    elapsed = (_mtime(run / "history.jsonl") or started) - started
    eta = elapsed * (1 - fraction) / fraction if status == "running" and fraction > 0 else None
    return {"step": last["step"], "epoch": last.get("epoch"), "fraction": round(fraction, 4),
            "eta_s": None if eta is None else round(eta, 1)}
