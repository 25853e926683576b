"""What a user watches: `rollouts status` during a run, and the run's artifacts in Prefect."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from conftest import AgentServer, write_jsonl
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.collect import collect_rollouts
from flows.ui import artifact_key
from reference_agent.server import generate_tasks, write_tasks
from rollouts.run_state import run_dir_for


def status_json(out: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "status", str(out), "--json", "--sample-s", "0.5"],
        check=True, capture_output=True, env=env, cwd=cwd,
    )  # fmt: skip
    return orjson.loads(res.stdout)


def lines_in(run_dir: Path, kind: str) -> dict[int, int]:
    return {
        int(p.name.split(".")[0]): p.read_bytes().count(b"\n")
        for p in (run_dir / "chunks").glob(f"*.{kind}.jsonl")
    }


def test_status_reports_true_counts_per_chunk_while_a_collection_runs(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    # 600 rollouts at 8 in flight take ~6 s: time for `rollouts status` to start mid-run
    agent = start_agent("--latency-ms", "80", "--fail-400-tasks", "3,7")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 600, seed=5)
    out = tmp_path / "rollouts.jsonl"
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
         f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}", "+chunk_size=100",
         "+num_samples_in_parallel=8", "+max_parallel_chunks=2"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run_dir = run_dir_for(out, None)
    try:
        deadline = time.monotonic() + 60
        # until 100 are written and both always-400 tasks have failed
        while (sum(lines_in(run_dir, "rollouts").values()) < 100
               or sum(lines_in(run_dir, "failures").values()) < 2):  # fmt: skip
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)

        before = sum(lines_in(run_dir, "rollouts").values())
        status = status_json(out, env, tmp_path)
        after = sum(lines_in(run_dir, "rollouts").values())

        assert proc.poll() is None, "the collection should still be running"
        assert status["expected"] == 600
        assert before <= status["done"] <= after < 600
        assert status["failed"] == 2  # tasks 3 and 7 answer 400: terminal
        assert status["state"].startswith("running")
        assert status["rate_per_s"] > 0 and status["eta_s"] > 0
        chunks = {c["index"]: c for c in status["chunks"]}
        assert set(chunks) <= set(range(6)) and chunks[0]["expected"] == 100
        assert sum(c["done"] for c in status["chunks"]) == status["done"]
        started = [c for c in status["chunks"] if c["worker"]]
        assert started and all(c["worker"] == f"{socket.gethostname()}:{proc.pid}"
                               for c in started)  # fmt: skip
    finally:
        assert proc.wait(120) == 0
    final = status_json(out, env, tmp_path)
    assert (final["done"], final["failed"], final["state"]) == (598, 2, "complete")


HOLD_THE_LOCK = """
import sys
from pathlib import Path
from rollouts.run_state import run_lock
run_dir, out = Path(sys.argv[1]), sys.argv[2]
with run_lock(run_dir, out):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
sys.stdin.readline()
"""


def test_status_says_running_only_while_the_lock_is_held_not_while_its_process_lives(
    tmp_path: Path, start_agent: Any, monkeypatch: Any
) -> None:
    """A run that stopped while its process lives on (a notebook, a worker, this very test)
    is not running: the lock is the truth, not the pid written in the lock file."""
    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", "0")
    agent = start_agent("--p-500", "1")  # every answer a 500: the run stops incomplete
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 20, seed=5)
    out = tmp_path / "rollouts.jsonl"
    state = asyncio.run(collect_rollouts(agent_url=agent.url, input_jsonl_fpath=str(inp),
                                         output_jsonl_fpath=str(out), return_state=True))  # fmt: skip
    assert state.is_failed()
    run_dir = run_dir_for(out, None)
    lock = run_dir.with_name(run_dir.name + ".lock")
    host = socket.gethostname()
    assert lock.read_text() == f"{host}:{os.getpid()}"  # this process collected, and lives on
    env = {**os.environ}

    def cli_state() -> str:
        res = subprocess.run(
            [sys.executable, "-m", "rollouts_cli", "status", str(out), "--json", "--sample-s",
             "0"], check=True, capture_output=True, env=env, cwd=tmp_path,
        )  # fmt: skip
        return orjson.loads(res.stdout)["state"]

    assert cli_state() == "stopped (incomplete)"

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run_dir), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli_state() == f"running ({host}:{holder.pid})"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert holder.poll() is None and lock.read_text() == f"{host}:{holder.pid}"
        assert cli_state() == "stopped (incomplete)"
        text = subprocess.run([sys.executable, "-m", "rollouts_cli", "status", out.name],
                              check=True, capture_output=True, text=True, env=env,
                              cwd=tmp_path).stdout  # fmt: skip
        assert f"{out.name}: stopped (incomplete)" in text
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_run_has_progress_metrics_table_and_summary_artifacts(
    tmp_path: Path, agent: AgentServer
) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(40)))
    out = tmp_path / "my_rollouts.jsonl"
    state = asyncio.run(collect_rollouts(agent_url=agent.url, agent_name="sim",
                                         input_jsonl_fpath=str(inp),
                                         output_jsonl_fpath=str(out), num_repeats=2,
                                         return_state=True))  # fmt: skip
    assert state.is_completed()

    async def artifacts() -> list[Any]:
        async with get_client() as client:
            flow_run_filter = FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
            return await client.read_artifacts(flow_run_filter=flow_run_filter)

    by_type: dict[str, list[Any]] = {}
    for a in asyncio.run(artifacts()):
        by_type.setdefault(a.type, []).append(a)
    (progress,) = by_type["progress"]
    assert float(progress.data) == 100.0
    tables = {a.key: a for a in by_type["table"]}
    key = artifact_key(out, "metrics")
    # readable (the file's stem, then what it is) and distinct per output path (same stem in
    # another folder): the UI titles the card with it
    assert key.startswith("my-rollouts-metrics-")
    assert key != artifact_key(tmp_path / "elsewhere" / out.name, "metrics")
    table = tables[key]
    rows = orjson.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[0]["agent"] == "sim" and rows[0]["written"] == 80 and "pass@2" in rows[0]
    floats = [v for v in rows[0].values() if isinstance(v, float)]
    assert floats and all(v == round(v, 4) for v in floats)  # 0.7778, not 0.7777777777777778
    (markdown,) = by_type["markdown"]
    assert "| written | 80 |" in markdown.data and str(out) in markdown.data
    assert "| | |" not in markdown.data and "| Rollouts | Count |" in markdown.data
    assert markdown.key == artifact_key(out, "summary")
    chunk_table = tables[artifact_key(out, "chunks")]
    chunks = (
        orjson.loads(chunk_table.data) if isinstance(chunk_table.data, str) else chunk_table.data
    )
    assert [c["done"] for c in chunks] == [80]
    assert chunks[0]["worker"] == f"{socket.gethostname()}:{os.getpid()}"


def test_without_a_terminal_progress_is_a_plain_line_now_and_then(
    tmp_path: Path, agent: AgentServer, monkeypatch: Any, capsys: Any
) -> None:
    import rollouts_cli.progress

    inp = write_jsonl(tmp_path / "in.jsonl", list(generate_tasks(30)))
    out = tmp_path / "plain.jsonl"
    state = asyncio.run(collect_rollouts(agent_url=agent.url, input_jsonl_fpath=str(inp),
                                         output_jsonl_fpath=str(out), return_state=True))  # fmt: skip
    assert state.is_completed()
    monkeypatch.setattr(rollouts_cli.progress, "LINE_EVERY_S", 0.05)
    capsys.readouterr()

    with rollouts_cli.progress.cli_progress_bar(out, None):  # stderr is captured: not a terminal
        time.sleep(0.3)

    lines = capsys.readouterr().err.splitlines()
    assert lines and set(lines) == {"plain.jsonl: 30/30 (100.0%), 0 failed"}
