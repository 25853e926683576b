"""Collect every chunk of a run: as tasks sharing this process's dispatcher, or on Dask."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prefect import State, get_run_logger
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import collect_on_dask, dask_enabled
from rollouts.agent_limits import limit_name
from rollouts.collect import DispatchPlan
from rollouts.dispatchers import LimitStoreFactory, open_dispatcher
from rollouts.models import ChunkSpec, CollectConfig, SplitResult
from rollouts.run import ChunkOutcome
from rollouts.settings import RolloutsSettings
from rollouts.stopping import Stopper
from tasks.agent_limits import PrefectLimitStore, set_agent_limits
from tasks.collect import collect_chunk_task


async def collect_chunks(
    split: SplitResult, plan: DispatchPlan, run_dir: Path, config: CollectConfig,
    settings: RolloutsSettings, processes: int, stop: Stopper,
) -> list[ChunkOutcome]:  # fmt: skip
    """One cached, retrying task run per chunk, in this process or in ``processes`` local ones
    (or on a Dask cluster); how each ended, in chunk order. ``stop`` (armed with the run's
    deadline) stops them all: here as their dispatcher's stopper, on Dask relayed to workers."""
    chunk_task = collect_chunk_task.with_options(
        retries=settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
    )
    if config.retry_failure_classes:
        # A retry's chunk result is complete over the reopened rollouts only: it must neither
        # come from the cache nor be stored as the chunk's result (tasks/collect.py).
        chunk_task = chunk_task.with_options(cache_policy=NO_CACHE)
    limit_store = await apply_agent_limits(plan, split, settings)
    if dask_enabled(settings, processes, config.slurm_jobs):
        states = await asyncio.to_thread(
            collect_on_dask, chunk_task, split.chunks, plan, split.run_id, run_dir, settings,
            config, processes, stop,
        )  # fmt: skip
    else:
        states = await collect_here(
            chunk_task, split.chunks, plan, config, settings, stop, limit_store
        )
    return [await chunk_outcome(s) for s in states]


async def apply_agent_limits(
    plan: DispatchPlan, split: SplitResult, settings: RolloutsSettings
) -> LimitStoreFactory | None:
    """The shared limits of the run's agents (ROLLOUTS_AGENT_LIMITS) set to their configured
    values, before any request; the store the dispatchers take their slots from (on Dask, each
    worker's chunk task uses its own: tasks/collect.py). None: no agent of the run has one."""
    if not settings.agent_limits:
        return None
    agents = plan.request_agents(split.agent_names)
    applied = await set_agent_limits(settings.agent_limits, agents)
    if applied:
        get_run_logger().info(
            "requests in flight to an agent across every run, at most: %s",
            ", ".join(f"{a} {n} (Prefect concurrency limit {limit_name(a)})"
                      for a, n in applied.items()),
        )  # fmt: skip
        return PrefectLimitStore
    get_run_logger().info(
        "ROLLOUTS_AGENT_LIMITS names none of this run's agents (%s): no shared limit applies",
        ", ".join(sorted(agents)),
    )  # fmt: skip
    return None


async def collect_here(
    chunk_task: Any, chunks: list[ChunkSpec], plan: DispatchPlan, config: CollectConfig,
    settings: RolloutsSettings, stop: Stopper, limit_store: LimitStoreFactory | None = None,
) -> list[State[Any]]:  # fmt: skip
    """The chunk tasks awaited together on this event loop, each handed this run's dispatcher
    (one HTTP client, one budget), whose stopper is the flow's: its signal handlers and
    deadline stop these chunks. ``limit_store``: where the agents' shared limits are held."""
    retry = bool(config.retry_failure_classes)
    async with open_dispatcher(
        settings, config.in_flight_ceiling, config.max_parallel_chunks, config.adaptive,
        limit_store,
    ) as dispatcher:  # fmt: skip
        dispatcher.use_stopper(stop)
        return list(await asyncio.gather(
            *(chunk_task(s, plan, dispatcher, stop_plan=stop.plan, retry=retry, return_state=True)
              for s in chunks)
        ))  # fmt: skip


async def chunk_outcome(state: State[Any]) -> ChunkOutcome:
    """A chunk task's final state as the run reads it. A chunk a stop kept from starting (on
    Dask: still Pending) has no error to read."""
    if state.is_completed():
        return ChunkOutcome(completed=True, cached=state.name == "Cached")
    error = await state.aresult(raise_on_failure=False) if state.is_final() else None
    return ChunkOutcome(completed=False, error=error if isinstance(error, BaseException) else None)
