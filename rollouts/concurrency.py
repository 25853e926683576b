"""How many requests may be in flight: a fixed number, or one found and followed at run time.

``InFlightLimit`` is the client's places on the wire, a semaphore whose size may change while
requests wait for it. ``AdaptiveConcurrency`` sets that size from what the answers say:

- Latency against load. By Little's law an agent's throughput is in-flight / latency, so
  more in flight helps only while latency stays put. Each window of about one round trip of
  answers gives a median latency; its ratio to the lowest recent median (the agent unloaded)
  estimates how many of our requests wait in the agent's queue instead of being served. The
  limit grows while that queue is small (doubling at first, then by about its square root)
  and is cut to the served part plus a small margin when the queue grows. The result sits
  just above the load at which throughput stops growing, and follows it when the agent's
  capacity changes.
- Overload. A 429, a 503 or a timeout halves the limit at once (once per burst); growth
  then slows to one at a time near the limit that drew them.
- Latency that does not fall when the limit falls (even when halved) is the tasks' own
  (harder prompts, longer answers), not load: it becomes the new baseline and the limit
  returns to where it was.
"""

from __future__ import annotations

import asyncio
import collections
import math
import statistics
import time
from dataclasses import dataclass, field

CONGESTION_CLASSES = frozenset({"rate_limited", "http_503", "timeout"})
"""Failure classes that say the agent has more than it can take."""


class InFlightLimit:
    """At most ``limit`` places taken at once; ``set_limit`` may change it at any time (a
    smaller limit takes effect as places are released)."""

    __slots__ = ("_in_use", "_limit", "_waiters")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        """Acquirers waiting for a place now."""
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self._limit = limit
        self._wake()

    async def acquire(self) -> None:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before use: give the place back
            elif waiter in self._waiters:  # a release may have passed it over already
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use += 1
                waiter.set_result(None)


@dataclass
class AdaptiveConcurrency:
    """The controller: every attempt calls ``sent`` as it goes out and ``observe`` when it
    ends, with its duration as the client's observer timed it (rollouts/attempts.py); the
    controller moves ``places``' limit.

    Each limit opens an epoch. Only attempts sent in the current epoch, while no more than the
    limit were in flight, count: answers to requests sent under an older limit show the old
    load, and would make every change look wrong one round trip later.
    """

    places: InFlightLimit
    ceiling: int
    floor: int = 1
    min_window: int = 16  # answers per window, at least: a median of fewer is noise
    baseline_windows: int = 1000  # the unloaded latency is the lowest median of these
    _limit: float = field(init=False)
    _epoch: int = field(default=0, init=False)
    _slow_start: bool = field(default=True, init=False)
    _window: list[float] = field(default_factory=list, init=False)
    _medians: collections.deque[float] = field(init=False)
    _last_cut: tuple[float, float] | None = field(default=None, init=False)  # (median, ratio)
    _overload_at: float | None = field(default=None, init=False)  # limit of the last 429s
    # (time, limit) of the latest changes, for logs and benchmarks
    history: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=1000), init=False
    )

    def __post_init__(self) -> None:
        self._limit = float(min(self.ceiling, max(self.floor, 8)))
        self._medians = collections.deque(maxlen=self.baseline_windows)
        self._apply()

    @property
    def limit(self) -> int:
        return self.places.limit

    def sent(self) -> int:
        """An attempt goes out now (its place taken); hand the result to ``observe``."""
        return self._epoch if self.places.in_use <= self.places.limit else -1

    def observe(self, sent: int, latency_s: float, failure_class: str | None) -> None:
        """The attempt ``sent`` ended after ``latency_s``: answered (``failure_class`` None)
        or not."""
        if sent != self._epoch:
            return
        if failure_class in CONGESTION_CLASSES:
            self._slow_start = False
            self._overload_at = self._limit
            self._limit = max(self.floor, self._limit / 2)
            self._apply(force_epoch=True)  # later 429s of this burst are the same signal
            return
        if failure_class is None:
            self._window.append(latency_s)
        if len(self._window) >= max(self.min_window, self.places.limit):
            self._end_window()

    def _end_window(self) -> None:
        median = statistics.median(self._window)
        self._window.clear()
        if self._last_cut is not None:
            before, ratio = self._last_cut
            self._last_cut = None
            # Load-driven latency falls with the limit (by `ratio` at most). If it fell by less
            # than a quarter of that, either the agent slowed down (less capacity) or the tasks
            # did: a deep cut tells which.
            if median > before * (1 - 0.25 * (1 - ratio)):
                if ratio > 0.6:
                    self._last_cut = (median, 0.5)
                    self._limit *= 0.5
                    self._apply()
                    return
                self._medians.clear()  # the tasks' own latency: the new baseline
                self._limit /= ratio  # and the cut was for nothing
        self._medians.append(median)
        gradient = min(1.0, min(self._medians) / median) if median > 0 else 1.0
        queue = self._limit * (1 - gradient)  # our requests waiting, not being served
        margin = max(2.0, 0.1 * self._limit)
        if self._slow_start:
            if gradient > 0.8:
                self._limit *= 2
            else:
                self._slow_start = False
                self._cut(gradient, margin, median)
        elif queue < margin:
            self._limit += self._step()
        elif queue > 2 * margin:
            self._cut(gradient, margin, median)
        self._apply()

    def _step(self) -> float:
        """How much to grow: about the square root of the limit, but one at a time near the
        limit that last drew 429s (each step past it costs a rejection)."""
        if self._overload_at is not None:
            if self._limit > 1.2 * self._overload_at:
                self._overload_at = None  # the agent takes more now
            elif self._limit >= 0.85 * self._overload_at:
                return 1.0
        return max(1.0, math.sqrt(self._limit))

    def _cut(self, gradient: float, margin: float, median: float) -> None:
        new = min(self._limit, self._limit * gradient + margin)
        self._last_cut = (median, new / self._limit)
        self._limit = new

    def _apply(self, force_epoch: bool = False) -> None:
        self._limit = min(float(self.ceiling), max(float(self.floor), self._limit))
        limit = round(self._limit)
        if limit != self.places.limit or force_epoch or not self.history:
            self.places.set_limit(limit)
            self.history.append((time.monotonic(), limit))
            self._epoch += 1
            self._window.clear()
