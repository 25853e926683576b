"""Thousands in flight: the limits that stand between a large budget and the agent.

Real processes on 127.0.0.1, short latencies; no timing assertions (bench/concurrency.py
measures). Open-file limits are lowered for the child process only, as a user's shell might
have them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import orjson
import pytest
from conftest import ROOT, AgentServer
from test_cli_console import assert_one_message, user_env

from reference_agent.server import generate_tasks, write_tasks
from rollouts.agent_client import AgentClient, RetryPolicy
from rollouts.collect import Dispatcher
from rollouts.dispatchers import open_dispatcher
from rollouts.gctune import IN_FLIGHT_THRESHOLDS
from rollouts.settings import RolloutsSettings


def _with_open_files(soft: int, hard: int, argv: list[str]) -> list[str]:
    """``argv`` run from a shell whose `ulimit -n` is ``soft`` (hard ``hard``), as a user's."""
    return ["bash", "-c", f'ulimit -Sn {soft} && ulimit -Hn {hard} && exec "$@"', "bash", *argv]


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_agent_serves_more_connections_than_its_inherited_soft_limit(tmp_path: Path) -> None:
    """Started with `ulimit -n 256` (hard 4096), the agent still holds 600 requests at once."""
    argv = [sys.executable, "-m", "reference_agent", "--port", "0", "--latency-ms", "1000"]
    proc = subprocess.Popen(
        _with_open_files(256, 4096, argv), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
        assert _open_files_limit(proc.pid) == (4096, 4096)
        body = orjson.dumps(next(iter(generate_tasks(1))) | {"_ng_task_index": 0})

        async def burst() -> tuple[list[int], dict]:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(url, connector=connector) as session:

                async def one() -> int:
                    async with session.post("/run", data=body) as resp:
                        await resp.read()
                        return resp.status

                statuses = await asyncio.gather(*(one() for _ in range(600)))
                async with session.get("/stats") as resp:
                    return statuses, await resp.json()

        statuses, stats = asyncio.run(burst())
        assert statuses == [200] * 600
        assert stats["peak_in_flight"] == 600  # every one was accepted and held at once
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "Too many open files" not in stderr


def test_budget_over_the_open_file_limit_is_refused_before_anything_is_sent(
    tmp_path: Path, agent: AgentServer, prefect_api: str
) -> None:
    write_tasks(tmp_path / "tasks.jsonl", 10)
    env = user_env(prefect_api, tmp_path / "home")
    argv = [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
            "+input_jsonl_fpath=tasks.jsonl", "+output_jsonl_fpath=out.jsonl",
            "+num_samples_in_parallel=3000"]  # fmt: skip
    res = subprocess.run(_with_open_files(1024, 2048, argv), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    message = assert_one_message(res, 2)
    assert "3000 requests in flight" in message and "at most 2048" in message, message
    assert "num_samples_in_parallel to at most 1792" in message
    assert agent.requests() == []


def test_raising_the_soft_limit_lets_a_budget_past_it_complete(
    tmp_path: Path, start_agent: Callable[..., AgentServer], prefect_api: str
) -> None:
    """`ulimit -n 1024` (hard 4096) and 2,000 in flight: every rollout written, none failed."""
    agent = start_agent("--latency-ms", "1500")
    write_tasks(tmp_path / "tasks.jsonl", 2000)
    env = user_env(prefect_api, tmp_path / "home")
    argv = [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
            "+input_jsonl_fpath=tasks.jsonl", "+output_jsonl_fpath=out.jsonl",
            "+num_samples_in_parallel=2000"]  # fmt: skip
    res = subprocess.run(_with_open_files(1024, 4096, argv), env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 2000
    failures = tmp_path / "out_failures.jsonl"
    assert not failures.exists() or failures.read_bytes() == b""
    assert len(agent.requests()) == 2000  # no retries: not one connection error


@pytest.mark.fast
def test_dispatchers_restore_the_gc_thresholds_once_the_last_one_closes() -> None:
    """Collection tunes the collector for thousands in flight; a process embedding it (a
    notebook, a Dask worker) gets its own thresholds back afterwards."""
    before = gc.get_threshold()

    async def scenario() -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        Dispatcher(RetryPolicy(), 8, None, None)  # building one alone changes nothing
        alone = gc.get_threshold()
        settings = RolloutsSettings()
        async with open_dispatcher(settings, 8, None), open_dispatcher(settings, 8, None):
            during = gc.get_threshold()
            async with open_dispatcher(settings, 8, None):
                pass
            still = gc.get_threshold()
        return alone, during, still

    alone, during, still = asyncio.run(scenario())
    assert alone == before
    assert during == still == IN_FLIGHT_THRESHOLDS != before
    assert gc.get_threshold() == before


@pytest.mark.fast
def test_a_dispatcher_opened_with_a_transport_sends_through_it() -> None:
    seen: list[str] = []

    def agent(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, content=b'{"reward": 1.0}')

    async def scenario() -> str | None:
        transport = httpx.MockTransport(agent)
        async with open_dispatcher(RolloutsSettings(), 8, None, transport=transport) as d:
            return (await d.client.run("http://agent.test/run", b"{}")).failure_class

    assert asyncio.run(scenario()) is None
    assert seen == ["http://agent.test/run"]


@pytest.mark.fast
def test_answers_are_freed_when_their_rollout_ends_not_at_a_gc_pass() -> None:
    """Thousands in flight make every cyclic-GC pass expensive: a finished rollout must leave
    no reference cycle (httpx binds each answer to its stream) holding its answer's body."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"reward": 1.0, "echo": request.content.decode()})

    async def scenario() -> None:
        client = AgentClient(RetryPolicy(), 16, transport=httpx.MockTransport(answer))
        await client.run("http://agent/run", b"{}")  # the client's own objects exist now
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a pass would free, to look at it
        try:
            outcomes = await asyncio.gather(
                *(client.run("http://agent/run", b'{"i": %d}' % i) for i in range(200))
            )
            assert all(o.kind == "ok" for o in outcomes)
            del outcomes
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, httpx.Response | httpx.Request)]
            assert left == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            await client.aclose()

    asyncio.run(scenario())
