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
import os
import threading

# (young, middle, old): a young pass every 10,000 net allocations instead of 700 (fewer objects
# in flight are traversed again and again), a full pass every 100 middle passes instead of 10.
IN_FLIGHT_THRESHOLDS = (10_000, 10, 100)

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


def _thresholds() -> tuple[int, int, int]:
    text = os.environ.get("EXPERIMENT_GC_THRESHOLD")  # TEMP: experiments only
    if text:
        a, b, c = (int(x) for x in text.split(","))
        return a, b, c
    return IN_FLIGHT_THRESHOLDS


def hold() -> None:
    """Use the in-flight thresholds until every ``hold`` has its ``release``."""
    global _holders, _saved  # noqa: PLW0603 - one setting per process, refcounted
    with _lock:
        if _holders == 0:
            _saved = gc.get_threshold()  # type: ignore[assignment]
            gc.set_threshold(*_thresholds())
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
