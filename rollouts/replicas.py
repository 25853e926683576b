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

The router counts nothing of its own: a ``Replica`` is its URL's ``Target`` in the process's
``AttemptObserver`` (rollouts/attempts.py), whose counts (in flight, sent, answered, failed by
class) the router reads to pick. The observer's one health file (rollouts/health.py) holds
them, with whether each replica is out and how often it was, for ``rollouts status`` and the
Prefect UI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import ClassVar

from rollouts.attempts import CANCELLED, AttemptObserver, Target
from rollouts.settings import RolloutsSettings

EJECTING_CLASSES = frozenset({"connection_error", "timeout"})
PROBE_FIRST_S = 1.0

# A connection probe: None if ``url`` accepts a TCP connection, else why not.
Probe = Callable[[str], Awaitable[str | None]]


class Replica(Target):
    """One URL of a replicated agent: what this process sent it (a ``Target``), and whether
    the router took it out."""

    __slots__ = ("ejected", "ejections", "errors_in_a_row", "group", "probe_level")
    replica: ClassVar[bool] = True

    def __init__(self, agent: str, url: str, group: ReplicaGroup) -> None:
        super().__init__(agent, url, time.monotonic())  # url: base URL, no final /
        self.group = group
        self.ejected = False
        self.ejections = 0
        self.errors_in_a_row = 0  # connection errors and timeouts since its last answer
        self.probe_level = 0  # doublings of the probe delay; an answer resets it

    def finish(self, failure_class: str | None, latency_s: float | None = None) -> None:
        """An attempt on this replica ended: counted, then judged (``ReplicaGroup.judge``)."""
        Target.finish(self, failure_class, latency_s)
        self.group.judge(self, failure_class)


class ReplicaGroup:
    """The replicas of one agent: picks one per attempt, takes out and puts back."""

    def __init__(self, agent: str, urls: list[str], router: ReplicaRouter) -> None:
        self.agent = agent
        self.replicas = [Replica(agent, u.rstrip("/"), self) for u in urls]
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
        best.start()
        return best

    def done(self, replica: Replica, failure_class: str | None) -> None:
        """The end of an attempt on ``replica`` not timed by an observer: None for an answer,
        else its failure class."""
        replica.finish(failure_class)

    def judge(self, replica: Replica, failure_class: str | None) -> None:
        """After an attempt's end on ``replica`` (counted): take it out after ``eject_after``
        connection errors or timeouts in a row, unless it is the last one live."""
        if failure_class is None:
            replica.errors_in_a_row = replica.probe_level = 0
            return
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
    """Every replicated agent of a run's settings; owned by the process's Dispatcher.

    ``observer``: where the replicas' attempts are counted (the client's, which sets it);
    a router made alone has one of its own.
    """

    def __init__(
        self, agents: dict[str, list[str]], *, eject_after: int = 3, probe_max_s: float = 30.0,
        probe: Probe | None = None, connect_timeout_s: float = 10.0,
        observer: AttemptObserver | None = None,
    ) -> None:  # fmt: skip
        self.eject_after = eject_after
        self.probe_max_s = probe_max_s
        self.observer = observer or AttemptObserver()
        self._probe = probe or _tcp_probe(connect_timeout_s)
        self._groups = {name: ReplicaGroup(name, urls, self) for name, urls in agents.items()}
        self._by_run_url: dict[str, ReplicaGroup] = {}  # only the run's agents
        self._probes: set[asyncio.Task[None]] = set()

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

    def use(self, plan_agents: dict[str, str]) -> None:
        """Route the run's agents (a DispatchPlan's ``agent_urls``: name -> the URL it resolved);
        their replicas are counted and published by the observer. Idempotent; every chunk calls
        it. A run-level ``agent_url`` resolves no name, so it is never routed."""
        for name, url in plan_agents.items():
            group = self._groups.get(name)
            if group is not None and group.replicas[0].url == url.rstrip("/"):
                self._by_run_url[group.replicas[0].run_url] = group
                for replica in group.replicas:
                    self.observer.adopt(replica)

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

    async def aclose(self) -> None:
        tasks = list(self._probes)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _tcp_probe(timeout_s: float) -> Probe:
    # Imported here: the CLI reads `agents_to_check` before it needs the HTTP stack.
    from rollouts.agent_client import _connect_problem

    return lambda url: _connect_problem(url, timeout_s)


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
