"""The agents' shared limits (rollouts/agent_limits.py) held in Prefect's global concurrency
limits, on the Prefect server every run and worker talks to (no task here: the store the
collecting processes hold their slots in).

Slots are taken with leases (``increment-with-lease``): the server frees a lease's slots when
it expires unrenewed, so a killed process leaks nothing for good. Each call is one request to
the API; the keeper in rollouts/agent_limits.py makes a few per second at most, never one per
rollout.
"""

from __future__ import annotations

import contextlib
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from rollouts.agent_limits import LimitReading, LimitStore, set_run_limits

HTTP_LOCKED = 423  # not that many slots free
HTTP_GONE = 410  # the lease expired (or was released)


class PrefectLimitStore(LimitStore):
    """Prefect's global concurrency limits through one API client, opened at the first call
    on the event loop that makes it (a store is used from one loop)."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._client: PrefectClient | None = None

    async def _api(self) -> PrefectClient:
        if self._client is None:
            client = get_client()
            assert isinstance(client, PrefectClient)  # not the sync one
            self._client = await self._stack.enter_async_context(client)
        return self._client

    async def ensure(self, name: str, limit: int, *, overwrite: bool) -> None:
        api = await self._api()
        try:
            existing = await api.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                await api.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
                return
            except ObjectAlreadyExists:  # another process created it meanwhile
                existing = await api.read_global_concurrency_limit_by_name(name)
        if overwrite and existing.limit != limit:
            await api.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit)
            )

    async def read(self, name: str) -> LimitReading | None:
        try:
            found = await (await self._api()).read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
        return LimitReading(limit=found.limit, active=found.active_slots)

    async def acquire(self, name: str, slots: int, lease_s: float) -> str | None:
        api = await self._api()
        try:
            response = await api.increment_concurrency_slots_with_lease(
                names=[name], slots=slots, mode="concurrency", lease_duration=lease_s
            )
        except httpx.HTTPStatusError as e:
            if e.response.status_code == HTTP_LOCKED:
                return None
            raise
        return str(response.json()["lease_id"])

    async def renew(self, lease_id: str, lease_s: float) -> bool:
        try:
            await (await self._api()).renew_concurrency_lease(UUID(lease_id), lease_s)
        except httpx.HTTPStatusError as e:
            if e.response.status_code in (HTTP_GONE, 404):
                return False
            raise
        return True

    async def release(self, lease_id: str) -> None:
        await (await self._api()).release_concurrency_slots_with_lease(UUID(lease_id))

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()


async def set_agent_limits(limits: dict[str, int], agents: set[str]) -> dict[str, int]:
    """At a run's start, on Prefect: the limits of the run's agents set to their configured
    values (see ``set_run_limits``); those applied."""
    store = PrefectLimitStore()
    try:
        return await set_run_limits(store, limits, agents)
    finally:
        await store.aclose()
