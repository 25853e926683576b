"""What a user sees: the whole console output of `rollouts collect` for each kind of failure.

The command runs as a user runs it: a subprocess with none of the test session's PREFECT_* or
ROLLOUTS_* settings, against a running Prefect server (the session's). Each failure the user or
the world caused is one message, with the right exit status, and no traceback.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import RUN_PAGE, AgentServer

from reference_agent.server import write_tasks


def user_env(prefect_api: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ROLLOUTS_"))}
    return {**env, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home), **extra}


def collect(
    env: dict[str, str], cwd: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    return res, time.monotonic() - start


def assert_one_message(res: subprocess.CompletedProcess[str], exit_code: int) -> str:
    """Exactly one `rollouts collect: ...` message on stderr, nothing on stdout, no traceback;
    returns the message. Before it, once the flow run started, only its page in the UI."""
    assert res.returncode == exit_code, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stdout == ""
    page = RUN_PAGE.match(res.stderr)
    stderr = res.stderr[page.end() :] if page else res.stderr
    assert stderr.startswith("rollouts collect: "), res.stderr
    assert stderr.count("rollouts collect: ") == 1, res.stderr
    return stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_bad_input_is_one_message_naming_file_line_and_problem(
    tmp_path: Path, agent: AgentServer, prefect_api: str
) -> None:
    inp = tmp_path / "tasks.jsonl"
    inp.write_bytes(b'{"responses_create_params": {"input": "hi"}}\n{"bad": "\xff"}\n')
    res, _ = collect(user_env(prefect_api, tmp_path / "home"), tmp_path,
                     f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     "+output_jsonl_fpath=out.jsonl")  # fmt: skip

    message = assert_one_message(res, 2)
    assert message == (
        f"rollouts collect: invalid input {inp} (1 problem); nothing was sent to the agent:\n"
        f"  {inp}:2: not valid UTF-8 (byte 9 of the line)\n"
    )
    assert agent.requests() == []


def test_unknown_agent_is_one_line_saying_how_to_name_it(
    tmp_path: Path, prefect_api: str
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 5)
    res, _ = collect(user_env(prefect_api, tmp_path / "home"), tmp_path, "+agent_name=my_agent",
                     f"+input_jsonl_fpath={inp}", "+output_jsonl_fpath=out.jsonl")  # fmt: skip

    message = assert_one_message(res, 2)
    assert message.splitlines() == [
        "rollouts collect: unknown agent 'my_agent': set "
        'ROLLOUTS_AGENTS=\'{"my_agent": "http://host:port"}\', point ROLLOUTS_HEAD_SERVER_URL at '
        "a NeMo Gym head server, or pass agent_url"
    ]


def test_unreachable_agent_is_refused_within_seconds_naming_host_port_and_cause(
    tmp_path: Path, prefect_api: str
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 5)
    port = free_port()  # nothing listens there
    env = user_env(prefect_api, tmp_path / "home",
                   ROLLOUTS_AGENTS=f'{{"my_agent": "http://127.0.0.1:{port}"}}')  # fmt: skip
    for how in ("+agent_name=my_agent", f"+agent_url=http://127.0.0.1:{port}"):
        res, took = collect(env, tmp_path, how, f"+input_jsonl_fpath={inp}",
                            "+output_jsonl_fpath=out.jsonl")  # fmt: skip

        message = assert_one_message(res, 1)
        assert took < 10, f"refused after {took:.1f} s"
        assert len(message.splitlines()) == 1
        assert f"127.0.0.1:{port}: connection refused" in message
        assert "nothing was sent" in message
    assert not (tmp_path / "out.jsonl").exists()


def test_an_agent_refusing_mid_run_ends_in_one_message_naming_its_url_and_errors(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    # 5xx for every request: the rollouts exhaust their attempts, the chunk its retries.
    agent = start_agent("--p-500", "1")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 6)
    env = user_env(prefect_api, tmp_path / "home", ROLLOUTS_MAX_ATTEMPTS="2",
                   ROLLOUTS_CHUNK_RETRIES="1", ROLLOUTS_CHUNK_RETRY_DELAY_S="0",
                   ROLLOUTS_BACKOFF_BASE_S="0.01",
                   ROLLOUTS_AGENTS=f'{{"my_agent": "{agent.url}"}}')  # fmt: skip
    res, _ = collect(env, tmp_path, "+agent_name=my_agent", f"+input_jsonl_fpath={inp}",
                     "+output_jsonl_fpath=out.jsonl")  # fmt: skip

    message = assert_one_message(res, 1)
    assert len(message.splitlines()) == 1
    assert "6 of 6 rollouts are neither written nor failed for good" in message
    assert re.search(
        rf"http_500: 6 \(e\.g\. agent 'my_agent' at {re.escape(agent.url)}: gave up after 2 "
        r"attempts: HTTP 500",
        message,
    ), message
    assert "Rerun the same command" in message
    assert len(agent.requests()) == 6 * 2 * 2  # attempts x chunk tries, then it stopped


def test_an_agent_that_dies_mid_run_is_named_with_its_connection_error(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--crash-after", "10")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 30)
    env = user_env(prefect_api, tmp_path / "home", ROLLOUTS_MAX_ATTEMPTS="2",
                   ROLLOUTS_CHUNK_RETRIES="0", ROLLOUTS_BACKOFF_BASE_S="0.01")  # fmt: skip
    res, _ = collect(env, tmp_path, f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     "+output_jsonl_fpath=out.jsonl", "+num_samples_in_parallel=2")  # fmt: skip

    message = assert_one_message(res, 1)
    assert "rollouts are neither written nor failed for good" in message
    host_port = agent.url.removeprefix("http://")
    assert re.search(rf"connection_error: \d+ \(e\.g\. agent {re.escape(agent.url)}: ", message)
    assert host_port in message.split("connection_error", 1)[1]


def test_a_healthy_run_prints_its_summary_and_no_error_or_warning(
    tmp_path: Path, agent: AgentServer, prefect_api: str
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 20)
    res, _ = collect(user_env(prefect_api, tmp_path / "home"), tmp_path,
                     f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}",
                     "+output_jsonl_fpath=out.jsonl", "+num_repeats=2")  # fmt: skip

    assert res.returncode == 0, res.stderr
    assert RUN_PAGE.fullmatch(res.stderr), res.stderr  # the run's page, and nothing else
    assert "40/40 written, 0 failed, 0 missing; 0/1 chunks from cache" in res.stdout
    assert not re.search(r"ERROR|WARNING|Traceback", res.stdout)


def test_the_run_logs_of_a_failed_run_hold_its_message_and_no_traceback(
    tmp_path: Path, start_agent: Any, monkeypatch: Any
) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.collect import collect_rollouts

    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", "1")
    broken = start_agent("--p-500", "1")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"responses_create_params": 3}\n')
    good = tmp_path / "good.jsonl"
    write_tasks(good, 3)

    async def logs_of(**params: Any) -> tuple[Any, list[str]]:
        state = await collect_rollouts(**params, return_state=True)
        by_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        async with get_client() as client:
            for _ in range(100):  # logs reach the API in batches
                logs = await client.read_logs(log_filter=by_run)
                if any("Finished in state" in log.message for log in logs):
                    break
                await asyncio.sleep(0.1)
        return state, [log.message for log in logs]

    for params, words in (
        ({"input_jsonl_fpath": str(bad)}, "field 'responses_create_params' must be an object"),
        ({"input_jsonl_fpath": str(good)}, "3 of 3 rollouts are neither written nor failed"),
    ):
        state, messages = asyncio.run(logs_of(agent_url=broken.url, output_jsonl_fpath=str(
            tmp_path / f"out{len(words)}.jsonl"), **params))  # fmt: skip
        assert state.is_failed() and words in state.message
        assert any(words in m for m in messages), messages
        assert not [m for m in messages if "Traceback" in m or "NoneType: None" in m], messages


def test_a_prefect_api_url_where_no_server_answers_is_one_line_not_a_traceback(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 3)
    api = f"http://127.0.0.1:{free_port()}/api"
    res, took = collect(user_env(api, tmp_path / "home"), tmp_path, f"+agent_url={agent.url}",
                        f"+input_jsonl_fpath={inp}", "+output_jsonl_fpath=out.jsonl")  # fmt: skip

    message = assert_one_message(res, 2)
    assert message.splitlines() == [
        f"rollouts collect: no Prefect server answers at PREFECT_API_URL={api} (connection "
        "refused). Start it (`make server`), or unset PREFECT_API_URL to run with a temporary "
        "local API."
    ]
    assert took < 10 and agent.requests() == []
