"""Against the real one-node Slurm that the repository sets up (scripts/slurm.sh)."""

from __future__ import annotations

import socket
from pathlib import Path

from slurm_cluster import SlurmCluster


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
