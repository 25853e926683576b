"""Collect every chunk of a run: as tasks sharing this process's dispatcher, or on Dask."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.states import State

from flows.dask_runner import collect_on_dask, dask_enabled
from rollouts.collect import DispatchPlan
from rollouts.dispatchers import close_dispatcher, open_dispatcher
from rollouts.errors import IncompleteRun, RolloutsError
from rollouts.models import ChunkSpec, CollectConfig
from rollouts.settings import RolloutsSettings
from rollouts.stopping import Stopper
from rollouts.urls import redact
from tasks.collect import collect_chunk_task


async def collect_chunks(
    chunks: list[ChunkSpec], plan: DispatchPlan, run_id: str, run_dir: Path,
    config: CollectConfig, settings: RolloutsSettings, processes: int, stop: Stopper,
) -> list[State[Any]]:  # fmt: skip
    """One cached, retrying task run per chunk, in this process or in ``processes`` local ones
    (or on a Dask cluster); their final states, in chunk order. ``stop`` (armed with the run's
    deadline) stops them all: here as their dispatcher's stopper, on Dask relayed to workers."""
    chunk_task = collect_chunk_task.with_options(
        retries=settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
    )
    retry = bool(config.retry_failure_classes)
    if retry:
        # A retry's chunk result is complete over the reopened rollouts only: it must neither
        # come from the cache nor be stored as the chunk's result (tasks/collect.py).
        chunk_task = chunk_task.with_options(cache_policy=NO_CACHE)
    # Prefect and pandas leave a large, long-lived heap; full collections over it stall the
    # event loop while requests wait. Freezing it keeps the collector's GC work small.
    gc.freeze()
    if dask_enabled(settings, processes):
        return await asyncio.to_thread(
            collect_on_dask, chunk_task, chunks, plan, run_id, run_dir, settings, config,
            processes, stop,
        )  # fmt: skip
    dispatcher = open_dispatcher(
        run_id, settings, config.in_flight_ceiling, config.max_parallel_chunks, config.adaptive
    )
    dispatcher.stop = stop  # the flow's: its signal handlers and deadline stop these chunks
    try:
        # Awaited together on this event loop, chunk tasks share one dispatcher.
        return await asyncio.gather(
            *(chunk_task(s, plan, run_id, stop_plan=stop.plan, retry=retry, return_state=True)
              for s in chunks)
        )  # fmt: skip
    finally:
        await close_dispatcher(run_id)


async def raise_what_a_rerun_will_not_fix(states: list[State[Any]]) -> None:
    """A chunk stopped by something a rerun alone will not fix (a full disk) ends the run with
    that message, rather than with the rollouts it left missing."""
    for state in states:
        # A chunk a stop kept from starting (on Dask: still Pending) has no error to read.
        if state.is_final() and not state.is_completed():
            error = await state.aresult(raise_on_failure=False)
            if isinstance(error, RolloutsError) and not isinstance(error, IncompleteRun):
                raise error


async def first_chunk_error(states: list[State[Any]]) -> str | None:
    """The exception that ended the first failed chunk, when it is not one of ours (those say
    what is missing, or were raised above): `ValueError: ...`, for the run's last message."""
    for state in states:
        if state.is_final() and not state.is_completed():
            error = await state.aresult(raise_on_failure=False)
            if isinstance(error, Exception) and not isinstance(error, RolloutsError):
                return redact(f"{type(error).__name__}: {error}")
    return None
