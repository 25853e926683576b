"""The command's live progress: a rich bar in a terminal, a plain line now and then elsewhere.

It polls the run directory through `StatusReader` (incremental reads), so it works the same for
chunks collected in this process or on Dask workers. (The UI's progress: flows/artifacts.py.)
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from rollouts.health import clock_text
from rollouts.status import RunStatus, StatusReader

LINE_EVERY_S = 30.0
BAR_EVERY_S = 0.5


@contextlib.contextmanager
def _polling(
    reader: StatusReader, every_s: float, show: Callable[[RunStatus], None], *, last: bool
) -> Iterator[None]:
    """While the block runs, read the run's status every ``every_s`` in a thread and ``show``
    it (once more at the end with ``last``). Runs with no expected count yet are skipped."""
    stop = threading.Event()

    def show_now() -> None:
        with contextlib.suppress(Exception):  # a half-written run dir: try again later
            status = reader.read()
            if status.expected:
                show(status)

    def poll() -> None:
        while not stop.wait(every_s):
            show_now()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if last:
            show_now()


def _progress_line(name: str, s: RunStatus) -> str:
    done = s.done + s.failed
    rate = f", {s.rate_per_s:,.0f}/s" if s.rate_per_s else ""
    eta = f", ETA {clock_text(s.eta_s)}" if s.eta_s else ""
    health = f"; {s.health.headline()}" if s.health is not None else ""
    return (f"{name}: {done:,}/{s.expected:,} ({100.0 * done / s.expected:.1f}%), "
            f"{s.failed:,} failed{rate}{eta}{health}")  # fmt: skip


@contextlib.contextmanager
def cli_progress_bar(output: str | Path, work_dir: Path | None) -> Iterator[None]:
    """Progress on stderr while the block runs: a bar with rate and ETA in a terminal, else (a
    log file, a batch job) a plain line every LINE_EVERY_S."""
    reader = StatusReader(output, work_dir)
    name = Path(output).name
    if not sys.stderr.isatty():

        def print_line(s: RunStatus) -> None:
            print(_progress_line(name, s), file=sys.stderr, flush=True)

        with _polling(reader, LINE_EVERY_S, print_line, last=False):
            yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )  # fmt: skip

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )  # fmt: skip
    bar = progress.add_task(name, total=None, rate="")

    def update_bar(s: RunStatus) -> None:
        rate = f"{s.rate_per_s:,.0f}/s" if s.rate_per_s else ""
        progress.update(bar, total=s.expected, completed=s.done + s.failed, rate=rate)

    with progress, _polling(reader, BAR_EVERY_S, update_bar, last=True):
        yield
