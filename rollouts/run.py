"""One collection run: its sequence and its decisions, with the stages injected.

split -> (reopen for a retry) -> check agents -> collect per chunk -> merge -> metrics, under the
output's lock, then the summary and how the run ends. The stages that depend on where the run
runs (Prefect tasks, artifacts, signal handlers) are a ``RunStages``: flows/collect.py binds
Prefect to them, tests bind plain fakes. What is decided here:

- the agents are checked unless the output is already complete (and only if nobody checked
  them before the flow run: rollouts/request.py);
- a stop by a signal or a cancellation ends the run unmerged, a stop at the deadline merges
  what finished and ends it as stopped at its deadline, not as a failure;
- a cached step whose output files are gone runs again (``must_refresh``);
- a chunk error a rerun will not fix ends the run with its own message; rollouts left missing
  otherwise end it with ``IncompleteRun``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from rollouts import gctune, storage
from rollouts.agent_client import check_agents_reachable
from rollouts.collect import DispatchPlan
from rollouts.errors import IncompleteRun, RolloutsError
from rollouts.failures import FailureReport, summarize_failures
from rollouts.health import ReplicaStatus, RunLatency, read_run_latency
from rollouts.models import CollectConfig, SplitResult
from rollouts.request import RunRequest, agents_down
from rollouts.retry import clear_retry, reopen_failures
from rollouts.run_state import (
    OutputPaths,
    output_lease,
    prepare_run_dir,
    run_dir_for,
    run_lock,
)
from rollouts.settings import RolloutsSettings
from rollouts.split import validate_input
from rollouts.status import RunStatus, StatusReader
from rollouts.stopping import Stopper, StopPlan, StopReason, write_stop_record
from rollouts.storage import Location
from rollouts.summary import (
    AgentResult,
    CollectSummary,
    RunFigures,
    deadline_message,
    incomplete_run,
    stopped_run,
    unexpected_errors_message,
)
from rollouts.urls import redact

if TYPE_CHECKING:  # numpy loads with the metrics step, not at start-up
    from rollouts.leases import Lease
    from rollouts.merge import MergeReport
    from rollouts.metrics import MetricsSummary


class RunLog(Protocol):
    """Where the run says what it does (the flow run's logger)."""

    def info(self, msg: str, /, *args: object) -> None: ...
    def warning(self, msg: str, /, *args: object) -> None: ...


class StatusSource(Protocol):
    """A run's status, read again and again (``StatusReader``)."""

    run_dir: Path

    def read(self) -> RunStatus: ...


class Progress(Protocol):
    """What the run shows while it collects; it also times the collection."""

    def figures(
        self, summary: CollectSummary, started_at: float, latency: RunLatency | None
    ) -> RunFigures: ...

    async def show_final(
        self, summary: CollectSummary, replicas: Sequence[ReplicaStatus]
    ) -> None: ...


@dataclass(frozen=True)
class ChunkOutcome:
    """How a chunk's collection ended, as the run reads it."""

    completed: bool
    cached: bool = False  # its result came from the cache: nothing was collected
    # What ended a chunk that did not complete; None for one a stop kept from starting.
    error: BaseException | None = None


class RunStages(abc.ABC):
    """The stages of a run that depend on where it runs."""

    @property
    def log(self) -> RunLog:
        return logging.getLogger("rollouts.run")

    def stop_controls(self, stop: Stopper) -> AbstractAsyncContextManager[object]:
        """While the run works: what asks ``stop`` to stop from outside (signals, a
        cancellation). None by default: only the deadline stops it."""
        return nullcontext()

    def status_reader(self, output: str, work_dir: Path | None) -> StatusSource:
        return StatusReader(output, work_dir)

    async def probe_agents(
        self, agents: Mapping[str, Sequence[str]], timeout_s: float
    ) -> list[str]:
        return await check_agents_reachable(agents, timeout_s)

    def freeze_heap(self) -> None:
        """Right before collecting: what this process loaded so far (Prefect, pandas) stays
        out of the collector's way (rollouts/gctune.py)."""
        gctune.freeze_heap()

    @abc.abstractmethod
    async def split(self, config: CollectConfig, run_dir: Path, run_id: str) -> SplitResult:
        """The input into the run state's chunks."""

    @abc.abstractmethod
    def progress(
        self, reader: StatusSource, output: Location
    ) -> AbstractAsyncContextManager[Progress]:
        """Shown while the chunks are collected."""

    @abc.abstractmethod
    async def collect(
        self, split: SplitResult, plan: DispatchPlan, run_dir: Path, stop: Stopper
    ) -> list[ChunkOutcome]:
        """Every chunk collected (``stop`` stops them all); how each ended, in chunk order."""

    @abc.abstractmethod
    async def merge(
        self, split: SplitResult, plan: DispatchPlan, paths: OutputPaths, refresh: bool
    ) -> MergeReport:
        """The chunk outputs merged into the output files (``refresh``: not from a cache)."""

    @abc.abstractmethod
    async def metrics(
        self, paths: OutputPaths, num_repeats: int, expected_by_agent: dict[str, int],
        refresh: bool,
    ) -> MetricsSummary:  # fmt: skip
        """The output's metrics file (``refresh``: not from a cache)."""

    @abc.abstractmethod
    async def publish(
        self, summary: CollectSummary, status: RunStatus, failures: FailureReport
    ) -> None:
        """The run's results where its users look (the Prefect UI's artifacts)."""


def must_refresh(*outputs: Location) -> bool:
    """A cached step whose output files (or objects) are gone runs again: its cache would
    answer with paths that no longer exist."""
    return not all(storage.exists(p) for p in outputs)


async def collect_run(
    request: RunRequest, settings: RolloutsSettings, stages: RunStages
) -> CollectSummary:
    """The run of ``request``: its summary, or RunStopped (a signal or a cancellation),
    IncompleteRun (rollouts missing) or the error a rerun will not fix. A deadline stop
    returns the summary of what was merged, ``stopped="deadline"``."""
    return await _Run(request, settings, stages).run()


class _Run:
    def __init__(self, request: RunRequest, settings: RolloutsSettings, stages: RunStages) -> None:
        self.request, self.config, self.settings = request, request.config, settings
        self.stages, self.log = stages, stages.log
        output = self.config.output_jsonl_fpath
        self.paths = OutputPaths.for_output(output)
        self.run_dir = run_dir_for(output, settings.work_dir)
        self.reader = stages.status_reader(output, settings.work_dir)
        # The deadline is fixed now: every chunk, retry and worker shares it; a rerun gets its own.
        plan = StopPlan.starting_now(
            self.config.max_duration_s(), settings.drain_margin_s, settings.stop_grace_s
        )
        self.stop, self.started_at = Stopper.armed(plan), plan.started_at
        self.lease: Lease | None = None  # held while the run writes an output in a bucket

    async def run(self) -> CollectSummary:
        output = self.config.output_jsonl_fpath
        with run_lock(self.run_dir, output):
            async with output_lease(output, self.lease_lost) as self.lease, \
                    self.stages.stop_controls(self.stop):
                split = await self.split()
                await self.reopen_for_retry(split)
                plan = self.request.plan or DispatchPlan.for_run(
                    self.config, split.agent_names, self.settings
                )
                await self.check_agents_unless_complete(plan)
                async with self.stages.progress(self.reader, self.paths.rollouts) as progress:
                    self.stages.freeze_heap()
                    chunks = await self.stages.collect(split, plan, self.run_dir, self.stop)
                raise_what_a_rerun_will_not_fix(chunks)
                await self.end_if_stopped_early()
                await self.finish_retry(split)
                if self.lease is not None:  # another run writes the output now: not this one
                    self.lease.check()
                merge, metrics = await self.merge_and_measure(split, plan)
                if merge.failed:
                    await self.warn_of_unexpected_errors()
        summary = summarize(self.paths, split, chunks, merge, metrics)
        summary.stopped = stopped_at_deadline(self.stop.reason, merge.missing)
        await self.report(summary, progress)
        if merge.missing and summary.stopped is None:
            unfinished = sum(1 for c in chunks if not c.completed)
            raise incomplete_run(merge, plan, unfinished, first_chunk_error(chunks))
        return summary

    def lease_lost(self, reason: str) -> None:
        """The lease of a bucket output was lost: stop writing it, as on a signal."""
        self.log.warning("%s; stopping", reason)
        self.stop.request("lease lost")

    async def split(self) -> SplitResult:
        """The run state for this request (refusing a conflicting one), then the input's
        chunks."""
        config, require_agent_ref = self.config, self.config.agent_identity is None
        # With fresh: validate (a streaming pass, writing nothing) before anything is discarded.
        if config.fresh:
            await asyncio.to_thread(validate_input, config.input_jsonl_fpath,
                                    limit=config.limit, require_agent_ref=require_agent_ref)  # fmt: skip
        run_id = prepare_run_dir(config, self.run_dir)
        split = await self.stages.split(config, self.run_dir, run_id)
        self.log.info(
            "%d tasks x %d repeats in %d chunks (run state %s)",
            split.n_tasks, config.num_repeats, len(split.chunks), self.run_dir,
        )  # fmt: skip
        return split

    async def reopen_for_retry(self, split: SplitResult) -> None:
        """With retry_failure_classes: move the matching failures back to "to collect" (under
        the run's lock, after split), and say how many of each class."""
        classes = self.config.retry_failure_classes
        if not classes:
            return
        report = await asyncio.to_thread(
            reopen_failures, self.run_dir, split.chunks, self.config.num_repeats, classes
        )
        self.log.info("%s", report.describe())

    async def check_agents_unless_complete(self, plan: DispatchPlan) -> None:
        """A dead address would otherwise spend every attempt and chunk retry first; a run
        whose rollouts are all written needs no agent."""
        if (await asyncio.to_thread(self.reader.read)).phase == "complete":
            return
        down = self.request.agents_down  # checked before the flow run, if it was
        if down is None:
            down = tuple(await agents_down(plan, self.settings, self.stages.probe_agents))
        for line in down:  # replicas down while others are up: collecting goes on without them
            self.log.warning("%s; collecting from the other replicas", line)

    async def end_if_stopped_early(self) -> None:
        """After a stop: record it in the run state; a signal or a cancellation ends the run
        here, unmerged, so it exits promptly (a deadline stop merges what finished)."""
        reason = self.stop.reason
        if reason is None:
            return
        if reason == "lease lost" and self.lease is not None:
            self.lease.check()  # LeaseLost: another run writes the output now
        status = await asyncio.to_thread(self.reader.read)
        missing = status.expected - status.done - status.failed
        await asyncio.to_thread(write_stop_record, self.run_dir, self.stop, missing)
        if reason != "deadline" and missing:
            raise stopped_run(reason, status)

    async def finish_retry(self, split: SplitResult) -> None:
        """After a retry's collection (not after a stop: a rerun of the retry carries its
        keys)."""
        if self.config.retry_failure_classes:
            await asyncio.to_thread(clear_retry, self.run_dir, split.chunks)

    async def merge_and_measure(
        self, split: SplitResult, plan: DispatchPlan
    ) -> tuple[MergeReport, MetricsSummary]:
        paths = self.paths
        merge = await self.stages.merge(
            split, plan, paths, refresh=must_refresh(paths.rollouts, paths.failures)
        )
        metrics = await self.stages.metrics(
            paths, self.config.num_repeats, merge.expected_by_agent,
            refresh=must_refresh(paths.metrics),
        )  # fmt: skip
        return merge, metrics

    async def warn_of_unexpected_errors(self) -> None:
        """One warning (the console, the run's logs) for every rollout that met an unexpected
        exception, however many: each is a classified failure in the failures file."""
        output = self.config.output_jsonl_fpath
        report = await asyncio.to_thread(summarize_failures, output, 0)
        message = unexpected_errors_message(report, output)
        if message is not None:
            self.log.warning("%s", message)

    async def report(self, summary: CollectSummary, progress: Progress) -> None:
        """This run's figures into the summary; its final progress and results shown (the
        failures triaged as `rollouts failures` does), and its summary line in the logs."""
        status = await asyncio.to_thread(self.reader.read)
        latency = await asyncio.to_thread(read_run_latency, self.run_dir, self.started_at)
        summary.figures = progress.figures(summary, self.started_at, latency)
        await progress.show_final(summary, status.replicas)
        failures = await asyncio.to_thread(summarize_failures, summary.output)
        await self.stages.publish(summary, status, failures)
        self.log.info(
            "%d/%d rollouts written, %d failed, %d missing; %d of %d chunks from cache; %s; %s",
            summary.succeeded, summary.expected, summary.failed, summary.missing,
            summary.chunks_from_cache, summary.chunks, summary.figures.line(), summary.output,
        )  # fmt: skip


def summarize(
    paths: OutputPaths, split: SplitResult, chunks: Sequence[ChunkOutcome], merge: MergeReport,
    metrics: MetricsSummary,
) -> CollectSummary:  # fmt: skip
    return CollectSummary(
        output=str(paths.rollouts), failures=str(paths.failures), metrics=str(paths.metrics),
        expected=merge.expected, succeeded=merge.succeeded, failed=merge.failed,
        missing=merge.missing, chunks=len(split.chunks),
        chunks_from_cache=sum(1 for c in chunks if c.cached),
        agents=[AgentResult.of(a) for a in metrics.agents],
        missing_examples=merge.missing_examples,
    )  # fmt: skip


def stopped_at_deadline(reason: StopReason | None, missing: int) -> str | None:
    """`deadline` for a run its deadline stopped with rollouts missing (it ends as stopped, not
    as incomplete); None otherwise (a stop that left nothing missing changes nothing)."""
    return "deadline" if reason == "deadline" and missing else None


def deadline_outcome(summary: CollectSummary) -> str | None:
    """The message a run its deadline cut ends with (not a failure: the command exits ``ExitCode.DEADLINE``);
    None for any other run."""
    return deadline_message(summary) if summary.stopped == "deadline" else None


def raise_what_a_rerun_will_not_fix(chunks: Sequence[ChunkOutcome]) -> None:
    """A chunk stopped by something a rerun alone will not fix (a full disk) ends the run with
    that message, rather than with the rollouts it left missing."""
    for chunk in chunks:
        if isinstance(chunk.error, RolloutsError) and not isinstance(chunk.error, IncompleteRun):
            raise chunk.error


def first_chunk_error(chunks: Sequence[ChunkOutcome]) -> str | None:
    """The exception that ended the first failed chunk, when it is not one of ours (those say
    what is missing, or were raised above): `ValueError: ...`, for the run's last message."""
    for chunk in chunks:
        error = chunk.error
        if isinstance(error, Exception) and not isinstance(error, RolloutsError):
            return redact(f"{type(error).__name__}: {error}")
    return None


def check_resume_budget(runs: int, settings: RolloutsSettings) -> None:
    """Stop a run that keeps crashing (``runs``: the times its flow run started): the resume
    automation reschedules it, this bounds it."""
    if runs > settings.max_auto_resumes + 1:
        raise RolloutsError(
            f"this flow run already started {runs - 1} times and was resumed "
            f"{runs - 2} times after crashes (ROLLOUTS_MAX_AUTO_RESUMES="
            f"{settings.max_auto_resumes}); not resuming again. Find the cause in its logs, "
            "then run it again by hand: everything written so far is kept."
        )
