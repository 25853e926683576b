"""Ending a run early and on purpose: at its deadline (--max-duration), on Ctrl-C or SIGTERM,
on a cancellation through the Prefect API. Each keeps everything written, exits with its own
status, and the same command then completes the output exactly, resending only what was in
flight when the run stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import AgentServer, read_jsonl

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for
from rollouts.stopping import STOP_RECORD

Key = tuple[int, int]
PARALLEL = 8


def written_keys(run_dir: Path) -> set[Key]:
    """Keys on complete lines of the chunk outputs."""
    keys = set()
    for path in (run_dir / "chunks").glob("*.rollouts.jsonl"):
        data = path.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            row = orjson.loads(line)
            keys.add((row["_ng_task_index"], row["_ng_rollout_index"]))
    return keys


def requested(agent: AgentServer, since: int = 0) -> list[Key]:
    return [(q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests()[since:]]


class Collection:
    """One output, collected by `rollouts collect` subprocesses against the session's API."""

    def __init__(self, tmp_path: Path, agent: AgentServer, api: str, n_tasks: int) -> None:
        self.inp, self.out = tmp_path / "tasks.jsonl", tmp_path / "rollouts.jsonl"
        write_tasks(self.inp, n_tasks, seed=5)
        self.n_tasks, self.cwd, self.run_dir = n_tasks, tmp_path, run_dir_for(self.out, None)
        self.cmd = [
            sys.executable, "-m", "rollouts_cli", "collect", f"+agent_url={agent.url}",
            f"+input_jsonl_fpath={self.inp}", f"+output_jsonl_fpath={self.out}",
            "+chunk_size=100", f"+num_samples_in_parallel={PARALLEL}",
        ]  # fmt: skip
        self.env = {**os.environ, "PREFECT_API_URL": api}

    def start(
        self, *extra: str, env: dict[str, str] | None = None, own_group: bool = False
    ) -> subprocess.Popen[str]:
        """``own_group``: in a process group of its own, as a batch job's processes are."""
        return subprocess.Popen(
            [*self.cmd, *extra], env={**self.env, **(env or {})}, cwd=self.cwd, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=own_group,
        )  # fmt: skip

    def wait_for_written(self, proc: subprocess.Popen[str], n: int) -> None:
        give_up = time.monotonic() + 60
        while len(written_keys(self.run_dir)) < n:
            assert proc.poll() is None, f"ended before {n} were written: {proc.communicate()}"
            assert time.monotonic() < give_up, "no progress"
            time.sleep(0.05)

    def all_keys(self) -> list[Key]:
        return [(t, 0) for t in range(self.n_tasks)]

    def rerun_completes_exactly(self, agent: AgentServer, before: set[Key], sent: set[Key]) -> None:
        """The same command completes the output; it sends only what was not written, and of
        what the stopped run had sent, only the rollouts it had in flight."""
        since = len(agent.requests())
        rerun = subprocess.run(self.cmd, env=self.env, cwd=self.cwd, capture_output=True,
                               text=True, timeout=120, check=False)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        rows = read_jsonl(self.out)
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == self.all_keys()
        resent = requested(agent, since)
        assert len(resent) == len(set(resent)) == self.n_tasks - len(before)
        assert set(resent) == set(self.all_keys()) - before
        in_flight = sent - before  # sent by the stopped run, never written: cut in flight
        assert len(in_flight) <= PARALLEL
        assert set(resent) & sent == in_flight


def test_a_run_cut_by_its_deadline_ends_on_time_with_its_output_and_the_rerun_completes_it(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "150", "--latency-sigma", "0.8")
    run = Collection(tmp_path, agent, prefect_api, 400)  # ~10 s of work at C=8

    first = run.start("--max-duration", "4s")
    _, stderr = first.communicate(timeout=60)
    ended = time.time()

    assert first.returncode == 3, stderr[-2000:]
    assert "stopped at deadline" in stderr and "missing, resumable" in stderr
    record = orjson.loads((run.run_dir / STOP_RECORD).read_bytes())
    assert record["reason"] == "deadline"
    assert record["deadline_at"] - record["started_at"] == pytest.approx(4.0)
    assert ended <= record["deadline_at"] + 2.0, ended - record["deadline_at"]
    before = written_keys(run.run_dir)
    assert 0 < len(before) < run.n_tasks
    merged = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(run.out)]
    assert merged == sorted(before)  # what finished, merged and sorted
    assert f"{run.n_tasks - len(before)} missing" in stderr
    state = asyncio.run(flow_run_state_of(run.out))
    assert state == ("COMPLETED", "StoppedAtDeadline")  # not a failure

    run.rerun_completes_exactly(agent, before, set(requested(agent)))


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_within_its_grace_and_the_rerun_resends_only_what_was_in_flight(
    tmp_path: Path, start_agent: Any, prefect_api: str, sig: signal.Signals, status: int
) -> None:
    agent = start_agent("--latency-ms", "300", "--latency-sigma", "0.6")
    run = Collection(tmp_path, agent, prefect_api, 300)
    grace = 0.5  # shorter than many latencies: some rollouts are cut in flight
    proc = run.start(env={"ROLLOUTS_STOP_GRACE_S": str(grace)})
    run.wait_for_written(proc, 20)

    proc.send_signal(sig)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - signalled

    assert proc.returncode == status, stderr[-2000:]
    assert took < grace + 4, took
    assert "Rerun the same command" in stderr and "missing" in stderr
    before = written_keys(run.run_dir)
    assert not run.out.exists()  # not merged: a stop by a signal exits promptly
    run.rerun_completes_exactly(agent, before, set(requested(agent)))  # the lock was released


def test_a_second_ctrl_c_stops_at_once_and_nothing_written_is_lost(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "800")
    run = Collection(tmp_path, agent, prefect_api, 48)
    proc = run.start(env={"ROLLOUTS_STOP_GRACE_S": "60"})
    run.wait_for_written(proc, 8)

    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    written_at_second = written_keys(run.run_dir)
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    _, stderr = proc.communicate(timeout=30)

    assert time.monotonic() - second < 2.0
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped at once" in stderr
    before = written_keys(run.run_dir)
    assert written_at_second <= before
    run.rerun_completes_exactly(agent, before, set(requested(agent)))


def test_cancelling_the_flow_run_through_the_api_stops_it_like_a_signal(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "300", "--latency-sigma", "0.6")
    run = Collection(tmp_path, agent, prefect_api, 300)
    proc = run.start(env={"ROLLOUTS_STOP_GRACE_S": "0.5"})
    run.wait_for_written(proc, 20)

    flow_run_id = asyncio.run(cancel_running_flow_run(run.out))
    cancelled = time.monotonic()
    _, stderr = proc.communicate(timeout=30)

    assert time.monotonic() - cancelled < 5.0
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by a cancellation" in stderr and "Rerun the same command" in stderr
    assert asyncio.run(flow_run_state(flow_run_id)) == "CANCELLED"
    run.rerun_completes_exactly(agent, written_keys(run.run_dir), set(requested(agent)))


async def cancel_running_flow_run(output: Path) -> Any:
    """What the UI's Cancel does: the run goes Cancelling."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as Types
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=Types(any_=[StateType.RUNNING]))))  # fmt: skip
        ours = [r for r in runs if r.parameters.get("output_jsonl_fpath") == str(output)]
        assert len(ours) == 1, [r.name for r in runs]
        await client.set_flow_run_state(ours[0].id, Cancelling())
        return ours[0].id


async def flow_run_state_of(output: Path) -> tuple[str, str]:
    """(type, name) of the last flow run that collected ``output``."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        runs = [r for r in await client.read_flow_runs()
                if r.parameters.get("output_jsonl_fpath") == str(output)]  # fmt: skip
        assert runs
        last = max(runs, key=lambda r: r.created or 0)
        assert last.state is not None
        return str(last.state.type.value), str(last.state.name)


async def flow_run_state(flow_run_id: Any) -> str:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return str((await client.read_flow_run(flow_run_id)).state_type.value)


def test_the_deadline_holds_in_several_processes(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """Chunks in Dask worker processes get the run's absolute deadline: each worker's
    dispatcher stops dispatching on its own, and the rerun completes the output exactly."""
    pytest.importorskip("prefect_dask")
    agent = start_agent("--latency-ms", "150", "--latency-sigma", "0.8")
    run = Collection(tmp_path, agent, prefect_api, 600)

    first = run.start("--max-duration", "8s", "--processes", "2")
    _, stderr = first.communicate(timeout=90)
    ended = time.time()

    assert first.returncode == 3, stderr[-2000:]
    record = orjson.loads((run.run_dir / STOP_RECORD).read_bytes())
    assert ended <= record["deadline_at"] + 2.0, ended - record["deadline_at"]
    before = written_keys(run.run_dir)
    assert 0 < len(before) < run.n_tasks
    run.rerun_completes_exactly(agent, before, set(requested(agent)))


def test_sigterm_stops_chunks_in_several_processes_too(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """The flow relays the stop to its Dask workers: they stop dispatching and cut what is in
    flight after the grace."""
    pytest.importorskip("prefect_dask")
    agent = start_agent("--latency-ms", "300", "--latency-sigma", "0.6")
    run = Collection(tmp_path, agent, prefect_api, 300)
    proc = run.start("--processes", "2", env={"ROLLOUTS_STOP_GRACE_S": "0.5"})
    run.wait_for_written(proc, 20)

    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 143, stderr[-2000:]
    assert time.monotonic() - signalled < 5.0
    run.rerun_completes_exactly(agent, written_keys(run.run_dir), set(requested(agent)))


def test_sigterm_to_every_process_of_the_command_stops_it_in_several_processes(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """As Slurm ends or requeues a batch job, systemd a unit: SIGTERM reaches the command and
    its Dask worker processes at once. The workers stop their chunks (they do not leave), the
    flow stops, exit 143 within the grace, and the rerun resends only what was in flight."""
    pytest.importorskip("prefect_dask")
    agent = start_agent("--latency-ms", "300", "--latency-sigma", "0.6")
    run = Collection(tmp_path, agent, prefect_api, 300)
    proc = run.start("--processes", "2", env={"ROLLOUTS_STOP_GRACE_S": "0.5"}, own_group=True)
    run.wait_for_written(proc, 20)

    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143, stderr[-2000:]
    assert time.monotonic() - signalled < 10.0
    run.rerun_completes_exactly(agent, written_keys(run.run_dir), set(requested(agent)))


def test_sigterm_stops_every_dataset_of_a_multi_run_gracefully(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """`rollouts multi` (its datasets' subflows run on threads of their own, where no signal
    handler can be installed): one SIGTERM stops them all within the grace, exit 143, no mix;
    the same command then completes both, resending at most what was in flight."""
    agent = start_agent("--latency-ms", "100")
    datasets = []
    for name in ("a", "b"):
        write_tasks(tmp_path / f"{name}.jsonl", 400, seed=len(datasets))
        datasets.append({"name": name, "input": str(tmp_path / f"{name}.jsonl"),
                         "output": str(tmp_path / f"out_{name}.jsonl"), "agent_url": agent.url,
                         "chunk_size": 100, "num_samples_in_parallel": PARALLEL})  # fmt: skip
    config = tmp_path / "multi.json"
    config.write_text(orjson.dumps({"datasets": datasets, "mix": {
        "output": str(tmp_path / "mixed.jsonl"), "total": 100,
        "proportions": {"a": 0.5, "b": 0.5}}}).decode())  # fmt: skip
    cmd = [sys.executable, "-m", "rollouts_cli", "multi", "--config", str(config)]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ROLLOUTS_STOP_GRACE_S": "1"}
    run_dirs = [run_dir_for(tmp_path / f"out_{n}.jsonl", None) for n in ("a", "b")]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    give_up = time.monotonic() + 60
    while not all(len(written_keys(d)) >= 20 for d in run_dirs if d.exists()) or not all(
        d.exists() for d in run_dirs
    ):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < give_up, "no progress"
        time.sleep(0.05)

    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 143, stderr[-3000:]
    assert time.monotonic() - signalled < 15, "the datasets kept collecting after SIGTERM"
    assert "SIGTERM: stopping" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not (tmp_path / "mixed.jsonl").exists()
    written = sum(len(written_keys(d)) for d in run_dirs)
    assert written < 800
    sent = len(agent.requests())
    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in ("a", "b"):
        rows = read_jsonl(tmp_path / f"out_{name}.jsonl")
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [
            (t, 0) for t in range(400)
        ]
    # Sent in all: each rollout once, plus at most what each dataset had in flight.
    assert len(agent.requests()) - 800 <= 2 * PARALLEL
    assert sent <= written + 2 * PARALLEL
