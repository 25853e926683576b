"""Errors a user can act on. Each message says what is wrong, where, and what to do."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class ExitCode(IntEnum):
    """The exit status of a `rollouts` command: the one table. Errors carry theirs
    (``RolloutsError.exit_code``), a stop its cause's (``STOP_EXIT_CODES``)."""

    OK = 0
    INCOMPLETE = 1  # rerunning the same command later is the fix
    USAGE = 2  # the caller must change something (input, parameters, settings) first
    DEADLINE = 3  # stopped at max_duration; rerunning the same command continues
    SIGINT = 130  # the shell's 128 + signal
    SIGTERM = 143  # also a Prefect cancellation: it reaches a worker's flow-run process as SIGTERM


# Exit status per stop cause: its own for the deadline, the shell's 128 + signal otherwise.
STOP_EXIT_CODES: dict[str, ExitCode] = {
    "deadline": ExitCode.DEADLINE,
    "SIGINT": ExitCode.SIGINT,
    "SIGTERM": ExitCode.SIGTERM,
    "cancelled": ExitCode.SIGTERM,
}

# Several parts that did not complete (the datasets of a multi-dataset run) exit with the
# first of these among theirs: something to change first, then a deadline, then a rerun.
_PRECEDENCE = (ExitCode.USAGE, ExitCode.DEADLINE, ExitCode.INCOMPLETE)


def combined_exit_code(codes: Iterable[int]) -> int:
    """The exit status of several parts that did not complete, by ``_PRECEDENCE``; a code
    outside it only when none of the parts has one in it (the first such)."""
    given = list(codes)
    ranked = [c for c in _PRECEDENCE if c in given]
    if ranked:
        return ranked[0]
    return given[0] if given else ExitCode.INCOMPLETE


class RolloutsError(Exception):
    """Base of every error we raise on purpose; the CLI prints its message without a traceback.

    ``exit_code``: USAGE (2) when the caller must change something (input, parameters,
    settings) before rerunning, INCOMPLETE (1) when rerunning the same command later is the fix.
    """

    exit_code: int = ExitCode.USAGE


class InputError(RolloutsError):
    """The input dataset is unusable. Raised before any request is sent."""

    def __init__(self, path: Path | str, problems: list[tuple[int | None, str]], total: int = 0):
        # A URL (s3://bucket/key) stays as given: Path() would fold its `//`.
        self.path: Path | str = path if isinstance(path, str) and "://" in path else Path(path)
        self.problems = problems
        shown = "\n".join(
            f"  {self.path}:{line}: {msg}" if line else f"  {self.path}: {msg}"
            for line, msg in problems
        )
        more = total - len(problems)
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        noun = "problem" if max(total, len(problems)) == 1 else "problems"
        super().__init__(
            f"invalid input {self.path} ({max(total, len(problems))} {noun}); "
            f"nothing was sent to the agent:\n{shown}{suffix}"
        )


class ConfigError(RolloutsError):
    """Bad run parameters or settings."""


class RunConflict(RolloutsError):
    """The request does not match the collection already in progress for this output."""


class RunLocked(RolloutsError):
    """Another process is collecting into the same output."""


class AgentResolutionError(RolloutsError):
    """An agent name could not be turned into a URL."""


class IncompleteRun(RolloutsError):
    """The run ended with rollouts neither written nor terminally failed."""

    exit_code = ExitCode.INCOMPLETE


class RunStopped(IncompleteRun):
    """The run stopped early (deadline, Ctrl-C, SIGTERM, a cancellation) with rollouts missing;
    everything finished is kept and rerunning the same command continues."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = STOP_EXIT_CODES.get(reason, ExitCode.INCOMPLETE)

    def __reduce__(self) -> tuple[type[RunStopped], tuple[str, str]]:
        # Pickled back from Dask workers: rebuild with both arguments.
        return (type(self), (str(self), self.reason))


class AgentUnreachable(RolloutsError):
    """An agent's address does not accept connections; found before any rollout is sent."""

    exit_code = ExitCode.INCOMPLETE


class SharedStorageError(RolloutsError):
    """A Dask worker cannot see the run's work directory or result storage."""


class WorkersUnavailable(RolloutsError):
    """No worker job started in time (a busy queue): nothing was sent; rerun later."""

    exit_code = ExitCode.INCOMPLETE


def validation_message(
    error: ValidationError,
    top: str = "parameters",
    path: Callable[[tuple[int | str, ...]], str] | None = None,
) -> str:
    """pydantic's errors as one line: `num_repeats: Value error, ...; limit: ...` (the field
    path, or ``top`` for the model as a whole). ``path`` writes a field's path otherwise than
    its parts joined by dots."""
    path = path or (lambda loc: ".".join(str(p) for p in loc))
    return "; ".join(f"{path(e['loc']) or top}: {e['msg']}" for e in error.errors())
