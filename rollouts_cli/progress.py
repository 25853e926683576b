"""The command's live progress: a rich bar in a terminal, a plain line now and then elsewhere.

It polls the run directory through `StatusReader` (incremental reads), so it works the same for
chunks collected in this process or on Dask workers. (The UI's progress: flows/artifacts.py.)
`rollouts multi` shows one bar (or line) per dataset and one for the mix.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rollouts.health import clock_text
from rollouts.status import RunStatus, StatusReader
from rollouts.storage import is_url

if TYPE_CHECKING:
    from rich.progress import Progress

LINE_EVERY_S = 30.0
BAR_EVERY_S = 0.5
# `rollouts multi` without a terminal: how often it looks, to print a dataset's line as it
# starts and as it finishes, and the mix's as it begins and is written (else every LINE_EVERY_S).
MULTI_POLL_S = 1.0


@contextlib.contextmanager
def _every(every_s: float, tick: Callable[[], None], *, last: bool) -> Iterator[None]:
    """While the block runs, call ``tick`` every ``every_s`` in a thread (once more at the
    end with ``last``). A failed call (a half-written run dir) waits for the next one."""
    stop = threading.Event()

    def tick_now() -> None:
        with contextlib.suppress(Exception):
            tick()

    def poll() -> None:
        while not stop.wait(every_s):
            tick_now()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if last:
            tick_now()


@contextlib.contextmanager
def _polling(
    reader: StatusReader, every_s: float, show: Callable[[RunStatus], None], *, last: bool
) -> Iterator[None]:
    """While the block runs, read the run's status every ``every_s`` in a thread and ``show``
    it (once more at the end with ``last``). Runs with no expected count yet are skipped."""

    def show_now() -> None:
        status = reader.read()
        if status.expected:
            show(status)

    with _every(every_s, show_now, last=last):
        yield


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
    progress = _bars()
    bar = progress.add_task(name, total=None, note="")

    def update_bar(s: RunStatus) -> None:
        progress.update(bar, total=s.expected, completed=s.done + s.failed, note=_rate(s))

    with progress, _polling(reader, BAR_EVERY_S, update_bar, last=True):
        yield


def _rate(s: RunStatus) -> str:
    return f"{s.rate_per_s:,.0f}/s" if s.rate_per_s else ""


def _bars() -> Progress:
    """Rich bars on stderr: name, bar, count, percent, a note (the rate), elapsed, ETA."""
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

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )  # fmt: skip


class _MultiStatus:
    """What `rollouts multi` shows: each dataset's collection (its run dir) and the mix (its
    output file: written once the file is newer than the command's start)."""

    def __init__(
        self, outputs: dict[str, str], mix: tuple[str, int] | None, work_dir: Path | None
    ) -> None:
        self.readers = {name: StatusReader(out, work_dir) for name, out in outputs.items()}
        self.mix = mix
        self.started = time.time()
        self._mix_rows: tuple[int, int] | None = None  # (mtime_ns, rows) of the mix written

    def datasets(self) -> dict[str, RunStatus]:
        statuses = {}
        for name, reader in self.readers.items():
            with contextlib.suppress(Exception):  # a half-written run dir: next time
                statuses[name] = reader.read()
        return statuses

    def mix_written(self) -> int | None:
        """Rows of the mix this command wrote, or None (not yet, or only an older one, or in
        a bucket: the summary says it once written)."""
        if self.mix is None or is_url(self.mix[0]):
            return None
        try:
            st = os.stat(self.mix[0])
        except FileNotFoundError:
            return None
        if st.st_mtime < self.started:
            return None
        if self._mix_rows is None or self._mix_rows[0] != st.st_mtime_ns:
            with open(self.mix[0], "rb") as f:
                self._mix_rows = (st.st_mtime_ns, sum(chunk.count(b"\n") for chunk in
                                                     iter(lambda: f.read(1 << 20), b"")))  # fmt: skip
        return self._mix_rows[1]

    def mix_note(self, statuses: dict[str, RunStatus]) -> str:
        """The mix's state in words: waiting, mixing, or written."""
        assert self.mix is not None
        output, total = self.mix
        rows = self.mix_written()
        if rows is not None:
            return f"{rows:,} rows written to {output}"
        waiting = [n for n in self.readers if not _finished(statuses.get(n))]
        if waiting:
            return f"waiting for {len(waiting)} of {len(self.readers)} datasets"
        return f"mixing {total:,} rows into {output}"


def _finished(s: RunStatus | None) -> bool:
    return s is not None and s.expected > 0 and s.done + s.failed >= s.expected


@contextlib.contextmanager
def cli_multi_progress(
    outputs: dict[str, str], mix: tuple[str, int] | None, work_dir: Path | None
) -> Iterator[None]:
    """`rollouts multi`'s progress on stderr while the block runs: ``outputs`` (dataset name
    -> output) and ``mix`` (output, total rows). In a terminal one bar per dataset and one for
    the mix; elsewhere a line per dataset as it starts, every LINE_EVERY_S and as it finishes,
    and the mix's as it starts and once written."""
    watch = _MultiStatus(outputs, mix, work_dir)
    if not sys.stderr.isatty():
        with _every(MULTI_POLL_S, _line_printer(watch), last=True):
            yield
        return
    progress = _bars()
    bars = {name: progress.add_task(name, total=None, note="") for name in outputs}
    mix_bar = None if mix is None else progress.add_task("mix", total=mix[1], note="")

    def update_bars() -> None:
        statuses = watch.datasets()
        for name, s in statuses.items():
            if s.expected:
                progress.update(bars[name], total=s.expected, completed=s.done + s.failed,
                                note=_rate(s))  # fmt: skip
        if mix_bar is not None:
            progress.update(mix_bar, completed=watch.mix_written() or 0,
                            note=watch.mix_note(statuses))  # fmt: skip

    with progress, _every(BAR_EVERY_S, update_bars, last=True):
        yield


def _line_printer(watch: _MultiStatus) -> Callable[[], None]:
    """A tick that prints what changed: a dataset's line when it first has a count, every
    LINE_EVERY_S while it runs and once when it finishes; the mix's line when it changes
    from waiting to mixing and to written."""
    last_line: dict[str, float] = {}
    finished: set[str] = set()
    mix_said: list[str] = []

    def tick() -> None:
        now = time.monotonic()
        statuses = watch.datasets()
        for name, s in statuses.items():
            if not s.expected or name in finished:
                continue
            done = _finished(s)
            if done or name not in last_line or now - last_line[name] >= LINE_EVERY_S:
                print(_progress_line(name, s), file=sys.stderr, flush=True)
                last_line[name] = now
                if done:
                    finished.add(name)
        if watch.mix is not None:
            note = watch.mix_note(statuses)
            if not note.startswith("waiting") and note not in mix_said:
                print(f"mix: {note}", file=sys.stderr, flush=True)
                mix_said.append(note)

    return tick
