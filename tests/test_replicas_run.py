"""Replicas through the command: three real agents, one killed mid-run and restarted on its port;
and the per-process counts of a `--processes 2` run in `rollouts status` and the Prefect UI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from conftest import AgentServer, read_jsonl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

from flows.ui import artifact_key
from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for

TASKS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def written(run_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (run_dir / "chunks").glob("*.rollouts.jsonl"))


def received(agent: AgentServer, start: float, end: float) -> int:
    return sum(1 for q in agent.requests() if start <= q["time"] < end)


def test_a_killed_replica_is_taken_out_its_load_absorbed_and_it_is_probed_back_in(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    ports = [free_port() for _ in range(3)]
    flags = ("--latency-ms", "100")
    agents = [start_agent("--port", str(p), *flags) for p in ports]
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, TASKS, seed=5)
    out = tmp_path / "rollouts.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ROLLOUTS_REPLICA_PROBE_MAX_S": "1",
           "ROLLOUTS_AGENTS": orjson.dumps({"calc": [a.url for a in agents]}).decode()}  # fmt: skip
    cmd = [sys.executable, "-m", "rollouts_cli", "collect", "+agent_name=calc",
           f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", "+chunk_size=500",
           "+num_samples_in_parallel=12"]  # fmt: skip
    run_dir = run_dir_for(out, None)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (run_dir / "chunks").exists() or written(run_dir) < 200:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)

    agents[1].process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    agents[1].process.wait()
    time.sleep(2.5)
    assert proc.poll() is None, "the run ended before the replica came back: too few rollouts"
    back_at = time.time()
    restarted = start_agent("--port", str(ports[1]), *flags)
    assert restarted.url == agents[1].url
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 0, stderr.decode()[-2000:]
    rows = read_jsonl(out)
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [
        (t, 0) for t in range(TASKS)
    ]
    assert all(r["agent_ref"] == {"name": "calc"} for r in rows)
    # While it was down the other two took all the load: their request rate together matched
    # the three's before the kill (the in-flight budget, not the agents, sets the rate).
    before = sum(received(a, killed_at - 2.0, killed_at) for a in agents) / 2.0
    down = [received(a, killed_at + 0.5, back_at) for a in (agents[0], agents[2])]
    assert min(down) > 0.25 * before * 2.0
    assert sum(down) / (back_at - killed_at - 0.5) > 0.6 * before
    # Probed back in: the restarted agent gets requests again.
    assert len(restarted.requests()) > 20

    status = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "status", str(out), "--json"],
        env=env, cwd=tmp_path, capture_output=True, check=True,
    )  # fmt: skip
    replicas = orjson.loads(status.stdout)["replicas"]
    assert [(r["agent"], r["url"]) for r in replicas] == [("calc", a.url) for a in agents]
    assert sum(r["answered"] for r in replicas) == TASKS
    for r in replicas:
        assert r["sent"] == r["answered"] + sum(r["failed"].values())
        assert r["in_flight"] == 0 and not r["ejected"]
    assert replicas[1]["ejections"] >= 1 and replicas[1]["failed"]["connection_error"] >= 3
    # the counts match what the agents saw: the two that never failed answered all they got
    assert replicas[0]["answered"] == len(agents[0].requests())
    assert replicas[2]["answered"] == len(agents[2].requests())
    assert replicas[1]["answered"] >= len(restarted.requests())
    assert replicas[0]["ejections"] == replicas[2]["ejections"] == 0


def test_with_processes_each_counts_its_own_and_status_sums_them(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agents = [start_agent("--latency-ms", "50") for _ in range(2)]
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 400, seed=6)
    out = tmp_path / "rollouts.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           "ROLLOUTS_AGENTS": orjson.dumps({"calc": [a.url for a in agents]}).decode()}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "collect", "+agent_name=calc",
         f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", "+chunk_size=100",
         "+num_samples_in_parallel=8", "--processes", "2"],
        env=env, cwd=tmp_path, capture_output=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert len(read_jsonl(out)) == 400

    run_dir = run_dir_for(out, None)
    workers = {orjson.loads(p.read_bytes())["worker"]
               for p in (run_dir / "chunks").glob("*.status.json")}  # fmt: skip
    files = {orjson.loads(p.read_bytes())["worker"] for p in run_dir.glob("health.*.json")}
    assert files == workers and len(files) == 2  # each process's one file, kept after the run
    status = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "status", str(out), "--json"],
        env=env, cwd=tmp_path, capture_output=True, check=True,
    )  # fmt: skip
    replicas = orjson.loads(status.stdout)["replicas"]
    assert [r["url"] for r in replicas] == [a.url for a in agents]
    assert [r["answered"] for r in replicas] == [len(a.requests()) for a in agents]
    assert sum(r["answered"] for r in replicas) == 400
    assert min(r["answered"] for r in replicas) > 100  # both used by both processes

    table, progress = asyncio.run(ui_artifacts(artifact_key(out, "replicas")))
    assert [(r["replica"], r["answered"]) for r in table] == [
        (r["url"], r["answered"]) for r in replicas
    ]
    assert all(f"{a.url} " in progress for a in agents), progress


async def ui_artifacts(key: str) -> tuple[list[dict[str, Any]], str]:
    """The run's replicas table and the description of its progress artifact, from the API."""
    async with get_client() as client:
        (table,) = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
        (progress,) = [a for a in await client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[table.flow_run_id]))) if a.type == "progress"]  # fmt: skip
    rows = orjson.loads(table.data) if isinstance(table.data, str) else table.data
    return rows, str(progress.description)
