"""The health of a collection, published: one document per process, one schema, one reader.

Each collecting process has one ``AttemptObserver`` (rollouts/attempts.py: what is in flight,
how fast, how long answers take, what fails, per agent URL). While its chunks collect, its
``Publication`` rewrites the process's one file in the run directory every ``PUBLISH_EVERY_S``
from one snapshot, ``health.<host>_<pid>.json`` (``HealthFile``): per agent and URL (an agent
with replicas has one entry per replica, with whether the router took it out and how often)
requests in flight now, sent, answered, failed attempts by class since the process started,
answers and failed attempts in the last minute, and a latency histogram of the recent answers
(the last ``WINDOW_S``), so that several processes' percentiles can be merged; the oldest
attempts in flight and those in flight longer than the stall threshold. It also holds the
histogram of every answer of the flow run (``run_started_at``). When its last chunk ends, a
process marks its file closed (no longer live): the flow reads the run's figures from the
files (``read_run_latency``), and the file stays, the run's lasting record, so that ``status``
sums the replicas' counts of every process that ever collected into the run, earlier
interrupted invocations too.

The files are read here alone (``read_published``, for ``rollouts status``, the CLI's
``--watch`` and the Prefect UI), with one freshness rule (``is_fresh``): a document older than
``FRESH_S`` is a process gone (killed), not collecting now. Their sizes are bounded (histogram
buckets, ``OLDEST_SHOWN``, ``STALLED_SHOWN``) however long the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pydantic
from typing_extensions import TypedDict  # pydantic reads it on Python 3.11

from rollouts.fileio import replace_file_quietly
from rollouts.run_state import worker_id

if TYPE_CHECKING:
    from rollouts.attempts import AttemptObserver

PUBLISH_EVERY_S = 2.0
WINDOW_S = 60.0
OLDEST_SHOWN = 5
STALLED_SHOWN = 50
FRESH_S = 10.0  # an older document is a process gone (killed): not collecting now
HEALTH_PREFIX = "health."
# Latency histogram: buckets 2 % wide (a percentile read from it is within 1 % of the exact one).
_BUCKET_RATIO = math.log(1.02)
_MIN_LATENCY_S = 1e-5


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


def histogram_record(histogram: dict[int, int]) -> dict[str, int]:
    """A histogram as a document holds it: bucket (a JSON key, so text) -> count, in order."""
    return {str(b): n for b, n in sorted(histogram.items())}


# The schema of the file, shared by the writer (rollouts/attempts.py) and the reader below.


class TargetRecord(TypedDict):
    """One agent URL in one process's health file."""

    agent: str
    url: str
    in_flight: int
    sent: int
    answered: int
    answers_last_min: int
    failed_last_min: int
    window_s: float  # what "last minute" spans (less while the process is younger)
    failures: dict[str, int]  # failed attempts by class since the process started
    latency_hist: dict[str, int]  # the last minute's answers
    run_answered: int  # the flow run's (run_started_at), in this process
    run_failed: int
    run_latency_hist: dict[str, int]
    replica: bool  # one of a replicated agent's URLs, routed by this process
    ejected: bool  # a replica taken out by the router now
    ejections: int  # times the router took it out


@dataclass
class InFlightAttempt:
    """One attempt in flight (the oldest, or a stalled one): in the health file and in
    ``RunHealth``."""

    agent: str
    url: str
    task_index: int
    rollout_index: int
    attempt: int
    age_s: float
    worker: str
    stall_after_s: float | None = None  # stalled ones: the threshold they passed


class HealthFile(TypedDict):
    """``health.<worker>.json``."""

    worker: str
    updated_at: float  # time.time()
    window_s: float
    targets: list[TargetRecord]
    oldest: list[InFlightAttempt]
    stalled: list[InFlightAttempt]
    stalled_total: int
    run_started_at: float | None
    closed: bool  # the process's last chunk ended: not live, kept as the run's record


# Built on first read (a few ms), not when a command that reads nothing imports this.
@functools.cache
def _health_schema() -> pydantic.TypeAdapter[HealthFile]:
    return pydantic.TypeAdapter(HealthFile)


def is_fresh(updated_at: float, now: float) -> bool:
    """The one freshness rule: a document rewritten within ``FRESH_S`` is of a process
    collecting now."""
    return now - updated_at <= FRESH_S


def file_name() -> str:
    """This process's health file."""
    return f"{HEALTH_PREFIX}{worker_id().replace(':', '_')}.json"


# Writing: one background task on the dispatcher's event loop, while chunks collect.


class Publication:
    """Publishes one observer's file in the run directory while any chunk is inside
    ``collecting`` (every chunk enters it); the last one out stops it and marks the health
    file closed, so a process that collects nothing now (a long-lived Dask worker) shows
    nothing in flight, while the flow run's figures stay for its summary."""

    def __init__(self, observer: AttemptObserver) -> None:
        self.observer = observer
        self._run_dir = Path()
        self._chunks = 0  # chunks collecting now, in this process
        self._writer: asyncio.Task[None] | None = None

    @property
    def collecting_now(self) -> bool:
        """Whether a chunk of this process is collecting (read from any thread)."""
        return self._chunks > 0

    @contextlib.asynccontextmanager
    async def collecting(
        self, run_dir: Path, run_started_at: float | None = None
    ) -> AsyncIterator[None]:
        """Publish into ``run_dir`` while this block runs. ``run_started_at`` names the flow
        run: another one starts the run_* figures afresh."""
        if self._chunks == 0:
            self.observer.start_run(run_started_at)
            self._run_dir = Path(run_dir)
            self._writer = asyncio.create_task(self._publish_forever())
        self._chunks += 1
        try:
            yield
        finally:
            self._chunks -= 1
            if self._chunks == 0 and self._writer is not None:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
                self._writer = None
                await self.write(closed=True)

    async def write(self, closed: bool = False) -> None:
        """Write this process's file now, from a snapshot."""
        data = orjson.dumps(self.observer.snapshot(closed=closed))
        await asyncio.to_thread(replace_file_quietly, self._run_dir / file_name(), data)

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            await self.write()


# Reading: every process's file, merged (rollouts status, --watch, the Prefect UI).


def _documents(run_dir: Path) -> Iterator[HealthFile]:
    """Every health file in ``run_dir`` (in name order), closed ones too; one being replaced or
    not of the schema is skipped (the next read has it)."""
    schema = _health_schema()
    for path in sorted(Path(run_dir).glob(f"{HEALTH_PREFIX}*.json")):
        try:
            yield schema.validate_json(path.read_bytes())
        except (OSError, pydantic.ValidationError):
            continue


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

    def add(self, other: TargetHealth) -> None:
        """Count ``other`` (one of this agent's URLs) in."""
        self._add_counts(other.in_flight, other.sent, other.answered, other.answers_last_min,
                         other.failed_last_min, other.failures)  # fmt: skip
        self.answers_per_s = round(self.answers_per_s + other.answers_per_s, 3)
        self.failed_per_s = round(self.failed_per_s + other.failed_per_s, 3)

    def add_record(self, t: TargetRecord) -> None:
        """Count one process's record of this URL in."""
        self._add_counts(t["in_flight"], t["sent"], t["answered"], t["answers_last_min"],
                         t["failed_last_min"], t["failures"])  # fmt: skip
        # A rate per process over its own window, then summed: at the start of a run the window
        # is shorter than a minute, and the last minute's count alone would read low.
        window = max(t["window_s"], PUBLISH_EVERY_S)
        self.answers_per_s = round(self.answers_per_s + t["answers_last_min"] / window, 3)
        self.failed_per_s = round(self.failed_per_s + t["failed_last_min"] / window, 3)

    def _add_counts(self, in_flight: int, sent: int, answered: int, answers_last_min: int,
                    failed_last_min: int, failures: dict[str, int]) -> None:  # fmt: skip
        self.in_flight += in_flight
        self.sent += sent
        self.answered += answered
        self.answers_last_min += answers_last_min
        self.failed_last_min += failed_last_min
        for cls, n in failures.items():
            self.failures[cls] = self.failures.get(cls, 0) + n

    def set_latency(self, hist: dict[int, int]) -> None:
        p50, p95, p99 = (_rounded(percentile(hist, q)) for q in (0.5, 0.95, 0.99))
        self.p50_s, self.p95_s, self.p99_s = p50, p95, p99
        self.latency_samples = sum(hist.values())


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


@dataclass
class ReplicaStatus:
    """One replica over every process of a run (``rollouts status``, the UI)."""

    agent: str
    url: str
    sent: int = 0
    answered: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # in processes collecting now
    ejected: bool = False  # out in a process collecting now
    ejections: int = 0

    @property
    def state(self) -> str:
        """`live`, `out (1x)`, `live (out 2x)`: whether it takes requests now, and how often
        the router took it out."""
        if self.ejected:
            return f"out ({self.ejections}x)"
        return "live" + (f" (out {self.ejections}x)" if self.ejections else "")


@dataclass
class Published:
    """What a run's processes published: the live health (None: no process collects now) and
    the counts of every replica of a replicated agent."""

    health: RunHealth | None
    replicas: list[ReplicaStatus]


def read_published(run_dir: Path, running: bool, now: float | None = None) -> Published:
    """Every process's documents in ``run_dir``, merged. ``running``: whether the run collects
    now (else nothing is live: no health, no replica in flight or out)."""
    now = time.time() if now is None else now
    health = read_health(run_dir, now) if running else None
    return Published(health, read_replica_stats(run_dir, running, now))


def read_health(run_dir: Path, now: float | None = None) -> RunHealth | None:
    """The merged health files of the processes publishing into ``run_dir`` now; None if none."""
    now = time.time() if now is None else now
    docs = [doc for doc in _documents(run_dir)
            if not doc["closed"] and is_fresh(doc["updated_at"], now)]  # fmt: skip
    if not docs:
        return None
    return merge_health(docs, now)


def merge_health(docs: list[HealthFile], now: float) -> RunHealth:
    by_url: dict[tuple[str, str], tuple[TargetHealth, dict[int, int]]] = {}
    for doc in docs:
        for t in doc["targets"]:
            th, hist = by_url.setdefault((t["agent"], t["url"]),
                                         (TargetHealth(t["agent"], t["url"]), {}))  # fmt: skip
            th.add_record(t)
            _add_histogram(hist, t["latency_hist"])
    per_agent: dict[str, tuple[TargetHealth, dict[int, int]]] = {}
    urls_of: dict[str, list[TargetHealth]] = {}
    for (agent, _), (th, hist) in by_url.items():
        agent_th, agent_hist = per_agent.setdefault(agent, (TargetHealth(agent, None), {}))
        agent_th.add(th)
        for b, n in hist.items():
            agent_hist[b] = agent_hist.get(b, 0) + n
        urls_of.setdefault(agent, []).append(th)
    for th, hist in [*by_url.values(), *per_agent.values()]:
        th.set_latency(hist)
    oldest = sorted(_attempts(d["oldest"] for d in docs), key=lambda a: -a.age_s)
    stalled = sorted(_attempts(d["stalled"] for d in docs), key=lambda a: -a.age_s)
    return RunHealth(
        processes=len(docs),
        updated_s_ago=round(now - max(d["updated_at"] for d in docs), 1),
        agents=[th for th, _ in per_agent.values()],
        replicas=[th for urls in urls_of.values() if len(urls) > 1 for th in urls],
        oldest=oldest[:OLDEST_SHOWN], stalled=stalled[:STALLED_SHOWN],
        stalled_total=sum(d["stalled_total"] for d in docs),
    )  # fmt: skip


def _add_histogram(hist: dict[int, int], record: dict[str, int]) -> None:
    for b, n in record.items():
        hist[int(b)] = hist.get(int(b), 0) + n


def read_replica_stats(
    run_dir: Path, running: bool, now: float | None = None
) -> list[ReplicaStatus]:
    """Every process's replica counts of a run (the targets of its health files that are
    replicas), summed per replica (in the configured order).

    ``running``: whether the run is collecting now. Counts cover every process that ever
    collected into the run dir (closed files too, earlier interrupted invocations too); in
    flight and out only those of processes collecting now (as ``read_health``: fresh and not
    closed), while the run is going.
    """
    now = time.time() if now is None else now
    merged: dict[tuple[str, str], ReplicaStatus] = {}
    for doc in _documents(run_dir):
        fresh = running and not doc["closed"] and is_fresh(doc["updated_at"], now)
        for t in doc["targets"]:
            if not t["replica"]:
                continue
            s = merged.setdefault((t["agent"], t["url"]), ReplicaStatus(t["agent"], t["url"]))
            s.sent += t["sent"]
            s.answered += t["answered"]
            s.ejections += t["ejections"]
            for cls, n in t["failures"].items():
                s.failed[cls] = s.failed.get(cls, 0) + n
            if fresh:
                s.in_flight += t["in_flight"]
                s.ejected = s.ejected or t["ejected"]
    return list(merged.values())


@dataclass
class RunLatency:
    """A flow run's answers over all its processes: how many, and how long they took."""

    answered: int
    failed_attempts: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None


def read_run_latency(run_dir: Path, run_started_at: float) -> RunLatency | None:
    """The figures of the flow run started at ``run_started_at`` from every process's health
    file of it (closed or not; those of other runs are not counted); None if no process sent
    anything in it. The files stay: the run's record (``read_replica_stats``)."""
    hist: dict[int, int] = {}
    answered = failed = 0
    found = False
    for doc in _documents(run_dir):
        if doc["run_started_at"] == run_started_at:
            found = True
            for t in doc["targets"]:
                answered += t["run_answered"]
                failed += t["run_failed"]
                _add_histogram(hist, t["run_latency_hist"])
    if not found:
        return None
    p50, p95, p99 = (_rounded(percentile(hist, q)) for q in (0.5, 0.95, 0.99))
    return RunLatency(answered, failed, p50, p95, p99)


def _attempts(groups: Iterable[list[InFlightAttempt]]) -> list[InFlightAttempt]:
    return [a for group in groups for a in group]


def rate_number(per_s: float | None) -> str:
    """A rate per second, to its useful digits: 0, 0.42, 21.9, 1,457."""
    if not per_s:
        return "0"
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}" if per_s >= 1 else f"{per_s:.2f}"


def rate_text(per_s: float | None) -> str:
    """A rate in one unit, per second: 21.9/s; `-` when unknown."""
    return "-" if per_s is None else f"{rate_number(per_s)}/s"


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
