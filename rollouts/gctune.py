"""Garbage-collector thresholds while requests are in flight.

Every rollout on the wire keeps about a hundred container objects alive (its task and coroutine
frames, httpx and aiohttp request and connection objects) for the agent's whole latency, so
they survive the young collections and land in the older generations, which CPython traverses
again and again: with thousands in flight, a pass over millions of objects every thousand
rollouts or so, measured at 0.3-0.7 s each and most of the collector's CPU at C=4,096
(bench/concurrency.py --loopwatch). Those passes only matter for cyclic garbage, and reference
counting frees a finished rollout, so while a dispatcher is open they run far less often.
"""

from __future__ import annotations

import gc
import threading

# (young, middle, old) instead of CPython's (700, 10, 10): a young pass every 10,000 net
# allocations, a middle one every 200 young ones, a full one every 100 middle ones. Middle and
# full passes traverse every rollout in flight (about 100 objects each), so their cost grows
# with C: at C=16,384 a middle pass took 0.5-1.9 s. A finished rollout leaves no cycle
# (agent_client unbinds httpx's), so what waits longer for a pass is only the garbage of
# failed attempts (exception tracebacks): at most about 2 million objects.
IN_FLIGHT_THRESHOLDS = (10_000, 200, 100)

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


def hold() -> None:
    """Use the in-flight thresholds until every ``hold`` has its ``release``."""
    global _holders, _saved  # noqa: PLW0603 - one setting per process, refcounted
    with _lock:
        if _holders == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(*IN_FLIGHT_THRESHOLDS)
        _holders += 1


def release() -> None:
    global _holders, _saved  # noqa: PLW0603
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None


def freeze_heap() -> None:
    """Move every object alive now out of the collector's reach, once a process is about to
    collect: Prefect, pandas and Dask leave a large, long-lived heap, and full collections
    over it stall the event loop while requests wait."""
    gc.freeze()
