"""Live health of a collection: what is in flight, how fast, how long answers take, what fails.

Each collecting process has one ``HealthRecorder`` (its dispatcher's). The client tells it when
each attempt starts and ends (a few dict and deque operations, no I/O), and a background task
rewrites ``health.<host>_<pid>.json`` in the run directory every ``PUBLISH_EVERY_S``:

- per agent and URL (an agent with replicas has one entry per replica): requests in flight now,
  answers and failed attempts in the last minute, failed attempts by class since the process
  started, and a latency histogram of the recent answers (the last ``WINDOW_S`` and at most
  ``LATENCY_SAMPLES``), so that several processes' percentiles can be merged;
- the oldest attempts in flight, and those in flight longer than the stall threshold
  (``ROLLOUTS_STALL_WARN_S``; default ``STALL_P95_FACTOR`` x the agent's recent p95, at
  least ``STALL_MIN_S``).

The file's size is bounded (histogram buckets, ``OLDEST_SHOWN``, ``STALLED_SHOWN``) however long
the run. ``read_health`` merges the files of the processes collecting now, for ``rollouts
status``, the CLI's ``--watch`` and the Prefect UI. A file also holds the latency histogram of
every answer of the flow run (``run_started_at``, the run's ``StopPlan``): when its last chunk
ends, a process marks its file closed (no longer live), and the flow reads the run's figures
from the closed files (``read_run_latency``) and removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from rollouts.fileio import replace_file_quietly
from rollouts.run_state import worker_id

PUBLISH_EVERY_S = 2.0
WINDOW_S = 60.0
LATENCY_SAMPLES = 4096  # per agent URL: the window is the last minute or these, the fewer
OLDEST_SHOWN = 5
STALLED_SHOWN = 50
STALL_P95_FACTOR = 10.0
STALL_MIN_S = 5.0  # a default threshold below this would flag ordinary scheduling hiccups
FRESH_S = 10.0  # an older file is a process gone (killed): not collecting now
HEALTH_PREFIX = "health."
# Failed attempts whose duration says nothing about the agent's answer time: no answer came
# (or none is known to have: an unexpected_error may be raised before anything is sent).
NO_ANSWER = frozenset({"timeout", "connection_error", "cancelled", "unexpected_error"})
# Latency histogram: buckets 2 % wide (a percentile read from it is within 1 % of the exact one).
_BUCKET_RATIO = math.log(1.02)
_MIN_LATENCY_S = 1e-5

RolloutTag = tuple[str, int, int]  # (agent, task index, rollout index)


def latency_bucket(seconds: float) -> int:
    return math.floor(math.log(max(seconds, _MIN_LATENCY_S)) / _BUCKET_RATIO)


def bucket_value(bucket: int) -> float:
    """The middle of ``bucket``, in seconds."""
    return math.exp((bucket + 0.5) * _BUCKET_RATIO)


def percentile(histogram: dict[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram (bucket -> count); None if empty."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    raise AssertionError("unreachable: rank <= total")


# One attempt on the wire: (its target, its rollout's tag, attempt number, start time). A plain
# tuple: made and dropped once per request.
_InFlight = tuple["_Target", RolloutTag, int, float]


class _Target:
    """What one process sent one agent URL. The request path only bumps counters and appends a
    latency; what happened in the last minute is read at each snapshot against the counters
    as they were a minute earlier (``marks``)."""

    __slots__ = ("agent", "answered", "failed", "failures", "in_flight", "latencies", "marks",
                 "n_latencies", "run_base", "run_folded", "run_hist", "sent",
                 "url")  # fmt: skip

    def __init__(self, agent: str, url: str, now: float) -> None:
        self.agent, self.url = agent, url
        self.in_flight = self.sent = self.answered = self.failed = self.n_latencies = 0
        self.failures: dict[str, int] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)  # the latest, oldest first
        # (time, answered, failed, n_latencies) at each snapshot, oldest first
        self.marks: deque[tuple[float, int, int, int]] = deque([(now, 0, 0, 0)])
        # The flow run's figures, kept off the request path: its answers and failed attempts
        # are the counters less ``run_base`` (their values as it started); its latencies are
        # folded into ``run_hist`` (bucket -> count) at each snapshot, up to ``run_folded``.
        self.run_base = (0, 0)
        self.run_hist: dict[int, int] = {}
        self.run_folded = 0

    def start_run(self) -> None:
        self.run_base, self.run_hist, self.run_folded = (self.answered, self.failed), {}, (
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
        marks.append((now, self.answered, self.failed, self.n_latencies))
        while len(marks) > 1 and marks[1][0] <= now - WINDOW_S:
            marks.popleft()
        since, answered, failed, n_latencies = marks[0]
        hist: dict[int, int] = {}
        recent = min(self.n_latencies - n_latencies, len(self.latencies))
        for seconds in itertools.islice(reversed(self.latencies), recent):
            b = latency_bucket(seconds)
            hist[b] = hist.get(b, 0) + 1
        return self.answered - answered, self.failed - failed, hist, now - since


class HealthRecorder:
    """One process's live view of its attempts. ``begin``/``end`` are on the request path:
    no I/O, a few microseconds. ``stall_after_s`` None: the default threshold (see module)."""

    def __init__(self, stall_after_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._targets: dict[tuple[str, str], _Target] = {}
        self._in_flight: dict[int, _InFlight] = {}  # insertion order: oldest first
        self._next_id = 0
        self._path = Path()
        self._chunks = 0  # chunks collecting now, in this process
        self._writer: asyncio.Task[None] | None = None
        self._run_started_at: float | None = None  # the flow run the run_* figures are of

    def begin(self, tag: RolloutTag, url: str, attempt: int) -> int:
        """An attempt of rollout ``tag`` is sent to ``url``; returns its ticket for ``end``."""
        now = self._clock()
        target = self._targets.get((tag[0], url))
        if target is None:
            base = url.removesuffix("/run")  # the agent's address, as configured
            target = self._targets[(tag[0], url)] = _Target(tag[0], base, now)
        target.in_flight += 1
        target.sent += 1
        self._next_id += 1
        self._in_flight[self._next_id] = (target, tag, attempt, now)
        return self._next_id

    def end(self, ticket: int, failure_class: str | None) -> None:
        """The attempt ``ticket`` ended: answered (None) or failed with ``failure_class``."""
        t, _, _, started = self._in_flight.pop(ticket)
        t.in_flight -= 1
        if failure_class is None:
            t.answered += 1
        else:
            t.failures[failure_class] = t.failures.get(failure_class, 0) + 1
            if failure_class != "cancelled":
                t.failed += 1
            if failure_class in NO_ANSWER:
                return  # no answer came: its duration is no answer time
        t.latencies.append(self._clock() - started)
        t.n_latencies += 1

    def snapshot(self) -> dict[str, Any]:
        """This process's health document (what ``health.<worker>.json`` holds)."""
        now = self._clock()
        targets, thresholds = [], {}
        for t in self._targets.values():
            answers, failed, hist, window_s = t.last_minute(now)
            t.fold_run_latencies()
            p95 = percentile(hist, 0.95)
            thresholds[id(t)] = self._stall_threshold(p95)
            targets.append({
                "agent": t.agent, "url": t.url, "in_flight": t.in_flight, "sent": t.sent,
                "answered": t.answered, "answers_last_min": answers,
                "failed_last_min": failed, "window_s": round(window_s, 3),
                "failures": dict(t.failures),
                "latency_hist": {str(b): n for b, n in sorted(hist.items())},
                "run_answered": t.answered - t.run_base[0],
                "run_failed": t.failed - t.run_base[1],
                "run_latency_hist": {str(b): n for b, n in sorted(t.run_hist.items())},
            })  # fmt: skip
        oldest, stalled, n_stalled = [], [], 0
        least = min((t for t in thresholds.values() if t is not None), default=math.inf)
        for a in self._in_flight.values():  # oldest first
            age = now - a[3]
            if len(oldest) < OLDEST_SHOWN:
                oldest.append(self._describe(a, age))
            threshold = thresholds[id(a[0])]
            if threshold is not None and age > threshold:
                n_stalled += 1
                if len(stalled) < STALLED_SHOWN:
                    stalled.append(self._describe(a, age) | {"stall_after_s": threshold})
            elif len(oldest) >= OLDEST_SHOWN and age < least:
                break  # every later attempt is younger still: neither oldest nor stalled
        return {"worker": worker_id(), "updated_at": time.time(), "window_s": WINDOW_S,
                "targets": targets, "oldest": oldest, "stalled": stalled,
                "stalled_total": n_stalled, "run_started_at": self._run_started_at,
                "closed": False}  # fmt: skip

    def _stall_threshold(self, p95: float | None) -> float | None:
        if self.stall_after_s is not None:
            return self.stall_after_s
        if p95 is None:
            return None  # no answer yet: nothing to compare with
        return max(STALL_MIN_S, STALL_P95_FACTOR * p95)

    @staticmethod
    def _describe(a: _InFlight, age: float) -> dict[str, Any]:
        target, (agent, task_index, rollout_index), attempt, _ = a
        return {"agent": agent, "url": target.url, "task_index": task_index,
                "rollout_index": rollout_index, "attempt": attempt, "age_s": round(age, 3),
                "worker": worker_id()}  # fmt: skip

    # Publishing: one background task on the dispatcher's event loop, while chunks collect.

    @contextlib.asynccontextmanager
    async def publishing(
        self, run_dir: Path, run_started_at: float | None = None
    ) -> AsyncIterator[None]:
        """Publish this process's health file in ``run_dir`` while any chunk is inside this
        block (every chunk enters it); the last one out stops it and marks the file closed, so
        a process that collects nothing now (a long-lived Dask worker) shows nothing in flight,
        while the flow run's figures stay for its summary. ``run_started_at`` names the flow
        run: another one starts the run_* figures afresh."""
        if self._chunks == 0:
            if run_started_at != self._run_started_at:
                self._run_started_at = run_started_at
                for t in self._targets.values():
                    t.start_run()
            self._path = Path(run_dir) / f"{HEALTH_PREFIX}{worker_id().replace(':', '_')}.json"
            self._writer = asyncio.create_task(self._publish_forever(self._path))
        self._chunks += 1
        try:
            yield
        finally:
            self._chunks -= 1
            if self._chunks == 0 and self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
                self._writer = None
                final = orjson.dumps(self.snapshot() | {"closed": True})
                await asyncio.to_thread(replace_file_quietly, self._path, final)

    async def _publish_forever(self, path: Path) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            doc = self.snapshot()
            await asyncio.to_thread(replace_file_quietly, path, orjson.dumps(doc))


# Reading: every live process's file, merged (rollouts status, --watch, the Prefect UI).


@dataclass
class TargetHealth:
    """One agent (``url`` None: all its URLs) or one replica, over the processes collecting."""

    agent: str
    url: str | None
    in_flight: int = 0
    sent: int = 0
    answered: int = 0
    answers_last_min: int = 0
    failed_last_min: int = 0
    answers_per_s: float = 0.0  # over the last minute (less for a younger run)
    failed_per_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)  # failed attempts by class
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    latency_samples: int = 0


@dataclass
class InFlightAttempt:
    agent: str
    url: str
    task_index: int
    rollout_index: int
    attempt: int
    age_s: float
    worker: str
    stall_after_s: float | None = None


@dataclass
class RunHealth:
    """The live health of a run over the processes collecting into it now."""

    processes: int
    updated_s_ago: float
    agents: list[TargetHealth]  # one per agent, all its URLs together
    replicas: list[TargetHealth]  # one per URL of agents with several URLs
    oldest: list[InFlightAttempt]
    stalled: list[InFlightAttempt]
    stalled_total: int

    @property
    def in_flight(self) -> int:
        return sum(a.in_flight for a in self.agents)

    def headline(self) -> str:
        """The figures in a line: `64 in flight, p50 199 ms, p95 457 ms, p99 604 ms, 2 stalled`
        (the latencies of the last minute's answers). No rate: where it is shown, the run's
        own rate of rollouts is beside it, in one unit."""
        if len(self.agents) == 1:
            a = self.agents[0]
            p50, p95, p99 = a.p50_s, a.p95_s, a.p99_s
            latency = f"p50 {seconds_text(p50)}, p95 {seconds_text(p95)}, p99 {seconds_text(p99)}"
        else:  # agents differ too much for one percentile to mean much: the worst p95
            worst = max((a.p95_s for a in self.agents if a.p95_s is not None), default=None)
            latency = f"worst agent p95 {seconds_text(worst)}"
        stalled = f", {self.stalled_total} stalled" if self.stalled_total else ""
        return f"{self.in_flight} in flight, {latency}{stalled}"

    @property
    def answers_last_min(self) -> int:
        return sum(a.answers_last_min for a in self.agents)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"in_flight": self.in_flight,
                               "answers_last_min": self.answers_last_min}  # fmt: skip


def read_health(run_dir: Path, now: float | None = None) -> RunHealth | None:
    """The merged health files of the processes publishing into ``run_dir`` now; None if none."""
    now = time.time() if now is None else now
    docs = []
    for path in sorted(Path(run_dir).glob(f"{HEALTH_PREFIX}*.json")):
        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # removed or replaced while read: the next read has it
        if not doc.get("closed") and now - float(doc.get("updated_at", 0)) <= FRESH_S:
            docs.append(doc)
    if not docs:
        return None
    return merge_health(docs, now)


def merge_health(docs: list[dict[str, Any]], now: float) -> RunHealth:
    by_url: dict[tuple[str, str], tuple[TargetHealth, dict[int, int]]] = {}
    for doc in docs:
        for t in doc["targets"]:
            entry = by_url.setdefault(
                (t["agent"], t["url"]), (TargetHealth(t["agent"], t["url"]), {})
            )
            _add(entry[0], entry[1], t)
    per_agent: dict[str, tuple[TargetHealth, dict[int, int]]] = {}
    for (agent, _), (th, hist) in by_url.items():
        entry = per_agent.setdefault(agent, (TargetHealth(agent, None), {}))
        _add(entry[0], entry[1], asdict(th) | {"latency_hist": hist})
    urls_of = {
        agent: [th for (a, _), (th, _) in by_url.items() if a == agent] for agent in per_agent
    }
    for th, hist in [*by_url.values(), *per_agent.values()]:
        th.p50_s, th.p95_s, th.p99_s = (_rounded(percentile(hist, q)) for q in (0.5, 0.95, 0.99))
        th.latency_samples = sum(hist.values())
    oldest = sorted(_attempts(d["oldest"] for d in docs), key=lambda a: -a.age_s)
    stalled = sorted(_attempts(d["stalled"] for d in docs), key=lambda a: -a.age_s)
    return RunHealth(
        processes=len(docs),
        updated_s_ago=round(now - max(float(d["updated_at"]) for d in docs), 1),
        agents=[th for th, _ in per_agent.values()],
        replicas=[th for urls in urls_of.values() if len(urls) > 1 for th in urls],
        oldest=oldest[:OLDEST_SHOWN], stalled=stalled[:STALLED_SHOWN],
        stalled_total=sum(int(d["stalled_total"]) for d in docs),
    )  # fmt: skip


def _add(th: TargetHealth, hist: dict[int, int], t: dict[str, Any]) -> None:
    for name in ("in_flight", "sent", "answered", "answers_last_min", "failed_last_min"):
        setattr(th, name, getattr(th, name) + int(t[name]))
    # A rate per process over its own window, then summed: at the start of a run the window
    # is shorter than a minute, and the last minute's count alone would read low.
    if "answers_per_s" in t:  # a merged entry (an agent's URLs): its rates are made
        answers, failed = float(t["answers_per_s"]), float(t["failed_per_s"])
    else:
        window = max(float(t.get("window_s", WINDOW_S)), PUBLISH_EVERY_S)
        answers, failed = int(t["answers_last_min"]) / window, int(t["failed_last_min"]) / window
    th.answers_per_s = round(th.answers_per_s + answers, 3)
    th.failed_per_s = round(th.failed_per_s + failed, 3)
    for cls, n in t["failures"].items():
        th.failures[cls] = th.failures.get(cls, 0) + n
    for b, n in t["latency_hist"].items():
        hist[int(b)] = hist.get(int(b), 0) + n


@dataclass
class RunLatency:
    """A flow run's answers over all its processes: how many, and how long they took."""

    answered: int
    failed_attempts: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


def read_run_latency(run_dir: Path, run_started_at: float) -> RunLatency | None:
    """The figures of the flow run started at ``run_started_at`` from every process's file
    (closed or not); None if no process sent anything in it. Closed files are removed."""
    hist: dict[int, int] = {}
    answered = failed = 0
    found = False
    for path in sorted(Path(run_dir).glob(f"{HEALTH_PREFIX}*.json")):
        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if doc.get("run_started_at") == run_started_at:
            found = True
            for t in doc["targets"]:
                answered += int(t["run_answered"])
                failed += int(t["run_failed"])
                for b, n in t["run_latency_hist"].items():
                    hist[int(b)] = hist.get(int(b), 0) + n
        if doc.get("closed"):
            with contextlib.suppress(OSError):
                path.unlink()
    if not found:
        return None
    p50, p95, p99 = (_rounded(percentile(hist, q)) for q in (0.5, 0.95, 0.99))
    return RunLatency(answered, failed, p50, p95, p99)


def rate_number(per_s: float | None) -> str:
    """A rate per second, to its useful digits: 0, 0.42, 21.9, 1,457."""
    if not per_s:
        return "0"
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2f}"


def rate_text(per_s: float | None) -> str:
    """A rate in one unit, per second: 21.9/s; `-` when unknown."""
    return "-" if per_s is None else f"{rate_number(per_s)}/s"


def _attempts(groups: Iterable[list[dict[str, Any]]]) -> list[InFlightAttempt]:
    return [InFlightAttempt(**a) for group in groups for a in group]


def seconds_text(value: float | None) -> str:
    """A latency or an age, short: 85 ms, 3.4 s, 2m05s."""
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.0f} ms"
    if value < 60.0:
        return f"{value:.1f} s"
    return clock_text(value)


def clock_text(seconds: float | None) -> str:
    """A duration in whole seconds: 0m05s, 12m30s, 2h05m00s (an ETA, an age past a minute)."""
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def describe_attempt(a: InFlightAttempt) -> str:
    """`task 3 rollout 0: 6.0 s on my_agent http://a:8000 (attempt 1, host:123)`."""
    where = a.agent if a.agent == a.url else f"{a.agent} {a.url}"
    return (f"task {a.task_index} rollout {a.rollout_index}: {seconds_text(a.age_s)} on {where} "
            f"(attempt {a.attempt}, {a.worker})")  # fmt: skip


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
