"""Collect stage as a Prefect task: one task run per chunk, never per request."""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import get_run_logger, task

from rollouts.chunks import ChunkFiles
from rollouts.collect import Dispatcher, DispatchPlan, collect_chunk
from rollouts.dispatchers import WorkerPlan, worker_dispatcher
from rollouts.errors import IncompleteRun, RunStopped
from rollouts.models import ChunkResult, ChunkSpec
from rollouts.retry import reopen_count
from rollouts.settings import RolloutsSettings
from rollouts.stopping import StopPlan
from tasks.agent_limits import PrefectLimitStore
from tasks.cache_policies import content_policy


def _chunk_identity(inputs: dict[str, Any]) -> Any:
    spec: ChunkSpec = inputs["spec"]
    plan: DispatchPlan = inputs["plan"]
    # Agent URLs are left out on purpose: an agent that moved host still gives the same rollouts.
    identity = {
        "chunk": spec.cache_identity(),
        "agent": plan.agent_name or plan.agent_url,
        "num_repeats": plan.num_repeats,
        "overrides": plan.overrides,
        "add_seed": plan.add_seed,
    }
    # A retry by failure class reopened rollouts of this chunk: a result cached before it may
    # say "complete" of a chunk whose retried rollouts now failed in a way a rerun resends.
    if reopened := reopen_count(ChunkFiles.of(spec).reopened):
        identity["reopened"] = reopened
    return identity


def retry_unless_stopped(task: Any, task_run: Any, state: Any) -> bool:
    """A chunk stopped on purpose (deadline, signal, cancellation) is not retried: its run is
    ending. (``state.data`` is the exception the chunk raised.)"""
    return not isinstance(state.data, RunStopped)


@task(
    name="collect-chunk",
    task_run_name="collect-chunk-{spec.index:05d}",
    cache_policy=content_policy(_chunk_identity),
    persist_result=True,
    retry_condition_fn=retry_unless_stopped,
    # retries: set by the flow from the settings (chunk_retries, chunk_retry_delay_s)
)
async def collect_chunk_task(
    spec: ChunkSpec,
    plan: DispatchPlan,
    dispatch: Dispatcher | WorkerPlan,
    stop_plan: StopPlan | None = None,
    retry: bool = False,
) -> ChunkResult:
    """Collect a chunk; raise (and so retry, resuming) while rollouts are still missing.

    ``dispatch``: the flow's dispatcher, which the chunk tasks it awaits on its event loop
    share; or on a Dask worker the plan of that process's dispatcher for the run, with its
    share of the run's budget. Neither is part of the cache key (``_chunk_identity``).
    ``stop_plan``: the run's deadline and stop grace, the same for every chunk and retry.
    ``retry``: send only the rollouts a retry by failure class reopened (rollouts/retry.py);
    such runs are never cached (the flow gives them no cache policy).
    """
    logger = get_run_logger()
    if isinstance(dispatch, Dispatcher):
        result = await collect_chunk(spec, plan, dispatch, stop_plan, retry)
    else:
        budget = this_worker_budget(dispatch)
        loop, dispatcher = worker_dispatcher(
            RolloutsSettings(), budget, dispatch, PrefectLimitStore
        )
        running = asyncio.run_coroutine_threadsafe(
            collect_chunk(spec, plan, dispatcher, stop_plan, retry), loop
        )
        result = await asyncio.wrap_future(running)
    logger.info(
        "chunk %05d: %d/%d written, %d failed, %d missing (%d requests, worker %s%s)",
        spec.index, result.succeeded, result.expected, result.failed, result.missing,
        result.attempts, result.worker,
        "" if result.in_flight_limit is None else f", in flight now {result.in_flight_limit} (auto)",
    )  # fmt: skip
    if not result.complete:
        raise_if_stopped(result, stop_plan)
        # Not cached: a retry (or the next run) resumes with only the missing rollouts.
        raise IncompleteRun(
            f"chunk {spec.index:05d}: {result.missing} of {result.expected} rollouts neither "
            f"written nor failed for good (see {result.failures_path})"
        )
    return result


def raise_if_stopped(result: ChunkResult, stop_plan: StopPlan | None) -> None:
    """An incomplete chunk of a stopping run raises RunStopped (not cached, not retried). So
    does one whose retry could not start before the deadline."""
    reason = result.stopped
    retry_delay = RolloutsSettings().chunk_retry_delay_s
    if reason is None and stop_plan is not None and not stop_plan.leaves_time_for(retry_delay):
        reason = "deadline"
    if reason is not None:
        raise RunStopped(
            f"chunk {result.index:05d}: stopped ({reason}) with {result.missing} of "
            f"{result.expected} rollouts missing",
            reason,
        )


def this_worker_budget(plan: WorkerPlan) -> int:
    """This Dask worker's share of the run's requests in flight, by its name."""
    from distributed import get_worker

    try:
        name = str(get_worker().name)
    except ValueError:  # not inside a Dask task
        name = ""
    return plan.budget_of(name)
