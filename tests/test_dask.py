"""Chunk collection on a real Dask cluster (scheduler + two workers on loopback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import read_jsonl

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for

DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dask_cluster(tmp_path: Path, prefect_api: str) -> Iterator[tuple[str, list[Any], dict]]:
    """`dask scheduler` and two `dask worker`s, configured like a real deployment: the same
    Prefect API and result storage as the run (here: this machine's filesystem, shared)."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=env, stdout=open(logs / "scheduler.log", "wb"), stderr=subprocess.STDOUT,
    )]  # fmt: skip
    workers = []
    for i in range(2):
        w = subprocess.Popen(
            [DASK, "worker", address, "--nthreads", "2", "--no-nanny", "--no-dashboard",
             "--host", "127.0.0.1", "--name", f"w{i}"],
            env=env, stdout=open(logs / f"worker{i}.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        workers.append(w)
    procs += workers
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    try:
        yield address, workers, env
    finally:
        for p in procs:
            p.kill()
            p.wait()


def worker_pids(run_dir: Path) -> dict[int, int]:
    """chunk index -> pid of the worker that (last) started it."""
    out = {}
    for p in (run_dir / "chunks").glob("*.status.json"):
        try:
            out[int(p.name.split(".")[0])] = int(
                orjson.loads(p.read_bytes())["worker"].split(":")[1]
            )
        except (ValueError, KeyError):
            continue
    return out


def test_chunks_spread_over_two_workers_and_survive_killing_one(
    tmp_path: Path, start_agent: Any, dask_cluster: tuple[str, list[Any], dict]
) -> None:
    address, workers, env = dask_cluster
    agent = start_agent("--latency-ms", "20")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 1200, seed=8)
    out = tmp_path / "rollouts.jsonl"
    run_dir = run_dir_for(out, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", "--dask-address", address,
         f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}",
         "+chunk_size=100", "+num_samples_in_parallel=8"],
        env=env, cwd=tmp_path, stdout=open(tmp_path / "collect.log", "wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    victim = workers[1]
    # wait until both workers are collecting, then kill one of them mid-chunk
    while True:
        assert proc.poll() is None, (tmp_path / "collect.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "chunks did not spread over both workers"
        pids = set(worker_pids(run_dir).values()) if run_dir.exists() else set()
        if len(pids) >= 2 and victim.pid in pids:
            break
        time.sleep(0.1)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)

    assert proc.wait(240) == 0, (tmp_path / "collect.log").read_text()[-4000:]
    rows = read_jsonl(out)
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [
        (t, 0) for t in range(1200)
    ]
    per_key = Counter(q["_ng_task_index"] for q in agent.requests())
    assert set(per_key) == set(range(1200))
    # resent: at most what the killed worker had in flight (its budget: 8 / 2 workers)
    assert sum(c - 1 for c in per_key.values()) <= 4
    survivors = set(worker_pids(run_dir).values())
    assert workers[0].pid in survivors
