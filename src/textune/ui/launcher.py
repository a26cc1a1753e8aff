"""Launching, stopping and resuming runs for `textune ui`.

A run is launched as `textune train` (or `textune pretrain`) in its own process, so the UI and the command line
share one code path. The process gets its own session (`start_new_session`): closing the browser, reloading
the page or stopping the UI does not stop it, and Ctrl-C in the UI's terminal does not reach it. What the UI
knows about it lives beside the runs, in RUNS/.textune-ui/: NAME.yaml (the config it was launched with),
NAME.log (its output), NAME.json (pid, command, start time; the exit status once the UI has seen it exit) and
NAME.exit (the exit status as the process wrote it, for a UI restarted meanwhile), which `runs.run_status` reads.

Stop sends SIGINT to the run's process group, as Ctrl-C in a terminal does: the run finishes its step, writes
a checkpoint and exits with status 130; resume runs `textune train RUN/config.yaml --resume`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from textune.errors import ConfigError, TextuneError
from textune.ui.actions import action_command, action_stem, refusal
from textune.ui.runs import STATE_DIR, RunsFolder, UIError, check_name, has_checkpoint, \
    pid_alive, read_json, run_path, run_status


def flatten(mapping: dict, prefix: str = "") -> dict:
    """A nested config mapping as dotted keys (`{"train": {"lr": 1}}` -> `{"train.lr": 1}`): `load_config`'s
    overrides, which it nests back the same way, so validation and its messages are the CLI's. Empty
    mappings stay values (`class_weights: {}`)."""
    out: dict = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_problems(error: TextuneError) -> list[dict]:
    """[{key, message}] of a config error: each problem names its key first (`train.lr: expected ...`)."""
    problems = error.problems if isinstance(error, ConfigError) else [str(error)]
    out = []
    for problem in problems:
        key, sep, _ = problem.partition(": ")
        out.append({"key": key if sep and " " not in key else None, "message": problem})
    return out


def validate_config(config: dict, output_dir: str | Path | None = None):
    """The typed `Config` of a config mapping (the YAML's, as JSON), as `textune train` validates it.

    Raises:
        UIError: 422 listing every problem (`problems`: [{key, message}]), with the CLI's message.
    """
    from textune.config import load_config

    if not isinstance(config, dict):
        raise UIError(422, f"config: expected a mapping of sections (model:, data:, train:), got "
                           f"{type(config).__name__}")
    overrides = flatten(config)
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    try:
        return load_config(None, overrides)
    except TextuneError as e:
        error = UIError(422, str(e))
        error.problems = config_problems(e)
        raise error from None


def data_check(cfg) -> dict:
    """`textune validate-data` on a validated config's data: {ok, report (its text), findings (how many
    warnings), message (why it fails, the CLI's line; None when it passes)}. A data file that cannot be read is a
    failing check, with the reader's message."""
    from textune.data_checks import enforce
    from textune.tasks import get_task

    try:
        report = get_task(cfg.task).check_data(cfg)
    except TextuneError as e:
        if cfg.pretrain.corpus:  # validate-data checks labelled data; `textune pretrain` checks its corpus itself
            return {"ok": True, "report": str(e), "findings": 0, "message": None}
        return {"ok": False, "report": str(e), "findings": 1, "message": str(e)}
    try:
        enforce(report, cfg.data.strict)
    except TextuneError as e:
        return {"ok": False, "report": report.format(), "findings": len(report.findings), "message": str(e)}
    return {"ok": True, "report": report.format(), "findings": len(report.findings), "message": None}


def command_of(config: dict) -> str:
    """`pretrain` for a config with a corpus, else `train`, as the CLI tells them apart."""
    return "pretrain" if (config.get("pretrain") or {}).get("corpus") else "train"


def write_state(stem: Path, state: dict) -> None:
    """STEM.json, replaced whole (a reader never sees half of it)."""
    tmp = stem.parent / f".{stem.name}.json.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    tmp.replace(Path(f"{stem}.json"))


class Launcher:
    """Starts, stops and resumes the runs of one runs folder; keeps the launched processes to collect their
    exit status (a child nobody waits for would linger as a zombie)."""

    def __init__(self, runs: RunsFolder):
        self.runs = runs
        self.children: dict[str, subprocess.Popen] = {}

    @property
    def state_dir(self) -> Path:
        return self.runs.root / STATE_DIR

    def reap(self) -> None:
        """Record the exit status of launched processes (runs and actions) that have ended."""
        for stem, child in list(self.children.items()):
            code = child.poll()
            if code is None:
                continue
            del self.children[stem]
            state = read_json(Path(f"{stem}.json")) or {}
            state["returncode"] = code
            write_state(Path(stem), state)

    def _spawn(self, stem: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        """`textune ARGS` in its own session, its output to STEM.log, its pid and command to STEM.json. `env`
        is added to the child's environment only (a token stays out of the command line and the files)."""
        stem.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "textune", *args]  # what it runs, as the UI shows it
        Path(f"{stem}.exit").unlink(missing_ok=True)
        log = Path(f"{stem}.log").open("ab")
        child = subprocess.Popen([sys.executable, "-m", "textune.ui.exit_status", str(stem), *args],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        log.close()  # the child holds its own copy
        self.children[str(stem)] = child
        write_state(stem, {"pid": child.pid, "command": command, "started": time.time(), "log": f"{stem}.log",
                           "returncode": None})

    def launch(self, config: dict, name: str | None = None) -> dict:
        """Validate `config` and start `textune train` on it into RUNS/NAME. Without `name`, the config's
        output_dir names the run (it must then be in the runs folder), else the task and the time do.

        Raises:
            UIError: 422 invalid config, or data that fails `validate-data`; 409 the run folder exists or the run
                is being launched; 400 a bad name or an output_dir outside the runs folder. Nothing is written then.
        """
        name = self._name_for(config, name)
        path = run_path(self.runs.root, name, must_exist=False)
        state = read_json(self.state_dir / f"{name}.json")
        if path.exists() or (state is not None and pid_alive(state.get("pid"))):  # whatever the config says
            raise UIError(409, f"run folder {path} already exists; pick another name (the UI never overwrites a run)")
        cfg = validate_config(config, path)
        checked = data_check(cfg)  # the run would stop on it anyway: say so now, with nothing written
        if not checked["ok"]:
            raise UIError(422, f"data: {checked['message']}")
        from textune.config import with_resolved_paths

        raw, _ = with_resolved_paths(cfg.to_dict())  # the launch file works from any directory
        self.state_dir.mkdir(parents=True, exist_ok=True)
        launch_file = self.state_dir / f"{name}.yaml"
        launch_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        (self.state_dir / f"{name}.log").unlink(missing_ok=True)  # an earlier launch that failed before the folder
        self._spawn(self.state_dir / name, [command_of(raw), str(launch_file)])
        return {"name": name, "status": "running"}

    def _name_for(self, config: dict, name: str | None) -> str:
        if name is not None:
            return check_name(name)
        output_dir = config.get("output_dir") if isinstance(config, dict) else None
        if output_dir is None:
            task = (config.get("task") if isinstance(config, dict) else None) or "run"
            return check_name(f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
        path = Path(str(output_dir)).expanduser().resolve()
        if path.parent != self.runs.root:
            raise UIError(400, f"output_dir: {output_dir} is not directly in the runs folder {self.runs.root}; "
                               f"leave output_dir out and give a \"name\" instead")
        return check_name(path.name)

    def stop(self, name: str) -> dict:
        """SIGINT to the run's process group (Ctrl-C): it writes a checkpoint and exits.

        Raises:
            UIError: 409 for a run that is not running, or one this UI did not launch (no pid known).
        """
        self.reap()
        path = run_path(self.runs.root, name, must_exist=False)
        status, _ = run_status(self.runs.root, path)
        state = read_json(self.state_dir / f"{name}.json")
        if status != "running":
            raise UIError(409, f"run {name} has {status}: there is nothing to stop" if status == "finished"
                          else f"run {name} is {status}, not running: there is nothing to stop")
        if state is None or not pid_alive(state.get("pid")):
            raise UIError(409, f"run {name} was not started by textune ui (no process known): stop it with Ctrl-C "
                               f"in its terminal")
        os.killpg(state["pid"], signal.SIGINT)
        return {"name": name, "status": "stopping"}

    def resume(self, name: str) -> dict:
        """`textune train RUN/config.yaml --resume` in a new process.

        Raises:
            UIError: 409 for a running run or one without a checkpoint.
        """
        self.reap()
        path = run_path(self.runs.root, name)
        status, _ = run_status(self.runs.root, path)
        if status == "running":
            raise UIError(409, f"run {name} is running; stop it before resuming it")
        if not has_checkpoint(path):
            raise UIError(409, f"run {name} has no checkpoint to resume from ({status}); launch it anew from its "
                               f"config")
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
        self._spawn(self.state_dir / name,
                    [command_of(config), str(path / "config.yaml"), "--resume", "--output_dir", str(path)])
        return {"name": name, "status": "running"}


    def act(self, name: str, action: str, options: dict) -> dict:
        """`textune ACTION RUN ...` (export, merge, push) in a new process, as the CLI runs it.

        Raises:
            UIError: 404 no such run or action; 409 the run trains, has no model yet, or the action runs; 400 an
                action that does not apply to the run, or a bad option. Nothing is launched then.
        """
        self.reap()
        refused = refusal(self.runs.root, name, action)
        if refused is not None:
            raise refused
        args, env = action_command(run_path(self.runs.root, name), action, options)
        stem = action_stem(self.runs.root, name, action)
        Path(f"{stem}.log").unlink(missing_ok=True)  # the page shows this launch's last line, not an earlier one's
        self._spawn(stem, args, env)
        return {"name": name, "action": action, "status": "running"}

