"""kill -9 in the middle of a collection, then the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import read_jsonl

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for


def written_keys(run_dir: Path) -> set[tuple[int, int]]:
    """Keys on complete lines of the chunk outputs: what a crash cannot take back."""
    keys = set()
    for path in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        keys |= {(r["_ng_task_index"], r["_ng_rollout_index"])
                 for r in read_jsonl_bytes(complete)}  # fmt: skip
    return keys


def wait_until_written(
    proc: subprocess.Popen[bytes], run_dir: Path, n: int, timeout_s: float
) -> None:
    """Until ``n`` rollouts are on complete lines, while the collection ``proc`` still runs."""
    deadline = time.monotonic() + timeout_s
    while len(written_keys(run_dir)) < n:
        assert proc.poll() is None, "the collection ended before it could be killed"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)


def read_jsonl_bytes(data: bytes) -> list[dict[str, Any]]:
    import orjson

    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def test_kill_9_then_same_command_completes_exactly_without_resending_written_rollouts(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "20")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 800, seed=3)
    out = tmp_path / "rollouts.jsonl"
    cmd = [
        sys.executable, "-m", "rollouts_cli", "collect",
        f"+agent_url={agent.url}", f"+input_jsonl_fpath={inp}", f"+output_jsonl_fpath={out}",
        "+num_repeats=2", "+chunk_size=200", "+num_samples_in_parallel=16",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    run_dir = run_dir_for(out, None)

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until_written(proc, run_dir, 500, timeout_s=90)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = written_keys(run_dir)
    assert 500 <= len(before) < 1600 and not out.exists()
    requests_before = len(agent.requests())

    rerun = subprocess.run(
        cmd, check=False, env=env, cwd=tmp_path, capture_output=True, timeout=180
    )

    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    rows = read_jsonl(out)
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [
        (t, r) for t in range(800) for r in range(2)
    ]
    resent = {(q["_ng_task_index"], q["_ng_rollout_index"])
              for q in agent.requests()[requests_before:]}  # fmt: skip
    assert resent.isdisjoint(before)
    assert resent == {(t, r) for t in range(800) for r in range(2)} - before
