"""The per-process registry of dispatchers, one per run.

Chunk tasks of one run share a dispatcher (one HTTP client, one in-flight budget) when they run
on the same event loop. Its key is the run id, a plain string, so task inputs stay hashable and
free of clients or locks.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from dataclasses import dataclass

from rollouts.agent_client import RetryPolicy
from rollouts.collect import Dispatcher
from rollouts.fdlimit import ensure_fd_budget
from rollouts.replicas import ReplicaRouter
from rollouts.settings import RolloutsSettings
from rollouts.stopping import StopPlan, StopReason

_dispatchers: dict[str, Dispatcher] = {}


def open_dispatcher(
    run_id: str, settings: RolloutsSettings, max_in_flight: int, max_parallel_chunks: int | None,
    adaptive: bool = False,
) -> Dispatcher:  # fmt: skip
    """``adaptive``: ``max_in_flight`` is a ceiling, the limit is found at run time."""
    key = run_id
    if key not in _dispatchers:
        # One socket per request in flight: refused here, before any is sent, if they cannot
        # all be open at once (this process's budget: the flow's).
        ensure_fd_budget(max_in_flight)
        api_key = settings.agent_api_key.get_secret_value() if settings.agent_api_key else None
        _dispatchers[key] = Dispatcher(
            RetryPolicy.from_settings(settings), max_in_flight, max_parallel_chunks, api_key,
            adaptive, ReplicaRouter.from_settings(settings), settings.stall_warn_s,
            settings.agent_credentials(),
        )  # fmt: skip
    return _dispatchers[key]


def get_dispatcher(run_id: str) -> Dispatcher:
    try:
        return _dispatchers[run_id]
    except KeyError:
        raise RuntimeError(
            f"no dispatcher open for run {run_id} in this process; the flow opens it"
        ) from None


async def close_dispatcher(run_id: str) -> None:
    dispatcher = _dispatchers.pop(run_id, None)
    if dispatcher is not None:
        await dispatcher.aclose()


# On Dask workers each task run may get its own thread and event loop, while the worker's
# budget and HTTP client must be shared by all chunks it runs. So a worker's dispatcher lives
# on one background event loop per process, and chunk coroutines are handed to that loop.
_worker_loop: asyncio.AbstractEventLoop | None = None
_worker_dispatchers: dict[str, Dispatcher] = {}
_worker_lock = threading.Lock()
_worker_stops: dict[str, tuple[StopPlan, StopReason]] = {}  # asked before a dispatcher existed


def _background_loop() -> asyncio.AbstractEventLoop:
    global _worker_loop  # noqa: PLW0603 - one loop per process, created lazily
    if _worker_loop is None:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="rollouts-dispatch", daemon=True).start()
        _worker_loop = loop
    return _worker_loop


@dataclass(frozen=True)
class WorkerPlan:
    """What a chunk task on a Dask worker needs to set up that process's dispatcher."""

    budgets: dict[str, int]  # worker name -> its share of the run's requests in flight
    chunks_at_once: int | None = None  # chunks dispatching at once there; None: its threads
    adaptive: bool = False  # each share is a ceiling, the limit found at run time


def worker_dispatcher(
    run_id: str, settings: RolloutsSettings, max_in_flight: int, worker: WorkerPlan
) -> tuple[asyncio.AbstractEventLoop, Dispatcher]:
    """This process's dispatcher for ``run_id`` and the loop it lives on (created once)."""
    with _worker_lock:
        loop = _background_loop()
        if run_id not in _worker_dispatchers:
            ensure_fd_budget(max_in_flight)  # this worker's share, as in the flow's process
            api_key = settings.agent_api_key.get_secret_value() if settings.agent_api_key else None

            async def make() -> Dispatcher:
                return Dispatcher(RetryPolicy.from_settings(settings), max_in_flight,
                                  worker.chunks_at_once, api_key, worker.adaptive,
                                  ReplicaRouter.from_settings(settings),
                                  settings.stall_warn_s,
                                  settings.agent_credentials())  # fmt: skip

            _worker_dispatchers[run_id] = asyncio.run_coroutine_threadsafe(make(), loop).result()
            if run_id in _worker_stops:
                loop.call_soon_threadsafe(
                    _stop, _worker_dispatchers[run_id], *_worker_stops[run_id]
                )
            # As in the flow's process (flows/dispatch.py): keep full collections off the
            # large, long-lived heap that Prefect and Dask leave here.
            gc.freeze()
        return loop, _worker_dispatchers[run_id]


def request_worker_stop(run_id: str, plan: StopPlan, reason: StopReason) -> None:
    """On a Dask worker (the flow calls it on each through ``Client.run``): stop this
    process's dispatcher for ``run_id`` as the flow's own was stopped. A dispatcher created
    later for that run starts stopped."""
    with _worker_lock:
        _worker_stops[run_id] = (plan, reason)
        dispatcher = _worker_dispatchers.get(run_id)
        if dispatcher is not None and _worker_loop is not None:
            _worker_loop.call_soon_threadsafe(_stop, dispatcher, plan, reason)


def _stop(dispatcher: Dispatcher, plan: StopPlan, reason: StopReason) -> None:
    dispatcher.stop.arm(plan)  # this run's stop state, even if no chunk of it ran here yet
    dispatcher.stop.request(reason)


def share_budget(total: int, workers: list[str]) -> dict[str, int]:
    """The run's in-flight budget split over ``workers``: shares differ by at most one and
    add up to ``total`` (each worker gets at least one)."""
    base, extra = divmod(total, len(workers))
    return {w: max(1, base + (i < extra)) for i, w in enumerate(workers)}
