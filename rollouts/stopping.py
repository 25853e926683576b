"""Stopping a run on time: at its deadline, on a signal, on a cancellation.

One mechanism for every cause. A ``Stopper`` belongs to a process's dispatcher and lives on its
event loop. Once asked to stop, no rollout starts; rollouts in flight get a grace period (up to
the deadline itself for a deadline stop), then are cancelled. Every finished result is already
appended and flushed by then (rollouts/collect.py), so a stopped run loses nothing written, and
the next run resends only what was cancelled.

A deadline is absolute wall-clock time fixed when the flow run starts (``StopPlan``), so every
chunk, chunk retry and worker process shares it. No rollout starts unless the time left exceeds
the drain margin: ROLLOUTS_DRAIN_MARGIN_S, or else the observed p90 latency of this process's
completed rollouts (read from its observer, rollouts/attempts.py).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from rollouts.fileio import write_json_atomic

StopReason = Literal["deadline", "SIGINT", "SIGTERM", "cancelled", "lease lost"]

STOP_RECORD = "last_stop.json"

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")


def parse_duration(text: str | float) -> float:
    """Seconds in ``2h``, ``90m``, ``45s``, ``1h30m``, or a plain number of seconds."""
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        if not _DURATION.fullmatch(raw):
            raise ValueError(
                f"{text!r} is not a duration: use e.g. 2h, 90m, 45s, 1h30m or seconds"
            ) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", raw))
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class StopPlan:
    """When this flow run stops on its own, and how long a stop waits for rollouts in flight.

    ``started_at`` identifies the flow run: a long-lived Dask worker serving successive runs of
    one output starts each with a fresh stop state.
    """

    started_at: float  # time.time() at the flow run's start
    deadline_at: float | None = None  # time.time() of the deadline; None: no deadline
    drain_margin_s: float | None = None  # None: the observed p90 latency
    grace_s: float = 10.0  # ROLLOUTS_STOP_GRACE_S

    @classmethod
    def starting_now(
        cls, max_duration_s: float | None, drain_margin_s: float | None, grace_s: float
    ) -> StopPlan:
        now = time.time()
        deadline = now + max_duration_s if max_duration_s is not None else None
        return cls(now, deadline, drain_margin_s, grace_s)

    def leaves_time_for(self, seconds: float) -> bool:
        return self.deadline_at is None or time.time() + seconds < self.deadline_at


class RolloutTimes(Protocol):
    """How long this process's rollouts take (``AttemptObserver``)."""

    def rollout_p90_s(self) -> float: ...


class Stopper:
    """One process's stop state for a run. Call its methods on the dispatcher's event loop
    (from a signal handler or another thread: ``loop.call_soon_threadsafe``).

    ``rollouts``: whose rollouts' p90 time is the drain margin when the plan sets none (the
    dispatcher's observer; set by each chunk, so a stopper made by the flow reads it too)."""

    @classmethod
    def armed(cls, plan: StopPlan) -> Stopper:
        """A stopper for ``plan``, its deadline timer running (call on the event loop)."""
        stopper = cls()
        stopper.arm(plan)
        return stopper

    def __init__(self, rollouts: RolloutTimes | None = None) -> None:
        self.rollouts = rollouts
        self.plan: StopPlan | None = None
        self.reason: StopReason | None = None
        self.requested_at: float | None = None
        self.cancel_at: float | None = None
        self.cancelled_in_flight = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight: list[set[asyncio.Task[None]]] = []

    def arm(self, plan: StopPlan) -> None:
        """Adopt ``plan`` (idempotent); another flow run's plan starts a fresh stop state."""
        if plan == self.plan:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.plan, self.reason, self.requested_at, self.cancel_at = plan, None, None, None
        self.cancelled_in_flight, self._timer = 0, None
        if plan.deadline_at is not None:
            self._cancel_in_flight_at(plan.deadline_at)

    def request(self, reason: StopReason) -> None:
        """Stop dispatching now; cancel what is still in flight after the grace period (never
        later than the deadline). A second request changes nothing."""
        if self.reason is not None:
            return
        self.reason, self.requested_at = reason, time.time()
        plan = self.plan or StopPlan(self.requested_at)
        cancel_at = self.requested_at + plan.grace_s
        if plan.deadline_at is not None:
            cancel_at = min(cancel_at, plan.deadline_at)
        self._cancel_in_flight_at(cancel_at)

    def grace_s(self) -> float:
        return self.plan.grace_s if self.plan is not None else StopPlan(0.0).grace_s

    def may_start(self) -> bool:
        """Whether a rollout may start now: no stop asked, and time left beyond the margin."""
        if self.reason is not None:
            return False
        deadline = self.plan.deadline_at if self.plan is not None else None
        if deadline is None or time.time() + self.drain_margin_s() < deadline:
            return True
        self.request("deadline")
        return False

    def drain_margin_s(self) -> float:
        if self.plan is not None and self.plan.drain_margin_s is not None:
            return self.plan.drain_margin_s
        return self.rollouts.rollout_p90_s() if self.rollouts is not None else 0.0

    def track(self, tasks: set[asyncio.Task[None]]) -> None:
        """``tasks`` (a chunk's rollouts in flight) are cancelled when a grace period ends,
        until ``untrack``."""
        self._in_flight.append(tasks)

    def untrack(self, tasks: set[asyncio.Task[None]]) -> None:
        # By identity: two chunks' sets may be equal (both empty).
        self._in_flight = [s for s in self._in_flight if s is not tasks]

    def _cancel_in_flight_at(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.cancel_at = when
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, when - time.time()), self._cancel_in_flight)

    def _cancel_in_flight(self) -> None:
        if self.reason is None:  # the deadline itself came before any dispatch saw it
            self.reason, self.requested_at = "deadline", time.time()
        for tasks in self._in_flight:
            for t in tasks:
                if not t.done():
                    t.cancel()
                    self.cancelled_in_flight += 1


def write_stop_record(run_dir: Path, stopper: Stopper, missing: int | None) -> None:
    """``last_stop.json`` in the run state: why and when the last stopped run stopped."""
    plan = stopper.plan
    write_json_atomic(
        run_dir / STOP_RECORD,
        {"reason": stopper.reason, "started_at": plan.started_at if plan else None,
         "deadline_at": plan.deadline_at if plan else None, "requested_at": stopper.requested_at,
         "cancel_at": stopper.cancel_at, "collection_ended_at": time.time(),
         "cancelled_in_flight": stopper.cancelled_in_flight, "missing": missing},
    )  # fmt: skip
