"""Garbage-collector thresholds while requests are in flight.

Every rollout on the wire keeps a few hundred container objects alive (its task and coroutine
frames, httpx and aiohttp request and connection objects) for the agent's whole latency, so
they survive the young collections and land in the oldest generation. CPython then runs a full
collection each time that generation has grown by a quarter: with thousands in flight that is
a pass over millions of objects every thousand rollouts or so, measured at 0.3-0.7 s each and
most of the collector's CPU at C=4,096 (bench/concurrency.py --loopwatch). Full passes only
matter for cyclic garbage, which a finished rollout rarely leaves (reference counting frees
the rest), so while a dispatcher is open they run far less often.
"""

from __future__ import annotations

import gc
import threading

# (young, middle, old) instead of CPython's (700, 10, 10): a young pass every 10,000 net
# allocations, a middle one every 50 young ones, a full one every 100 middle ones. Measured at
# C=4,096, L=5 s: GC time in the collection 4.3-7.4 s -> 1.2 s, CPU 7.8-8.8 s -> 5.4 s, RSS
# unchanged (259 MB). (10,000, 10, 100) still spent 1.6 s in middle passes.
IN_FLIGHT_THRESHOLDS = (10_000, 50, 100)

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


def hold() -> None:
    """Use the in-flight thresholds until every ``hold`` has its ``release``."""
    global _holders, _saved  # noqa: PLW0603 - one setting per process, refcounted
    with _lock:
        if _holders == 0:
            _saved = gc.get_threshold()  # type: ignore[assignment]
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
