"""Against the real one-node Slurm that the repository sets up (scripts/slurm.sh)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import AgentServer, read_jsonl
from slurm_cluster import ROOT, SlurmCluster
from test_crash_resume import written_keys

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for

COLLECT_SBATCH = ROOT / "examples" / "slurm" / "collect.sbatch"
REPEATS, IN_FLIGHT = 2, 16


def test_the_repository_slurm_runs_a_batch_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    job_id = slurm_cluster.sbatch(
        "--job-name=hello", f"--output={out}",
        "--wrap", 'echo "job $SLURM_JOB_ID on $(hostname -s) in $PWD"',
        cwd=tmp_path,
    )  # fmt: skip

    job = slurm_cluster.wait_until_ended(job_id, timeout_s=60)

    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0")
    host = socket.gethostname().split(".")[0]
    assert out.read_text() == f"job {job_id} on {host} in {tmp_path}\n"


@dataclass
class InterruptedJob:
    """A collection submitted with examples/slurm/collect.sbatch, stopped once mid-run."""

    job: dict[str, str]  # `scontrol show job` at its end
    log: str  # the job's output file: every run of it, appended
    rows: list[tuple[int, int]]  # (task, rollout) of the output, in order
    written_by_the_first_run: set[tuple[int, int]]
    resent: set[tuple[int, int]]  # what the later runs asked the agent for
    sent_twice: list[tuple[int, int]]  # over the job's whole life


def run_batch_job_stopped_once(
    cluster: SlurmCluster, tmp_path: Path, agent: AgentServer, prefect_api: str,
    tasks: int, stop_after_rows: int, stop: Callable[[str], None],
) -> InterruptedJob:  # fmt: skip
    """`sbatch examples/slurm/collect.sbatch <collect arguments>`; once ``stop_after_rows``
    rows are written, ``stop(job_id)``; then wait until the job has run again and ended."""
    write_tasks(tmp_path / "tasks.jsonl", tasks, seed=7)
    out = tmp_path / "rollouts.jsonl"
    log = tmp_path / "job.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_api,
           "ROLLOUTS_BIN": str(Path(sys.executable).with_name("rollouts"))}  # fmt: skip
    job_id = cluster.sbatch(
        f"--output={log}", str(COLLECT_SBATCH),
        f"+agent_url={agent.url}", "+input_jsonl_fpath=tasks.jsonl",
        f"+output_jsonl_fpath={out.name}", f"+num_repeats={REPEATS}", "+chunk_size=1000",
        f"+num_samples_in_parallel={IN_FLIGHT}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    run_dir = run_dir_for(out, None)
    try:
        deadline = time.monotonic() + 120
        while len(written_keys(run_dir)) < stop_after_rows:
            job = cluster.job(job_id)
            assert job is not None and job["JobState"] in ("PENDING", "RUNNING"), (
                f"the job ended before it could be stopped: {job}\n{log.read_text()}"
            )
            assert time.monotonic() < deadline, f"no rows in 120 s:\n{log.read_text()}"
            time.sleep(0.1)
        stop(job_id)
        cluster.wait_for(
            job_id, "pending again",
            lambda f: f["JobState"] == "PENDING" and f["Restarts"] == "1", timeout_s=60,
        )  # fmt: skip
        written_by_the_first_run = written_keys(run_dir)
        requests_of_the_first_run = len(agent.requests())
        job = cluster.wait_until_ended(job_id, timeout_s=120)
    finally:
        cluster.cancel(job_id)  # a job that a failure left behind must not run on
    requests = [(q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests()]
    return InterruptedJob(
        job=job,
        log=log.read_text(),
        rows=[(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)],
        written_by_the_first_run=written_by_the_first_run,
        resent=set(requests[requests_of_the_first_run:]),
        sent_twice=[key for key, n in Counter(requests).items() if n > 1],
    )


def assert_resumed_exactly(run: InterruptedJob, tasks: int) -> None:
    """The project's guarantee across runs: the output is exact, rows written are never sent
    again, and no more rollouts are sent twice than were in flight at the stop."""
    assert (run.job["JobState"], run.job["ExitCode"]) == ("COMPLETED", "0:0"), run.log
    every_rollout = [(t, r) for t in range(tasks) for r in range(REPEATS)]
    assert run.rows == every_rollout
    assert 0 < len(run.written_by_the_first_run) < len(every_rollout)
    assert run.resent == set(every_rollout) - run.written_by_the_first_run
    assert len(run.sent_twice) <= IN_FLIGHT, run.sent_twice
    assert "stopped by SIGTERM" in run.log  # the first run stopped gracefully, not killed


def test_the_whole_run_as_one_batch_job_resumes_exactly_after_a_requeue(
    slurm_cluster: SlurmCluster, tmp_path: Path, start_agent: Callable[..., AgentServer],
    prefect_api: str,
) -> None:  # fmt: skip
    """`scontrol requeue` in the middle of the run: Slurm sends SIGTERM to every process of
    the job (the collection stops gracefully) and runs the job again, which resumes."""
    agent = start_agent("--latency-ms", "50")  # 6000 rollouts take ~20 s at 16 in flight
    tasks = 3000

    def requeue(job_id: str) -> None:
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)

    run = run_batch_job_stopped_once(
        slurm_cluster, tmp_path, agent, prefect_api, tasks, stop_after_rows=1000, stop=requeue
    )

    assert_resumed_exactly(run, tasks)
    assert run.job["Restarts"] == "1"
    job_id = run.job["JobId"]
    assert f"job {job_id}, run 1," in run.log and f"job {job_id}, run 2," in run.log


def test_near_its_walltime_the_batch_job_stops_the_run_and_requeues_itself(
    slurm_cluster: SlurmCluster, tmp_path: Path, start_agent: Callable[..., AgentServer],
    prefect_api: str,
) -> None:  # fmt: skip
    """The walltime warning (`#SBATCH --signal=B:USR1@180`: USR1 to the batch script only) as
    Slurm sends it, without waiting for a walltime: the script stops the collection (exit 143)
    and requeues its own job, whose next run resumes."""
    agent = start_agent("--latency-ms", "50")
    tasks = 1000

    def walltime_warning(job_id: str) -> None:
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)

    run = run_batch_job_stopped_once(
        slurm_cluster, tmp_path, agent, prefect_api, tasks, stop_after_rows=300,
        stop=walltime_warning,
    )  # fmt: skip

    assert_resumed_exactly(run, tasks)
    assert run.job["Restarts"] == "1"
    assert "walltime near: stopping the collection" in run.log
    assert f"requeueing job {run.job['JobId']}" in run.log
