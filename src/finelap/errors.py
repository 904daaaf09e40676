"""Exception types. User errors carry a one-line message that names the file and the problem."""
from __future__ import annotations


class FinelapError(Exception):
    """Base class for errors caused by user input; the CLI prints them as one line, no traceback."""


class AudioError(FinelapError):
    """An audio file could not be used (missing, empty, corrupt, NaN/Inf, unsupported format)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DataFormatError(FinelapError):
    """A manifest/label file is malformed. `line` is 1-based where known."""

    def __init__(self, path: object, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class ConfigError(FinelapError):
    """A configuration is contradictory or names an unknown option."""


class CheckpointError(FinelapError):
    """A checkpoint directory is missing, incomplete or of an incompatible version."""
