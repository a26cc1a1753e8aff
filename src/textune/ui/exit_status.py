"""`python -m textune.ui.exit_status STEM ARGS...`: what `textune ui` starts for a run or an action.

It runs `textune ARGS` in this process and writes its exit status to STEM.exit (`runs.read_state` reads it), so a
UI started after the process ended still knows how it ended: only a process's parent can wait for its exit
status, and a restarted UI is not the parent. A module of its own, apart from the launcher, because it imports
the CLI, which imports the UI.
"""

from __future__ import annotations

import sys
from pathlib import Path


def record_exit(argv: list[str]) -> int:
    from textune.cli import main

    stem, args = argv[0], argv[1:]
    code = 1  # an exception out of main: a crash
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors exit 2
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        Path(f"{stem}.exit").write_text(str(code))
    return code


if __name__ == "__main__":
    sys.exit(record_exit(sys.argv[1:]))
