"""What reaches the logs when a run fails for a reason the user or the world caused.

Errors we raise on purpose (`RolloutsError`) carry a message that says what is wrong and what to
do; Prefect's engine would log each with a traceback through its own frames, which only buries
that message. Tracebacks stay for everything else: those are our bugs.

Plain `logging`, no Prefect import: the filters attach to Prefect's run loggers by name.
"""

from __future__ import annotations

import logging
import os

from rollouts.errors import RolloutsError

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
VERBOSE_ENV = "ROLLOUTS_VERBOSE"


def verbose() -> bool:
    """`--verbose`, ROLLOUTS_VERBOSE=1 or PREFECT_LOGGING_LEVEL=DEBUG: show everything."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0") or (
        os.environ.get("PREFECT_LOGGING_LEVEL", "").upper() == "DEBUG"
    )


def _exception(record: logging.LogRecord) -> BaseException | None:
    return record.exc_info[1] if record.exc_info else None


class UserErrorTracebacks(logging.Filter):
    """Drop the traceback of a `RolloutsError` (and the `NoneType: None` Prefect logs with
    `exc_info=True` outside an exception) from a record; the message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (
            _exception(record) is None or isinstance(_exception(record), RolloutsError)
        ):
            record.exc_info = None
            record.exc_text = None
        return True


class FailureReportedByCli(logging.Filter):
    """On the CLI's console: the command prints how the run ended, in one message, so Prefect's
    ERROR lines that only restate a failed state are left to the run's logs. ERROR lines that
    carry an unexpected exception (a bug: its traceback) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(RUN_LOGGERS):
            return True
        exc = _exception(record)
        return exc is not None and not isinstance(exc, RolloutsError)


_installed = False


def quiet_user_error_tracebacks() -> None:
    """Install `UserErrorTracebacks` on Prefect's run loggers once per process (unless verbose).

    Called where our tasks and flows are imported, so it holds in the CLI, in a deployment's
    flow-run process and on Dask workers alike.
    """
    global _installed  # noqa: PLW0603 - once per process
    if _installed or verbose():
        return
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(UserErrorTracebacks())
    _installed = True


class ExitDrainNote(logging.Filter):
    """Prefect sends a run's last events while the process exits and says so at WARNING
    ("Still processing items: N items remaining...") although nothing is wrong: they are sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Still processing items")


def console_reports_failures_once() -> None:
    """The CLI's console filters (not when verbose): one message per failure, no exit noise."""
    if verbose():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(FailureReportedByCli())
    logging.getLogger("EventsWorker").addFilter(ExitDrainNote())
