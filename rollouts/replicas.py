"""Replicas: several URLs serving one agent name (``ROLLOUTS_AGENTS='{"a": [url, url]}'``).

The choice is made per attempt, when it is sent (a retry may go elsewhere), by the client
(``AgentClient(replicas=...)``), never in the ``DispatchPlan``: the plan is a Prefect task input,
and a chunk's cache key must not depend on where its requests went. The plan resolves a
replicated name to its first replica's URL; the router recognizes that URL and spreads attempts:

- to the live replica with the fewest requests in flight, ties broken round-robin;
- a replica whose attempts end in a connection error or a timeout ``eject_after`` times in a row
  is taken out; a TCP connection probe (1 s, then doubling up to ``probe_max_s``) puts it back
  as soon as it accepts connections. Its requests still in flight end as they end; a failed one
  is retried as ever, on a live replica;
- the last live replica of an agent is never taken out: with every replica failing, requests
  fail and are retried exactly as with a single URL (no waiting on an empty set, no spinning).

Each collecting process counts, per replica, requests sent, answered, failed (by class), in
flight, and whether it is out, and rewrites ``replicas.<host>_<pid>.json`` in the run directory
every ``STATS_EVERY_S`` and at each chunk's end (no file I/O per request). ``read_replica_stats``
sums those files for ``rollouts status`` and the Prefect UI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from rollouts.fileio import replace_file_quietly
from rollouts.run_state import worker_id
from rollouts.settings import RolloutsSettings

EJECTING_CLASSES = frozenset({"connection_error", "timeout"})
CANCELLED = "cancelled"  # an attempt cut by a stop: says nothing about the replica
PROBE_FIRST_S = 1.0
STATS_EVERY_S = 2.0
STATS_FRESH_S = 10.0  # a stats file older than this is a process gone: nothing in flight there
STATS_PREFIX = "replicas."

# A connection probe: None if ``url`` accepts a TCP connection, else why not.
Probe = Callable[[str], Awaitable[str | None]]


@dataclass(eq=False)
class Replica:
    """One URL of a replicated agent, and what this process sent it."""

    agent: str
    url: str  # base URL, no final /
    in_flight: int = 0
    sent: int = 0
    answered: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    ejected: bool = False
    ejections: int = 0
    errors_in_a_row: int = 0  # connection errors and timeouts since its last answer
    probe_level: int = 0  # doublings of the probe delay; an answer resets it

    @property
    def run_url(self) -> str:
        return self.url + "/run"

    def stats(self) -> dict[str, Any]:
        return {"agent": self.agent, "url": self.url, "sent": self.sent,
                "answered": self.answered, "failed": dict(self.failed),
                "in_flight": self.in_flight, "ejected": self.ejected,
                "ejections": self.ejections}  # fmt: skip


class ReplicaGroup:
    """The replicas of one agent: picks one per attempt, takes out and puts back."""

    def __init__(self, agent: str, urls: list[str], router: ReplicaRouter) -> None:
        self.agent = agent
        self.replicas = [Replica(agent, u.rstrip("/")) for u in urls]
        self._router = router
        self._next = 0  # where the round-robin tie-break starts

    def pick(self) -> Replica:
        """The live replica with the fewest in flight (ties: round-robin), counted as sent."""
        n = len(self.replicas)
        best, best_i = None, 0
        for k in range(n):
            i = (self._next + k) % n
            r = self.replicas[i]
            if not r.ejected and (best is None or r.in_flight < best.in_flight):
                best, best_i = r, i
        assert best is not None  # the last live replica is never taken out
        self._next = (best_i + 1) % n
        best.in_flight += 1
        best.sent += 1
        return best

    def done(self, replica: Replica, failure_class: str | None) -> None:
        """The end of an attempt on ``replica``: None for an answer, else its failure class."""
        replica.in_flight -= 1
        if failure_class is None:
            replica.answered += 1
            replica.errors_in_a_row = replica.probe_level = 0
            return
        replica.failed[failure_class] = replica.failed.get(failure_class, 0) + 1
        if failure_class not in EJECTING_CLASSES:
            if failure_class != CANCELLED:
                replica.errors_in_a_row = 0  # it answered (an HTTP error is an answer)
            return
        replica.errors_in_a_row += 1
        live = sum(1 for r in self.replicas if not r.ejected)
        if (replica.errors_in_a_row >= self._router.eject_after and not replica.ejected
                and live > 1):  # fmt: skip
            replica.ejected = True
            replica.ejections += 1
            self._router.probe_later(replica)


class ReplicaRouter:
    """Every replicated agent of a run's settings; owned by the process's Dispatcher."""

    def __init__(
        self, agents: dict[str, list[str]], *, eject_after: int = 3, probe_max_s: float = 30.0,
        probe: Probe | None = None, connect_timeout_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.eject_after = eject_after
        self.probe_max_s = probe_max_s
        self._probe = probe or _tcp_probe(connect_timeout_s)
        self._groups = {name: ReplicaGroup(name, urls, self) for name, urls in agents.items()}
        self._by_run_url: dict[str, ReplicaGroup] = {}  # only the run's agents
        self._probes: set[asyncio.Task[None]] = set()
        self._stats_path: Path | None = None
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: RolloutsSettings) -> ReplicaRouter | None:
        """The router of the agents with several URLs in ROLLOUTS_AGENTS; None if there is none."""
        replicated = {n: settings.replicas_of(n) for n in settings.agents}
        replicated = {n: urls for n, urls in replicated.items() if len(urls) > 1}
        if not replicated:
            return None
        return cls(replicated, eject_after=settings.replica_eject_after,
                   probe_max_s=settings.replica_probe_max_s,
                   connect_timeout_s=settings.connect_timeout_s)  # fmt: skip

    def use(self, plan_agents: dict[str, str], run_dir: Path) -> None:
        """Route the run's agents (a DispatchPlan's ``agent_urls``: name -> the URL it resolved)
        and keep the stats file in ``run_dir``. Idempotent; every chunk calls it. A run-level
        ``agent_url`` resolves no name, so it is never routed."""
        for name, url in plan_agents.items():
            group = self._groups.get(name)
            if group is not None and group.replicas[0].url == url.rstrip("/"):
                self._by_run_url[group.replicas[0].run_url] = group
        if self._stats_path is None:
            name = f"{STATS_PREFIX}{worker_id().replace(':', '_')}.json"
            self._stats_path = Path(run_dir) / name
            self._writer = asyncio.create_task(self._write_forever())

    def group_for(self, url: str) -> ReplicaGroup | None:
        """The replicas behind ``url`` (a plan's ``/run`` URL), if it is a routed agent's."""
        return self._by_run_url.get(url)

    def probe_later(self, replica: Replica) -> None:
        task = asyncio.create_task(self._probe_until_back(replica))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe_until_back(self, replica: Replica) -> None:
        while replica.ejected:
            first = min(PROBE_FIRST_S, self.probe_max_s)
            await asyncio.sleep(min(self.probe_max_s, first * 2 ** min(replica.probe_level, 16)))
            replica.probe_level += 1
            if await self._probe(replica.url) is None:
                # Back in with a clean count; the probe delay keeps its level until the replica
                # answers, so one that accepts connections but never answers is probed ever
                # more rarely.
                replica.errors_in_a_row = 0
                replica.ejected = False

    def snapshot(self) -> dict[str, Any]:
        groups = {id(g): g for g in self._by_run_url.values()}.values()
        return {"worker": worker_id(), "updated_at": time.time(),
                "replicas": [r.stats() for g in groups for r in g.replicas]}  # fmt: skip

    async def flush(self) -> None:
        """Write the stats file now (a chunk's end)."""
        if self._stats_path is not None and self._by_run_url:
            await asyncio.to_thread(
                replace_file_quietly, self._stats_path, orjson.dumps(self.snapshot())
            )

    async def _write_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            await self.flush()

    async def aclose(self) -> None:
        tasks = [*self._probes, *([self._writer] if self._writer else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.flush()


def _tcp_probe(timeout_s: float) -> Probe:
    # Imported here: `rollouts status` reads this module's stats without the HTTP stack.
    from rollouts.agent_client import _connect_problem

    return lambda url: _connect_problem(url, timeout_s)


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


def read_replica_stats(run_dir: Path, running: bool) -> list[ReplicaStatus]:
    """Every process's replica counts of a run, summed per replica (in the configured order).

    ``running``: whether the run is collecting now. Counts cover every process that ever
    collected into the run dir (earlier, interrupted invocations too); in flight and out only
    those of processes that wrote within ``STATS_FRESH_S``, while the run is going.
    """
    merged: dict[tuple[str, str], ReplicaStatus] = {}
    now = time.time()
    for path in sorted(Path(run_dir).glob(f"{STATS_PREFIX}*.json")):
        try:
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        fresh = running and now - float(doc.get("updated_at", 0)) <= STATS_FRESH_S
        for r in doc.get("replicas", []):
            s = merged.setdefault((r["agent"], r["url"]), ReplicaStatus(r["agent"], r["url"]))
            s.sent += r["sent"]
            s.answered += r["answered"]
            s.ejections += r["ejections"]
            for cls, n in r["failed"].items():
                s.failed[cls] = s.failed.get(cls, 0) + n
            if fresh:
                s.in_flight += r["in_flight"]
                s.ejected = s.ejected or r["ejected"]
    return list(merged.values())


def agents_to_check(
    plan_agents: dict[str, str], run_level_url: str | None, settings: RolloutsSettings
) -> dict[str, list[str]]:
    """What the reachability check probes: label -> the URLs requests may go to (a replicated
    agent's every replica; a run-level ``agent_url`` is only itself)."""
    checked = {}
    for label, url in plan_agents.items():
        urls = [url]
        if run_level_url is None and label in settings.agents:
            replicas = settings.replicas_of(label)
            if replicas[0] == url.rstrip("/"):
                urls = replicas
        checked[label] = urls
    return checked
