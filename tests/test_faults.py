"""Faults: every fault the reference agent can inject, against the real flow.

For each fault a user checks the same things: every rollout is either written or, when it can
never succeed, in the failures file with its class; no key twice; every line of every file
parses; failures never count as reward; retries stay within the budget; and the flow state,
the summary and the CLI's exit code say whether the run is complete.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import AgentServer
from prefect.states import State

from flows.collect import CollectSummary, collect_rollouts
from reference_agent.server import FAILURE_CLASS, write_tasks
from rollouts.agent_client import AgentClient, RetryPolicy
from rollouts.errors import IncompleteRun
from rollouts.run_state import OutputPaths, run_dir_for

Key = tuple[int, int]


def run_collect(**params: Any) -> State:
    return asyncio.run(collect_rollouts(**params, return_state=True))


def budget(monkeypatch: pytest.MonkeyPatch, attempts: int, chunk_retries: int, **more: str) -> int:
    """Set the retry settings; return the most requests one rollout may cost."""
    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", str(attempts))
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", str(chunk_retries))
    for k, v in more.items():
        monkeypatch.setenv(f"ROLLOUTS_{k.upper()}", v)
    return attempts * (1 + chunk_retries)


def requests_per_key(*agents: AgentServer) -> Counter[Key]:
    return Counter(
        (q["_ng_task_index"], q["_ng_rollout_index"]) for a in agents for q in a.requests()
    )


def parse_every_line(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file we wrote parses and is complete (no torn line)."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"{path} ends in a torn line"
    return [orjson.loads(line) for line in data.splitlines()]


def check_files(
    out: Path, expected: set[Key], per_key: Counter[Key], max_requests: int
) -> tuple[dict[Key, dict[str, Any]], dict[Key, dict[str, Any]]]:
    """The invariants every fault must keep; returns (rollouts, failures) by key."""
    paths = OutputPaths.for_output(out)
    rows = parse_every_line(paths.rollouts)
    fails = parse_every_line(paths.failures)
    for p in (run_dir_for(out, None) / "chunks").glob("*.jsonl"):
        parse_every_line(p)
    rkeys = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]
    fkeys = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in fails]
    assert rkeys == sorted(rkeys) and len(set(rkeys)) == len(rkeys), "duplicate or unsorted"
    assert len(set(fkeys)) == len(fkeys), "a key twice in the failures file"
    assert not set(rkeys) & set(fkeys), "a key both written and failed"
    assert set(rkeys) | set(fkeys) <= expected
    for r in rows:  # nothing that failed was written as a rollout
        assert r.get("_ng_failure_class") is None and not r.get("_ng_no_persist")
    for f in fails:
        assert isinstance(f["_ng_failure_class"], str) and f["_ng_failure_class"]
    # retries stay within the budget: attempts per rollout x (1 + chunk retries)
    assert max(per_key.values()) <= max_requests, per_key.most_common(3)
    assert set(per_key) <= expected

    (metrics,) = orjson.loads(paths.metrics.read_bytes())
    m = metrics["agent_metrics"]
    assert m["num_expected_rollouts"] == len(expected)
    assert m["num_succeeded_rollouts"] == len(rows)
    # failed = failed for good; those a rerun retries are missing, not failed
    assert m["num_failed_rollouts"] == sum(f["_ng_failure_terminal"] is not False for f in fails)
    if rows:  # reward over successes only: a failure is never a reward of 0
        mean = sum(r["reward"] for r in rows) / len(rows)
        assert m["mean/reward"] == pytest.approx(mean)
    return dict(zip(rkeys, rows, strict=True)), dict(zip(fkeys, fails, strict=True))


def complete(state: State, expected: set[Key]) -> CollectSummary:
    assert state.is_completed(), state.message
    summary = state.result()
    assert isinstance(summary, CollectSummary)
    assert summary.missing == 0 and summary.expected == len(expected)
    return summary


def incomplete(state: State) -> IncompleteRun:
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, IncompleteRun), state.message
    return error


def tasks_file(tmp_path: Path, n: int) -> Path:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, n, seed=11)
    return inp


def all_keys(n: int, repeats: int) -> set[Key]:
    return {(t, r) for t in range(n) for r in range(repeats)}


# ------------------------------------------------------------------ transient faults recover


@pytest.mark.parametrize(
    ("fault", "flags", "outcome"),
    [
        ("500", ["--p-500", "0.3"], "500"),
        ("reset", ["--p-reset", "0.3"], "reset"),
        ("hang", ["--p-hang", "0.15", "--hang-s", "30"], "hang"),
    ],
)
def test_transient_faults_are_retried_to_a_complete_exact_output(
    fault: str, flags: list[str], outcome: str, tmp_path: Path, start_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    limit = budget(monkeypatch, attempts=6, chunk_retries=1, request_timeout_s="1")
    agent = start_agent(*flags, "--seed", "4")
    n, repeats = 20, 2
    out = tmp_path / "out.jsonl"
    started = time.monotonic()

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(tasks_file(tmp_path, n)),
                        output_jsonl_fpath=str(out), num_repeats=repeats, chunk_size=8,
                        num_samples_in_parallel=8)  # fmt: skip

    elapsed = time.monotonic() - started
    expected = all_keys(n, repeats)
    summary = complete(state, expected)
    per_key = requests_per_key(agent)
    rows, fails = check_files(out, expected, per_key, limit)
    assert set(rows) == expected and fails == {}
    assert summary.succeeded == len(expected) and summary.failed == 0
    outcomes = Counter(q["outcome"] for q in agent.requests())
    assert outcomes[outcome] > 0, outcomes  # the fault did happen, and was retried past
    assert sum(per_key.values()) == len(expected) + outcomes[outcome]
    if fault == "hang":
        assert elapsed < 30  # nobody waited for a 30 s hang: the 1 s deadline cut it
    print(f"{fault}: {dict(outcomes)}, max requests per key {max(per_key.values())}")


def test_429_retry_waits_at_least_retry_after(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = budget(monkeypatch, attempts=8, chunk_retries=1)  # backoff alone is <= 0.2 s
    agent = start_agent("--p-429", "0.3", "--retry-after-s", "1", "--seed", "2")
    n = 15
    out = tmp_path / "out.jsonl"

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(tasks_file(tmp_path, n)),
                        output_jsonl_fpath=str(out), num_samples_in_parallel=8)  # fmt: skip

    expected = all_keys(n, 1)
    complete(state, expected)
    rows, _ = check_files(out, expected, requests_per_key(agent), limit)
    assert set(rows) == expected
    by_key: dict[Key, list[dict[str, Any]]] = {}
    for q in agent.requests():
        by_key.setdefault((q["_ng_task_index"], q["_ng_rollout_index"]), []).append(q)
    gaps = [
        later["time"] - earlier["time"]
        for log in by_key.values()
        for earlier, later in itertools.pairwise(log)
        if earlier["outcome"] == "429"
    ]
    assert gaps, "no 429 was retried"
    assert min(gaps) >= 1.0, sorted(gaps)[:3]
    print(f"429: {len(gaps)} retries after a 429, waits {min(gaps):.2f}..{max(gaps):.2f} s")


# ------------------------------------------------------------ faults that exhaust the budget


@pytest.mark.parametrize(
    ("flags", "failure_class"),
    [(["--p-500", "1"], "http_500"), (["--p-hang", "1", "--hang-s", "30"], "timeout")],
)
def test_a_fault_that_never_clears_ends_incomplete_after_exactly_the_budget(
    flags: list[str], failure_class: str, tmp_path: Path, start_agent: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    limit = budget(monkeypatch, attempts=2, chunk_retries=1, request_timeout_s="1")
    agent = start_agent(*flags)
    n = 4
    inp = tasks_file(tmp_path, n)
    out = tmp_path / "out.jsonl"
    params = {"input_jsonl_fpath": str(inp), "output_jsonl_fpath": str(out)}

    error = incomplete(run_collect(agent_url=agent.url, **params))

    assert f"{n} of {n} rollouts" in str(error) and failure_class in str(error)
    expected = all_keys(n, 1)
    per_key = requests_per_key(agent)
    rows, fails = check_files(out, expected, per_key, limit)
    assert per_key == dict.fromkeys(expected, limit)  # exactly the budget, no more
    assert rows == {} and set(fails) == expected
    assert {f["_ng_failure_class"] for f in fails.values()} == {failure_class}
    assert not any(f["_ng_failure_terminal"] for f in fails.values())  # retried next run

    # The agent recovers (same agent URL, so the same run): the next run finishes the job.
    agent.stop()
    healthy = start_agent("--port", agent.url.rsplit(":", 1)[1])
    summary = complete(run_collect(agent_url=agent.url, **params), expected)
    rows, fails = check_files(out, expected, requests_per_key(healthy), 1)
    assert set(rows) == expected and fails == {} and summary.succeeded == n


# ---------------------------------------------------------------------- permanent failures


def test_always_400_tasks_are_final_failures_sent_once(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = budget(monkeypatch, attempts=4, chunk_retries=2)
    agent = start_agent("--fail-400-tasks", "2,5")
    n, repeats = 10, 2
    out = tmp_path / "out.jsonl"

    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(tasks_file(tmp_path, n)),
                        output_jsonl_fpath=str(out), num_repeats=repeats,
                        chunk_size=4)  # fmt: skip

    expected = all_keys(n, repeats)
    summary = complete(state, expected)
    per_key = requests_per_key(agent)
    rows, fails = check_files(out, expected, per_key, limit)
    bad = {(t, r) for t in (2, 5) for r in range(repeats)}
    assert set(fails) == bad and set(rows) == expected - bad
    assert all(f["_ng_failure_class"] == "http_400" and f["_ng_failure_terminal"] is True
               and f["attempts"] == 1 and "HTTP 400" in f["error"]
               for f in fails.values())  # fmt: skip
    assert set(per_key.values()) == {1}  # a 400 is never retried, nor is anything else here
    assert (summary.succeeded, summary.failed) == (16, 4)
    assert summary.agents[0].failed == 4


def test_agent_declared_failures_and_no_persist_answers(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = budget(monkeypatch, attempts=4, chunk_retries=2)
    agent = start_agent("--fail-class-tasks", "3", "--no-persist-tasks", "4")
    n, repeats = 8, 2
    inp = tasks_file(tmp_path, n)
    out = tmp_path / "out.jsonl"
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp),
              "output_jsonl_fpath": str(out), "num_repeats": repeats}  # fmt: skip

    error = incomplete(run_collect(**params))

    expected = all_keys(n, repeats)
    per_key = requests_per_key(agent)
    rows, fails = check_files(out, expected, per_key, limit)
    declared = {(3, 0), (3, 1)}
    no_persist = {(4, 0), (4, 1)}
    assert set(fails) == declared  # the declared failures, with the agent's own class
    assert set(rows) == expected - declared - no_persist  # no_persist: written nowhere
    for f in fails.values():
        assert f["_ng_failure_class"] == FAILURE_CLASS and f["_ng_failure_terminal"] is True
        assert f["reward"] == 0.0  # kept in the failures file, never in the reward
    assert "2 of 16 rollouts" in str(error) and "_ng_no_persist" in str(error)
    assert {per_key[k] for k in declared} == {1}  # terminal: never retried
    # no_persist is redone by every attempt of its chunk: once per Prefect try
    assert {per_key[k] for k in no_persist} == {1 + 2}
    assert {per_key[k] for k in expected - declared - no_persist} == {1}

    # The next run redoes only the no_persist rollouts.
    sent = len(agent.requests())
    incomplete(run_collect(**params))
    resent = {(q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests()[sent:]}
    assert resent == no_persist


async def _client_run(answer: dict[str, Any]) -> Any:
    """AgentClient against a real one-route server answering ``answer``."""

    async def run(_: web.Request) -> web.Response:
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/run", run)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = AgentClient(RetryPolicy(max_attempts=2, backoff_base_s=0.01), 4)
    try:
        port = runner.addresses[0][1]
        return await client.run(f"http://127.0.0.1:{port}/run", b"{}")
    finally:
        await client.aclose()
        await runner.cleanup()


def test_sentinel_keys_are_routed_like_nemo_gym() -> None:
    # a null failure class is an ordinary answer (agents that serialize an Optional field)
    ok = asyncio.run(_client_run({"reward": 1.0, "_ng_failure_class": None}))
    assert ok.kind == "ok" and ok.attempts == 1
    # _ng_no_persist alone: stored nowhere
    gone = asyncio.run(_client_run({"reward": 1.0, "_ng_no_persist": True}))
    assert gone.kind == "no_persist" and gone.attempts == 1
    # a class without terminal: retried, then given up
    retry = asyncio.run(_client_run({"_ng_failure_class": "judge_down", "reward": 0.0}))
    assert (retry.kind, retry.failure_class, retry.terminal, retry.attempts) == (
        "failed", "judge_down", False, 2,
    )  # fmt: skip


# --------------------------------------------------------- an agent that dies and comes back


def test_agent_crash_and_restart_on_the_same_port_loses_nothing(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunk retries wait 3 s: long enough for the restarted agent to be listening.
    limit = budget(monkeypatch, attempts=3, chunk_retries=2, chunk_retry_delay_s="3")
    first = start_agent("--crash-after", "15")
    port = first.url.rsplit(":", 1)[1]
    restarted: list[AgentServer] = []

    def restart_when_dead() -> None:
        first.process.wait()
        restarted.append(start_agent("--port", port))

    watcher = threading.Thread(target=restart_when_dead, daemon=True)
    watcher.start()
    n, repeats = 20, 2
    out = tmp_path / "out.jsonl"

    state = run_collect(agent_url=first.url, input_jsonl_fpath=str(tasks_file(tmp_path, n)),
                        output_jsonl_fpath=str(out), num_repeats=repeats, chunk_size=5,
                        num_samples_in_parallel=4)  # fmt: skip

    watcher.join(10)
    assert first.process.returncode == 3 and restarted
    (second,) = restarted
    assert second.url == first.url
    expected = all_keys(n, repeats)
    complete(state, expected)
    per_key = requests_per_key(first, second)
    rows, fails = check_files(out, expected, per_key, limit)
    assert set(rows) == expected and fails == {}
    outcomes = [q["outcome"] for q in first.requests()]
    assert outcomes.count("ok") == 15 and outcomes[-1] == "crash"
    # whatever the first agent answered is not asked again
    answered = {(q["_ng_task_index"], q["_ng_rollout_index"])
                for q in first.requests() if q["outcome"] == "ok"}  # fmt: skip
    assert answered.isdisjoint(
        (q["_ng_task_index"], q["_ng_rollout_index"]) for q in second.requests()
    )
    print(f"crash: first agent {len(outcomes)} requests, second {len(second.requests())}, "
          f"max per key {max(per_key.values())}")  # fmt: skip


# ------------------------------------------------------------------------- the CLI's verdict


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_cli_exit_code_is_0_only_when_complete(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    flaky = start_agent("--fail-400-tasks", "1", "--p-500", "0.2")
    broken = start_agent("--p-500", "1")
    inp = tasks_file(tmp_path, 6)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ROLLOUTS_MAX_ATTEMPTS": "5",
           "ROLLOUTS_CHUNK_RETRIES": "0"}  # fmt: skip

    done = cli([f"+agent_url={flaky.url}", f"+input_jsonl_fpath={inp}",
                "+output_jsonl_fpath=a.jsonl"], env, tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5/6 written, 1 failed, 0 missing" in done.stdout

    short = cli([f"+agent_url={broken.url}", f"+input_jsonl_fpath={inp}",
                 "+output_jsonl_fpath=b.jsonl"], env, tmp_path)  # fmt: skip
    assert short.returncode == 1
    assert "6 of 6 rollouts are neither written nor failed" in short.stderr
    assert "http_500" in short.stderr and "Rerun the same command" in short.stderr


# ------------------------------------------------------------------------- kill -9, repeatedly


def written_keys(run_dir: Path) -> set[Key]:
    """Keys on complete lines of the chunk outputs: what a crash cannot take back."""
    keys: set[Key] = set()
    for path in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            row = orjson.loads(line)
            keys.add((row["_ng_task_index"], row["_ng_rollout_index"]))
    return keys


def test_kill_9_at_random_moments_then_rerun_is_exact_every_time(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "15", "--latency-sigma", "0.5")
    n, repeats = 240, 2
    total = n * repeats
    inp = tasks_file(tmp_path, n)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    rng = random.Random(20240611)
    expected = sorted(all_keys(n, repeats))
    for trial in range(4):
        out = tmp_path / f"trial{trial}.jsonl"
        cmd = [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
               f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}",
               f"+num_repeats={repeats}", "+chunk_size=60", "+num_samples_in_parallel=8"]  # fmt: skip
        run_dir = run_dir_for(out, None)
        # A random moment: after a random share of the rollouts is written (the first trial
        # kills before a single one is, during start-up and split).
        threshold = 0 if trial == 0 else int(rng.uniform(0.05, 0.95) * total)
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        if threshold == 0:
            time.sleep(rng.uniform(0.5, 2.0))
        while threshold and len(written_keys(run_dir)) < threshold:
            assert proc.poll() is None, f"trial {trial}: finished before the kill"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.2)  # let the agent log what was on the wire at the kill
        before = written_keys(run_dir) if run_dir.exists() else set()
        sent = len(agent.requests())

        rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=120, check=False)  # fmt: skip

        assert rerun.returncode == 0, rerun.stderr[-2000:]
        rows = parse_every_line(out)
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == expected
        resent = Counter((q["_ng_task_index"], q["_ng_rollout_index"])
                         for q in agent.requests()[sent:])  # fmt: skip
        assert set(resent).isdisjoint(before), f"trial {trial}: a written rollout was resent"
        assert set(resent) == set(expected) - before and set(resent.values()) <= {1}
        print(f"kill trial {trial}: {len(before)}/{total} written before the kill, "
              f"{len(resent)} sent by the rerun")  # fmt: skip


def test_serve_agent_takes_every_fault_flag() -> None:
    from reference_agent.server import AgentSimConfig, config_from_args
    from rollouts_cli.main import build_parser

    args = build_parser().parse_args(
        ["serve-agent", "--p-500", "0.1", "--p-429", "0.1", "--retry-after-s", "2",
         "--p-reset", "0.1", "--p-hang", "0.1", "--hang-s", "30", "--fail-400-tasks", "1,2",
         "--fail-class-tasks", "3", "--no-persist-tasks", "4,5", "--crash-after", "9"]
    )  # fmt: skip
    assert config_from_args(args) == AgentSimConfig(
        p_500=0.1, p_429=0.1, retry_after_s=2.0, p_reset=0.1, p_hang=0.1, hang_s=30.0,
        fail_400_tasks=frozenset({1, 2}), fail_class_tasks=frozenset({3}),
        no_persist_tasks=frozenset({4, 5}), crash_after=9, api_key=None,
    )  # fmt: skip
