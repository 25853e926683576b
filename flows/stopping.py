"""What stops a flow run early, from outside: SIGINT, SIGTERM and a Prefect cancellation.

Each asks the run's ``Stopper`` (rollouts/stopping.py) to stop: no rollout starts, those in
flight get ROLLOUTS_STOP_GRACE_S, and what finished is kept. A second signal ends the process at
once (appends are whole flushed lines: nothing written is lost; a torn tail is cut on resume).

Prefect delivers a cancellation (UI, `prefect flow-run cancel`) in two ways, and both lead here:
a worker's process runner sends SIGTERM to the flow-run process; a run in the CLI's own process
is only marked Cancelling on the server, so this flow watches its own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prefect import State
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.states import Cancelled, Crashed, Failed

from rollouts.errors import STOP_EXIT_CODES, RunStopped
from rollouts.stopping import Stopper, StopPlan, StopReason

CANCEL_POLL_S = 1.0  # how often a run checks whether it was cancelled
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_STATES = (StateType.CANCELLING, StateType.CANCELLED)


# Every stopper of this process whose run is working, with the loop it lives on: a signal
# stops them all. A multi-dataset run's subflows each have one, on threads of their own, where
# no signal handler can be installed; the multi flow installs the handlers (`stop_signals`).
_stoppers: dict[int, tuple[Stopper, asyncio.AbstractEventLoop]] = {}
_signalled: list[StopReason] = []  # the first stop signal this process received


@contextlib.asynccontextmanager
async def stop_controls(stop: Stopper) -> AsyncIterator[None]:
    """While the block runs, SIGINT, SIGTERM and a cancellation of this flow run stop it."""
    key = id(stop)
    _stoppers[key] = (stop, asyncio.get_running_loop())
    if _signalled:  # a signal came before this run started (a dataset of a multi run)
        stop.request(_signalled[0])
    watcher = asyncio.create_task(_watch_cancellation(stop))
    try:
        with stop_signals():
            yield
    finally:
        _stoppers.pop(key, None)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if stop.reason == "cancelled":
            _ignore_late_sigterm()


def _ignore_late_sigterm() -> None:
    """A cancelled deployed run often sees the cancellation itself (its poll) before its
    worker's SIGTERM arrives. Arriving once the run has stopped, Prefect's own handler would
    turn the stopped run into Crashed, and the resume automation would run it again: in a
    deployed run's process, for the rest of its life (writing the final state, exiting),
    SIGTERM is ignored."""
    if _deployed(FlowRunContext.get()) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM stop every run of this process (installed in
    the main thread only, the one place Python delivers signals; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if previous[signal.SIGINT] is not _on_stop_signal:  # the outermost block: the
            _signalled.clear()  # process's next run starts unsignalled


def _on_stop_signal(signum: int, frame: Any) -> None:
    # No lock here: the handler runs between two bytecodes of the main thread, which may hold
    # it. Appending and copying are atomic under the GIL; a run that registers meanwhile sees
    # `_signalled` itself.
    name = signal.Signals(signum).name
    if _signalled:  # the second one: now
        os.write(2, f"\nrollouts: {name} again: stopped at once. Nothing written is lost; "
                    "rerun the same command to continue.\n".encode())  # fmt: skip
        os._exit(STOP_EXIT_CODES[name])
    reason: StopReason = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    _signalled.append(reason)
    stoppers = list(_stoppers.values())
    grace = max((s.grace_s() for s, _ in stoppers), default=StopPlan(0.0).grace_s)
    os.write(2, f"\nrollouts: {name}: stopping. No new rollouts; those in flight get "
                f"{grace:g} s. Press Ctrl-C again to stop at once.\n".encode())  # fmt: skip
    for stop, loop in stoppers:
        loop.call_soon_threadsafe(stop.request, reason)


async def _watch_cancellation(stop: Stopper) -> None:
    """Poll this flow run's state; Cancelling (or Cancelled) stops the run."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    run_id = ctx.flow_run.id
    async with get_client() as client:
        while stop.reason is None:
            await asyncio.sleep(CANCEL_POLL_S)
            with contextlib.suppress(Exception):  # an API hiccup: ask again next time
                run = await client.read_flow_run(run_id)
                if run.state is not None and run.state.type in CANCEL_STATES:
                    stop.request("cancelled")


async def stopped_state(error: RunStopped) -> State[Any]:
    """The flow run's final state after a stop by a signal or a cancellation: Cancelled, with
    the message to rerun. A SIGTERM to a deployed run that nobody cancelled (the
    infrastructure's, e.g. an eviction) ends Crashed instead, so the resume automation
    reschedules it (rollouts_cli/prefect_setup.py). A worker delivers a cancellation as a
    SIGTERM too, often before this run's own poll has seen it: the server's state decides."""
    ctx = FlowRunContext.get()
    if error.reason == "lease lost":  # another run writes the output now: not a cancellation
        return Failed(message=str(error), data=error)
    if error.reason == "SIGTERM" and _deployed(ctx) and not await _is_cancelled(ctx):
        return Crashed(message=str(error), data=error)
    return Cancelled(message=str(error), data=error)


def _deployed(ctx: FlowRunContext | None) -> bool:
    """Whether this flow run is a deployment's (a worker started it and signals it)."""
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None


async def _is_cancelled(ctx: FlowRunContext | None) -> bool:
    """Whether this flow run is Cancelling or Cancelled on the server. Unknown (the API did not
    answer) counts as not: a crash is resumed, and a resumed run that was cancelled finds its
    output complete or its work still to do, never lost."""
    if ctx is None or ctx.flow_run is None:
        return False
    try:
        async with get_client() as client:
            run = await client.read_flow_run(ctx.flow_run.id)
    except Exception:
        return False
    return run.state is not None and run.state.type in CANCEL_STATES
