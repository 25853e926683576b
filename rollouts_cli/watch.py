"""`rollouts status --watch`: the status redrawn in place until Ctrl-C, like `watch` without
the flicker (rich redraws only the lines that changed). Away from a terminal it appends one
status after another instead (a log), and with ``--json`` one JSON line each time."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.live import Live

from rollouts.errors import ExitCode
from rollouts.status import StatusReader
from rollouts_cli.report import status_view


def watch_status(output: str, work_dir: Path | None, interval_s: float, as_json: bool) -> int:
    """Show the status of ``output`` every ``interval_s`` until interrupted; exit status 0."""
    reader = StatusReader(output, work_dir)
    # Ctrl-C is the one way out of a watch, so it must work even where SIGINT arrives ignored
    # (a command started in the background by a script inherits it so; `collect` installs its
    # own handler likewise).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if as_json or not sys.stdout.isatty():
            _append_forever(reader, interval_s, as_json)
        else:
            _redraw_forever(reader, interval_s)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: not an error, no traceback
    return ExitCode.OK


def _redraw_forever(reader: StatusReader, interval_s: float) -> None:
    console = Console()
    # auto_refresh off: one redraw per reading, from this thread only.
    with Live(status_view(reader.read()), console=console, auto_refresh=False,
              vertical_overflow="visible") as live:  # fmt: skip
        while True:
            time.sleep(interval_s)
            live.update(status_view(reader.read()), refresh=True)


def _append_forever(reader: StatusReader, interval_s: float, as_json: bool) -> None:
    console = Console(width=110)
    while True:
        status = reader.read()
        if as_json:
            sys.stdout.write(orjson.dumps(status.to_json()).decode() + "\n")
            sys.stdout.flush()
        else:
            console.print(status_view(status))
            console.print()
        time.sleep(interval_s)
