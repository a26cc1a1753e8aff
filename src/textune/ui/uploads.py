"""Data files uploaded from the new-run form, kept in RUNS/.textune-ui/uploads/ for the runs that read them.

The file is the request's raw body rather than a multipart form: FastAPI's `UploadFile` needs python-multipart,
which textune does not otherwise depend on, and one file per request needs no form encoding. The body is
streamed to a temporary file and counted as it comes, so an upload over the limit is cut off without filling
the disk, and nothing of it is left.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from fastapi import Request

from textune.ui.runs import STATE_DIR, UIError

UPLOAD_LIMIT = 512 * 1024 * 1024  # bytes; a data file larger than this is better given by its path
# data.FORMATS' extensions (textune.data imports the datasets library, which the UI process does not need) and the
# CoNLL files a token classifier reads.
DATA_EXTENSIONS = (".csv", ".tsv", ".txt", ".jsonl", ".json", ".parquet", ".conll", ".bio")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A plain file name from a browser's (no folder, no leading dot, only letters, digits, '.', '_', '-').

    Raises:
        UIError: 400 for a name without a data file's extension.
    """
    name = UNSAFE.sub("_", Path(filename.replace("\\", "/")).name).lstrip("._")[:100]
    suffix = Path(name).suffix.lower()
    if not name or suffix not in DATA_EXTENSIONS:
        raise UIError(400, f"filename {filename!r}: upload a data file ({', '.join(DATA_EXTENSIONS)})")
    return name


def free_path(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem-2.ext, -3, ... : an upload never replaces a file a run may read."""
    path, stem, suffix, n = folder / name, Path(name).stem, Path(name).suffix, 2
    while path.exists():
        path, n = folder / f"{stem}-{n}{suffix}", n + 1
    return path


async def store_upload(root: Path, filename: str, request: Request) -> dict:
    """Write the request's body to RUNS/.textune-ui/uploads/NAME; {path, bytes}.

    Raises:
        UIError: 400 a name that is not a data file's or an empty body; 413 a body over `UPLOAD_LIMIT`.
    """
    name = safe_name(filename)
    limit = UPLOAD_LIMIT
    too_big = UIError(413, f"{name}: larger than the upload limit ({limit / 2**20:,.0f} MiB); give the data file's "
                           f"path in data.train instead")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big
    folder = root / STATE_DIR / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)  # two uploads never share one
    tmp, size = Path(tmp_name), 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                f.write(chunk)
        if size == 0:
            raise UIError(400, f"{name}: the upload is empty; send the file's bytes as the request body")
        path = free_path(folder, name)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(path), "bytes": size}
