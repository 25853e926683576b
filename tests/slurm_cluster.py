"""The repository's one-node Slurm (scripts/slurm.sh) for the tests that submit jobs.

`slurm_cluster` (tests/conftest.py) runs `scripts/slurm.sh start` once per session: it installs
Debian's slurm-wlm and munge when they are missing and starts the daemons that do not run yet,
so `make test` works on a fresh machine. At the end of the session it stops only the daemons
that it started (a cluster that CI or a developer started keeps running). Where Slurm cannot be
set up (not root, no apt-get, no packages, a slurm.conf of someone else's) the tests that need
it are skipped with the script's reason.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_SH = ROOT / "scripts" / "slurm.sh"
UNAVAILABLE = 3  # scripts/slurm.sh start: Slurm cannot be set up on this machine
# A fresh install (apt) takes about 15 s here; the daemons start in about 1 s.
START_TIMEOUT_S = 300
# Terminal states of a job that is not coming back (a requeued job passes through PENDING).
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"})  # fmt: skip
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class SlurmCluster:
    """The running one-node cluster: submit jobs and read their state."""

    start_log: str  # what `scripts/slurm.sh start` said (installed, started, already running)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit a batch job; its id."""
        done = subprocess.run(["sbatch", "--parsable", *args], check=False, cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, f"sbatch {' '.join(args)} failed: {done.stderr}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str] | None:
        """`scontrol show job` as fields (JobState, Restarts, ExitCode, ...); None once the
        job has left slurmctld's memory (MinJobAge after its end)."""
        done = subprocess.run(["scontrol", "-o", "show", "job", job_id], check=False,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if done.returncode != 0:
            return None
        return dict(_FIELD.findall(done.stdout))

    def wait_for(
        self, job_id: str, what: str, ready: Callable[[dict[str, str]], bool], timeout_s: float
    ) -> dict[str, str]:
        """Poll the job until ``ready`` holds for its fields; its fields then. ``what`` names
        the wait in the failure."""
        deadline = time.monotonic() + timeout_s
        fields: dict[str, str] | None = None
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields is not None and ready(fields):
                return fields
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id}: {what} not reached in {timeout_s:g} s; last seen {fields}"
        )

    def wait_until_ended(self, job_id: str, timeout_s: float) -> dict[str, str]:
        return self.wait_for(job_id, "the end", lambda f: f["JobState"] in ENDED, timeout_s)

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], check=False, capture_output=True, timeout=30)


def _slurm_sh(command: str, state_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SLURM_SH), command, str(state_file)], check=False,
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)  # fmt: skip


@contextlib.contextmanager
def slurm_cluster_started(state_file: Path) -> Iterator[SlurmCluster]:
    """`scripts/slurm.sh start` with a state file of our own; `stop` with it at the end stops
    only what this start started. Skips (pytest.skip) where Slurm cannot be set up here."""
    try:
        started = _slurm_sh("start", state_file)
    except FileNotFoundError as e:  # no bash: not a machine of this kind
        pytest.skip(f"needs bash to set up Slurm with scripts/slurm.sh ({e})")
    if started.returncode == UNAVAILABLE:
        pytest.skip(f"needs Slurm (scripts/slurm.sh start): {started.stderr.strip()}")
    if started.returncode != 0:
        raise RuntimeError(
            f"scripts/slurm.sh start failed ({started.returncode}):\n{started.stderr}"
        )
    try:
        yield SlurmCluster(started.stderr.strip())
    finally:
        _slurm_sh("stop", state_file)
