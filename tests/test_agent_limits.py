"""ROLLOUTS_AGENT_LIMITS: one limit on the requests in flight to an agent across every run and
process that uses it, held in Prefect's global concurrency limits.

The keeper's logic (slots held in leases, given back when unused, shared when demands exceed
the limit) runs first against a store in memory, with processes simulated on one event loop;
then two real `rollouts collect` runs share one reference agent through the session's Prefect
API, and the agent itself reports the most requests it ever had in flight."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import AgentServer, read_jsonl

from reference_agent.server import write_tasks
from rollouts.agent_limits import (
    COUNTER_LIMIT,
    LIMIT_PREFIX,
    AgentSlots,
    LimitReading,
    SlotTiming,
    demand_name,
    limit_name,
    waiting_name,
)
from rollouts.concurrency import InFlightLimit
from rollouts.errors import ConfigError
from rollouts.run_state import run_dir_for
from rollouts.settings import RolloutsSettings

FAST = SlotTiming(lease_s=5.0, renew_every_s=1.0, expiry_margin_s=1.0, tick_s=0.01,
                  check_every_s=0.02, release_after_s=0.1)  # fmt: skip
AGENT = "shared"


class MemoryStore:
    """The ``LimitStore`` protocol in memory, as Prefect's server keeps it: all-or-nothing
    leases, refused when fewer slots are free; a lease it has dropped cannot be renewed."""

    def __init__(self) -> None:
        self.limits: dict[str, int] = {}
        self.leases: dict[str, tuple[str, int]] = {}  # id -> (limit name, slots)
        self.calls: Counter[str] = Counter()
        self.unreachable = False
        self._ids = itertools.count()

    def held(self, name: str) -> int:
        return sum(slots for n, slots in self.leases.values() if n == name)

    def _call(self, what: str) -> None:
        self.calls[what] += 1
        if self.unreachable:
            raise httpx.ConnectError("the store is down (test)")

    async def ensure(self, name: str, limit: int, *, overwrite: bool) -> None:
        self._call("ensure")
        if overwrite or name not in self.limits:
            self.limits[name] = limit

    async def read(self, name: str) -> LimitReading | None:
        self._call("read")
        if name not in self.limits:
            return None
        return LimitReading(self.limits[name], self.held(name))

    async def acquire(self, name: str, slots: int, lease_s: float) -> str | None:
        self._call("acquire")
        if self.held(name) + slots > self.limits[name]:
            return None
        lease_id = f"lease-{next(self._ids)}"
        self.leases[lease_id] = (name, slots)
        return lease_id

    async def renew(self, lease_id: str, lease_s: float) -> bool:
        self._call("renew")
        return lease_id in self.leases

    async def release(self, lease_id: str) -> None:
        self._call("release")
        self.leases.pop(lease_id, None)

    async def aclose(self) -> None:
        pass


@dataclass
class Fleet:
    """The agent's side: requests in flight now, the most ever, when each was answered."""

    latency_s: float = 0.005
    in_flight: int = 0
    peak: int = 0
    answered: list[tuple[float, str]] = field(default_factory=list)  # (time, process)


@dataclass
class Process:
    """A collecting process as the client runs one: a place of its own budget first, then a
    slot of the agent's shared limit, for each request."""

    name: str
    budget: int
    store: MemoryStore
    slots: AgentSlots = field(init=False)
    places: InFlightLimit = field(init=False)

    def __post_init__(self) -> None:
        self.places = InFlightLimit(self.budget)
        self.slots = AgentSlots(AGENT, 8, lambda: self.store, lambda: self.budget, timing=FAST)

    async def send(self, fleet: Fleet, n: int) -> None:
        """``n`` requests, each started once the budget has room (as the chunk dispatch)."""
        tasks = []
        for _ in range(n):
            await self.places.acquire()
            tasks.append(asyncio.create_task(self._one(fleet)))
        await asyncio.gather(*tasks)

    async def _one(self, fleet: Fleet) -> None:
        try:
            await self.slots.acquire()
            try:
                fleet.in_flight += 1
                fleet.peak = max(fleet.peak, fleet.in_flight)
                await asyncio.sleep(fleet.latency_s)
                fleet.answered.append((time.monotonic(), self.name))
            finally:
                fleet.in_flight -= 1
                self.slots.release()
        finally:
            self.places.release()


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _store_with_limit(limit: int = 8) -> MemoryStore:
    store = MemoryStore()
    store.limits[limit_name(AGENT)] = limit
    store.limits[demand_name(AGENT)] = COUNTER_LIMIT
    store.limits[waiting_name(AGENT)] = COUNTER_LIMIT
    return store


@pytest.mark.fast
def test_one_process_holds_slots_in_batches_and_gives_them_back_when_idle() -> None:
    async def main() -> tuple[Fleet, MemoryStore, int]:
        store = _store_with_limit(8)
        process, fleet = Process("a", 16, store), Fleet()
        await process.send(fleet, 1000)
        held_at_end = process.slots.held
        await _until(lambda: store.held(limit_name(AGENT)) == 0)  # idle: all of it back
        await _until(lambda: store.held(demand_name(AGENT)) == 0)  # and no demand left
        await process.slots.aclose()
        return fleet, store, held_at_end

    fleet, store, held_at_end = asyncio.run(main())
    assert len(fleet.answered) == 1000
    assert fleet.peak == 8  # the whole limit used, never more, though its budget is 16
    assert held_at_end == 8
    # A few calls to the store, not one per request.
    assert store.calls["acquire"] < 50, store.calls
    assert store.leases == {}


@pytest.mark.fast
def test_two_processes_share_a_full_limit_and_never_exceed_it() -> None:
    """B starts while A holds the whole limit and still wants twice as much: within a moment
    both hold half (their demands are equal), and once A is done B takes all of it."""

    async def main() -> tuple[Fleet, float, float, int]:
        store = _store_with_limit(8)
        # Requests last longer than a tick: slots given back while in use would show.
        a, b, fleet = Process("a", 16, store), Process("b", 16, store), Fleet(latency_s=0.03)
        sending_a = asyncio.create_task(a.send(fleet, 320))
        await _until(lambda: a.slots.held == 8)
        b_started = time.monotonic()
        sending_b = asyncio.create_task(b.send(fleet, 160))
        a_usable = 8  # the fewest slots A could use while it gave B its share
        while not (a.slots.places.limit == 4 and b.slots.held == 4):
            assert time.monotonic() < b_started + 5, "B never got its share"
            a_usable = min(a_usable, a.slots.places.limit)
            await asyncio.sleep(0.001)
        b_got_its_share = time.monotonic() - b_started
        await sending_a
        a_done = time.monotonic()
        await _until(lambda: b.slots.held == 8 or sending_b.done())
        await sending_b
        for p in (a, b):
            await p.slots.aclose()
        assert store.leases == {}
        return fleet, b_got_its_share, a_done, a_usable

    fleet, b_got_its_share, a_done, a_usable = asyncio.run(main())
    assert a_usable == 4  # A gave back what B's share needed, no more
    assert fleet.peak <= 8
    assert Counter(p for _, p in fleet.answered) == {"a": 320, "b": 160}
    assert b_got_its_share < 1.0
    # While both sent, each had about half: B's answers before A finished.
    both = [p for t, p in fleet.answered if t <= a_done]
    assert 0.3 < both.count("b") / len(both) < 0.7


@pytest.mark.fast
def test_a_small_demand_beside_a_large_one_gets_a_slot() -> None:
    """Shares are in proportion to demand, rounded down but at least one: a process wanting 1
    beside one wanting 16 of a limit of 8 is never left without one."""

    async def main() -> Fleet:
        store = _store_with_limit(8)
        big, small, fleet = Process("big", 16, store), Process("small", 1, store), Fleet()
        sending = asyncio.create_task(big.send(fleet, 1500))
        await _until(lambda: big.slots.held == 8)
        await asyncio.wait_for(small.send(fleet, 20), 10)
        assert not sending.done()  # the small one finished while the big one still sent
        await sending
        for p in (big, small):
            await p.slots.aclose()
        return fleet

    fleet = asyncio.run(main())
    assert fleet.peak <= 8
    assert Counter(p for _, p in fleet.answered) == {"big": 1500, "small": 20}


@pytest.mark.fast
def test_a_small_run_beside_a_big_one_gets_its_share_of_a_real_sized_limit() -> None:
    """A limit of 256 (leases of 32 slots) held whole by a run that wants 512: a run that
    wants 64 gets its share (256 x 64 / 576 = 28), though that is less than one lease."""

    async def main() -> tuple[Fleet, int]:
        store = _store_with_limit(256)
        big, small, fleet = Process("big", 512, store), Process("small", 64, store), Fleet()
        sending = asyncio.create_task(big.send(fleet, 200_000))
        await _until(lambda: big.slots.held == 256)
        small_sending = asyncio.create_task(small.send(fleet, 5_000))
        await _until(lambda: small.slots.held >= 28, timeout_s=20)
        got = small.slots.held
        sending.cancel()
        small_sending.cancel()
        await asyncio.gather(sending, small_sending, return_exceptions=True)
        for p in (big, small):
            await p.slots.aclose()
        return fleet, got

    fleet, got = asyncio.run(main())
    assert got >= 28
    assert fleet.peak <= 256


@pytest.mark.fast
def test_a_demand_that_takes_nothing_leaves_free_slots_to_the_others() -> None:
    """A process that published a demand but takes no slot (slow to start, or killed: its
    demand's lease has not expired yet) does not wait below its share: the others use every
    free slot."""

    async def main() -> Fleet:
        store = _store_with_limit(8)
        store.leases["phantom"] = (demand_name(AGENT), 16)
        process, fleet = Process("a", 16, store), Fleet()
        await process.send(fleet, 400)
        await process.slots.aclose()
        return fleet

    assert asyncio.run(main()).peak == 8


@pytest.mark.fast
def test_a_limit_lowered_while_held_is_followed() -> None:
    """An operator lowers the limit (the Prefect UI) below what a run holds, no other run
    waiting: it gives slots back as their requests end, down to the new limit."""

    async def main() -> int:
        store = _store_with_limit(8)
        process, fleet = Process("a", 16, store), Fleet(latency_s=0.02)
        sending = asyncio.create_task(process.send(fleet, 100_000))
        await _until(lambda: store.held(limit_name(AGENT)) == 8)
        store.limits[limit_name(AGENT)] = 4
        await _until(lambda: store.held(limit_name(AGENT)) <= 4)
        fleet.peak = fleet.in_flight
        await asyncio.sleep(0.3)  # long after: never above the new limit again
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await process.slots.aclose()
        return fleet.peak

    assert asyncio.run(main()) <= 4


@pytest.mark.fast
def test_a_lease_the_store_dropped_is_not_counted_on(caplog: pytest.LogCaptureFixture) -> None:
    """Leases the server let expire (this process stalled past them) fail to renew: the
    process stops counting on them and holds new ones, granted again by the store."""

    async def main() -> tuple[set[str], set[str], Fleet]:
        store = _store_with_limit(8)
        process, fleet = Process("a", 16, store), Fleet(latency_s=0.02)
        sending = asyncio.create_task(process.send(fleet, 100_000))
        await _until(lambda: process.slots.held == 8)
        expired = {i for i, (name, _) in store.leases.items() if name == limit_name(AGENT)}
        for lease_id in expired:
            del store.leases[lease_id]
        # Found out at the next renewal: then it holds only what the store granted it.
        await _until(lambda: "was not renewed in time" in caplog.text,
                     timeout_s=FAST.renew_every_s + 2)  # fmt: skip
        await _until(lambda: process.slots.held == store.held(limit_name(AGENT)) == 8)
        held_now = {i for i, (name, _) in store.leases.items() if name == limit_name(AGENT)}
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await process.slots.aclose()
        return expired, held_now, fleet

    expired, held_now, fleet = asyncio.run(main())
    assert held_now and not held_now & expired
    assert fleet.answered  # it went on sending


@pytest.mark.fast
def test_requests_wait_while_the_store_is_unreachable_and_go_on_after() -> None:
    async def main() -> tuple[Fleet, int]:
        store = _store_with_limit(8)
        store.unreachable = True
        process, fleet = Process("a", 16, store), Fleet()
        sending = asyncio.create_task(process.send(fleet, 200))
        await asyncio.sleep(0.2)
        answered_while_down = len(fleet.answered)
        store.unreachable = False
        await asyncio.wait_for(sending, 10)
        await process.slots.aclose()
        return fleet, answered_while_down

    fleet, answered_while_down = asyncio.run(main())
    assert answered_while_down == 0  # no slot, no request: the limit is never guessed
    assert len(fleet.answered) == 200
    assert fleet.peak <= 8


# --- the setting -------------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{my_agent: 8}", "not JSON"),
        ('["my_agent"]', "must be a JSON object"),
        ('{"my_agent": 0}', "agent 'my_agent': the limit must be a whole number >= 1, got 0"),
        ('{"my_agent": 2.5}', "got 2.5"),
        ('{"my_agent": "8"}', "got '8'"),
        ('{"my/agent": 8}', "'my/agent' cannot name an agent's limit"),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENT_LIMITS", value)
    with pytest.raises(ConfigError, match="ROLLOUTS_AGENT_LIMITS") as raised:
        RolloutsSettings()
    assert message in str(raised.value)


@pytest.mark.fast
def test_the_setting_reads_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENT_LIMITS", '{"my_agent": 256, "other": 8}')
    assert RolloutsSettings().agent_limits == {"my_agent": 256, "other": 8}
    monkeypatch.delenv("ROLLOUTS_AGENT_LIMITS")
    assert RolloutsSettings().agent_limits == {}


def test_a_bad_setting_stops_the_command_before_any_request(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 5)
    done = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", "--agent-name", "ref",
         "--input", str(inp), "--output", str(tmp_path / "out.jsonl")],
        env={**os.environ, "ROLLOUTS_AGENTS": f'{{"ref": "{agent.url}"}}',
             "ROLLOUTS_AGENT_LIMITS": '{"ref": -1}'},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "ROLLOUTS_AGENT_LIMITS: agent 'ref': the limit must be a whole number" in done.stderr
    assert "Traceback" not in done.stderr
    assert agent.requests() == []


# --- two real runs, one agent, the session's Prefect API ---------------------------------------

# Requests long enough that a run outlasts the other's start-up (5-8 s here, with one running).
LATENCY_MS = 200


def _collect(agent: AgentServer, inp: Path, out: Path, temperature: float) -> list[str]:
    return [sys.executable, "-m", "rollouts_cli", "collect", "--agent-name", "ref",
            "--input", str(inp), "--output", str(out), "--num-samples-in-parallel", "16",
            "--chunk-size", "100", "--temperature", str(temperature)]  # fmt: skip


def _agent_stats(agent: AgentServer) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{agent.url}/stats", timeout=10).json()
    return stats


def test_two_runs_on_one_agent_never_exceed_its_limit_together(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """Two `rollouts collect` commands, each asking 16 in flight of an agent limited to 8
    across runs: b starts while a collects and gets its share at once; the agent never has
    more than 8 in flight, and both runs end exact."""
    agent = start_agent("--latency-ms", str(LATENCY_MS))
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           "ROLLOUTS_AGENTS": f'{{"ref": "{agent.url}"}}',
           "ROLLOUTS_AGENT_LIMITS": '{"ref": 8, "unused_agent": 1}'}  # fmt: skip
    sizes, temperatures = {"a": 800, "b": 100}, {"a": 0.2, "b": 0.6}
    runs = {}
    for seed, name in enumerate(("a", "b")):
        inp = tmp_path / f"tasks_{name}.jsonl"
        write_tasks(inp, sizes[name], seed=seed)
        out = tmp_path / f"rollouts_{name}.jsonl"
        if name == "b":  # once a collects (20 s alone at 8 in flight)
            deadline = time.monotonic() + 60
            while not agent.requests():
                assert time.monotonic() < deadline, "run a sent nothing"
                time.sleep(0.1)
        runs[name] = (subprocess.Popen(
            _collect(agent, inp, out, temperatures[name]), env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ), out)  # fmt: skip
    for name, (proc, out) in runs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        n = sizes[name]
        assert f"{n}/{n} written, 0 failed, 0 missing" in stdout
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)] == [
            (t, 0) for t in range(n)
        ]

    assert _agent_stats(agent)["peak_in_flight"] == 8  # all of the limit, never more
    requests = agent.requests()
    assert len(requests) == 900  # each rollout sent once
    a_times, b_times = (sorted(q["time"] for q in requests if q["temperature"] == temperatures[r])
                        for r in ("a", "b"))  # fmt: skip
    # b collected while a did, and had its share then: not a slot now and then.
    assert b_times[-1] < a_times[-1], "a ended before b: they did not share the agent"
    a_meanwhile = sum(1 for t in a_times if b_times[0] <= t <= b_times[-1])
    assert len(b_times) / (len(b_times) + a_meanwhile) > 0.3
    # The limit is on the server at its configured value, and nothing holds it after; the
    # limit of an agent the runs did not use was not made.
    assert _shared_limits(prefect_api) == {"rollouts-agent:ref": (8, 0)}


def _shared_limits(api_url: str) -> dict[str, tuple[int, int]]:
    """The agents' limits on the server: name -> (limit, slots held now)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> dict[str, tuple[int, int]]:
        async with get_client() as client:
            found = await client.read_global_concurrency_limits(limit=200)
        return {c.name: (c.limit, c.active_slots) for c in found
                if c.name.startswith(LIMIT_PREFIX)}  # fmt: skip

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def test_a_run_in_two_processes_keeps_to_the_limit_together(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """`--processes 2`: each Dask worker process holds slots of its own from the same limit;
    together they never exceed it, though their budgets (8 + 8) do."""
    agent = start_agent("--latency-ms", "100")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 240, seed=3)
    out = tmp_path / "rollouts.jsonl"
    done = subprocess.run(
        [*_collect(agent, inp, out, 0.4), "--processes", "2", "--chunk-size", "30"],
        env={**os.environ, "PREFECT_API_URL": prefect_api,
             "ROLLOUTS_AGENTS": f'{{"ref": "{agent.url}"}}',
             "ROLLOUTS_AGENT_LIMITS": '{"ref": 5}'},
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert "240/240 written, 0 failed, 0 missing" in done.stdout
    assert [r["_ng_task_index"] for r in read_jsonl(out)] == list(range(240))
    assert _agent_stats(agent)["peak_in_flight"] == 5
    assert len(agent.requests()) == 240
    workers = {orjson.loads(p.read_bytes())["worker"]
               for p in run_dir_for(out, None).glob("chunks/*.status.json")}  # fmt: skip
    assert len(workers) == 2  # both processes collected
