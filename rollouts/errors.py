"""Errors a user can act on. Each message says what is wrong, where, and what to do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class RolloutsError(Exception):
    """Base of every error we raise on purpose; the CLI prints its message without a traceback.

    ``exit_code``: 2 when the caller must change something (input, parameters, settings) before
    rerunning, 1 when rerunning the same command later is the fix.
    """

    exit_code = 2


class InputError(RolloutsError):
    """The input dataset is unusable. Raised before any request is sent."""

    def __init__(self, path: Path | str, problems: list[tuple[int | None, str]], total: int = 0):
        self.path = Path(path)
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

    exit_code = 1


# Exit status per stop cause: its own for the deadline, the shell's 128 + signal otherwise (a
# Prefect cancellation reaches a worker's flow-run process as SIGTERM).
STOP_EXIT_CODES = {"deadline": 3, "SIGINT": 130, "SIGTERM": 143, "cancelled": 143}


class RunStopped(IncompleteRun):
    """The run stopped early (deadline, Ctrl-C, SIGTERM, a cancellation) with rollouts missing;
    everything finished is kept and rerunning the same command continues."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = STOP_EXIT_CODES.get(reason, 1)

    def __reduce__(self) -> tuple[type[RunStopped], tuple[str, str]]:
        # Pickled back from Dask workers: rebuild with both arguments.
        return (type(self), (str(self), self.reason))


class AgentUnreachable(RolloutsError):
    """An agent's address does not accept connections; found before any rollout is sent."""

    exit_code = 1


class SharedStorageError(RolloutsError):
    """A Dask worker cannot see the run's work directory or result storage."""


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
