"""The one exception type for user mistakes.

The CLI prints a `TextuneError` as a single line and exits non-zero; anything else is a bug and keeps
its traceback. Raise it with what was got, what was expected and the likely fix.
"""

import json
from pathlib import Path


class TextuneError(Exception):
    """A problem with the user's input (config, data, model path), not with textune itself."""


class ConfigError(TextuneError):
    """One or more invalid config keys; the message lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + "; ".join(problems))


class TrainingInterrupted(TextuneError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""


# The file that marks a folder written by `textune export --format onnx`. Named here, in the module every
# stage imports and which imports no ML library, so the config, the task registry and the model loaders
# can all recognise an export.
ONNX_MODEL_FILE = "model.onnx"
ONNX_EXPORT_INFO = "textune_onnx.json"  # what was exported from where, and how close its outputs came


def is_onnx_export(path) -> bool:
    return (Path(path).expanduser() / ONNX_MODEL_FILE).is_file()


def onnx_export_error(path, need: str = "a PyTorch run or model folder", fix: str | None = None) -> TextuneError:
    """The error for an ONNX export given where `need` is required: it says what the folder is, what runs
    on it, and `fix`, by default the run to use instead (named in its textune_onnx.json)."""
    info_file = Path(path).expanduser() / ONNX_EXPORT_INFO
    source = json.loads(info_file.read_text()).get("source") if info_file.is_file() else None
    fix = fix or (f"use the run it was exported from ({source})" if source else "use the run it was exported from")
    return TextuneError(f"{path} is an ONNX export (textune export), which textune predict, evaluate and serve "
                        f"run, but this needs {need}; {fix}")
