"""Collect one chunk: expand repeats, skip what is already written, post the rest, append results.

Every result is appended and flushed as it arrives, so a crash loses at most the requests in
flight. On resume a torn last line is cut and every key already written (or failed for good)
is skipped. All chunks of a run in one process share one ``Dispatcher``: one HTTP client and
one in-flight budget, so the agent stays busy while a chunk finishes its stragglers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

from rollouts.agent_client import AgentClient, Outcome, RetryPolicy, Slot, resolve_agent_urls
from rollouts.agent_limits import AgentLimits
from rollouts.attempts import AttemptObserver
from rollouts.chunks import ChunkFiles, task_indices
from rollouts.fileio import (
    UnwritablePathError,
    dumps_line,
    iter_jsonl,
    repair_torn_tail,
    write_json_atomic,
)
from rollouts.health import Publication
from rollouts.models import ChunkResult, ChunkSpec, CollectConfig, RolloutKey
from rollouts.nemo_gym import (
    AGENT_REF,
    NG_FAILURE_CLASS,
    NG_FAILURE_TERMINAL,
    NG_ROLLOUT_INDEX,
    NG_TASK_INDEX,
    RESPONSES_CREATE_PARAMS,
    key_of,
)
from rollouts.replicas import ReplicaRouter
from rollouts.retry import retry_attempts
from rollouts.run_state import chunk_writer_lock, worker_id
from rollouts.settings import RolloutsSettings
from rollouts.slurm import this_job_id
from rollouts.stopping import Stopper, StopPlan
from rollouts.urls import AgentCredentials

FSYNC_EVERY_S = 5.0
DISPATCH_BATCH = 64  # rollouts started between two yields to the event loop
# The fields the collector places in every output and failure row itself, after the answer's
# (a tuple built once: the hot path would otherwise build it for every key of every answer).
_PLACED_FIELDS = (NG_TASK_INDEX, NG_ROLLOUT_INDEX, AGENT_REF)


@dataclass(frozen=True)
class DispatchPlan:
    """How a task row becomes requests. Carries no secret: it is a task input."""

    agent_urls: dict[str, str]  # agent name -> base URL
    agent_name: str | None = None  # run-level agent; else each row's agent_ref
    agent_url: str | None = None  # run-level URL; skips name resolution
    num_repeats: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    add_seed: bool = False

    def agent_ref(self, row: dict[str, Any]) -> dict[str, str]:
        return {"name": self.agent_of_ref(row[AGENT_REF]["name"] if AGENT_REF in row else None)}

    def agent_of_ref(self, row_agent: str | None) -> str:
        """The agent answering a row whose agent_ref names ``row_agent`` (None: it has none)."""
        if self.agent_name:
            return self.agent_name
        if row_agent is not None:
            return row_agent
        return self.agent_url or "agent"

    @classmethod
    def for_run(
        cls, config: CollectConfig, row_agents: list[str], settings: RolloutsSettings,
        http: httpx.Client | None = None,
    ) -> DispatchPlan:  # fmt: skip
        """The plan of a collection: its agents resolved to URLs (a run-level URL, a run-level
        name, or else the agents the rows name), repeats and sampling overrides. ``http``: the
        client that asks a head server for agent addresses (None: one of its own)."""
        if config.agent_url:
            names: list[str] = []
        else:
            names = [config.agent_name] if config.agent_name else row_agents
        return cls(
            agent_urls=resolve_agent_urls(names, settings, http),
            agent_name=config.agent_name,
            agent_url=config.agent_url,
            num_repeats=config.num_repeats,
            overrides=config.responses_create_params,
            add_seed=config.num_repeats_add_seed,
        )

    def agents_in_use(self) -> dict[str, str]:
        """Agent label -> base URL, for every agent this plan can send to."""
        if self.agent_url:
            return {self.agent_name or self.agent_url: self.agent_url}
        return dict(self.agent_urls)

    def request_agents(self, row_agents: list[str]) -> set[str]:
        """The agents the requests of a run name (their ``agent_ref``), its rows naming
        ``row_agents``: the run-level name, else the rows' (a row without one: the run-level
        URL itself)."""
        return set(self.agents_in_use()) | {self.agent_of_ref(name) for name in row_agents}

    def url_for(self, agent_ref: dict[str, str]) -> str:
        base = self.agent_url or self.agent_urls[agent_ref["name"]]
        return base.rstrip("/") + "/run"

    def body(self, row: dict[str, Any], rollout_index: int) -> dict[str, Any]:
        body = dict(row)
        rcp = row[RESPONSES_CREATE_PARAMS] | self.overrides
        if self.add_seed:
            metadata = dict(rcp.get("metadata") or {})
            extra = orjson.loads(metadata.get("extra_body") or "{}")
            extra["seed"] = rollout_index
            metadata["extra_body"] = orjson.dumps(extra).decode()
            rcp["metadata"] = metadata
        body[RESPONSES_CREATE_PARAMS] = rcp
        body[AGENT_REF] = self.agent_ref(row)
        body[NG_ROLLOUT_INDEX] = rollout_index
        return body


def scan_done(rollouts_path: Path, failures_path: Path) -> tuple[set[RolloutKey], set[RolloutKey]]:
    """Keys already written, and keys failed for good. Repairs torn tails first."""
    succeeded: set[RolloutKey] = set()
    terminal: set[RolloutKey] = set()
    for path in (rollouts_path, failures_path):
        repair_torn_tail(path)
    if rollouts_path.exists():
        succeeded = {key_of(r) for r in iter_jsonl(rollouts_path)}
    if failures_path.exists():
        terminal = {
            key_of(r) for r in iter_jsonl(failures_path) if r.get(NG_FAILURE_TERMINAL) is True
        }
    return succeeded, terminal - succeeded


class Dispatcher:
    """Per-process, per-run shared resources: the client (its in-flight budget, and the observer
    of its attempts with their publication), chunk slots, the stopper.

    ``max_parallel_chunks`` None: no limit on the chunks dispatching at once. ``stop``
    (rollouts/stopping.py) says when its chunks stop dispatching and cancel what is in flight;
    the flow may set its own. ``transport``: what carries its client's requests (None:
    aiohttp, ``agent_client.default_transport``; tests pass an ``httpx.MockTransport``).
    ``agent_limits``: the agents' limits shared with other processes and runs
    (rollouts/agent_limits.py), whose slots it gives back when closed.

    Building one changes nothing outside it: the process-wide setup a collecting process
    needs (its open-file limit raised to fit ``max_in_flight`` sockets, the collector's GC
    thresholds for thousands in flight) is the caller's, in rollouts/dispatchers.py.
    """

    def __init__(self, policy: RetryPolicy, max_in_flight: int, max_parallel_chunks: int | None,
                 api_key: str | None, adaptive: bool = False,
                 replicas: ReplicaRouter | None = None,
                 stall_warn_s: float | None = None,
                 credentials: AgentCredentials | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 agent_limits: AgentLimits | None = None) -> None:  # fmt: skip
        self.observer = AttemptObserver(stall_warn_s)
        self.client = AgentClient(policy, max_in_flight, api_key, adaptive=adaptive,
                                  transport=transport, replicas=replicas,
                                  observer=self.observer, credentials=credentials,
                                  agent_limits=agent_limits)  # fmt: skip
        self.publication = Publication(self.observer)
        self._chunk_slots = (
            asyncio.Semaphore(max_parallel_chunks) if max_parallel_chunks is not None else None
        )
        self.stop = Stopper(self.observer)

    def use_stopper(self, stop: Stopper) -> None:
        """Stop this dispatcher's chunks with ``stop`` (the flow's: its signal handlers and
        deadline), its drain margin from this dispatcher's rollouts."""
        stop.rollouts = self.observer
        self.stop = stop

    def chunk_slot(self) -> AbstractAsyncContextManager[object]:
        """Held by a chunk while it dispatches; free at once without a chunk limit."""
        if self._chunk_slots is None:
            return contextlib.nullcontext()
        return self._chunk_slots

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.client.replicas is not None:
            await self.client.replicas.aclose()
        if self.client.agent_limits is not None:
            await self.client.agent_limits.aclose()


class _ResultWriter:
    """Appends result lines, flushed per line (survives kill -9), fsynced periodically."""

    def __init__(self, rollouts_path: Path, failures_path: Path) -> None:
        self.rollouts: IO[bytes] = open(rollouts_path, "ab")
        self.failures: IO[bytes] = open(failures_path, "ab")
        self._last_sync = time.monotonic()

    def write(self, f: IO[bytes], row: dict[str, Any]) -> None:
        try:
            f.write(dumps_line(row))
            f.flush()
            if time.monotonic() - self._last_sync > FSYNC_EVERY_S:
                self.sync()
        except OSError as e:  # a full disk: the user's to fix, in one message
            raise UnwritablePathError(
                f"cannot write the run state {f.name}: {e.strerror or e}. Free space (or move "
                "ROLLOUTS_WORK_DIR), then rerun the same command: what was written is kept."
            ) from e

    def sync(self) -> None:
        for f in (self.rollouts, self.failures):
            f.flush()
            os.fsync(f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()
        self.rollouts.close()
        self.failures.close()


def _output_row(
    answer: dict[str, Any], key: RolloutKey, agent_ref: dict[str, str]
) -> dict[str, Any]:
    row = {k: v for k, v in answer.items() if k not in _PLACED_FIELDS}
    row[NG_TASK_INDEX], row[NG_ROLLOUT_INDEX] = key
    row[AGENT_REF] = agent_ref
    return row


def _failure_row(
    outcome: Outcome, key: RolloutKey, agent_ref: dict[str, str], earlier: int = 0
) -> dict[str, Any]:
    """``earlier``: attempts spent on this rollout before (a retry by failure class)."""
    row: dict[str, Any] = dict(outcome.answer or {})
    for k in _PLACED_FIELDS:
        row.pop(k, None)
    row[NG_FAILURE_CLASS] = outcome.failure_class
    row[NG_FAILURE_TERMINAL] = outcome.terminal
    row["error"] = outcome.error
    row["attempts"] = earlier + outcome.attempts
    row[NG_TASK_INDEX], row[NG_ROLLOUT_INDEX] = key
    row[AGENT_REF] = agent_ref
    return row


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended (their errors are dropped)."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def collect_chunk(
    spec: ChunkSpec, plan: DispatchPlan, dispatcher: Dispatcher,
    stop_plan: StopPlan | None = None, retry: bool = False,
) -> ChunkResult:  # fmt: skip
    """Collect every rollout of one chunk not already written. Returns counts, never bodies.

    ``stop_plan``: the run's deadline and grace (see rollouts/stopping.py), armed on the
    dispatcher's stopper; a stopped chunk ends with what finished and says why.
    ``retry``: a retry by failure class (rollouts/retry.py): only the keys it reopened are
    sent, their attempts add up, and ``missing`` counts only them (other missing rollouts are
    a plain rerun's business). While any chunk collects, the process publishes its live
    health into the run directory.
    """
    stop = _arm_stop(dispatcher, stop_plan)
    run_dir = Path(spec.tasks_path).parent.parent
    run_started_at = stop_plan.started_at if stop_plan is not None else None  # the flow run
    async with dispatcher.publication.collecting(run_dir, run_started_at):
        files = ChunkFiles.of(spec)
        client = dispatcher.client
        async with chunk_writer_lock(files, lambda: stop.reason):
            async with dispatcher.chunk_slot():
                _write_status(files, spec, spec.expected(plan.num_repeats))
                if client.replicas is not None:  # replicated agents: route them
                    client.replicas.use(plan.agent_urls)
                resume = _Resume.scan(files, retry)
                rollouts = _ChunkRollouts(
                    client, stop, _ResultWriter(*files.outputs), resume.earlier
                )
                try:
                    await rollouts.dispatch(plan, resume.pending(spec, plan.num_repeats))
                except BaseException:
                    await rollouts.abort()
                    raise
            # Everything is dispatched: the chunk slot is released while stragglers finish
            # here, so the next chunk can start filling the agent.
            await rollouts.finish()
        return _recount(spec, files, plan.num_repeats, resume, rollouts.requests, stop, client)


def _arm_stop(dispatcher: Dispatcher, stop_plan: StopPlan | None) -> Stopper:
    """The dispatcher's stopper (the flow's, where it set its own) armed with the run's plan;
    its drain margin is the p90 time of this process's rollouts."""
    stop = dispatcher.stop
    if stop_plan is not None:
        stop.arm(stop_plan)
    return stop


def _write_status(files: ChunkFiles, spec: ChunkSpec, expected: int) -> None:
    """The chunk's status file: which process collects it, since when (``rollouts status``)."""
    write_json_atomic(
        files.status,
        {"index": spec.index, "expected": expected, "worker": worker_id(),
         "slurm_job": this_job_id(), "started_at": time.time()},
    )  # fmt: skip


@dataclass(frozen=True)
class _Resume:
    """Where a chunk resumes: the keys written or failed for good (never sent again) and, in
    a retry by failure class, the keys it reopened, with the attempts each spent before."""

    done: set[RolloutKey]
    earlier: dict[RolloutKey, int]
    retry: bool

    @classmethod
    def scan(cls, files: ChunkFiles, retry: bool) -> _Resume:
        succeeded, terminal = scan_done(*files.outputs)
        return cls(succeeded | terminal, retry_attempts(files) if retry else {}, retry)

    def pending(self, spec: ChunkSpec, repeats: int) -> Iterator[tuple[dict[str, Any], int]]:
        return _pending(spec, repeats, self.done, set(self.earlier) if self.retry else None)


class _ChunkRollouts:
    """A chunk's rollouts: each a task, made once the wire has room for its first attempt,
    whose outcome is appended to the chunk's files as it ends. The first error a rollout task
    raises stops the dispatch and ends the chunk."""

    def __init__(self, client: AgentClient, stop: Stopper, writer: _ResultWriter,
                 earlier: dict[RolloutKey, int]) -> None:  # fmt: skip
        self.client, self.stop, self.writer, self.earlier = client, stop, writer, earlier
        self.requests = 0  # attempts of this chunk's rollouts
        self.tasks: set[asyncio.Task[None]] = set()
        self.failed: list[BaseException] = []  # the first error a rollout task raised
        stop.track(self.tasks)  # cancelled when a stop's grace period ends

    async def dispatch(
        self, plan: DispatchPlan, pending: Iterable[tuple[dict[str, Any], int]]
    ) -> None:
        """Start a task per pending rollout, each once the wire has room for it, until all are
        started, a task failed, or the stopper says no more."""
        client, stop = self.client, self.stop
        for started, (row, r) in enumerate(pending, start=1):
            body = plan.body(row, r)
            agent_ref = body[AGENT_REF]
            url = plan.url_for(agent_ref)
            # A rollout's task is made only once the wire has room for its first attempt:
            # the chunk holds tasks only for rollouts on the wire or in a backoff, however
            # many rows it has.
            slot = await client.reserve()
            if self.failed or not stop.may_start():  # an error, a stop, or the deadline near
                slot.release()
                break
            t = asyncio.create_task(
                self._one((row[NG_TASK_INDEX], r), url, orjson.dumps(body), agent_ref, slot)
            )
            t.add_done_callback(slot.release)  # a task cancelled before it ran
            self.tasks.add(t)
            t.add_done_callback(self._settled)
            if started % DISPATCH_BATCH == 0:
                # With free slots ``reserve`` never suspends, so at start thousands of tasks
                # would be made before any of them ran: each then connects, and sends only
                # after every other has connected (measured at C=16,384: the first request
                # 15 s late, connect timeouts). Letting each batch start before making the
                # next keeps the first requests going out at once.
                await asyncio.sleep(0)

    async def _one(
        self, key: RolloutKey, url: str, data: bytes, agent_ref: dict[str, str], slot: Slot
    ) -> None:
        # Only the encoded body is held while the rollout is on the wire, not the row's parsed
        # dicts: with thousands in flight that is tens of MB.
        outcome = await self.client.run(url, data, slot=slot, tag=(agent_ref["name"], *key))
        self.requests += outcome.attempts
        writer = self.writer
        if outcome.kind == "ok":
            assert outcome.answer is not None
            writer.write(writer.rollouts, _output_row(outcome.answer, key, agent_ref))
        elif outcome.kind == "failed":
            writer.write(writer.failures,
                         _failure_row(outcome, key, agent_ref, self.earlier.get(key, 0)))  # fmt: skip
        # else no_persist: written nowhere; the next run redoes it

    def _settled(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)
        # Every task's error is retrieved here, as it ends (none is left "never retrieved");
        # the first one stops the dispatch and ends the chunk.
        if not t.cancelled() and (error := t.exception()) is not None and not self.failed:
            self.failed.append(error)

    async def abort(self) -> None:
        """The dispatch itself failed (or was cancelled): end every rollout, close the files."""
        await _cancel_all(self.tasks)
        self._close()

    async def finish(self) -> None:
        """Wait for every rollout (one cancelled by a stop is no error: it stays missing);
        raise the first real error, once the others are cancelled."""
        try:
            while self.tasks and not self.failed:
                await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_EXCEPTION)
            if self.failed:
                raise self.failed[0]
        except BaseException:
            # One rollout failed unexpectedly (a full disk, say): stop the rest before the
            # files close under them; what was written stays, the next try resumes from it.
            await _cancel_all(self.tasks)
            raise
        finally:
            self._close()

    def _close(self) -> None:
        self.stop.untrack(self.tasks)
        self.writer.close()


def _recount(
    spec: ChunkSpec, files: ChunkFiles, repeats: int, resume: _Resume, requests: int,
    stop: Stopper, client: AgentClient,
) -> ChunkResult:  # fmt: skip
    """The chunk's result, counted again from its files: they, not this process's tallies, are
    the truth on resume."""
    rollouts_path, failures_path = files.outputs
    succeeded, terminal = scan_done(rollouts_path, failures_path)
    indices = task_indices(spec)
    expected = spec.expected(repeats)
    n_ok = sum(1 for t, r in succeeded if t in indices and 0 <= r < repeats)
    n_failed = sum(1 for t, r in terminal if t in indices and 0 <= r < repeats)
    missing = expected - n_ok - n_failed
    if resume.retry:
        missing = sum(1 for k in resume.earlier if k not in succeeded and k not in terminal)
    return ChunkResult(
        index=spec.index,
        n_tasks=spec.n_tasks,
        expected=expected,
        succeeded=n_ok,
        failed=n_failed,
        missing=missing,
        rollouts_path=str(rollouts_path),
        failures_path=str(failures_path),
        worker=worker_id(),
        attempts=requests,
        stopped=stop.reason,
        in_flight_limit=client.concurrency.limit if client.concurrency else None,
    )


def _pending(
    spec: ChunkSpec, repeats: int, done: set[RolloutKey], only: set[RolloutKey] | None = None
) -> Iterator[tuple[dict[str, Any], int]]:
    """The only read of a chunk's tasks file after split: the rows' bodies, for requests.
    ``only``: send none but these keys (a retry by failure class)."""
    for row in iter_jsonl(ChunkFiles.of(spec).tasks):
        for r in range(repeats):
            key = (row[NG_TASK_INDEX], r)
            if key not in done and (only is None or key in only):
                yield row, r
