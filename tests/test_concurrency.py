"""Thousands in flight: the limits that stand between a large budget and the agent.

Real processes on 127.0.0.1, short latencies; no timing assertions (bench/concurrency.py
measures). Open-file limits are lowered for the child process only, as a user's shell might
have them.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
from conftest import ROOT, AgentServer
from test_cli_console import assert_one_message, collect, user_env

from rollouts.reference_agent import generate_tasks, write_tasks


def _limit_open_files(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


def test_agent_serves_more_connections_than_its_inherited_soft_limit(tmp_path: Path) -> None:
    """Started with `ulimit -n 256` (hard 4096), the agent still holds 600 requests at once."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts.reference_agent", "--port", "0", "--latency-ms", "1000"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_limit_open_files(256, 4096),
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
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         "+input_jsonl_fpath=tasks.jsonl", "+output_jsonl_fpath=out.jsonl",
         "+num_samples_in_parallel=3000"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        preexec_fn=_limit_open_files(1024, 2048),
    )  # fmt: skip
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
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         "+input_jsonl_fpath=tasks.jsonl", "+output_jsonl_fpath=out.jsonl",
         "+num_samples_in_parallel=2000"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        preexec_fn=_limit_open_files(1024, 4096),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 2000
    failures = tmp_path / "out_failures.jsonl"
    assert not failures.exists() or failures.read_bytes() == b""
    assert len(agent.requests()) == 2000  # no retries: not one connection error
