"""Dispatchers: one per run and process, shared by the chunks of that run collected there (one
HTTP client, one in-flight budget).

In the flow's process the flow opens its own (``open_dispatcher``) and hands it to each chunk
task it runs on its event loop. An object cannot travel to a Dask worker: a chunk task there
carries a ``WorkerPlan`` instead, and each worker process builds its dispatcher for the run
from it once (``worker_dispatcher``).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from rollouts import gctune
from rollouts.agent_client import RetryPolicy
from rollouts.collect import Dispatcher
from rollouts.fdlimit import ensure_fd_budget
from rollouts.replicas import ReplicaRouter
from rollouts.settings import RolloutsSettings
from rollouts.stopping import StopPlan, StopReason


def open_dispatcher(
    settings: RolloutsSettings, max_in_flight: int, max_parallel_chunks: int | None,
    adaptive: bool = False,
) -> Dispatcher:  # fmt: skip
    """A run's dispatcher in this process (the caller closes it: ``aclose``). ``adaptive``:
    ``max_in_flight`` is a ceiling, the limit is found at run time."""
    # One socket per request in flight: refused here, before any is sent, if they cannot all
    # be open at once (this process's budget: the flow's).
    ensure_fd_budget(max_in_flight)
    api_key = settings.agent_api_key.get_secret_value() if settings.agent_api_key else None
    return Dispatcher(
        RetryPolicy.from_settings(settings), max_in_flight, max_parallel_chunks, api_key,
        adaptive, ReplicaRouter.from_settings(settings), settings.stall_warn_s,
        settings.agent_credentials(),
    )  # fmt: skip


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

    run_id: str  # the run whose dispatcher it is (a worker may serve several runs)
    budgets: dict[str, int]  # worker name -> its share of the run's requests in flight
    chunks_at_once: int | None = None  # chunks dispatching at once there; None: its threads
    adaptive: bool = False  # each share is a ceiling, the limit found at run time


def worker_dispatcher(
    settings: RolloutsSettings, max_in_flight: int, worker: WorkerPlan
) -> tuple[asyncio.AbstractEventLoop, Dispatcher]:
    """This process's dispatcher for the worker's run and the loop it lives on (created once)."""
    run_id = worker.run_id
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
            gctune.freeze_heap()  # as in the flow's process (rollouts/run.py)
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
