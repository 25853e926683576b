"""Live progress: a Prefect progress artifact for the UI, a rich progress bar for the CLI.

Both poll the run directory through `StatusReader` (incremental reads), so they work the same
for a run in this process, in a worker, or on Dask workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from rollouts.status import StatusReader

ARTIFACT_EVERY_S = 3.0


async def update_progress_artifact_forever(reader: StatusReader, artifact_id: object) -> None:
    """Update one progress artifact every few seconds; one task, so updates never reorder."""
    from prefect.artifacts import aupdate_progress_artifact

    while True:
        await asyncio.sleep(ARTIFACT_EVERY_S)
        status = await asyncio.to_thread(reader.read)
        if status.expected:
            pct = 100.0 * (status.done + status.failed) / status.expected
            await aupdate_progress_artifact(
                artifact_id=artifact_id,  # type: ignore[arg-type]
                progress=pct,
                description=f"{status.done}/{status.expected} written, {status.failed} failed",
            )


LINE_EVERY_S = 30.0


@contextlib.contextmanager
def _progress_lines(output: str | Path, work_dir: Path | None) -> Iterator[None]:
    """Not a terminal (a log file, a batch job): a plain progress line every LINE_EVERY_S."""
    reader = StatusReader(output, work_dir)
    stop = threading.Event()
    name = Path(output).name

    def poll() -> None:
        while not stop.wait(LINE_EVERY_S):
            with contextlib.suppress(Exception):  # a half-written run dir: try again later
                s = reader.read()
                if s.expected:
                    done = s.done + s.failed
                    rate = f", {s.rate_per_s:,.0f}/s" if s.rate_per_s else ""
                    eta = f", ETA {int(s.eta_s) // 60}m{int(s.eta_s) % 60:02d}s" if s.eta_s else ""
                    print(f"{name}: {done:,}/{s.expected:,} ({100.0 * done / s.expected:.1f}%), "
                          f"{s.failed:,} failed{rate}{eta}", file=sys.stderr, flush=True)  # fmt: skip

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def cli_progress_bar(output: str | Path, work_dir: Path | None) -> Iterator[None]:
    """Progress on stderr while the block runs: a bar with rate and ETA in a terminal, else a
    plain line now and then."""
    if not sys.stderr.isatty():
        with _progress_lines(output, work_dir):
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

    reader = StatusReader(output, work_dir)
    stop = threading.Event()
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )  # fmt: skip
    bar = progress.add_task(Path(output).name, total=None, rate="")

    def poll() -> None:
        while not stop.wait(0.5):
            with contextlib.suppress(Exception):  # a half-written run dir: try again later
                s = reader.read()
                if s.expected:
                    rate = f"{s.rate_per_s:,.0f}/s" if s.rate_per_s else ""
                    progress.update(bar, total=s.expected, completed=s.done + s.failed, rate=rate)

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                s = reader.read()
                if s.expected:
                    progress.update(bar, total=s.expected, completed=s.done + s.failed)
