"""The `collect-rollouts` flow: split -> collect per chunk -> merge -> metrics.

Rerunning it with the same parameters resumes: finished chunks are cache hits, an unfinished
chunk skips the rollouts already written.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import ValidationError

from flows.artifacts import LiveProgress, publish_collection
from flows.dask_runner import collecting_processes
from flows.dispatch import collect_chunks, first_chunk_error, raise_what_a_rerun_will_not_fix
from flows.retry import finish_retry, reopen_for_retry
from flows.stopping import stop_controls, stopped_state
from flows.ui import collect_run_name, form_field, own_run_context, run_name
from rollouts.agent_client import check_agents_reachable
from rollouts.collect import DispatchPlan
from rollouts.errors import ConfigError, RolloutsError, RunStopped, validation_message
from rollouts.failures import summarize_failures
from rollouts.health import read_run_latency
from rollouts.models import CollectConfig, CountOrAuto, SplitResult
from rollouts.replicas import agents_to_check
from rollouts.run_state import OutputPaths, prepare_run_dir, run_dir_for, run_lock
from rollouts.settings import RolloutsSettings
from rollouts.split import validate_input
from rollouts.status import StatusReader
from rollouts.stopping import Stopper, StopPlan, write_stop_record
from rollouts.summary import (
    STOPPED_AT_DEADLINE,
    AgentResult,
    CollectSummary,
    deadline_message,
    incomplete_run,
    stopped_run,
    unexpected_errors_message,
)
from tasks.merge import merge_task
from tasks.metrics import metrics_task
from tasks.split import split_task

if TYPE_CHECKING:  # numpy loads with the metrics step, not at start-up
    from rollouts.merge import MergeReport
    from rollouts.metrics import MetricsSummary

__all__ = ["CollectSummary", "collect_rollouts", "run_collection"]


def _flow_run_name() -> str:
    """`out/train`, `out/train: retry timeout` (the runs list shows the flow's name beside it)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return run_name(
        collect_run_name(params["output_jsonl_fpath"], params.get("retry_failure_classes"))
    )


def _form(name: str) -> Any:
    return form_field(CollectConfig, name)


@flow(name="collect-rollouts", flow_run_name=_flow_run_name, validate_parameters=True)
async def collect_rollouts(
    input_jsonl_fpath: Annotated[str, _form("input_jsonl_fpath")],
    output_jsonl_fpath: Annotated[str, _form("output_jsonl_fpath")],
    agent_name: Annotated[str | None, _form("agent_name")] = None,
    agent_url: Annotated[str | None, _form("agent_url")] = None,
    limit: Annotated[int | None, _form("limit")] = None,
    num_repeats: Annotated[int, _form("num_repeats")] = 1,
    num_samples_in_parallel: Annotated[CountOrAuto, _form("num_samples_in_parallel")] = 64,
    max_in_flight: Annotated[int, _form("max_in_flight")] = 1024,
    responses_create_params: Annotated[
        dict[str, Any] | None, _form("responses_create_params")
    ] = None,
    num_repeats_add_seed: Annotated[bool, _form("num_repeats_add_seed")] = False,
    chunk_size: Annotated[int, _form("chunk_size")] = 10_000,
    max_parallel_chunks: Annotated[int, _form("max_parallel_chunks")] = 4,
    processes: Annotated[CountOrAuto, _form("processes")] = 1,
    max_duration: Annotated[str | None, _form("max_duration")] = None,
    fresh: Annotated[bool, _form("fresh")] = False,
    retry_failure_classes: Annotated[list[str] | None, _form("retry_failure_classes")] = None,
) -> CollectSummary | State:
    """Collect rollouts of one dataset from one agent into NeMo Gym-compatible files."""
    params = {k: v for k, v in locals().items() if v is not None}
    # Called from a task (collect-multi-dataset), this flow's artifacts and logs must still
    # belong to this flow run, not to the calling task.
    with own_run_context():
        try:
            try:
                config = CollectConfig(**params)
            except ValidationError as e:
                raise ConfigError(validation_message(e)) from None
            check_auto_resume_budget(RolloutsSettings())
            return finished_state(await run_collection(config))
        except RunStopped as e:  # a signal or a cancellation: its own state, not a failure
            get_run_logger().warning("%s", e)
            return stopped_state(e)
        except RolloutsError as e:
            # A user-facing failure: its message says what to do; a traceback would only bury it.
            get_run_logger().error("%s", e)
            return Failed(message=str(e), data=e)


def finished_state(summary: CollectSummary) -> CollectSummary | State:
    """A run its deadline cut ends Completed, named StoppedAtDeadline, with the summary of
    what it wrote: not a failure, and the CLI exits 3."""
    if summary.stopped != "deadline":
        return summary
    message = deadline_message(summary)
    get_run_logger().warning("%s", message)
    return Completed(name=STOPPED_AT_DEADLINE, message=message, data=summary)


def check_auto_resume_budget(settings: RolloutsSettings) -> None:
    """Stop a run that keeps crashing: the resume automation reschedules it, this bounds it."""
    from prefect.runtime import flow_run

    runs = int(flow_run.run_count or 1)
    if runs > settings.max_auto_resumes + 1:
        raise RolloutsError(
            f"this flow run already started {runs - 1} times and was resumed "
            f"{runs - 2} times after crashes (ROLLOUTS_MAX_AUTO_RESUMES="
            f"{settings.max_auto_resumes}); not resuming again. Find the cause in its logs, "
            "then run it again by hand: everything written so far is kept."
        )


async def run_collection(
    config: CollectConfig, settings: RolloutsSettings | None = None
) -> CollectSummary:
    """split -> collect per chunk -> merge -> metrics, under the output's lock. A deadline,
    a signal or a cancellation stops collecting early (rollouts/stopping.py, flows/stopping.py)."""
    settings = settings or RolloutsSettings()
    processes = collecting_processes(config, settings)  # a contradiction fails before any work
    paths = OutputPaths.for_output(config.output_jsonl_fpath)
    run_dir = run_dir_for(config.output_jsonl_fpath, settings.work_dir)
    reader = StatusReader(config.output_jsonl_fpath, settings.work_dir)
    # The deadline is fixed now: every chunk, retry and worker shares it; a rerun gets its own.
    stop = Stopper.armed(StopPlan.starting_now(
        config.max_duration_s(), settings.drain_margin_s, settings.stop_grace_s))  # fmt: skip
    with run_lock(run_dir, config.output_jsonl_fpath):
        async with stop_controls(stop):
            split = await split_into_chunks(config, run_dir)
            await reopen_for_retry(config, split, run_dir)
            plan = DispatchPlan.for_run(config, split.agent_names, settings)
            await check_agents_unless_complete(plan, reader, settings)
            async with LiveProgress(reader, paths.rollouts) as progress:
                states = await collect_chunks(
                    split.chunks, plan, split.run_id, run_dir, config, settings, processes, stop
                )
            await raise_what_a_rerun_will_not_fix(states)
            await end_if_stopped_early(stop, run_dir, reader)
            await finish_retry(config, split, run_dir)
            merge, metrics = await merge_and_measure(split, plan, paths, config)
            if merge.failed:
                await warn_of_unexpected_errors(config.output_jsonl_fpath)
    summary = summarize(paths, split, states, merge, metrics)
    summary.stopped = "deadline" if stop.reason == "deadline" and merge.missing else None
    await report(summary, progress, reader, stop.plan.started_at)
    if merge.missing and summary.stopped is None:
        raise incomplete_run(merge, plan, sum(1 for s in states if not s.is_completed()),
                             await first_chunk_error(states))  # fmt: skip
    return summary


async def warn_of_unexpected_errors(output: str) -> None:
    """One warning (the console, the run's logs) for every rollout that met an unexpected
    exception, however many: each is a classified failure in the failures file."""
    from rollouts.failures import summarize_failures

    report = await asyncio.to_thread(summarize_failures, output, 0)
    message = unexpected_errors_message(report, output)
    if message is not None:
        get_run_logger().warning("%s", message)


async def end_if_stopped_early(stop: Stopper, run_dir: Path, reader: StatusReader) -> None:
    """After a stop: record it in the run state; a signal or a cancellation ends the run here,
    unmerged, so it exits promptly (a deadline stop merges what finished)."""
    if stop.reason is None:
        return
    status = await asyncio.to_thread(reader.read)
    missing = status.expected - status.done - status.failed
    await asyncio.to_thread(write_stop_record, run_dir, stop, missing)
    if stop.reason != "deadline" and missing:
        raise stopped_run(stop.reason, status)


async def merge_and_measure(
    split: SplitResult, plan: DispatchPlan, paths: OutputPaths, config: CollectConfig
) -> tuple[MergeReport, MetricsSummary]:
    """The chunk outputs merged into the output files, and its metrics."""
    merge = await merge_task.with_options(
        refresh_cache=not (paths.rollouts.exists() and paths.failures.exists())
    )(chunks=split.chunks, plan=plan, output_path=str(paths.rollouts),
      failures_path=str(paths.failures))  # fmt: skip
    metrics = await metrics_task.with_options(refresh_cache=not paths.metrics.exists())(
        rollouts_path=str(paths.rollouts), failures_path=str(paths.failures),
        metrics_path=str(paths.metrics), num_repeats=config.num_repeats,
        expected_by_agent=merge.expected_by_agent,
    )  # fmt: skip
    return merge, metrics


def summarize(
    paths: OutputPaths, split: SplitResult, states: list[State[Any]], merge: MergeReport,
    metrics: MetricsSummary,
) -> CollectSummary:  # fmt: skip
    return CollectSummary(
        output=str(paths.rollouts), failures=str(paths.failures), metrics=str(paths.metrics),
        expected=merge.expected, succeeded=merge.succeeded, failed=merge.failed,
        missing=merge.missing, chunks=len(split.chunks),
        chunks_from_cache=sum(1 for s in states if s.name == "Cached"),
        agents=[AgentResult.of(a) for a in metrics.agents],
        missing_examples=merge.missing_examples,
    )  # fmt: skip


async def check_agents_unless_complete(
    plan: DispatchPlan, reader: StatusReader, settings: RolloutsSettings
) -> None:
    """A dead address would otherwise spend every attempt and chunk retry first; a run whose
    rollouts are all written needs no agent."""
    if (await asyncio.to_thread(reader.read)).state != "complete":
        agents = agents_to_check(plan.agents_in_use(), plan.agent_url, settings)
        down = await check_agents_reachable(agents, settings.connect_timeout_s)
        for line in down:  # replicas down while others are up: collecting goes on without them
            get_run_logger().warning("%s; collecting from the other replicas", line)


async def split_into_chunks(config: CollectConfig, run_dir: Path) -> SplitResult:
    """The run state for this request (refusing a conflicting one), then the input's chunks."""
    if config.fresh:  # validate (a streaming pass, writing nothing) before anything is discarded
        await asyncio.to_thread(validate_input, Path(config.input_jsonl_fpath),
                                limit=config.limit, require_agent_ref=config.agent_identity is None)  # fmt: skip
    split = await split_task(
        input_path=config.input_jsonl_fpath, run_dir=str(run_dir),
        run_id=prepare_run_dir(config, run_dir), chunk_size=config.chunk_size,
        limit=config.limit, require_agent_ref=config.agent_identity is None,
    )  # fmt: skip
    get_run_logger().info(
        "%d tasks x %d repeats in %d chunks (run state %s)",
        split.n_tasks, config.num_repeats, len(split.chunks), run_dir,
    )  # fmt: skip
    return split


async def report(
    summary: CollectSummary, progress: LiveProgress, reader: StatusReader, started_at: float
) -> None:
    """This run's figures into the summary; the run's final progress and artifacts in the UI
    (the failures triaged as `rollouts failures` does), and its summary line in the logs."""
    status = await asyncio.to_thread(reader.read)
    latency = await asyncio.to_thread(read_run_latency, reader.run_dir, started_at)
    summary.figures = progress.figures(summary, started_at, latency)
    await progress.show_final(summary, status.replicas)
    failures = await asyncio.to_thread(summarize_failures, summary.output)
    await publish_collection(summary, status, failures)
    get_run_logger().info(
        "%d/%d rollouts written, %d failed, %d missing; %d of %d chunks from cache; %s; %s",
        summary.succeeded, summary.expected, summary.failed, summary.missing,
        summary.chunks_from_cache, summary.chunks, summary.figures.line(), summary.output,
    )  # fmt: skip
