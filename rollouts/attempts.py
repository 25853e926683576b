"""The one observer of a process's requests: every attempt on the wire reports to it.

The client (rollouts/agent_client.py) tells its ``AttemptObserver`` when each attempt starts
(``begin``, or ``track`` for a replica the router has just picked) and how it ended (``end``:
answered, or failed with its class), and when each rollout ends. What the rest needs is read
from here, never counted again:

- per agent and URL (``Target``): requests in flight, sent, answered, failed by class, the
  latencies of the recent answers and, for a replica, whether the router took it out, whence
  the health file (``snapshot``, published by rollouts/health.py);
- the replica router (rollouts/replicas.py): a replica *is* its URL's ``Target``; it picks the
  one with the fewest in flight, and decides from each attempt's end whether to take it out;
- the adaptive concurrency controller (rollouts/concurrency.py): ``end`` returns the attempt's
  duration, the latency it judges the load by;
- the stopper (rollouts/stopping.py): the p90 time of this process's recent rollouts
  (``rollout_p90_s``), its drain margin before a deadline.

The request path only bumps counters and appends to bounded deques (no I/O, under a
microsecond per attempt); percentiles, windows and the stall threshold are worked out when a
snapshot is taken, every ``PUBLISH_EVERY_S``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from rollouts.health import (
    OLDEST_SHOWN,
    STALLED_SHOWN,
    WINDOW_S,
    HealthFile,
    InFlightAttempt,
    TargetRecord,
    histogram_record,
    latency_bucket,
    percentile,
)
from rollouts.run_state import worker_id

if TYPE_CHECKING:
    from rollouts.replicas import Replica

LATENCY_SAMPLES = 4096  # per agent URL: the window is the last minute or these, the fewer
STALL_P95_FACTOR = 10.0
STALL_MIN_S = 5.0  # a default threshold below this would flag ordinary scheduling hiccups
ROLLOUT_SAMPLES = 1000  # the rollouts' p90 (the stopper's drain margin) is over these, the latest
P90_REFRESH_S = 1.0  # recompute that p90 at most this often (the stopper reads it per dispatch)
CANCELLED = "cancelled"  # an attempt cut by a stop: no failure of the agent
# Failed attempts whose duration says nothing about the agent's answer time: no answer came
# (or none is known to have: an unexpected_error may be raised before anything is sent).
NO_ANSWER = frozenset({"timeout", "connection_error", CANCELLED, "unexpected_error"})

RolloutTag = tuple[str, int, int]  # (agent, task index, rollout index)


class Target:
    """What one process sent one agent URL. The request path only bumps counters and appends a
    latency; what happened in the last minute is read at each snapshot against the counters
    as they were a minute earlier (``marks``)."""

    __slots__ = ("agent", "answered", "failed", "in_flight", "latencies", "marks", "n_failed",
                 "n_latencies", "run_base", "run_folded", "run_hist", "sent",
                 "url")  # fmt: skip
    # What the health file says of a replica of a replicated agent (rollouts/replicas.py: a
    # ``Replica`` sets ``replica`` and holds ``ejected`` and ``ejections`` in its own slots);
    # a plain URL is never one, nor taken out. Read at each snapshot, never on the request path.
    replica: ClassVar[bool] = False
    ejected: bool = False  # taken out by the router now
    ejections: int = 0  # times taken out

    def __init__(self, agent: str, url: str, now: float = 0.0) -> None:
        self.agent, self.url = agent, url  # url: the agent's base URL, as configured
        self.in_flight = self.sent = self.answered = self.n_failed = self.n_latencies = 0
        self.failed: dict[str, int] = {}  # failed attempts by class (cancelled ones too)
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # the latest, oldest first
        # (time, answered, failed, n_latencies) at each snapshot, oldest first
        self.marks: deque[tuple[float, int, int, int]] = deque([(now, 0, 0, 0)])
        # The flow run's figures, kept off the request path: its answers and failed attempts
        # are the counters less ``run_base`` (their values as it started); its latencies are
        # folded into ``run_hist`` (bucket -> count) at each snapshot, up to ``run_folded``.
        self.run_base = (0, 0)
        self.run_hist: dict[int, int] = {}
        self.run_folded = 0

    @property
    def run_url(self) -> str:
        return self.url + "/run"

    def start(self) -> None:
        """An attempt goes out to this URL."""
        self.in_flight += 1
        self.sent += 1

    def finish(self, failure_class: str | None, latency_s: float | None = None) -> None:
        """An attempt ended: answered (``failure_class`` None) or failed, after ``latency_s``
        (None: not timed)."""
        self.in_flight -= 1
        if failure_class is None:
            self.answered += 1
        else:
            failed = self.failed
            failed[failure_class] = failed.get(failure_class, 0) + 1
            if failure_class != CANCELLED:
                self.n_failed += 1
            if failure_class in NO_ANSWER:
                return  # no answer came: its duration is no answer time
        if latency_s is not None:
            self.latencies.append(latency_s)
            self.n_latencies += 1

    def mark_from(self, now: float) -> None:
        """Count the last minute from ``now`` (the observer's clock) on."""
        self.marks = deque([(now, self.answered, self.n_failed, self.n_latencies)])

    def start_run(self) -> None:
        self.run_base, self.run_hist, self.run_folded = (self.answered, self.n_failed), {}, (
            self.n_latencies)  # fmt: skip

    def fold_run_latencies(self) -> None:
        """Add the answers since the last fold to ``run_hist`` (beyond ``LATENCY_SAMPLES``
        between two snapshots, about 2,000 answers/s on one URL, the latest of them)."""
        new = min(self.n_latencies - self.run_folded, len(self.latencies))
        for seconds in itertools.islice(reversed(self.latencies), new):
            b = latency_bucket(seconds)
            self.run_hist[b] = self.run_hist.get(b, 0) + 1
        self.run_folded = self.n_latencies

    def last_minute(self, now: float) -> tuple[int, int, dict[int, int], float]:
        """(answers, failed attempts, latency histogram, seconds they span) since the last mark
        at least ``WINDOW_S`` old (so over the last minute and up to one snapshot period more;
        less while the target is younger than a minute)."""
        marks = self.marks
        marks.append((now, self.answered, self.n_failed, self.n_latencies))
        while len(marks) > 1 and marks[1][0] <= now - WINDOW_S:
            marks.popleft()
        since, answered, failed, n_latencies = marks[0]
        hist: dict[int, int] = {}
        recent = min(self.n_latencies - n_latencies, len(self.latencies))
        for seconds in itertools.islice(reversed(self.latencies), recent):
            b = latency_bucket(seconds)
            hist[b] = hist.get(b, 0) + 1
        return self.answered - answered, self.n_failed - failed, hist, now - since


# One attempt on the wire: (its target, its rollout's tag, attempt number, start time). A plain
# tuple: made and dropped once per request.
_InFlight = tuple[Target, RolloutTag | None, int, float]


class AttemptObserver:
    """One process's (one dispatcher's) record of its attempts. ``begin``/``track``/``end``
    are on the request path: no I/O, under a microsecond. ``stall_after_s`` None: the default
    threshold, ``STALL_P95_FACTOR`` x the URL's recent p95, at least ``STALL_MIN_S``."""

    def __init__(self, stall_after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._targets: dict[tuple[str, str], Target] = {}
        self._in_flight: dict[int, _InFlight] = {}  # insertion order: oldest first
        self._next_id = 0
        self.run_started_at: float | None = None  # the flow run the run_* figures are of
        self._rollouts: deque[float] = deque(maxlen=ROLLOUT_SAMPLES)
        self._p90_s = 0.0
        self._p90_due = 0.0

    def begin(self, tag: RolloutTag | None, url: str, attempt: int) -> int:
        """An attempt of rollout ``tag`` (None: untagged) goes to ``url`` (a ``/run`` URL);
        returns its ticket for ``end``."""
        agent = tag[0] if tag is not None else url.removesuffix("/run")
        target = self._targets.get((agent, url))
        if target is None:
            base = url.removesuffix("/run")  # the agent's address, as configured
            target = self._targets[(agent, url)] = Target(agent, base, self._clock())
        target.in_flight += 1  # Target.start and track, inline: this is per request
        target.sent += 1
        self._next_id += 1
        self._in_flight[self._next_id] = (target, tag, attempt, self._clock())
        return self._next_id

    def track(self, target: Target, tag: RolloutTag | None, attempt: int) -> int:
        """An attempt already counted as sent on ``target`` (a replica ``ReplicaGroup.pick``
        chose) goes out now; returns its ticket for ``end``."""
        self._next_id += 1
        self._in_flight[self._next_id] = (target, tag, attempt, self._clock())
        return self._next_id

    def end(self, ticket: int, failure_class: str | None) -> float:
        """The attempt ``ticket`` ended: answered (None) or failed with ``failure_class``.
        Returns its duration in seconds."""
        target, _, _, started = self._in_flight.pop(ticket)
        latency = self._clock() - started
        target.finish(failure_class, latency)
        return latency

    def adopt(self, replica: Replica) -> None:
        """Count ``replica``'s attempts here and publish its state (once per replica)."""
        key = (replica.agent, replica.run_url)
        if self._targets.get(key) is not replica:
            replica.mark_from(self._clock())
            self._targets[key] = replica

    # Whole rollouts (every attempt, and the backoffs between): the stopper's drain margin.

    def rollout_ended(self, seconds: float) -> None:
        """A rollout's time from its start to its outcome (retries included)."""
        self._rollouts.append(seconds)

    def rollout_p90_s(self) -> float:
        """The p90 time of the latest ``ROLLOUT_SAMPLES`` rollouts; 0 before the first ends."""
        now = self._clock()
        if now >= self._p90_due and self._rollouts:
            ordered = sorted(self._rollouts)
            self._p90_s = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
            self._p90_due = now + P90_REFRESH_S
        return self._p90_s

    # The snapshot: what this process's health file holds (rollouts/health.py).

    def start_run(self, run_started_at: float | None) -> None:
        """The figures of the flow run started at ``run_started_at`` start afresh (if another)."""
        if run_started_at != self.run_started_at:
            self.run_started_at = run_started_at
            for t in self._targets.values():
                t.start_run()

    def snapshot(self, closed: bool = False) -> HealthFile:
        """This process's health document (what ``health.<worker>.json`` holds)."""
        now = self._clock()
        targets: list[TargetRecord] = []
        thresholds: dict[int, float | None] = {}
        for t in self._targets.values():
            answers, failed, hist, window_s = t.last_minute(now)
            t.fold_run_latencies()
            thresholds[id(t)] = self._stall_threshold(percentile(hist, 0.95))
            targets.append({
                "agent": t.agent, "url": t.url, "in_flight": t.in_flight, "sent": t.sent,
                "answered": t.answered, "answers_last_min": answers,
                "failed_last_min": failed, "window_s": round(window_s, 3),
                "failures": dict(t.failed), "latency_hist": histogram_record(hist),
                "run_answered": t.answered - t.run_base[0],
                "run_failed": t.n_failed - t.run_base[1],
                "run_latency_hist": histogram_record(t.run_hist),
                "replica": t.replica, "ejected": t.ejected, "ejections": t.ejections,
            })  # fmt: skip
        oldest: list[InFlightAttempt] = []
        stalled: list[InFlightAttempt] = []
        n_stalled = 0
        least = min((t for t in thresholds.values() if t is not None), default=math.inf)
        for a in self._in_flight.values():  # oldest first
            if a[1] is None:
                continue  # untagged (no rollout to name): counted, not listed
            age = now - a[3]
            if len(oldest) < OLDEST_SHOWN:
                oldest.append(self._describe(a, age))
            threshold = thresholds[id(a[0])]
            if threshold is not None and age > threshold:
                n_stalled += 1
                if len(stalled) < STALLED_SHOWN:
                    stalled.append(self._describe(a, age, threshold))
            elif len(oldest) >= OLDEST_SHOWN and age < least:
                break  # every later attempt is younger still: neither oldest nor stalled
        return {"worker": worker_id(), "updated_at": time.time(), "window_s": WINDOW_S,
                "targets": targets, "oldest": oldest, "stalled": stalled,
                "stalled_total": n_stalled, "run_started_at": self.run_started_at,
                "closed": closed}  # fmt: skip

    def _stall_threshold(self, p95: float | None) -> float | None:
        if self.stall_after_s is not None:
            return self.stall_after_s
        if p95 is None:
            return None  # no answer yet: nothing to compare with
        return max(STALL_MIN_S, STALL_P95_FACTOR * p95)

    @staticmethod
    def _describe(
        a: _InFlight, age: float, stall_after_s: float | None = None
    ) -> InFlightAttempt:
        target, tag, attempt, _ = a
        assert tag is not None
        agent, task_index, rollout_index = tag
        return InFlightAttempt(agent, target.url, task_index, rollout_index, attempt,
                               round(age, 3), worker_id(), stall_after_s)  # fmt: skip
