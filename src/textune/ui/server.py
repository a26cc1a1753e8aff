"""`textune ui`: check the address and serve the app under uvicorn."""

from __future__ import annotations

from pathlib import Path

from textune.errors import TextuneError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_ui(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, token: str | None = None) -> None:
    """Serve the UI until interrupted.

    Raises:
        TextuneError: a host other than loopback without a token (the UI launches processes on this machine, so
            it is never open to the network without one).
    """
    import uvicorn

    from textune.ui.app import create_ui_app

    if host not in LOOPBACK and token is None:
        raise TextuneError(f"--host {host}: textune ui launches training processes on this machine, so it needs a "
                           f"token when reachable from other machines; add --token-env NAME (or keep the default "
                           f"--host 127.0.0.1)")
    app = create_ui_app(runs_dir, token)
    shown = "localhost" if host in LOOPBACK else host
    print(f"textune ui  runs in {app.state.runs.root}  on http://{shown}:{port}  (API docs at /docs; Ctrl-C stops "
          f"the UI, not the runs it launched)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
