"""Chunk workers as Slurm jobs (`--slurm-jobs`), against the real one-node Slurm that the
repository sets up (scripts/slurm.sh): a job cancelled mid-run, workers retiring before their
walltime. Both give the exact output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import read_jsonl

from reference_agent.server import write_tasks
from rollouts.run_state import run_dir_for
from rollouts.slurm import SLURM_FILE

# The repository's one-node Slurm (tests/slurm_cluster.py), started once per session.
pytestmark = pytest.mark.usefixtures("slurm_cluster")


def squeue(name: str) -> dict[str, str]:
    """job id -> state, of the jobs named ``name``."""
    listed = subprocess.run(
        ["squeue", "--noheader", f"--name={name}", "--format=%i %T"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listed.returncode != 0:  # the controller busy for a moment: ask again next poll
        return {}
    return dict(line.split() for line in listed.stdout.splitlines())


def chunk_jobs(run_dir: Path) -> dict[int, str | None]:
    """chunk index -> the Slurm job that (last) started collecting it."""
    out = {}
    for p in (run_dir / "chunks").glob("*.status.json"):
        try:
            out[int(p.name.split(".")[0])] = orjson.loads(p.read_bytes()).get("slurm_job")
        except (ValueError, orjson.JSONDecodeError):
            continue
    return out


def chunk_lines(run_dir: Path, index: int) -> int:
    path = run_dir / "chunks" / f"{index:05d}.rollouts.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


class SlurmRun:
    """`rollouts collect --slurm-jobs N` in the background, watched through squeue."""

    def __init__(self, tmp: Path, agent_url: str, tasks: int, jobs: int, prefect_api: str,
                 **settings: str) -> None:  # fmt: skip
        self.tmp, self.inp, self.out = tmp, tmp / "tasks.jsonl", tmp / "rollouts.jsonl"
        write_tasks(self.inp, tasks, seed=21)
        self.tasks = tasks
        self.run_dir = run_dir_for(self.out, None)
        self.log = tmp / "collect.log"
        # Dask's own configuration, as on a real cluster: its scheduler and workers on loopback.
        env = {**os.environ, "PREFECT_API_URL": prefect_api, "ROLLOUTS_SLURM_CORES": "1",
               "ROLLOUTS_SLURM_MEMORY": "1GB", "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
               **settings}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rollouts_cli", "collect", "--slurm-jobs", str(jobs),
             f"+agent_url={agent_url}", f"+input_jsonl_fpath={self.inp}",
             f"+output_jsonl_fpath={self.out}", "+chunk_size=100",
             "+num_samples_in_parallel=8", "+max_parallel_chunks=4"],
            env=env, cwd=tmp, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.seen: dict[str, set[str]] = {}  # job id -> states seen
        self.most_at_once = 0

    def job_name(self) -> str | None:
        path = self.run_dir / SLURM_FILE
        return orjson.loads(path.read_bytes())["job_name"] if path.exists() else None

    def poll(self) -> dict[str, str]:
        name = self.job_name()
        jobs = squeue(name) if name else {}
        for job, state in jobs.items():
            self.seen.setdefault(job, set()).add(state)
        self.most_at_once = max(self.most_at_once, len(jobs))
        return jobs

    def wait(self, until: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what}: {self.log.read_text()[-3000:]}"
            self.poll()
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.2)
        return self.proc.wait(1)

    def exact(self) -> bool:
        rows = read_jsonl(self.out)
        keys = [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]
        return keys == [(t, 0) for t in range(self.tasks)]


def test_two_worker_jobs_one_cancelled_mid_run_give_the_exact_output(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "120")
    run = SlurmRun(tmp_path, agent.url, 1600, 2, prefect_api)
    try:
        # Both jobs collect (the adaptive cluster asks for the second once chunks wait).
        run.wait(lambda: len({j for j in chunk_jobs(run.run_dir).values() if j}) >= 2, 120,
                 "chunks did not spread over two worker jobs")  # fmt: skip
        status = subprocess.run(
            [sys.executable, "-m", "rollouts_cli", "status", str(run.out), "--json"],
            capture_output=True, text=True, cwd=tmp_path, check=True,
        )  # fmt: skip
        listed = orjson.loads(status.stdout)
        running = {j for j, s in run.poll().items() if s == "RUNNING"}
        assert {j["job_id"] for j in listed["slurm_jobs"]} >= running
        assert {c["slurm_job"] for c in listed["chunks"] if c["slurm_job"]} <= running
        victim = sorted(j for j in chunk_jobs(run.run_dir).values() if j)[0]
        cut = {i for i, j in chunk_jobs(run.run_dir).items()
               if j == victim and chunk_lines(run.run_dir, i) < 100}  # fmt: skip
        subprocess.run(["scancel", victim], check=True)
        assert run.finish(240) == 0, run.log.read_text()[-4000:]
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert run.exact()
    per_key = Counter(q["_ng_task_index"] for q in agent.requests())
    assert set(per_key) == set(range(1600))
    # Resent: at most what the cancelled job had in flight (its share: 8 / 2 jobs); its
    # worker stops on SIGTERM and writes what finishes within the grace.
    resent = sum(c - 1 for c in per_key.values())
    print(f"resent after the cancel: {resent}; jobs over the run: {sorted(run.seen)}")
    assert resent <= 4
    assert run.most_at_once <= 2
    # The chunks the cancelled job was collecting were finished by another job, and the
    # cluster submitted a job in its place.
    assert cut, "the cancelled job had no chunk in progress"
    finishers = chunk_jobs(run.run_dir)
    assert all(finishers[i] not in (None, victim) for i in cut), (cut, finishers)
    assert len(run.seen) >= 3, run.seen


def test_workers_retire_before_a_walltime_shorter_than_the_run_and_lose_nothing(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """A 1-minute walltime (Slurm's least): workers retire 30 s in (the margin), finish what
    they have in flight, and the cluster submits new jobs while chunks wait: more jobs than
    --slurm-jobs over the run's life, never more at once, and the exact output."""
    agent = start_agent("--latency-ms", "150")
    run = SlurmRun(tmp_path, agent.url, 1800, 2, prefect_api, ROLLOUTS_SLURM_WALLTIME="1")
    try:
        assert run.finish(300) == 0, run.log.read_text()[-4000:]
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert run.exact()
    assert len(run.seen) > 2, run.seen
    assert run.most_at_once <= 2
    per_key = Counter(q["_ng_task_index"] for q in agent.requests())
    assert set(per_key) == set(range(1800))
    resent = sum(c - 1 for c in per_key.values())
    print(f"jobs over the run: {len(run.seen)}; resent: {resent}")
    # A retiring worker finishes what it has in flight before it goes: nothing is resent.
    assert resent == 0


def test_a_multi_dataset_run_gives_each_dataset_its_own_slurm_workers(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    """`slurm_jobs` per dataset of a multi config: both datasets' chunks run in jobs of their
    own (the subflows run at once, off the main thread), both outputs exact, and the mix."""
    agent = start_agent("--latency-ms", "20")
    datasets = []
    for name, n in (("easy", 300), ("hard", 200)):
        write_tasks(tmp_path / f"{name}.jsonl", n, seed=len(name))
        datasets.append({"name": name, "input": str(tmp_path / f"{name}.jsonl"),
                         "output": str(tmp_path / f"out_{name}.jsonl"), "agent_url": agent.url,
                         "chunk_size": 100, "slurm_jobs": 1})  # fmt: skip
    config = {"datasets": datasets, "mix": {"output": str(tmp_path / "mixed.jsonl"), "total": 100,
                                            "proportions": {"easy": 0.5, "hard": 0.5}}}  # fmt: skip
    (tmp_path / "multi.json").write_text(orjson.dumps(config).decode())
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "ROLLOUTS_SLURM_CORES": "1",
           "ROLLOUTS_SLURM_MEMORY": "1GB", "DASK_JOBQUEUE__SLURM__INTERFACE": "lo"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "multi", "--config", str(tmp_path / "multi.json")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    for name, n in (("easy", 300), ("hard", 200)):
        out = tmp_path / f"out_{name}.jsonl"
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in read_jsonl(out)] == [
            (t, 0) for t in range(n)
        ]
        jobs = set(chunk_jobs(run_dir_for(out, None)).values())
        assert len(jobs) == 1 and None not in jobs, jobs  # its own job
    easy_job = chunk_jobs(run_dir_for(tmp_path / "out_easy.jsonl", None))
    hard_job = chunk_jobs(run_dir_for(tmp_path / "out_hard.jsonl", None))
    assert set(easy_job.values()).isdisjoint(hard_job.values())
    assert len(read_jsonl(tmp_path / "mixed.jsonl")) == 100
