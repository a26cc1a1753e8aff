"""The one exception type for user mistakes.

The CLI prints a `TextuneError` as a single line and exits non-zero; anything else is a bug and keeps
its traceback. Raise it with what was got, what was expected and the likely fix.
"""


class TextuneError(Exception):
    """A problem with the user's input (config, data, model path), not with textune itself."""


class ConfigError(TextuneError):
    """One or more invalid config keys; the message lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + "; ".join(problems))


class TrainingInterrupted(TextuneError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""
