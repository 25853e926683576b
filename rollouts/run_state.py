"""Per-output run state: where it lives, who holds it, and whether a new request matches it.

One output file has one run directory. It carries a random ``run_id`` that is part of every
cache key, so deleting the directory (or ``--fresh``) can never resurrect stale cached results.

An output in object storage (``s3://b/runs/rollouts.jsonl``) keeps its run state on a local
path: ROLLOUTS_WORK_DIR, else this machine's cache (``$XDG_CACHE_HOME/rollouts/runs``), in a
directory named for the URL. Resume works on that machine, or on any that shares the work dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from rollouts import storage
from rollouts.chunks import ChunkFiles
from rollouts.errors import IncompleteRun, RunConflict, RunLocked, RunStopped
from rollouts.fileio import ensure_writable_dir, write_json_atomic
from rollouts.models import ChunkSpec, CollectConfig, RecordedChunk, as_given_or_absolute
from rollouts.storage import Location, is_url, local_or_url, parent_of, sibling, stem_of

if TYPE_CHECKING:
    from rollouts.leases import Lease

RUN_FILE = "run.json"


class RunState(BaseModel):
    """`run.json`: what one output's run state was created for, and its last split's chunks."""

    model_config = ConfigDict(extra="allow")  # newer fields survive an older reader's rewrite

    run_id: str
    result_params: dict[str, Any]
    chunk_size: int
    fingerprint: str | None = None
    created_at: str | None = None
    first_input: str | None = None
    output: str | None = None
    # Each chunk as split recorded it, without paths (None: a run dir split before this list).
    chunks: list[RecordedChunk] | None = None
    # The last collection's parameters (CollectConfig.stored_params), which `rollouts retry`
    # reruns with (None: a run dir from before they were stored).
    params: dict[str, Any] | None = None

    @property
    def num_repeats(self) -> int:
        return int(self.result_params["num_repeats"])

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / RUN_FILE, self.model_dump(exclude_none=True))


@dataclass(frozen=True)
class OutputPaths:
    """The three files of an output, beside each other: local paths (Path), or URLs (str) of
    objects under the output's prefix."""

    rollouts: Location
    failures: Location
    metrics: Location

    @classmethod
    def for_output(cls, output: str | Path) -> OutputPaths:
        out = local_or_url(output)
        stem = stem_of(out)
        return cls(
            rollouts=out,
            failures=sibling(out, f"{stem}_failures.jsonl"),
            metrics=sibling(out, f"{stem}_aggregate_metrics.json"),
        )

    def all(self) -> list[Location]:
        return [self.rollouts, self.failures, self.metrics]


def local_runs_dir() -> Path:
    """Where the run state of an output in object storage lives without ROLLOUTS_WORK_DIR:
    this machine's cache, ``$XDG_CACHE_HOME/rollouts/runs`` (``~/.cache/rollouts/runs``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return root / "rollouts" / "runs"


def run_dir_for(output: str | Path, work_dir: Path | None) -> Path:
    """The run state's directory of ``output``: ``<stem>-<hash of the output>`` in
    ``work_dir``, else in ``.rollouts/`` beside a local output, else (an output in object
    storage) in ``local_runs_dir()``."""
    if isinstance(output, str) and is_url(output):
        digest = hashlib.sha256(output.encode()).hexdigest()[:8]
        root = work_dir if work_dir is not None else local_runs_dir()
        return Path(root).resolve() / f"{stem_of(output)}-{digest}"
    out = Path(output).resolve()
    root = work_dir if work_dir is not None else out.parent / ".rollouts"
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:8]
    return Path(root).resolve() / f"{out.stem}-{digest}"


def output_lease_url(output: str | Path) -> str | None:
    """Where the lease of an output in a bucket lives: ``.rollouts/<stem>-<hash>.lease`` beside
    it (rollouts/leases.py); None for a local output, whose lock is ``run_lock``'s flock."""
    if not (isinstance(output, str) and is_url(output)):
        return None
    digest = hashlib.sha256(output.encode()).hexdigest()[:8]
    return f"{parent_of(output)}/.rollouts/{stem_of(output)}-{digest}.lease"


@contextlib.asynccontextmanager
async def output_lease(
    output: str | Path, on_lost: Callable[[str], None]
) -> AsyncIterator[Lease | None]:
    """For an output in a bucket: its lease held while the run writes, since another machine's
    run has a run state and a flock of its own (RunLocked naming the holder when another run
    holds it). ``on_lost(reason)``: the lease was taken or could not be renewed in time; the
    run must stop writing, and must not merge (``Lease.check`` raises). A local output: None
    (``run_lock`` is its lock)."""
    url = output_lease_url(output)
    if url is None:
        yield None
        return
    from rollouts import leases

    async with leases.held(url, worker_id(), output=str(output), on_lost=on_lost) as lease:
        yield lease


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def run_lock(run_dir: Path, output: str | Path) -> Iterator[None]:
    """Exclusive, non-blocking lock per output. The kernel drops it when the holder dies.

    Taken first, so it also refuses, before any work, an output or run-state directory that
    cannot be written.
    """
    out = parent_of(local_or_url(output))
    if isinstance(out, Path):  # a bucket was checked before any work (rollouts/request.py)
        ensure_writable_dir(out, f"the output {output}")
    ensure_writable_dir(run_dir.parent, f"the run state of {output} (ROLLOUTS_WORK_DIR moves it)")
    lock_path = run_dir.with_name(run_dir.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock_soon(fd):
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunLocked(
                f"{output} is being collected by {holder} right now (lock {lock_path}); "
                "wait for it to finish or stop it. Two runs never write one output."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, worker_id().encode(), 0)
        yield
    finally:
        os.close(fd)


CHUNK_LOCK_POLL_S = 0.2
# How long a chunk waits for the writer before it: a draining worker needs its grace and a
# moment to write; a dead one's lock goes with it (on NFSv4, when its lease expires: 90 s).
CHUNK_LOCK_MAX_WAIT_S = 300.0

_log = logging.getLogger("rollouts.chunks")


@contextlib.asynccontextmanager
async def chunk_writer_lock(
    files: ChunkFiles, stop_reason: Callable[[], str | None],
    max_wait_s: float = CHUNK_LOCK_MAX_WAIT_S,
) -> AsyncIterator[None]:  # fmt: skip
    """One writer per chunk, across processes and hosts (flock; the kernel drops it when the
    holder dies). A Dask scheduler reschedules the chunk of a worker it lost (a Slurm job
    cancelled or at its walltime) while that worker may still be draining its requests in
    flight: the new attempt waits here until the old one has written its last row, so it
    resumes from every row and never writes beside it. A stop of this run ends the wait
    (RunStopped), and so does ``max_wait_s`` (IncompleteRun: the chunk task retries)."""
    fd = os.open(files.writer_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited_since: float | None = None
        while not _flock_now(fd):
            holder = _chunk_holder(files)
            now = time.monotonic()
            if waited_since is None:
                _log.warning("chunk %05d is still written by %s (stopping); waiting for it",
                             files.index, holder)  # fmt: skip
                waited_since = now
            reason = stop_reason()
            if reason is not None:
                raise RunStopped(f"chunk {files.index:05d}: stopped ({reason}) while waiting "
                                 f"for {holder} to let go of it", reason)  # fmt: skip
            if now - waited_since > max_wait_s:
                raise IncompleteRun(
                    f"chunk {files.index:05d} is still written by {holder} after "
                    f"{max_wait_s:g} s (lock {files.writer_lock}); it is tried again"
                )
            await asyncio.sleep(CHUNK_LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _chunk_holder(files: ChunkFiles) -> str:
    """Who holds a chunk: the process its status file names (it writes the file once it holds
    the lock; the lock file itself stays empty: no disk block, nothing to fail on a full disk)."""
    try:
        return str(orjson.loads(files.status.read_bytes()).get("worker") or "?")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return "?"


def _flock_now(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _flock_soon(fd: int, tries: int = 20, pause_s: float = 0.005) -> bool:
    """The exclusive lock, retried for ~0.1 s: a `lock_taken_by` probe holds a shared lock
    for microseconds, and a collection starting just then must not be refused for it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(pause_s)
    return False


def lock_taken_by(run_dir: Path) -> str | None:
    """Who holds the output's lock right now (``host:pid``), or None. The one test of
    "running" (`rollouts status`, `rollouts retry`): a probe of the lock itself, so a
    collection that ended while its process lives on (a notebook, a worker, a caller of the
    flow) does not count, and one that died released it with the kernel. Shared, so probes
    from several watchers never see each other as the holder."""
    lock_path = run_dir.with_name(run_dir.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# Where the run was started, for the one thing its conflict messages must say in the words of
# that place: how to discard an output's collection and start over. The layer that knows sets
# it: the `rollouts` command around its flow run, the multi-dataset flow around each dataset;
# anything else is a flow run (a deployment, the UI's form, a Python call).
StartedFrom = Literal["command line", "multi-dataset run", "flow run"]
_started_from: ContextVar[StartedFrom] = ContextVar("rollouts_started_from", default="flow run")


@contextlib.contextmanager
def started_from(origin: StartedFrom) -> Iterator[None]:
    """Conflict messages raised in this block (and in the tasks and subflows it starts: they
    copy the context) name the way to start over that works for ``origin``."""
    token = _started_from.set(origin)
    try:
        yield
    finally:
        _started_from.reset(token)


def how_to_start_over(run_dir: Path) -> str:
    """What discards the collection in ``run_dir`` where this run was started, as a verb
    phrase: the flag on the command line, the parameter in a flow run (named as its form shows
    it), and in a multi-dataset run, which has neither, deleting it."""
    origin = _started_from.get()
    if origin == "command line":
        return "add --fresh"
    if origin == "multi-dataset run":
        return f"delete the output's files and its run state {run_dir}"
    form_title = CollectConfig.model_fields["fresh"].title
    return f'set the `fresh` parameter ("{form_title}" in the UI form)'


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in params.items())


def prepare_run_dir(config: CollectConfig, run_dir: Path) -> str:
    """Create or check the run state for ``config``; return its run_id. Call under the lock.

    Refuses, with the way out in the message, anything that would mix incompatible rollouts
    into one output: other result-changing parameters, another chunk size, or an output that
    exists without the state it was collected with.
    """
    paths = OutputPaths.for_output(config.output_jsonl_fpath)
    if config.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        for p in paths.all():
            storage.remove(p)

    # Before a first chunk is committed (e.g. the input was refused) nothing was collected, so
    # nothing pins the parameters: the state is simply written anew.
    state = read_run_state(run_dir)
    if state is not None and ChunkFiles.of_run(run_dir, 0).tasks.exists():
        if state.fingerprint != config.result_fingerprint():
            raise RunConflict(
                f"{config.output_jsonl_fpath} was collected with "
                f"{_describe(state.result_params)}; this run asks for "
                f"{_describe(config.result_params())}. Mixing them would corrupt the dataset: "
                f"write to another output, or {how_to_start_over(run_dir)} to discard it and start "
                "over."
            )
        if state.chunk_size != config.chunk_size:
            raise RunConflict(
                f"{config.output_jsonl_fpath} is being collected with chunk_size="
                f"{state.chunk_size}; rerun with chunk_size={state.chunk_size} to resume, "
                f"or {how_to_start_over(run_dir)} to start over."
            )
        if state.params != config.stored_params():
            state.params = config.stored_params()
            state.write(run_dir)
        return state.run_id

    if storage.size_of(paths.rollouts):
        raise RunConflict(
            f"{paths.rollouts} already exists but its run state ({run_dir}) is missing, so its "
            f"rollouts cannot be matched to tasks. Choose another output, or "
            f"{how_to_start_over(run_dir)} to replace it."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    RunState(
        run_id=run_id,
        created_at=datetime.now(UTC).isoformat(),
        first_input=as_given_or_absolute(config.input_jsonl_fpath),
        output=as_given_or_absolute(config.output_jsonl_fpath),
        result_params=config.result_params(),
        fingerprint=config.result_fingerprint(),
        chunk_size=config.chunk_size,
        params=config.stored_params(),
    ).write(run_dir)
    return run_id


def read_run_state(run_dir: Path) -> RunState | None:
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        return None
    return RunState.model_validate_json(run_file.read_bytes())


def record_chunks(run_dir: Path, specs: list[ChunkSpec]) -> None:
    """List the chunks of a split in ``run.json`` (rows, task-index range, rows per agent_ref;
    never paths), so that status reads no tasks file. Atomic; only when they changed, and
    only in a run dir that has a run.json (prepare_run_dir writes it before the split)."""
    state = read_run_state(run_dir)
    chunks = [RecordedChunk.of(s) for s in specs]
    if state is not None and state.chunks != chunks:
        state.chunks = chunks
        state.write(run_dir)


def recorded_chunks(run_dir: Path, state: RunState) -> list[ChunkSpec] | None:
    """The chunks of the last split as ``record_chunks`` listed them in ``state`` (run.json);
    None in a run dir split before run.json listed its chunks."""
    if state.chunks is None:
        return None
    return [c.spec(str(ChunkFiles.of_run(run_dir, c.index).tasks), state.run_id)
            for c in state.chunks]  # fmt: skip
