"""Progress of a collection read from its run state: the replacement for `watch wc -l`.

Works from any process (another terminal, the flow's progress artifact, the CLI's progress bar)
while a run is going: it only reads the run directory. Counting is incremental: each poll reads
only the bytes appended since the previous one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from rollouts.chunks import ChunkFiles, tasks_files
from rollouts.health import ReplicaStatus, RunHealth, read_published
from rollouts.models import ChunkSpec
from rollouts.nemo_gym import NG_FAILURE_TERMINAL
from rollouts.run_state import (
    lock_taken_by,
    output_lease_url,
    read_run_state,
    recorded_chunks,
    run_dir_for,
)
from rollouts.slurm import SlurmJob, run_jobs
from rollouts.storage import local_or_url


@dataclass
class ChunkStatus:
    index: int
    expected: int
    done: int
    failed: int
    worker: str | None  # host:pid of the process that (last) started collecting it
    slurm_job: str | None = None  # the Slurm job that process ran in


# Where a run is: "running" while a process holds its lock, "stopped" when none does and
# rollouts are missing, "unknown" until read.
RunPhase = Literal["unknown", "not started", "running", "stopped", "complete"]


@dataclass
class RunStatus:
    output: str
    run_dir: str
    expected: int
    done: int  # rollouts written
    failed: int  # rollouts failed for good
    chunks: list[ChunkStatus] = field(default_factory=list)
    rate_per_s: float | None = None  # rollouts finished per second, over rate_window_s
    rate_window_s: float | None = None  # the last 30 s at most (as long as this reader read)
    eta_s: float | None = None
    phase: RunPhase = "unknown"
    holder: str | None = None  # while running: the process holding the output's lock
    replicas: list[ReplicaStatus] = field(default_factory=list)  # replicated agents only
    health: RunHealth | None = None  # while collecting: in flight, latency, failures, stalls
    slurm_jobs: list[SlurmJob] | None = None  # while running on Slurm workers: squeue's list

    @property
    def running(self) -> bool:
        return self.phase == "running"

    @property
    def state(self) -> str:
        """As `status` shows it: `running (host:pid)`, `stopped (incomplete)`, `complete`,
        `not started`."""
        if self.phase == "running":
            return f"running ({self.holder})"
        if self.phase == "stopped":
            return "stopped (incomplete)"
        return self.phase

    def to_json(self) -> dict[str, Any]:
        shown = {k: v for k, v in asdict(self).items() if k not in ("phase", "holder")}
        return shown | {"state": self.state,
                        "health": self.health.to_json() if self.health else None}  # fmt: skip


class _LineCounter:
    """Counts complete lines of an append-only file, reading only what was appended."""

    def __init__(self, path: Path, terminal_only: bool = False) -> None:
        self.path = path
        self.terminal_only = terminal_only
        self.offset = 0
        self.count = 0

    def poll(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.count
        if size < self.offset:  # rewritten (repair or fresh start): count again
            self.offset = self.count = 0
        if size == self.offset:
            return self.count
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1  # a torn last line is not counted
        if self.terminal_only:
            self.count += sum(
                1 for line in data[:end].splitlines()
                if line.strip() and orjson.loads(line).get(NG_FAILURE_TERMINAL) is True
            )  # fmt: skip
        else:
            self.count += data.count(b"\n", 0, end)
        self.offset += end
        return self.count


class StatusReader:
    """Reads a run's status again and again, cheaply."""

    def __init__(self, output: str | Path, work_dir: Path | None = None) -> None:
        self.output = local_or_url(output)  # a URL as given (a Path folds s3:// into s3:/)
        self.run_dir = run_dir_for(output, work_dir)
        self._counters: dict[Path, _LineCounter] = {}
        self._tasks: dict[int, tuple[int, int]] = {}  # chunk -> (tasks file mtime_ns, rows)
        self._samples: list[tuple[float, int]] = []

    def _counter(self, path: Path, terminal_only: bool = False) -> int:
        c = self._counters.get(path)
        if c is None:
            c = self._counters[path] = _LineCounter(path, terminal_only)
        return c.poll()

    def _counted_rows(self) -> dict[int, int]:
        """Chunk number -> task rows, by counting lines of the tasks files: only for a run
        dir split before run.json listed its chunks. Read again only when a file changes."""
        rows: dict[int, int] = {}
        for files in tasks_files(self.run_dir):
            try:
                st = files.tasks.stat()
                cached = self._tasks.get(files.index)
                if cached is None or cached[0] != st.st_mtime_ns:
                    n = files.tasks.read_bytes().count(b"\n")
                    cached = self._tasks[files.index] = (st.st_mtime_ns, n)
            except FileNotFoundError:
                continue
            rows[files.index] = cached[1]
        return rows

    def _lease_holder(self) -> str | None:
        """Who holds the lease of an output in a bucket (another machine's run, whose flock
        this one cannot see); None for a local output, or when the store cannot tell now."""
        url = output_lease_url(self.output)
        if url is None:
            return None
        from rollouts.leases import holder_of

        try:
            return holder_of(url)
        except Exception:  # a status read must not fail on the store: not known to run
            return None

    def read(self) -> RunStatus:
        state = read_run_state(self.run_dir)
        status = RunStatus(str(self.output), str(self.run_dir), 0, 0, 0, phase="not started")
        if state is None:
            return status
        repeats = state.num_repeats
        specs = recorded_chunks(self.run_dir, state)  # as split recorded them
        chunks: dict[int, ChunkSpec | int] = (
            dict(self._counted_rows()) if specs is None else {s.index: s for s in specs})  # fmt: skip
        for index, spec in sorted(chunks.items()):
            files = ChunkFiles.of_run(self.run_dir, index)
            expected = spec.expected(repeats) if isinstance(spec, ChunkSpec) else spec * repeats
            done = min(expected, self._counter(files.rollouts))
            failed = self._counter(files.failures, terminal_only=True)
            started: dict[str, Any] = {}
            if files.status.exists():
                with contextlib.suppress(orjson.JSONDecodeError):
                    started = orjson.loads(files.status.read_bytes())
            status.chunks.append(ChunkStatus(
                index, expected, done, min(failed, expected - done), started.get("worker"),
                started.get("slurm_job"),
            ))  # fmt: skip
        status.expected = sum(c.expected for c in status.chunks)
        status.done = sum(c.done for c in status.chunks)
        status.failed = sum(c.failed for c in status.chunks)
        finished = status.done + status.failed
        holder = lock_taken_by(self.run_dir) or self._lease_holder()
        if status.expected and finished >= status.expected:
            status.phase = "complete"
        elif holder:
            status.phase, status.holder = "running", holder
        else:
            status.phase = "stopped"
        if status.running:
            status.slurm_jobs = run_jobs(self.run_dir)
        published = read_published(self.run_dir, running=status.running)
        status.replicas, status.health = published.replicas, published.health
        now = time.monotonic()
        self._samples.append((now, finished))
        self._samples = [s for s in self._samples if now - s[0] <= 30.0]  # a 30 s window
        t0, n0 = self._samples[0]
        if now - t0 > 0.5 and finished > n0:
            status.rate_per_s = (finished - n0) / (now - t0)
            status.rate_window_s = now - t0
            status.eta_s = max(0.0, status.expected - finished) / status.rate_per_s
        return status


def read_status(
    output: str | Path, work_dir: Path | None = None, sample_s: float = 1.0
) -> RunStatus:
    """One status with a rate measured over ``sample_s`` seconds (0: no rate)."""
    reader = StatusReader(output, work_dir)
    status = reader.read()
    if sample_s > 0 and status.running:
        time.sleep(sample_s)
        status = reader.read()
    return status
