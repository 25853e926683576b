"""The in-flight limit and the adaptive controller, against a simulated agent in this loop.

The simulated agent has the reference agent's capacity model: latency grows in proportion once
more than K requests are in flight; above ``reject_above`` it answers 429 at once. The closed-loop
tests run the controller in real time for 4-6 s each, so they are not in the fast tier.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import AgentServer, read_jsonl

from reference_agent.capacity import ProcessorSharing
from reference_agent.server import generate_tasks, write_tasks
from rollouts.concurrency import AdaptiveConcurrency, InFlightLimit


@dataclass
class SimulatedAgent:
    """The reference agent's capacity model (processor sharing), in this event loop."""

    capacity: int
    latency_s: float
    reject_above: int | None = None
    answered: int = 0
    rejected: int = 0
    latency_scale: float = 1.0
    server: ProcessorSharing = field(init=False)

    def __post_init__(self) -> None:
        self.server = ProcessorSharing(self.capacity)

    async def run(self) -> str | None:
        """One request: None when answered, else its failure class."""
        if self.reject_above is not None and self.server.in_service >= self.reject_above:
            self.rejected += 1
            return "rate_limited"
        await self.server.serve(self.latency_s * self.latency_scale)
        self.answered += 1
        return None


async def drive(
    agent: SimulatedAgent, controller: AdaptiveConcurrency, seconds: float,
    during: Callable[[float], None] = lambda t: None,
) -> list[tuple[float, int]]:  # fmt: skip
    """Keep the limit's worth of requests going for ``seconds``; (elapsed, limit) samples."""
    places = controller.places
    start = time.monotonic()
    samples: list[tuple[float, int]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        t0, sent = time.monotonic(), controller.sent()
        try:
            failure = await agent.run()
        finally:
            places.release()
        controller.observe(sent, time.monotonic() - t0, failure)
        if failure is not None:
            await asyncio.sleep(0.005)

    while (elapsed := time.monotonic() - start) < seconds:
        during(elapsed)
        await places.acquire()
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        if not samples or samples[-1][1] != places.limit:
            samples.append((elapsed, places.limit))
    await asyncio.gather(*tasks)
    return samples


def limits_after(samples: list[tuple[float, int]], t0: float, t1: float) -> list[int]:
    return [limit for t, limit in samples if t0 <= t < t1]


def settled_limit(samples: list[tuple[float, int]], t0: float, t1: float) -> float:
    """The limit in force over [t0, t1), weighted by time."""
    total, weighted = 0.0, 0.0
    for (t, limit), (t_next, _) in zip(samples, [*samples[1:], (t1, 0)], strict=True):
        a, b = max(t, t0), min(t_next, t1)
        if b > a:
            total += b - a
            weighted += (b - a) * limit
    return weighted / total


def test_the_limit_finds_the_agents_capacity_and_follows_it_when_it_halves() -> None:
    agent = SimulatedAgent(capacity=64, latency_s=0.02)
    controller = AdaptiveConcurrency(InFlightLimit(1), ceiling=1024)

    def halve_at_3s(elapsed: float) -> None:
        if elapsed >= 3.0:
            agent.server.set_capacity(32)

    samples = asyncio.run(drive(agent, controller, 6.0, halve_at_3s))

    # Near the load where throughput stops growing: at least K (full throughput), and not far
    # above it (latency stays near the unloaded one).
    assert 64 <= settled_limit(samples, 1.5, 3.0) <= 64 * 1.5, samples
    assert 32 <= settled_limit(samples, 4.5, 6.0) <= 32 * 1.6, samples


def test_429s_halve_the_limit_and_stay_rare() -> None:
    agent = SimulatedAgent(capacity=1000, latency_s=0.02, reject_above=48)
    controller = AdaptiveConcurrency(InFlightLimit(1), ceiling=1024)

    samples = asyncio.run(drive(agent, controller, 4.0))

    assert agent.rejected <= 0.01 * (agent.answered + agent.rejected), (agent, samples)
    assert max(limits_after(samples, 2.0, 4.0)) <= 64


def test_latency_that_does_not_follow_load_does_not_starve_the_agent() -> None:
    """Harder tasks later in a dataset take longer at any load: that is no reason to send
    fewer of them."""
    agent = SimulatedAgent(capacity=10_000, latency_s=0.02)
    controller = AdaptiveConcurrency(InFlightLimit(1), ceiling=64)

    def slower_tasks_at_2s(elapsed: float) -> None:
        if elapsed >= 2.0:
            agent.latency_scale = 3.0

    samples = asyncio.run(drive(agent, controller, 5.0, slower_tasks_at_2s))

    assert settled_limit(samples, 1.0, 2.0) >= 56, samples
    assert settled_limit(samples, 4.0, 5.0) >= 48, samples


@pytest.mark.fast
def test_a_smaller_limit_takes_effect_as_places_are_released() -> None:
    async def go() -> list[int]:
        places = InFlightLimit(4)
        for _ in range(4):
            await places.acquire()
        places.set_limit(2)
        waiter = asyncio.create_task(places.acquire())
        seen = []
        for _ in range(3):
            places.release()
            await asyncio.sleep(0)
            seen.append(places.in_use)
        assert waiter.done()
        return seen

    # 4 taken; limit 2: releases bring it to 3, then 2, then the waiter gets the third place back
    assert asyncio.run(go()) == [3, 2, 2]


@pytest.mark.fast
def test_a_cancelled_waiter_gives_back_the_place_it_was_granted() -> None:
    async def go() -> int:
        places = InFlightLimit(1)
        await places.acquire()
        waiter = asyncio.create_task(places.acquire())
        await asyncio.sleep(0)
        places.release()  # granted to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(waiter, return_exceptions=True)
        return places.in_use

    assert asyncio.run(go()) == 0


@pytest.mark.fast
def test_processor_sharing_serves_capacity_at_full_speed_and_shares_above_it() -> None:
    async def finish_times(n: int, capacity: int, work_s: float) -> list[float]:
        server = ProcessorSharing(capacity)
        start = time.monotonic()

        async def one() -> float:
            await server.serve(work_s)
            return time.monotonic() - start

        return list(await asyncio.gather(*(one() for _ in range(n))))

    # 2 at full speed: 0.1 s each; 4 sharing 2: each at half speed, 0.2 s
    assert all(0.09 < t < 0.15 for t in asyncio.run(finish_times(2, 2, 0.1)))
    assert all(0.19 < t < 0.25 for t in asyncio.run(finish_times(4, 2, 0.1)))


@pytest.mark.fast
def test_halving_capacity_mid_request_slows_what_is_left() -> None:
    async def go() -> float:
        server = ProcessorSharing(2)
        start = time.monotonic()
        tasks = [asyncio.create_task(server.serve(0.2)) for _ in range(2)]
        await asyncio.sleep(0.1)  # half done at full speed
        server.set_capacity(1)  # the other half at half speed: 0.2 s more
        await asyncio.gather(*tasks)
        return time.monotonic() - start

    assert 0.28 < asyncio.run(go()) < 0.36


def test_the_reference_agent_rejects_above_its_limit_and_slows_above_capacity(
    start_agent: Callable[..., AgentServer],
) -> None:
    agent = start_agent("--latency-ms", "200", "--capacity", "2", "--reject-above", "3",
                        "--retry-after-s", "0.5")  # fmt: skip

    async def go() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=10) as http:

            async def one(i: int) -> tuple[int, float]:
                t0 = time.monotonic()
                r = await http.post(f"{agent.url}/run", json=list(generate_tasks(4))[i])
                return r.status_code, time.monotonic() - t0

            return list(await asyncio.gather(*(one(i) for i in range(4))))

    answers = sorted(asyncio.run(go()))
    assert [status for status, _ in answers] == [200, 200, 200, 429]
    # three in service sharing a capacity of two: 200 ms of work takes about 300 ms
    assert all(0.27 < seconds < 0.6 for status, seconds in answers if status == 200)


def test_auto_finds_a_capacity_limited_agents_load_through_the_command(
    tmp_path: Path, start_agent: Callable[..., AgentServer], prefect_api: str
) -> None:
    """With `auto` and a ceiling far above the agent's capacity (8), the run never holds more
    than about twice that in flight (slow start's last step), draws no 429 from an agent that
    refuses above 24, and writes every rollout once."""
    agent = start_agent("--latency-ms", "40", "--capacity", "8", "--reject-above", "24")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 600, seed=11)
    out = tmp_path / "rollouts.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", "+chunk_size=200",
         "--num-samples-in-parallel", "auto", "--max-in-flight", "256"],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=tmp_path,
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["_ng_task_index"] for r in read_jsonl(out)] == list(range(600))
    outcomes = [q["outcome"] for q in agent.requests()]
    assert outcomes.count("429") == 0 and len(outcomes) == 600
    peak = httpx.get(f"{agent.url}/stats").json()["peak_in_flight"]
    assert 8 <= peak <= 16
