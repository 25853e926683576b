"""Chunk workers as Slurm jobs: the job shape from settings, the worker lifetime that keeps a
job from dying at its walltime mid-request, and the run's jobs as Slurm reports them.

The cluster itself is dask-jobqueue's ``SLURMCluster`` (flows/dask_runner.py builds it from
``cluster_kwargs``); this module only computes and reads, so it is tested without Dask.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from rollouts.errors import ConfigError
from rollouts.fileio import write_json_atomic

SLURM_FILE = "slurm.json"  # in the run directory: the run's job name and log directory
JOB_ID_ENV = "SLURM_JOB_ID"  # set by Slurm in every process of a job
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def walltime_s(text: str) -> int:
    """Seconds in a Slurm time limit: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM",
    "D-HH:MM:SS" (sbatch --time)."""
    m = _WALLTIME.match(text.strip())
    if not m:
        raise ConfigError(
            f"ROLLOUTS_SLURM_WALLTIME={text!r} is not a Slurm time limit "
            '(e.g. "30", "01:00:00", "1-12:00:00")'
        )
    days, a, b, c = (int(g) if g else None for g in m.groups())
    assert a is not None
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + (b or 0) * 60 + c
    return a * 60 + (b or 0)  # MM[:SS]


def lifetime_margin_s(walltime: int) -> int:
    """How long before its walltime a worker retires: 10% of the walltime, at least 30 s (a
    graceful stop's grace and the job's clean-up), at most 10 min."""
    return max(30, min(600, walltime // 10))


@dataclass(frozen=True)
class JobShape:
    """One worker job: ROLLOUTS_SLURM_* settings."""

    partition: str | None
    account: str | None
    walltime: str
    cores: int  # CPUs of the job (--cpus-per-task)
    memory: str  # of the job, split over its worker processes
    processes: int  # Dask worker processes per job
    job_extra: list[str]  # extra #SBATCH lines, as given
    python: str | None  # the workers' interpreter; None: this one's

    def worker_lifetime_s(self) -> int:
        total = walltime_s(self.walltime)
        return max(1, total - lifetime_margin_s(total))


def job_name(run_id: str) -> str:
    """The run's worker jobs' name (squeue --name): one run's jobs, whoever else uses Slurm."""
    return f"rollouts-{run_id[:8]}"


def cluster_kwargs(
    shape: JobShape, run_id: str, threads_per_process: int, log_dir: Path, env: dict[str, str]
) -> dict[str, Any]:
    """``SLURMCluster``'s arguments. Workers run ``threads_per_process`` chunk threads each
    (Dask's threads are our chunk tasks, not CPU work: the job's CPUs are ``shape.cores``).
    ``env`` is exported in the job script, except values that carry a password (a URL's
    ``user:password@``): Slurm stores job scripts; those reach the job through sbatch's
    exported environment only."""
    lifetime = shape.worker_lifetime_s()
    # Dask staggers by +/- this much: a third of the margin at most, so that a worker
    # retires at least two thirds of the margin before its walltime.
    stagger = min(60, lifetime_margin_s(walltime_s(shape.walltime)) // 3)
    return {
        "job_name": job_name(run_id),
        "queue": shape.partition,
        "account": shape.account,
        "walltime": shape.walltime,
        "cores": threads_per_process * shape.processes,
        "job_cpu": shape.cores,
        "processes": shape.processes,
        "memory": shape.memory,
        "job_extra_directives": list(shape.job_extra),
        "python": shape.python or sys.executable,
        "log_directory": str(log_dir),
        "job_script_prologue": [
            f"export {k}={_shell_quote(v)}" for k, v in sorted(env.items()) if not _has_password(v)
        ],
        # Retire before the walltime instead of being killed mid-request; staggered so that
        # the run's workers do not all leave at once. No restart: the job ends with its
        # worker, and the cluster submits a new job while chunks wait.
        "worker_extra_args": ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"],
        # No dashboard, and its HTTP server on any free port: two runs at once must not
        # compete for 8787. The rest of the scheduler's and workers' network (interface,
        # protocol) is Dask's own configuration: jobqueue.slurm.*
        "scheduler_options": {"dashboard": False, "dashboard_address": ":0"},
        # The cluster's INFO (workers coming and going, "lost already computed tasks": chunks
        # that come back from the cache) is not the run's news; its errors are.
        "silence_logs": "error",
    }


def _has_password(value: str) -> bool:
    return "://" in value and urlsplit(value).password is not None


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def record_jobs(run_dir: Path, run_id: str, log_dir: Path) -> None:
    """Tell `rollouts status` where this run's worker jobs are (name and log directory)."""
    write_json_atomic(run_dir / SLURM_FILE, {"job_name": job_name(run_id), "logs": str(log_dir)})


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    node: str  # where it runs, or why it waits
    elapsed: str


def run_jobs(run_dir: Path) -> list[SlurmJob] | None:
    """The run's worker jobs that Slurm still lists, or None for a run without Slurm workers
    (or where ``squeue`` is not available)."""
    path = Path(run_dir) / SLURM_FILE
    if not path.exists() or shutil.which("squeue") is None:
        return None
    try:
        name = orjson.loads(path.read_bytes())["job_name"]
        out = subprocess.run(
            ["squeue", "--noheader", f"--name={name}", "--format=%i|%T|%N|%R|%M"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, KeyError, orjson.JSONDecodeError, subprocess.SubprocessError):
        return None
    jobs = []
    for line in out.splitlines():
        job_id, state, node, reason, elapsed = (line.split("|") + [""] * 5)[:5]
        jobs.append(SlurmJob(job_id, state, node or reason, elapsed))
    return jobs


def this_job_id() -> str | None:
    """The Slurm job this process runs in, if any."""
    return os.environ.get(JOB_ID_ENV)
