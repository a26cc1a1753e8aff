"""Writing files and folders so that a reader never sees them half-written.

Everything textune writes for later use (models, histories, predictions, augmented tables, converted GGUF
folders, adapter registries) goes through `replace_atomically`: the content is written under a temporary
name beside the target and renamed over it only once complete, so an interrupt, a full disk or a crash
mid-write leaves the previous version (or nothing), never a truncated one. Checkpoints have their own
protocol (several processes write into one folder before the main one renames it: `checkpoint.py`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def old_copy(target: Path) -> Path:
    """Where a replaced folder waits between the two renames (a resumed run puts it back if killed there)."""
    return target.with_name(target.name + ".old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replace_atomically(target: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` (an empty folder if `folder`) to write into; when the block ends
    without an error it becomes `target`, and on any error (KeyboardInterrupt included) it is removed.

    The temporary name is hidden and carries the process id, so two processes writing the same target do not
    write into each other's files; the last to finish wins. A file is swapped in with one `os.replace`; a
    folder cannot be renamed over a non-empty one, so the old folder moves to `TARGET.old` first and is deleted
    after the new one is in place (see `old_copy`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # a file's suffix stays last so writers that pick a format by extension (pandas, datasets) still see it
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}" if folder else
                           f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and target.exists():
            old = old_copy(target)
            _remove(old)
            target.rename(old)
            tmp.rename(target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)
