"""A capacity model for the reference agent: K requests at full speed, more share it.

Processor sharing, as an inference server's batch behaves: each request needs ``work_s``
seconds of service at full speed; with n > K requests in service each progresses at K/n of
full speed, so latency grows in proportion to the load above K and throughput stays at K per
``work_s``. Exact, with one timer: the shared "virtual time" (service each request has had
since it arrived) advances at min(1, K/n), and the request with the least work left finishes
first.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class ProcessorSharing:
    __slots__ = ("_capacity", "_heap", "_in_service", "_seq", "_stamp", "_timer", "_virtual")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._in_service = 0
        self._virtual = 0.0  # service each request in service has had since time zero
        self._stamp = 0.0  # loop time `_virtual` was last advanced to
        # (virtual finish, seq, future): the least work left first; a cancelled one is skipped
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_service(self) -> int:
        return self._in_service

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        self._advance()
        self._capacity = max(1, capacity)
        self._reschedule()

    async def serve(self, work_s: float) -> None:
        """Return once ``work_s`` seconds of full-speed service have been given."""
        loop = asyncio.get_running_loop()
        self._advance()
        done = loop.create_future()
        heapq.heappush(self._heap, (self._virtual + work_s, next(self._seq), done))
        self._in_service += 1
        self._reschedule()
        try:
            await done
        except asyncio.CancelledError:
            if not done.done() or done.cancelled():  # left before its end: it stops sharing
                self._advance()
                self._in_service -= 1
                self._reschedule()
            raise

    def _rate(self) -> float:
        return min(1.0, self._capacity / self._in_service) if self._in_service else 1.0

    def _advance(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._in_service:
            self._virtual += (now - self._stamp) * self._rate()
        self._stamp = now

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)  # cancelled while waiting
        if self._heap:
            left = self._heap[0][0] - self._virtual
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, left / self._rate()), self._finish_due
            )

    def _finish_due(self) -> None:
        self._timer = None
        self._advance()
        while self._heap and self._heap[0][0] <= self._virtual + 1e-9:
            _, _, done = heapq.heappop(self._heap)
            if not done.done():
                done.set_result(None)
                self._in_service -= 1
        self._reschedule()
