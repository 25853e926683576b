"""One agent fleet, several runs: a limit on the requests in flight to an agent across every run
and process that uses it (ROLLOUTS_AGENT_LIMITS).

The limit is held in a store every process reaches (Prefect's global concurrency limits,
tasks/agent_limits.py, behind the ``LimitStore`` protocol). A call to it per request would cost
more than many a request, so each process holds slots of the limit in leases of several slots,
and every attempt to the agent takes one of the slots its process holds (``AgentSlots``: a
local ``InFlightLimit`` as large as the slots held). Per process and agent, a keeper task looks
at its demand (the requests that would be in flight now: those in flight and those waiting for
a slot, never more than the process's own budget) every ``tick_s`` and at once when a request
waits:

- it takes more while requests wait: a lease of at most an eighth of the limit at a time, no
  more than are free;
- it gives back what it has not used for ``release_after_s``, a whole lease at a time: the
  lease's slots leave the local limit first, and the lease is released once the requests in
  them have ended, so the sum over every holder never exceeds the limit;
- it shares the limit when demands exceed it. Each process publishes its demand in a second
  counter, ``rollouts-agent-demand:<name>``; its share is the limit split in proportion to the
  demands, rounded down but at least one, so the shares add up to no more than the limit and
  every process with a demand has a share. A process held below its share (it wants more,
  none are free) counts itself in a third counter, ``rollouts-agent-waiting:<name>``. While
  any process waits, no process takes more than its share, and one above it gives slots back
  as their requests end; while none waits, free slots go to whoever wants them. So a run
  started beside one that holds the whole limit gets its share within seconds, and no slot
  stays free while a process wants it;
- it renews its leases. A lease lasts 60 s (``lease_s``, the shortest Prefect grants) and is
  renewed every 20 s; the slots of a process that died without releasing them come back when
  its leases expire (the Prefect server's repossessor frees them: within 60 s plus its loop,
  15 s by default). A lease this process failed to renew is dropped here before it can expire
  there: its slots are no longer used.

Everything else holds nothing: an agent without a limit costs a dictionary lookup per attempt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from rollouts.concurrency import InFlightLimit

LIMIT_PREFIX = "rollouts-agent:"
DEMAND_PREFIX = "rollouts-agent-demand:"
WAITING_PREFIX = "rollouts-agent-waiting:"
# The demand and waiting counters count, they do not limit: their ceiling is far above any sum.
COUNTER_LIMIT = 1_000_000_000
LEASES_PER_LIMIT = 8  # a lease holds at most limit / 8 slots: the grain of giving back


@dataclass(frozen=True)
class SlotTiming:
    """When the keeper looks, asks and gives back (tests pass shorter ones)."""

    lease_s: float = 60.0  # Prefect's shortest lease
    renew_every_s: float = 20.0  # three renewals per lease duration: two may fail
    # A lease not renewed this long before it would expire on the server is dropped here first.
    expiry_margin_s: float = 10.0
    tick_s: float = 0.5  # demand is looked at this often (and at once when a request waits)
    check_every_s: float = 1.0  # the shared limit and demands are read this often while held
    release_after_s: float = 2.0  # unused this long, slots go back (not in a chunk's gap)


LEASE_S = SlotTiming.lease_s

log = logging.getLogger("rollouts.agent_limits")


def limit_name(agent: str) -> str:
    """The shared limit of ``agent`` (its name in the Prefect UI, under Concurrency)."""
    return LIMIT_PREFIX + agent


def demand_name(agent: str) -> str:
    """The counter of the requests every process would have in flight to ``agent`` now."""
    return DEMAND_PREFIX + agent


def waiting_name(agent: str) -> str:
    """The counter of the processes held below their share of ``agent``'s limit."""
    return WAITING_PREFIX + agent


@dataclass(frozen=True)
class LimitReading:
    limit: int
    active: int  # slots held now, by every holder


class LimitStore(Protocol):
    """Shared counters with a limit, whose slots are held in leases that expire unless renewed.

    A store is used from one event loop."""

    async def ensure(self, name: str, limit: int, *, overwrite: bool) -> None:
        """Create limit ``name`` with ``limit`` if it does not exist; ``overwrite``: set an
        existing one's limit to ``limit`` too."""

    async def read(self, name: str) -> LimitReading | None:
        """The limit and the slots held now; None when there is no such limit."""

    async def acquire(self, name: str, slots: int, lease_s: float) -> str | None:
        """A lease of ``slots`` slots for ``lease_s`` seconds: its id; None if fewer are free."""

    async def renew(self, lease_id: str, lease_s: float) -> bool:
        """Extend a lease; False when it is gone (it expired)."""

    async def release(self, lease_id: str) -> None:
        """Give a lease's slots back."""

    async def aclose(self) -> None: ...


@dataclass
class _Lease:
    id: str
    slots: int
    renewed_at: float  # monotonic, when it was asked for or last renewed


@dataclass
class _Published:
    """What this process adds to a shared counter (its demand, or 1 while it waits): a lease
    of that many slots of it."""

    name: str
    value: int = 0
    lease: _Lease | None = None

    async def set(
        self, store: LimitStore, value: int, now: float, lease_s: float, step: float = 1
    ) -> None:
        """Publish ``value`` if it moved by ``step`` or more since the last one (or to or from
        zero): the old lease is released, a new one taken."""
        old = self.value
        if value == old or (value and old and abs(value - old) < step):
            return
        previous, self.lease, self.value = self.lease, None, 0
        if previous is not None:
            await store.release(previous.id)
        if value:
            lease_id = await store.acquire(self.name, value, lease_s)
            if lease_id is not None:
                self.lease, self.value = _Lease(lease_id, value, now), value

    def forget(self) -> None:
        self.lease, self.value = None, 0


class AgentSlots:
    """This process's slots of one agent's shared limit (see the module's doc).

    ``acquire``/``release`` around every attempt to the agent; ``budget``: the process's own
    limit of requests in flight now (its demand never exceeds it). ``store`` makes the store
    at the first request (on this event loop). ``clock`` and ``timing``: tests pass their own.
    """

    def __init__(
        self, agent: str, limit: int, store: Callable[[], LimitStore],
        budget: Callable[[], int], *, clock: Callable[[], float] = time.monotonic,
        timing: SlotTiming = SlotTiming(),
    ) -> None:  # fmt: skip
        self.agent, self.configured_limit, self.name = agent, limit, limit_name(agent)
        self._store_of: Callable[[], LimitStore] = store
        self._store: LimitStore | None = None
        self._budget, self._clock, self.timing = budget, clock, timing
        self.places = InFlightLimit(0)  # its limit: the slots of the active leases
        self._leases: list[_Lease] = []  # active: their slots are in the local limit
        self._leaving: list[_Lease] = []  # out of the local limit, released once unused
        self.demand = _Published(demand_name(agent))
        self.waits = _Published(waiting_name(agent))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.limit = limit  # the shared limit as last read
        self.share: int | None = None  # None: every demand fits in the limit
        self.others_wait = False  # a process held below its share, as last read
        # The limit is below the slots held by all (it was lowered): this process's part of it.
        self.over_limit: int | None = None
        self._checked_at = -math.inf
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._failing = False  # the store failed last time (logged once until it recovers)

    # --- the request path -------------------------------------------------------------------

    async def acquire(self) -> None:
        places = self.places
        if places.in_use >= places.limit or places.waiting:
            if self._keeper is None:
                self._keeper = asyncio.create_task(self._keep(), name=f"slots-{self.agent}")
            self._wake.set()
        await places.acquire()

    def release(self) -> None:
        self.places.release()

    @property
    def held(self) -> int:
        """Slots held (the ones leaving included: their requests may still be in flight)."""
        return sum(lease.slots for lease in (*self._leases, *self._leaving))

    # --- the keeper -------------------------------------------------------------------------

    async def _keep(self) -> None:
        tick = self.timing.tick_s
        while True:
            try:
                short = await self.adjust()
                if self._failing:
                    log.warning("agent %r: its shared limit %s answers again", self.agent,
                                self.name)  # fmt: skip
                    self._failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store unreachable: keep what is held, try again
                if not self._failing:
                    log.warning("agent %r: cannot reach its shared limit %s (%s: %s); trying "
                                "again every %g s", self.agent, self.name, type(e).__name__,
                                e, tick)  # fmt: skip
                self._failing, short = True, True
            self._wake.clear()
            if short:  # wanting more than it could have: ask again next tick, not sooner
                await asyncio.sleep(tick)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), tick)

    async def adjust(self) -> bool:
        """One look at demand: renew, give back, take, publish. True while requests wait
        for slots this process could not have yet."""
        store = await self._ensure_store()
        timing, places = self.timing, self.places
        now = self._clock()
        self._drop_expired(now)
        await self._renew_due(store, now)
        budget = max(1, self._budget())
        demand = min(budget, places.in_use + places.waiting)
        recent = self._recent_demand(now, demand)
        wants_more = demand > places.limit
        free = budget  # a limit deleted (or made inactive) limits nothing
        if wants_more or (self.held and now - self._checked_at >= timing.check_every_s):
            self._checked_at = now
            reading = await store.read(self.name)
            self.over_limit = None
            if reading is not None:
                self.limit, free = reading.limit, reading.limit - reading.active
                if reading.active > reading.limit:  # lowered below what is held: scale down
                    self.over_limit = reading.limit * self.held // reading.active
            await self._read_contention(store)
        # While a process waits below its share, hold no more than this one's.
        cap = budget if self.share is None or not self.others_wait else min(budget, self.share)
        if self.over_limit is not None:
            cap = min(cap, self.over_limit)
        await self._give_back(store, min(recent, cap))
        if wants_more:
            await self._take(store, min(cap - self.held, free))
        # Published once the slots are asked for: a run's first requests wait for no other
        # write (on a SQLite server, one write beside the flow's own can wait 2 s for its lock).
        await self.demand.set(store, recent, now, timing.lease_s, step=self.lease_size() / 2)
        entitled = demand if self.share is None else min(demand, self.share)
        await self.waits.set(store, int(places.limit < entitled), now, timing.lease_s)
        return demand > places.limit

    async def _ensure_store(self) -> LimitStore:
        if self._store is None:
            store = self._store_of()
            # A process may be the first to use the agent (a Dask worker, before the flow
            # set the limit): create it then, never change it (the run's start sets it).
            await store.ensure(self.name, self.configured_limit, overwrite=False)
            for counter in (self.demand, self.waits):
                await store.ensure(counter.name, COUNTER_LIMIT, overwrite=False)
            self._store = store
        return self._store

    def _recent_demand(self, now: float, demand: int) -> int:
        """The most requests this process wanted in flight over the last release_after_s."""
        recent = self._recent
        recent.append((now, demand))
        while recent[0][0] < now - self.timing.release_after_s:
            recent.popleft()
        return max(d for _, d in recent)

    def lease_size(self) -> int:
        return max(1, math.ceil(self.limit / LEASES_PER_LIMIT))

    async def _read_contention(self, store: LimitStore) -> None:
        """This process's share (None while every demand fits in the limit): the limit split
        in proportion to the published demands, rounded down, at least one; so that every
        other process with a demand has room for one slot at least. And whether a process
        waits below its share."""
        demands = await store.read(self.demand.name)
        total = demands.active if demands is not None else 0
        if total <= self.limit or not self.demand.value:
            self.share, self.others_wait = None, False
            return
        self.share = max(1, self.limit * self.demand.value // total)
        waiting = await store.read(self.waits.name)
        self.others_wait = waiting is not None and waiting.active > self.waits.value

    async def _take(self, store: LimitStore, slots: int) -> None:
        """Take up to ``slots`` more, a lease at a time."""
        while slots > 0:
            size = min(slots, self.lease_size())
            asked_at = self._clock()
            lease_id = await store.acquire(self.name, size, self.timing.lease_s)
            if lease_id is None:  # fewer free than counted: another process was quicker
                return
            self._leases.append(_Lease(lease_id, size, asked_at))
            self.places.set_limit(self.places.limit + size)
            slots -= size

    async def _give_back(self, store: LimitStore, keep: int) -> None:
        """Take leases out of the local limit while it is above ``keep`` (the largest that
        fit first); release each once the requests in its slots have ended."""
        surplus = self.places.limit - keep  # the leases already leaving are not counted again
        for lease in sorted(self._leases, key=lambda lease: -lease.slots):
            if lease.slots <= surplus:
                self._leases.remove(lease)
                self._leaving.append(lease)
                self.places.set_limit(self.places.limit - lease.slots)
                surplus -= lease.slots
        while self._leaving and self.places.in_use <= self.places.limit:
            await store.release(self._leaving.pop().id)

    async def _renew_due(self, store: LimitStore, now: float) -> None:
        for lease in self._all_leases():
            if now - lease.renewed_at < self.timing.renew_every_s:
                continue
            if await store.renew(lease.id, self.timing.lease_s):
                lease.renewed_at = now
            else:  # gone on the server (expired): its slots are someone else's now
                self._forget(lease)

    def _drop_expired(self, now: float) -> None:
        """Leases not renewed in time are no longer counted on: the server frees them."""
        margin = self.timing.lease_s - self.timing.expiry_margin_s
        for lease in self._all_leases():
            if now - lease.renewed_at >= margin:
                self._forget(lease)

    def _forget(self, lease: _Lease) -> None:
        for counter in (self.demand, self.waits):
            if lease is counter.lease:
                counter.forget()
                return
        log.warning("agent %r: a lease of %d slots of %s was not renewed in time: its slots "
                    "are no longer used here", self.agent, lease.slots, self.name)  # fmt: skip
        if lease in self._leases:
            self._leases.remove(lease)
            self.places.set_limit(self.places.limit - lease.slots)
        else:
            self._leaving.remove(lease)

    def _all_leases(self) -> list[_Lease]:
        counters = [c.lease for c in (self.demand, self.waits) if c.lease is not None]
        return [*self._leases, *self._leaving, *counters]

    async def aclose(self) -> None:
        """Stop the keeper and give back every lease (the counters' too)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        leases = self._all_leases()
        self._leases, self._leaving = [], []
        self.demand.forget()
        self.waits.forget()
        self.places.set_limit(0)
        if self._store is None:
            return
        for lease in leases:
            try:
                await self._store.release(lease.id)
            except Exception as e:  # the server frees it when the lease expires
                log.warning("agent %r: could not release a lease of %s (%s); it expires within "
                            "%g s", self.agent, self.name, e, self.timing.lease_s)  # fmt: skip


class AgentLimits:
    """A dispatcher's slots of the shared limits of the agents in ``limits`` (agent name ->
    the configured limit): one ``AgentSlots`` per agent, made at its first request, all on
    one store made then (``store``)."""

    def __init__(
        self, limits: Mapping[str, int], store: Callable[[], LimitStore],
        timing: SlotTiming = SlotTiming(),
    ) -> None:  # fmt: skip
        self.limits, self.timing = dict(limits), timing
        self._store_of = store
        self._store: LimitStore | None = None
        self._slots: dict[str, AgentSlots] = {}
        self._places: InFlightLimit | None = None

    def follow_budget(self, places: InFlightLimit) -> None:
        """The process's own limit (the client's places): no agent's demand exceeds it."""
        self._places = places

    def budget(self) -> int:
        return self._places.limit if self._places is not None else 1

    def slots(self, agent: str) -> AgentSlots | None:
        """The slots an attempt to ``agent`` takes (the name its rows carry; a run-level URL
        without a name is no name here); None: it has no limit."""
        slots = self._slots.get(agent)
        if slots is None and agent in self.limits:
            slots = self._slots[agent] = AgentSlots(
                agent, self.limits[agent], self._shared_store, self.budget,
                timing=self.timing,
            )  # fmt: skip
        return slots

    def _shared_store(self) -> LimitStore:
        if self._store is None:
            self._store = self._store_of()
        return self._store

    async def aclose(self) -> None:
        for slots in self._slots.values():
            await slots.aclose()
        self._slots.clear()
        if self._store is not None:
            await self._store.aclose()
            self._store = None


async def set_run_limits(
    store: LimitStore, limits: Mapping[str, int], agents: set[str]
) -> dict[str, int]:
    """At a run's start: the shared limit of each of ``agents`` (the names its requests carry)
    that ``limits`` names, created or set to its configured value. Returns those applied."""
    applied = {agent: limits[agent] for agent in sorted(agents) if agent in limits}
    for agent, limit in applied.items():
        await store.ensure(limit_name(agent), limit, overwrite=True)
        for counter in (demand_name(agent), waiting_name(agent)):
            await store.ensure(counter, COUNTER_LIMIT, overwrite=False)
    return applied
