"""`--processes N`: chunk tasks in N local processes (a local Dask cluster), each with its own
HTTP client and a share of the run's in-flight budget; the output is the same as with one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import AgentServer, read_jsonl
from test_crash_resume import wait_until_written, written_keys

from reference_agent.server import write_tasks
from rollouts.dispatchers import share_budget
from rollouts.models import CollectConfig
from rollouts.request import collecting_processes
from rollouts.run_state import run_dir_for
from rollouts.settings import RolloutsSettings
from rollouts_cli.main import build_parser, collect_params

LATENCY_S = 0.1


def collect_cmd(agent: AgentServer, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
            f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", *extra]  # fmt: skip


def chunk_workers(run_dir: Path) -> dict[int, str]:
    """chunk index -> the process (host:pid) that last started it."""
    out = {}
    for p in (run_dir / "chunks").glob("*.status.json"):
        try:
            out[int(p.name.split(".")[0])] = orjson.loads(p.read_bytes())["worker"]
        except (ValueError, KeyError):
            continue  # being replaced right now
    return out


def peak_in_flight(agent: AgentServer, latency_s: float) -> int:
    """Most requests in any window of one latency: with a fixed latency, all of them were in
    flight at once, so this never exceeds what the client had in flight."""
    times = sorted(q["time"] for q in agent.requests())
    peak, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - latency_s:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


@pytest.mark.fast
def test_the_budget_is_shared_exactly_over_the_processes() -> None:
    assert share_budget(7, ["0", "1"]) == {"0": 4, "1": 3}
    assert share_budget(256, [str(i) for i in range(3)]) == {"0": 86, "1": 85, "2": 85}
    assert sum(share_budget(1000, [str(i) for i in range(16)]).values()) == 1000


@pytest.mark.fast
def test_processes_come_from_flags_plus_keys_and_auto() -> None:
    def processes(*argv: str) -> int:
        params = collect_params(build_parser().parse_args(
            ["collect", "--input", "a.jsonl", "--output", "b.jsonl", *argv]))  # fmt: skip
        return collecting_processes(CollectConfig(**params), RolloutsSettings())

    assert processes() == 1
    assert processes("--processes", "3") == 3
    assert processes("+processes=3") == 3
    assert processes("--dask-local-workers", "2") == 2  # the older spelling
    assert processes("--processes", "auto") == len(os.sched_getaffinity(0))
    # every process needs at least one request of the budget
    assert processes("--processes", "8", "+num_samples_in_parallel=3") == 3


@pytest.mark.fast
def test_processes_and_a_remote_cluster_are_refused_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollouts.errors import ConfigError

    monkeypatch.setenv("ROLLOUTS_DASK_ADDRESS", "tcp://127.0.0.1:8786")
    config = CollectConfig(input_jsonl_fpath="a", output_jsonl_fpath="b", processes=2)
    with pytest.raises(ConfigError, match="choose one"):
        collecting_processes(config, RolloutsSettings())


def test_two_processes_write_the_same_output_and_share_the_budget(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", str(int(LATENCY_S * 1000)))
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 150, seed=5)
    out = tmp_path / "rollouts.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    done = subprocess.run(
        collect_cmd(agent, inp, out, "+num_repeats=2", "+chunk_size=25",
                    "+num_samples_in_parallel=7", "--processes", "2"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert "300/300 written, 0 failed, 0 missing" in done.stdout
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)] == [
        (t, r) for t in range(150) for r in range(2)
    ]
    assert len(agent.requests()) == 300  # each rollout sent once
    # Two processes, neither of them the command itself, each collected chunks: status says so.
    workers = set(chunk_workers(run_dir_for(out, None)).values())
    assert len(workers) == 2
    status = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "status", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for w in workers:
        assert w in status.stdout
    # The run's 7 requests in flight are split 4 + 3, never more and all of them used.
    assert peak_in_flight(agent, LATENCY_S) == 7


def test_a_process_killed_mid_run_loses_only_its_requests_in_flight(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "20")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 1200, seed=6)
    out = tmp_path / "rollouts.jsonl"
    run_dir = run_dir_for(out, None)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    log = tmp_path / "collect.log"
    proc = subprocess.Popen(
        collect_cmd(agent, inp, out, "+chunk_size=100", "+num_samples_in_parallel=8",
                    "--processes", "2"),
        env=env, cwd=tmp_path, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while True:  # both processes collecting, and something written
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "chunks did not spread over two processes"
        pids = {int(w.split(":")[1]) for w in chunk_workers(run_dir).values()} - {proc.pid}
        if len(pids) == 2 and len(written_keys(run_dir)) > 200:
            break
        time.sleep(0.05)
    victim = max(pids)
    os.kill(victim, signal.SIGKILL)

    assert proc.wait(180) == 0, log.read_text()[-4000:]
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)] == [
        (t, 0) for t in range(1200)
    ]
    per_key = Counter(q["_ng_task_index"] for q in agent.requests())
    assert set(per_key) == set(range(1200))
    # resent: at most what the killed process had in flight (its share: 4 of 8)
    assert sum(c - 1 for c in per_key.values()) <= 4


def test_kill_9_of_the_command_then_rerun_with_processes_is_exact(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "20")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 800, seed=7)
    out = tmp_path / "rollouts.jsonl"
    run_dir = run_dir_for(out, None)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cmd = collect_cmd(agent, inp, out, "+num_repeats=2", "+chunk_size=200",
                      "+num_samples_in_parallel=16", "--processes", "2")  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until_written(proc, run_dir, 500, timeout_s=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    before = written_keys(run_dir)
    time.sleep(1)  # the worker processes ended with the command: nothing is written after it
    assert written_keys(run_dir) == before
    assert 500 <= len(before) < 1600 and not out.exists()
    requests_before = len(agent.requests())

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=180, check=False)  # fmt: skip

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)] == [
        (t, r) for t in range(800) for r in range(2)
    ]
    resent = {(q["_ng_task_index"], q["_ng_rollout_index"])
              for q in agent.requests()[requests_before:]}  # fmt: skip
    assert resent == {(t, r) for t in range(800) for r in range(2)} - before
