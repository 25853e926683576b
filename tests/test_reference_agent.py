"""Tests of the reference agent simulator against a real server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import operator
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from reference_agent.server import (
    API_KEY_ENV,
    AgentSimConfig,
    _ReferenceAgent,
    add_serve_agent_arguments,
    build_app,
    config_from_args,
    generate_tasks,
    pass_at_k,
    write_tasks,
)

ROOT = Path(__file__).resolve().parents[1]
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TASKS = [orjson.dumps(row) for row in generate_tasks(400, seed=0)]
T = TypeVar("T")
Scenario = Callable[[aiohttp.ClientSession], Awaitable[T]]


def _row(task: int = 0, rollout: int = 0, temperature: float | None = None, **extra: Any) -> dict:
    """An expanded task row as a collector would POST it."""
    row = orjson.loads(TASKS[task]) | {  # a fresh copy: tests mutate it
        "agent_ref": {"name": "reference"},
        "_ng_task_index": task,
        "_ng_rollout_index": rollout,
    }
    if temperature is not None:
        row["responses_create_params"]["temperature"] = temperature
    return row | extra


def _serve(config: AgentSimConfig, scenario: Scenario[T]) -> T:
    """Run ``scenario`` against an in-process server on a free port of 127.0.0.1."""

    async def main() -> T:
        async with (
            TestServer(build_app(config), host="127.0.0.1") as server,
            aiohttp.ClientSession(base_url=server.make_url("/")) as session,
        ):
            return await scenario(session)

    return asyncio.run(main())


async def _post(
    session: aiohttp.ClientSession, body: Any, path: str = "/run", **kwargs: Any
) -> tuple[int, Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(path, data=data, **kwargs) as resp:
        return resp.status, orjson.loads(await resp.read()), dict(resp.headers)


async def _run_many(session: aiohttp.ClientSession, rows: list[dict]) -> list[dict]:
    results = await asyncio.gather(*(_post(session, row) for row in rows))
    assert all(status == 200 for status, _, _ in results)
    return [body for _, body, _ in results]


def _read_log(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# ---------------------------------------------------------------------------------- tasks


def test_generated_tasks_are_exact_and_deterministic() -> None:
    rows = list(generate_tasks(30, seed=7))
    assert rows == list(generate_tasks(30, seed=7))
    assert rows != list(generate_tasks(30, seed=8))
    for row in rows:
        assert set(row) == {"responses_create_params", "question", "expected_answer"}
        a, op, b = row["question"].split()
        assert row["expected_answer"] == str(OPERATORS[op](int(a), int(b)))
        (message,) = row["responses_create_params"]["input"]
        assert message == {
            "role": "user",
            "content": f"What is {row['question']}? Answer with the number only.",
            "type": "message",
        }
    assert {row["question"].split()[1] for row in rows} == {"+", "-", "*"}


def test_bundled_sample_is_write_tasks_output(tmp_path: Path) -> None:
    out = tmp_path / "sample.jsonl"
    write_tasks(out, 200, seed=0)
    bundled = ROOT / "data" / "sample_arithmetic.jsonl"
    assert bundled.read_bytes() == out.read_bytes()
    lines = out.read_bytes().splitlines()
    assert len(lines) == 200
    assert lines[0] == orjson.dumps(next(generate_tasks(1, seed=0)))


# ---------------------------------------------------------------------------------- /run


def test_run_echoes_row_and_rewards_exact_answers() -> None:
    rows = [_row(task=i, rollout=0, temperature=0.0) for i in range(60)]
    # Same question, but the row claims a wrong expected answer: a correct reply must score 0.
    liar = _row(task=0, rollout=0, temperature=0.0)
    liar["expected_answer"] = str(int(liar["expected_answer"]) + 1000)

    async def scenario(session: aiohttp.ClientSession) -> list[dict]:
        return await _run_many(session, [*rows, liar])

    *results, liar_result = _serve(AgentSimConfig(), scenario)
    for sent, got in zip(rows, results, strict=True):
        for key, value in sent.items():
            assert got[key] == value  # task fields, indices, agent_ref, params: all echoed
        response = got["response"]
        assert response["object"] == "response"
        assert response["status"] == "completed"
        assert response["model"] == "reference-simulator"
        (message,) = response["output"]
        assert message["role"] == "assistant"
        text = message["content"][0]["text"]
        assert message["content"][0]["type"] == "output_text"
        assert got["extracted_answer"] == text
        assert got["reward"] == (1.0 if text == sent["expected_answer"] else 0.0)
        usage = response["usage"]
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    rewards = [got["reward"] for got in results]
    assert 0.0 in rewards and 1.0 in rewards  # p = 0.95: mostly right, deterministically some wrong
    assert liar_result["extracted_answer"] == results[0]["extracted_answer"]
    assert liar_result["reward"] == 0.0


def test_row_without_indices_gets_none_added() -> None:
    row = next(generate_tasks(1))

    async def scenario(session: aiohttp.ClientSession) -> tuple[int, Any, dict[str, str]]:
        return await _post(session, row)

    status, body, _ = _serve(AgentSimConfig(), scenario)
    assert status == 200
    assert not {"_ng_task_index", "_ng_rollout_index", "agent_ref"} & body.keys()
    assert set(body) == set(row) | {"response", "reward", "extracted_answer"}


def test_lower_temperature_gives_higher_mean_reward() -> None:
    def rows(temperature: float) -> list[dict]:
        return [_row(task=i % 50, rollout=i // 50, temperature=temperature) for i in range(300)]

    async def scenario(session: aiohttp.ClientSession) -> tuple[float, float]:
        cold = await _run_many(session, rows(0.0))
        hot = await _run_many(session, rows(1.5))
        return (
            sum(r["reward"] for r in cold) / len(cold),
            sum(r["reward"] for r in hot) / len(hot),
        )

    cold_mean, hot_mean = _serve(AgentSimConfig(), scenario)
    assert cold_mean > 0.85  # p = 0.95
    assert hot_mean < 0.45  # p = 0.275
    assert cold_mean - hot_mean > 0.4


def test_answers_are_deterministic_per_key() -> None:
    rows = [_row(task=i % 20, rollout=i // 20, temperature=1.0) for i in range(100)]

    async def scenario(session: aiohttp.ClientSession) -> list[str]:
        return [r["extracted_answer"] for r in await _run_many(session, rows)]

    first = _serve(AgentSimConfig(seed=1), scenario)
    assert _serve(AgentSimConfig(seed=1), scenario) == first  # fresh server, same answers
    assert _serve(AgentSimConfig(seed=2), scenario) != first  # the seed is part of the key

    async def same_row_twice(session: aiohttp.ClientSession) -> list[str]:
        got = await _run_many(session, [rows[0], rows[0]])
        return [r["response"]["output"][0]["content"][0]["text"] for r in got]

    one, two = _serve(AgentSimConfig(seed=1), same_row_twice)
    assert one == two == first[0]


def test_unknown_create_param_is_422_naming_the_key() -> None:
    row = _row()
    row["responses_create_params"]["seed"] = 3

    async def scenario(session: aiohttp.ClientSession) -> tuple[int, Any, dict[str, str]]:
        return await _post(session, row)

    status, body, _ = _serve(AgentSimConfig(), scenario)
    assert status == 422
    assert "'seed'" in body["error"]
    assert body["detail"][0]["loc"] == ["body", "responses_create_params", "seed"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        ([1, 2], 400),
        ({"question": "1 + 1"}, 422),  # no responses_create_params
        ({"responses_create_params": "hi"}, 422),
        ({"responses_create_params": {"temperature": 0.5}}, 422),  # no input
        ({"responses_create_params": {"input": "What is 1 + 1?", "temperature": "hot"}}, 422),
    ],
)
def test_invalid_bodies(body: Any, status: int) -> None:
    async def scenario(session: aiohttp.ClientSession) -> tuple[int, Any, dict[str, str]]:
        return await _post(session, body)

    got, payload, _ = _serve(AgentSimConfig(), scenario)
    assert got == status
    assert "error" in payload


def test_string_input_is_the_user_message() -> None:
    row = {"responses_create_params": {"input": "What is 6 * 7?"}, "expected_answer": "42"}

    async def scenario(session: aiohttp.ClientSession) -> list[dict]:
        return await _run_many(
            session, [row | {"_ng_task_index": 0, "_ng_rollout_index": r} for r in range(20)]
        )

    results = _serve(AgentSimConfig(), scenario)
    assert any(r["reward"] == 1.0 and r["extracted_answer"] == "42" for r in results)


# ---------------------------------------------------------------------------------- auth, log


def test_api_key_enforced_and_never_logged(tmp_path: Path) -> None:
    key = "s3cret-key-value"
    log = tmp_path / "requests.jsonl"
    config = AgentSimConfig(api_key=key, request_log=log)
    assert key not in repr(config)

    async def scenario(session: aiohttp.ClientSession) -> list[int]:
        statuses = []
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {key}"}):
            status, _, _ = await _post(session, _row(), headers=headers)
            statuses.append(status)
        metrics_status, _, _ = await _post(
            session, {"verify_responses": []}, path="/aggregate_metrics"
        )
        async with session.get("/health") as resp:  # probes need no key
            statuses += [metrics_status, resp.status]
        return statuses

    assert _serve(config, scenario) == [401, 401, 200, 401, 200]
    assert key not in log.read_text()
    entries = _read_log(log)
    assert [(e["outcome"], e["authorized"]) for e in entries] == [
        ("401", False),
        ("401", False),
        ("ok", True),
    ]


def test_basic_auth_enforced_and_only_the_user_logged(tmp_path: Path) -> None:
    """As a basic-auth proxy in front of an agent: the right USER:PASSWORD opens /run."""
    password = "pr0xy-s3cret"
    log = tmp_path / "requests.jsonl"
    config = AgentSimConfig(basic_auth=f"alice:{password}", request_log=log)
    assert password not in repr(config)

    def basic(credentials: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

    async def scenario(session: aiohttp.ClientSession) -> list[int]:
        statuses = []
        for headers in ({}, basic("alice:wrong"), {"Authorization": f"Bearer {password}"},
                        basic(f"alice:{password}")):  # fmt: skip
            status, _, _ = await _post(session, _row(), headers=headers)
            statuses.append(status)
        return statuses

    assert _serve(config, scenario) == [401, 401, 401, 200]
    assert password not in log.read_text()
    assert [(e["outcome"], e["authorized"], e["auth"]) for e in _read_log(log)] == [
        ("401", False, None),
        ("401", False, "Basic alice"),
        ("401", False, "Bearer"),
        ("ok", True, "Basic alice"),
    ]


def test_request_log_has_one_line_per_request(tmp_path: Path) -> None:
    log = tmp_path / "sub" / "requests.jsonl"
    config = AgentSimConfig(request_log=log, fail_400_tasks=frozenset({5}))
    bad = _row(task=1)
    bad["responses_create_params"]["seed"] = 1
    sent = [_row(task=0, rollout=3, temperature=0.25), _row(task=5), bad, _row(task=2)]

    async def scenario(session: aiohttp.ClientSession) -> list[int]:
        statuses = []
        for row in sent:
            status, _, _ = await _post(session, row)
            statuses.append(status)
            assert len(_read_log(log)) == len(statuses)  # flushed while the server runs
        return statuses

    assert _serve(config, scenario) == [200, 400, 422, 200]
    entries = _read_log(log)
    assert [e["outcome"] for e in entries] == ["ok", "400", "422", "ok"]
    assert entries[0] == {
        "time": entries[0]["time"],
        "_ng_task_index": 0,
        "_ng_rollout_index": 3,
        "temperature": 0.25,
        "outcome": "ok",
        "authorized": True,
        "auth": None,
    }
    assert entries[3]["temperature"] == 1.0  # the default the policy used
    assert abs(entries[0]["time"] - time.time()) < 60


# ---------------------------------------------------------------------------------- faults


def test_fail_400_tasks() -> None:
    async def scenario(session: aiohttp.ClientSession) -> list[int]:
        results = [await _post(session, _row(task=t, rollout=r)) for t in (3, 4) for r in (0, 1)]
        return [status for status, _, _ in results]

    assert _serve(AgentSimConfig(fail_400_tasks=frozenset({3})), scenario) == [400, 400, 200, 200]


def test_p_500_and_p_429() -> None:
    async def scenario(session: aiohttp.ClientSession) -> tuple[int, Any, dict[str, str]]:
        return await _post(session, _row())

    status, body, _ = _serve(AgentSimConfig(p_500=1.0), scenario)
    assert status == 500 and "error" in body
    status, _, headers = _serve(AgentSimConfig(p_429=1.0, retry_after_s=2.0), scenario)
    assert status == 429
    assert headers["Retry-After"] == "2"


def test_fault_rates_are_marginal() -> None:
    rows = [_row(task=i) for i in range(400)]

    async def scenario(session: aiohttp.ClientSession) -> list[int]:
        results = await asyncio.gather(*(_post(session, row) for row in rows))
        return [status for status, _, _ in results]

    statuses = _serve(AgentSimConfig(p_500=0.25, p_429=0.25), scenario)
    assert 60 < statuses.count(500) < 140
    assert 60 < statuses.count(429) < 140
    assert statuses.count(200) + statuses.count(500) + statuses.count(429) == 400


def test_p_reset_drops_the_connection(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"

    async def scenario(session: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ClientConnectionError):
            await _post(session, _row())

    _serve(AgentSimConfig(p_reset=1.0, request_log=log), scenario)
    assert [e["outcome"] for e in _read_log(log)] == ["reset"]


def test_p_hang_delays_the_answer(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"

    async def scenario(session: aiohttp.ClientSession) -> tuple[int, float]:
        start = time.perf_counter()
        status, _, _ = await _post(session, _row())
        return status, time.perf_counter() - start

    status, elapsed = _serve(AgentSimConfig(p_hang=1.0, hang_s=0.2, request_log=log), scenario)
    assert status == 200 and elapsed >= 0.2
    assert [e["outcome"] for e in _read_log(log)] == ["hang"]


def test_latency_fixed_and_lognormal() -> None:
    async def scenario(session: aiohttp.ClientSession) -> float:
        start = time.perf_counter()
        await _run_many(session, [_row(task=i) for i in range(20)])  # concurrent: one delay
        return time.perf_counter() - start

    assert 0.1 <= _serve(AgentSimConfig(latency_s=0.1), scenario) < 2.0
    agent = _ReferenceAgent(AgentSimConfig(latency_s=0.05, latency_sigma=0.8))
    draws = sorted(agent._latency() for _ in range(2001))
    assert draws[1000] == pytest.approx(0.05, rel=0.15)  # median latency_s
    assert draws[0] < 0.03 and draws[-1] > 0.1  # and actually spread


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="exceed 1"):
        AgentSimConfig(p_500=0.6, p_reset=0.6)
    with pytest.raises(ValueError, match="p_hang"):
        AgentSimConfig(p_hang=1.5)


# ---------------------------------------------------------------------------------- metrics


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0


def test_aggregate_metrics_hand_computed() -> None:
    def rows(rewards_by_task: dict[int, list[float]]) -> list[dict]:
        return [
            {"_ng_task_index": task, "_ng_rollout_index": i, "reward": reward}
            for task, rewards in rewards_by_task.items()
            for i, reward in enumerate(rewards)
        ]

    async def scenario(session: aiohttp.ClientSession) -> list[Any]:
        uniform = rows({0: [1, 0, 0, 0], 1: [0, 0, 0, 0], 2: [1, 1, 0, 0]})
        ragged = rows({0: [1, 0], 1: [0, 0, 1]})
        out = []
        for payload in (uniform, ragged, []):
            status, body, _ = await _post(
                session, {"verify_responses": payload}, path="/aggregate_metrics"
            )
            assert status == 200
            out.append(body)
        status, _, _ = await _post(session, {"rows": []}, path="/aggregate_metrics")
        out.append(status)
        return out

    uniform, ragged, empty, bad_status = _serve(AgentSimConfig(), scenario)
    # k = 4: pass@4 per task is 1, 0, 1; pass@1 per task is 1/4, 0, 2/4.
    assert uniform == {
        "mean/reward": pytest.approx(3 / 12),
        "num_rollouts": 12,
        "pass@1": pytest.approx(0.25),
        "pass@k": pytest.approx(2 / 3),
    }
    # k = 2 (smallest group): task 0 -> 1 - C(1,2)/C(2,2) = 1; task 1 -> 1 - C(2,2)/C(3,2) = 2/3.
    assert ragged == {
        "mean/reward": pytest.approx(2 / 5),
        "num_rollouts": 5,
        "pass@1": pytest.approx((1 / 2 + 1 / 3) / 2),
        "pass@k": pytest.approx((1 + 2 / 3) / 2),
    }
    assert empty == {"mean/reward": None, "num_rollouts": 0, "pass@1": None, "pass@k": None}
    assert bad_status == 400


# ---------------------------------------------------------------------------------- CLI


def test_cli_flags_build_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_serve_agent_arguments(parser)
    defaults = parser.parse_args([])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8765)
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = parser.parse_args(
        shlex.split(
            "--port 0 --latency-ms 250 --latency-sigma 0.5 --seed 9 --request-log r.jsonl "
            "--p-500 0.1 --p-429 0.2 --retry-after-s 3 --p-reset 0.05 --p-hang 0.01 --hang-s 7 "
            "--fail-400-tasks 3,17,42 --crash-after 5"
        )
    )
    config = config_from_args(args)
    assert config == AgentSimConfig(
        latency_s=0.25,
        latency_sigma=0.5,
        seed=9,
        request_log=Path("r.jsonl"),
        api_key="from-env",
        p_500=0.1,
        p_429=0.2,
        retry_after_s=3.0,
        p_reset=0.05,
        p_hang=0.01,
        hang_s=7.0,
        fail_400_tasks=frozenset({3, 17, 42}),
        crash_after=5,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--p-500", "2"])


def _start_agent(*flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference_agent", "--port", "0", *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    prefix = "reference agent listening on http://127.0.0.1:"
    assert line.startswith(prefix), line
    assert int(line.removeprefix(prefix)) > 0  # the real port, not 0
    return proc, line.rsplit(" ", 1)[1]


def test_subprocess_crash_after_two_requests_exits_3(tmp_path: Path) -> None:
    """--crash-after 2: requests 1 and 2 are answered; receiving request 3 exits with code 3."""
    log = tmp_path / "requests.jsonl"
    proc, url = _start_agent("--crash-after", "2", "--request-log", str(log))

    async def client() -> list[int | str]:
        outcomes: list[int | str] = []
        async with aiohttp.ClientSession(base_url=url) as session:
            for rollout in range(3):
                try:
                    status, _, _ = await _post(session, _row(rollout=rollout))
                    outcomes.append(status)
                except aiohttp.ClientConnectionError:
                    outcomes.append("connection error")
        return outcomes

    try:
        assert asyncio.run(client()) == [200, 200, "connection error"]
        assert proc.wait(timeout=10) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [e["outcome"] for e in _read_log(log)] == ["ok", "ok", "crash"]


def test_subprocess_api_key_from_env_and_clean_sigterm(tmp_path: Path) -> None:
    key = "env-only-secret"
    log = tmp_path / "requests.jsonl"
    proc, url = _start_agent("--request-log", str(log), env={API_KEY_ENV: key})

    async def client() -> list[int]:
        async with aiohttp.ClientSession(base_url=url) as session:
            denied, _, _ = await _post(session, _row())
            allowed, _, _ = await _post(session, _row(), headers={"Authorization": f"Bearer {key}"})
            return [denied, allowed]

    try:
        assert asyncio.run(client()) == [401, 200]
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert key not in stdout + stderr + log.read_text()
    assert [e["authorized"] for e in _read_log(log)] == [False, True]
