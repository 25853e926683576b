"""One agent fleet, several runs: a limit on the requests in flight to an agent across every run
and process that uses it (ROLLOUTS_AGENT_LIMITS).

The limit is held in a store every process reaches (Prefect's global concurrency limits,
tasks/agent_limits.py, behind the ``LimitStore`` protocol). A call to it per request would cost
more than many a request, so each process holds slots of the limit in leases of several slots,
and every attempt to the agent takes one of the slots its process holds (``AgentSlots``: a
local ``InFlightLimit`` as large as the slots held). Then, per process and agent, a keeper task:

- takes more while requests wait for a slot and the process is under its own budget: a lease of
  at most an eighth of the limit at a time, no more than are free;
- gives back what it has not used for ``RELEASE_AFTER_S`` (demand below what it holds), a whole
  lease at a time: the lease's slots leave the local limit first, and the lease is released
  once the requests in them have ended, so the sum over every holder never exceeds the limit;
- shares a full limit: each process publishes its demand (the requests it would have in flight
  now, up to its budget) in a second counter, ``rollouts-agent-demand:<name>``. When the limit
  is full, a process holds at most its share, the limit split in proportion to the demands
  (rounded up): one above it gives slots back as their requests end, one below takes them as
  they come free. A run started beside one that holds the whole limit gets its share within
  seconds, and the whole limit once the other's demand falls;
- renews its leases. A lease lasts ``LEASE_S`` (60 s, the shortest Prefect grants) and is
  renewed every ``RENEW_EVERY_S``; the slots of a process that died without releasing come
  back when its leases expire (the Prefect server's repossessor frees them: within 60 s plus its
  loop, 15 s by default). A lease this process failed to renew is dropped here before it can
  expire there: its slots are no longer used.

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
# The demand counter counts, it does not limit: its ceiling is far above any demand.
DEMAND_COUNTER_LIMIT = 1_000_000_000
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
    return DEMAND_PREFIX + agent


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
        self.agent, self.configured_limit = agent, limit
        self.name, self.demand_name = limit_name(agent), demand_name(agent)
        self._store_of: Callable[[], LimitStore] = store
        self._store: LimitStore | None = None
        self._budget, self._clock, self.timing = budget, clock, timing
        self.places = InFlightLimit(0)  # its limit: the slots of the active leases
        self._leases: list[_Lease] = []  # active: their slots are in the local limit
        self._leaving: list[_Lease] = []  # out of the local limit, released once unused
        self._demand_lease: _Lease | None = None
        self.published = 0  # the demand this process has published
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.limit = limit  # the shared limit as last read
        self.share: int | None = None  # at most this many while demands exceed the limit
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
        """One look at demand: renew, give back, take. True when requests wait for slots
        this process could not have yet."""
        store = await self._ensure_store()
        now = self._clock()
        self._drop_expired(now)
        await self._renew_due(store, now)
        places = self.places
        budget = max(1, self._budget())
        demand = min(budget, places.in_use + places.waiting)
        recent = self._recent_demand(now, demand)
        await self._publish(store, recent, now)
        wants_more = demand > places.limit
        free = budget  # a limit deleted (or inactive) limits nothing
        if wants_more or (self.held and now - self._checked_at >= self.timing.check_every_s):
            self._checked_at = now
            reading = await store.read(self.name)
            if reading is not None:
                self.limit, free = reading.limit, reading.limit - reading.active
            self.share = await self._share_of(store) if reading is not None else None
        cap = budget if self.share is None else min(budget, self.share)
        await self._give_back(store, min(recent, cap))
        if not wants_more:
            return False
        return not await self._take(store, min(cap - self.held, free))

    async def _ensure_store(self) -> LimitStore:
        if self._store is None:
            store = self._store_of()
            # A process may be the first to use the agent (a Dask worker, before the flow
            # set the limit): create it then, never change it (the run's start sets it).
            await store.ensure(self.name, self.configured_limit, overwrite=False)
            await store.ensure(self.demand_name, DEMAND_COUNTER_LIMIT, overwrite=False)
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

    async def _share_of(self, store: LimitStore) -> int | None:
        """This process's share while the demands of every process exceed the limit (None:
        they do not): the limit split in proportion to the published demands, rounded down,
        so that every other process with a demand has room for one slot at least."""
        if not self.published:
            return None
        demands = await store.read(self.demand_name)
        total = demands.active if demands is not None else 0
        if total <= self.limit:
            return None  # every demand fits: slots unused come back by themselves
        return max(1, self.limit * self.published // total)

    async def _publish(self, store: LimitStore, demand: int, now: float) -> None:
        """Publish ``demand`` when it moved by half a lease or more (or to or from zero)."""
        old = self.published
        if demand == old or (demand and old and abs(demand - old) < self.lease_size() / 2):
            return
        previous, self._demand_lease, self.published = self._demand_lease, None, 0
        if previous is not None:
            await store.release(previous.id)
        if demand:
            lease_id = await store.acquire(self.demand_name, demand, self.timing.lease_s)
            if lease_id is not None:
                self._demand_lease, self.published = _Lease(lease_id, demand, now), demand

    async def _take(self, store: LimitStore, slots: int) -> bool:
        """Take up to ``slots`` more, a lease at a time; True if any was granted."""
        granted = False
        while slots > 0:
            size = min(slots, self.lease_size())
            asked_at = self._clock()
            lease_id = await store.acquire(self.name, size, self.timing.lease_s)
            if lease_id is None:  # fewer free than counted: another process was quicker
                break
            self._leases.append(_Lease(lease_id, size, asked_at))
            self.places.set_limit(self.places.limit + size)
            slots -= size
            granted = True
        return granted

    async def _give_back(self, store: LimitStore, keep: int) -> None:
        """Take leases out of the local limit while more than ``keep`` slots are held (the
        largest that fit first); release each once the requests in its slots have ended."""
        surplus = self.held - keep
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
        if lease is self._demand_lease:
            self._demand_lease, self.published = None, 0
            return
        log.warning("agent %r: a lease of %d slots of %s was not renewed in time: its slots "
                    "are no longer used here", self.agent, lease.slots, self.name)  # fmt: skip
        if lease in self._leases:
            self._leases.remove(lease)
            self.places.set_limit(self.places.limit - lease.slots)
        else:
            self._leaving.remove(lease)

    def _all_leases(self) -> list[_Lease]:
        demand = [self._demand_lease] if self._demand_lease is not None else []
        return [*self._leases, *self._leaving, *demand]

    async def aclose(self) -> None:
        """Stop the keeper and give back every lease (the demand's too)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        leases = self._all_leases()
        self._leases, self._leaving, self._demand_lease, self.published = [], [], None, 0
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
        await store.ensure(demand_name(agent), DEMAND_COUNTER_LIMIT, overwrite=False)
    return applied
