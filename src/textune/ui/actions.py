"""A finished run's actions in `textune ui`: export to ONNX, merge an adapter, push to the Hub.

Each is the CLI command (`textune export|merge|push RUN ...`) launched in its own process by the launcher, so the
UI and the command line share one code path. What the UI knows about one lives in
RUNS/.textune-ui/actions/NAME.ACTION.json (pid, command, returncode), .log (its output) and .exit (the exit
status the process wrote itself, `exit_status.record_exit`): a folder of its own,
so an action's files are never taken for a launched run's (RUNS/.textune-ui/NAME.json).

Whether an action applies is asked of the run's files and its task (`Task.export_spec`), never of a task name.
Pure file reading here, like runs.py; the task registry is imported only when an export is asked for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from textune.ui.runs import STATE_DIR, UIError, last_line, pid_alive, read_state, run_path, run_status

ACTIONS = ("export", "merge", "push")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file in an adapter folder (adapters.ADAPTER_CONFIG; PEFT not imported)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")


def action_stem(root: Path, name: str, action: str) -> Path:
    """RUNS/.textune-ui/actions/NAME.ACTION: its .json (state) and .log (output) sit beside each other."""
    return root / STATE_DIR / "actions" / f"{name}.{action}"


def action_state(root: Path, name: str, action: str) -> dict | None:
    """{status: running|finished|failed, line: the log's last line, command} of the last time `action` was launched
    for run `name`; None if never."""
    stem = action_stem(root, name, action)
    state = read_state(stem)
    if state is None:
        return None
    code = state.get("returncode")
    status = ("running" if code is None and pid_alive(state.get("pid"))
              else "finished" if code == 0 else "failed")
    line = last_line(Path(f"{stem}.log"))
    return {"status": status, "line": line, "command": " ".join(state.get("command", [])[2:])}  # from `textune`


def action_states(root: Path, name: str) -> dict[str, dict | None]:
    return {action: action_state(root, name, action) for action in ACTIONS}


def refusal(root: Path, name: str, action: str) -> UIError | None:
    """Why `action` cannot be launched for run `name` now (a UIError to raise), else None: 404 no such action;
    409 a run still training, without a model yet, or the same action running; 400 an action that does not apply
    to this run (merge of a full model, export of a task with no export spec)."""
    if action not in ACTIONS:
        return UIError(404, f"no action {action!r}; the run actions are {', '.join(ACTIONS)}")
    path = run_path(root, name)
    status, _ = run_status(root, path)
    if status == "running":
        return UIError(409, f"run {name} is running; {action} it once it has finished (or stop it first)")
    if not (path / "model").is_dir():
        return UIError(409, f"run {name} has no model folder yet ({status}): there is nothing to {action}")
    if (action_state(root, name, action) or {}).get("status") == "running":
        return UIError(409, f"{action} of run {name} is already running; wait for it to end")
    if action == "merge" and not (path / "model" / ADAPTER_CONFIG).is_file():
        return UIError(400, f"run {name} holds a full model, not an adapter: there is nothing to merge")
    if action == "export":
        from textune.tasks import get_task, task_of

        task = get_task(task_of(path))
        if task.export_spec is None:
            return UIError(400, f"run {name}: {task.name} models cannot be exported to ONNX (the task has no "
                                f"export spec)")
    return None


def action_command(path: Path, action: str, options: dict) -> tuple[list[str], dict[str, str]]:
    """(the CLI's arguments, the environment variables to add) for `action` on the run at `path`.

    The push token is read here from the UI's own environment, from the variable the request names, and handed
    to the child as HF_TOKEN in its environment: never in its command line, a state file or the log.

    Raises:
        UIError: 400 for an option of the wrong kind, a missing repo, or a token variable that is not set.
    """
    args, env = [action, str(path)], {}
    if options.get("overwrite"):
        args.append("--overwrite")
    if action == "export" and options.get("quantize"):
        if options["quantize"] != "int8":
            raise UIError(400, f"quantize: {options['quantize']!r}; ONNX export quantises to int8 only (or leave "
                               f"it out)")
        args += ["--quantize", "int8"]
    if action == "push":
        repo, token_env = options.get("repo"), options.get("token_env") or "HF_TOKEN"
        if not isinstance(repo, str) or not repo.strip():
            raise UIError(400, "repo: give the Hub model repository to push to, as USER/NAME")
        if not ENV_NAME_RE.match(str(token_env)):
            raise UIError(400, f"token_env: {token_env!r} is not an environment variable name (e.g. HF_TOKEN)")
        if not os.environ.get(token_env):
            raise UIError(400, f"token_env: {token_env} is not set in the environment textune ui runs in; set it "
                               f"there (export {token_env}=hf_...) and restart textune ui")
        args += ["--repo", repo.strip()] + (["--private"] if options.get("private") else [])
        env["HF_TOKEN"] = os.environ[token_env]
    return args, env
