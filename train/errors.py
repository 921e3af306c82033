"""The project's own error types: what the CLI turns into one line and an exit status, never a traceback."""


class ConfigError(Exception):
    """A user mistake in a recipe, override or data file: printed as one line, exit status 2."""


class StopRun(Exception):
    """The run cannot usefully continue (e.g. zero pairs); the message says why and what to change. Exit status 1."""


class NonFiniteLossError(RuntimeError):
    """Training diverged (loss nan/inf); `Run.phase` turns it into a one-line stop."""
