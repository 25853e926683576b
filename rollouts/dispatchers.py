"""Dispatchers: one per run and process, shared by the chunks of that run collected there (one
HTTP client, one in-flight budget).

In the flow's process the flow opens its own (``open_dispatcher``) and hands it to each chunk
task it runs on its event loop. An object cannot travel to a Dask worker: a chunk task there
carries a ``WorkerPlan`` instead, and each worker process builds its dispatcher for the run
from it once (``worker_dispatcher``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from rollouts import gctune
from rollouts.agent_client import RetryPolicy
from rollouts.agent_limits import AgentLimits, LimitStore
from rollouts.collect import Dispatcher
from rollouts.fdlimit import ensure_fd_budget
from rollouts.replicas import ReplicaRouter
from rollouts.settings import RolloutsSettings
from rollouts.stopping import StopPlan, StopReason


def _prepare_process(max_in_flight: int) -> None:
    """What a process needs before ``max_in_flight`` requests are on the wire: one socket each,
    refused here, before any is sent, if they cannot all be open at once; and rarer full
    garbage collections while they are (rollouts/gctune.py; ``gctune.release`` undoes it)."""
    ensure_fd_budget(max_in_flight)
    gctune.hold()


# Makes the store of the agents' shared limits (rollouts/agent_limits.py), on the event loop
# of the dispatcher that uses it: Prefect's, given by the layers above (tasks/agent_limits.py).
LimitStoreFactory = Callable[[], LimitStore]


def _new_dispatcher(
    settings: RolloutsSettings, max_in_flight: int, max_parallel_chunks: int | None,
    adaptive: bool, limit_store: LimitStoreFactory | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Dispatcher:  # fmt: skip
    api_key = settings.agent_api_key.get_secret_value() if settings.agent_api_key else None
    agent_limits = (
        AgentLimits(settings.agent_limits, limit_store)
        if settings.agent_limits and limit_store is not None else None
    )  # fmt: skip
    return Dispatcher(
        RetryPolicy.from_settings(settings), max_in_flight, max_parallel_chunks, api_key,
        adaptive, ReplicaRouter.from_settings(settings), settings.stall_warn_s,
        settings.agent_credentials(), agent_limits=agent_limits, transport=transport,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def open_dispatcher(
    settings: RolloutsSettings, max_in_flight: int, max_parallel_chunks: int | None,
    adaptive: bool = False, limit_store: LimitStoreFactory | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Dispatcher]:  # fmt: skip
    """A run's dispatcher in this process, closed on leaving, when the process's GC thresholds
    come back too. ``adaptive``: ``max_in_flight`` is a ceiling, the limit is found at run
    time. ``limit_store``: where the agents' shared limits (ROLLOUTS_AGENT_LIMITS) are held;
    None: they are not applied. ``transport``: what carries the requests (None: aiohttp; tests
    pass an ``httpx.MockTransport``)."""
    _prepare_process(max_in_flight)
    try:
        dispatcher = _new_dispatcher(
            settings, max_in_flight, max_parallel_chunks, adaptive, limit_store, transport
        )
        try:
            yield dispatcher
        finally:
            await dispatcher.aclose()
    finally:
        gctune.release()


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
    # The share of a worker not in ``budgets``: one that replaced a lost worker under another
    # name, or any Slurm worker (they come and go). None: the smallest share.
    other_workers: int | None = None

    def budget_of(self, worker_name: str) -> int:
        """This worker's share; the run's total is never exceeded by a newcomer."""
        if worker_name in self.budgets:
            return self.budgets[worker_name]
        return self.other_workers or min(self.budgets.values())


def worker_dispatcher(
    settings: RolloutsSettings, max_in_flight: int, worker: WorkerPlan,
    limit_store: LimitStoreFactory | None = None,
) -> tuple[asyncio.AbstractEventLoop, Dispatcher]:  # fmt: skip
    """This process's dispatcher for the worker's run and the loop it lives on (created once).
    ``limit_store``: as for ``open_dispatcher``. Its slots of the agents' shared limits go
    back when its chunks leave them unused: the dispatcher is never closed."""
    run_id = worker.run_id
    with _worker_lock:
        loop = _background_loop()
        if run_id not in _worker_dispatchers:
            # This worker's share, as in the flow's process; kept for the process's life, as
            # its dispatchers are.
            _prepare_process(max_in_flight)

            async def make() -> Dispatcher:
                return _new_dispatcher(
                    settings, max_in_flight, worker.chunks_at_once, worker.adaptive, limit_store
                )

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


def request_stop_everywhere() -> list[Dispatcher]:
    """Stop every run's dispatcher in this process as on SIGTERM (safe in a signal handler:
    it only schedules the stops on their loop); those dispatchers. No lock: a handler that
    interrupted its own thread holding it would wait forever; a copy is atomic under the GIL."""
    dispatchers = list(_worker_dispatchers.values())
    loop = _worker_loop
    if loop is None:
        return []
    for dispatcher in dispatchers:
        loop.call_soon_threadsafe(dispatcher.stop.request, "SIGTERM")
    return dispatchers


def stop_worker_dispatchers(extra_wait_s: float = 5.0) -> None:
    """On a Dask worker that is closing: stop every run's dispatcher in this process as on
    SIGTERM and wait (up to each one's grace, plus ``extra_wait_s`` to write) until none of
    their chunks is collecting any more."""
    dispatchers = request_stop_everywhere()
    if not dispatchers:
        return
    deadline = time.monotonic() + max(d.stop.grace_s() for d in dispatchers) + extra_wait_s
    while time.monotonic() < deadline and any(d.publication.collecting_now for d in dispatchers):
        time.sleep(0.1)
    # The slots of agents' shared limits this process holds go back now, not when their
    # leases expire (about a minute): other processes and runs take them at once.
    loop = _worker_loop
    for dispatcher in dispatchers:
        limits = dispatcher.client.agent_limits
        if limits is not None and loop is not None:
            with contextlib.suppress(Exception):  # the server gone: the leases expire anyway
                asyncio.run_coroutine_threadsafe(limits.aclose(), loop).result(timeout=5)


def _stop(dispatcher: Dispatcher, plan: StopPlan, reason: StopReason) -> None:
    dispatcher.stop.arm(plan)  # this run's stop state, even if no chunk of it ran here yet
    dispatcher.stop.request(reason)


def share_budget(total: int, workers: list[str]) -> dict[str, int]:
    """The run's in-flight budget split over ``workers``: shares differ by at most one and
    add up to ``total`` (each worker gets at least one)."""
    base, extra = divmod(total, len(workers))
    return {w: max(1, base + (i < extra)) for i, w in enumerate(workers)}
