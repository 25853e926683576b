"""Slurm worker jobs without a cluster: the job script they are submitted with, the settings
refused before anything starts, and the one-writer-per-chunk lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollouts.chunks import ChunkFiles
from rollouts.errors import ConfigError
from rollouts.models import CollectConfig
from rollouts.request import collecting_processes
from rollouts.run_state import chunk_writer_lock
from rollouts.settings import RolloutsSettings
from rollouts.slurm import cluster_kwargs, walltime_s


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("5:30", 330), ("01:00:00", 3600), ("2-00", 172800),
     ("1-12:30", 131400), ("1-00:00:10", 86410)],
)  # fmt: skip
def test_walltime_reads_slurm_time_formats(text: str, seconds: int) -> None:
    assert walltime_s(text) == seconds


@pytest.mark.fast
def test_a_bad_walltime_or_a_second_placement_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CollectConfig(input_jsonl_fpath="in.jsonl", output_jsonl_fpath="out.jsonl",
                           slurm_jobs=2)  # fmt: skip
    monkeypatch.setenv("ROLLOUTS_SLURM_WALLTIME", "an hour")
    with pytest.raises(ConfigError, match="ROLLOUTS_SLURM_WALLTIME='an hour'"):
        collecting_processes(config, RolloutsSettings())
    monkeypatch.delenv("ROLLOUTS_SLURM_WALLTIME")
    both = config.model_copy(update={"processes": 2})
    with pytest.raises(ConfigError, match=r"slurm_jobs=2 .* processes=2 .* choose one"):
        collecting_processes(both, RolloutsSettings())
    monkeypatch.setenv("ROLLOUTS_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    with pytest.raises(ConfigError, match=r"ROLLOUTS_DASK_ADDRESS .* choose one"):
        collecting_processes(config, RolloutsSettings())
    with pytest.raises(ValueError, match="slurm_jobs must be at least 1"):
        CollectConfig(input_jsonl_fpath="in.jsonl", output_jsonl_fpath="out.jsonl", slurm_jobs=0)


def test_the_job_script_has_the_shape_from_settings_and_never_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script dask-jobqueue submits, built from ROLLOUTS_SLURM_* as a user sets them."""
    from dask_jobqueue import SLURMCluster

    monkeypatch.setenv("ROLLOUTS_SLURM_PARTITION", "cpu")
    monkeypatch.setenv("ROLLOUTS_SLURM_ACCOUNT", "proj7")
    monkeypatch.setenv("ROLLOUTS_SLURM_WALLTIME", "02:00:00")
    monkeypatch.setenv("ROLLOUTS_SLURM_CORES", "4")
    monkeypatch.setenv("ROLLOUTS_SLURM_MEMORY", "8GB")
    monkeypatch.setenv("ROLLOUTS_SLURM_PROCESSES", "2")
    monkeypatch.setenv("ROLLOUTS_SLURM_JOB_EXTRA", "--qos=high\n--constraint=intel")
    monkeypatch.setenv("ROLLOUTS_SLURM_PYTHON", "/shared/venv/bin/python")
    monkeypatch.setenv("ROLLOUTS_AGENT_API_KEY", "sk-never-in-a-job-script")
    shape = RolloutsSettings().slurm_job_shape()
    env = {"PREFECT_API_URL": "http://prefect-host:4200/api"}
    kwargs = cluster_kwargs(shape, "0123456789abcdef", 3, tmp_path / "logs", env)
    with SLURMCluster(**kwargs) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -J rollouts-01234567", "#SBATCH -p cpu", "#SBATCH -A proj7",
                 "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G",
                 "#SBATCH --qos=high", "#SBATCH --constraint=intel",
                 "export PREFECT_API_URL='http://prefect-host:4200/api'"):  # fmt: skip
        assert line in script, script
    assert script.count("/shared/venv/bin/python -m distributed.cli.dask_worker") == 1
    # 2 processes of 3 chunk threads each; retiring 10 min (10% of 2 h, at most 10 min)
    # before the walltime
    assert "--nworkers 2 --nanny" in script and "--nthreads 3" in script
    assert "--lifetime 6600s --lifetime-stagger 60s" in script
    assert "sk-never" not in script


@pytest.mark.fast
def test_a_chunk_has_one_writer_a_second_waits_until_the_first_is_done(tmp_path: Path) -> None:
    """As when Dask gives a chunk to a new worker while the old one still drains: the new
    attempt starts writing only once the other process has let go (or died)."""
    files = ChunkFiles.at(tmp_path, 3)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(files.writer_lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'w1:42'); print('held', flush=True)\n"
         "time.sleep(1.0)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"

    async def second_writer() -> float:
        async with chunk_writer_lock(files):
            return time.monotonic()

    entered = asyncio.run(second_writer())
    assert holder.poll() is not None  # it entered only after the holder was gone
    assert holder.wait() == 0
    assert entered > 0


def test_slurm_workers_refuse_the_commands_temporary_prefect_api(
    monkeypatch: pytest.MonkeyPatch, prefect_api: str
) -> None:
    """Jobs on other nodes could not reach a temporary API on 127.0.0.1: said before any job
    is submitted."""
    from flows.dask_runner import prepare_worker_environment
    from rollouts.settings import TEMPORARY_API_ENV

    monkeypatch.setenv(TEMPORARY_API_ENV, prefect_api)
    with pytest.raises(ConfigError, match="Slurm worker jobs need a Prefect server"):
        prepare_worker_environment(RolloutsSettings(), prefect_api, slurm_jobs=2)
    monkeypatch.delenv(TEMPORARY_API_ENV)
    prepare_worker_environment(RolloutsSettings(), prefect_api, slurm_jobs=2)  # a real server


@pytest.mark.usefixtures("slurm_cluster")
def test_a_job_shape_slurm_would_refuse_is_refused_before_any_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong partition, or more CPUs than a node has: Slurm's own words, at once, instead of
    a run that waits for a job that never starts."""
    from rollouts.slurm import check_job_shape

    monkeypatch.setenv("ROLLOUTS_SLURM_MEMORY", "1GB")
    check_job_shape(RolloutsSettings().slurm_job_shape())  # the repository's cluster takes it
    monkeypatch.setenv("ROLLOUTS_SLURM_PARTITION", "no-such-partition")
    with pytest.raises(ConfigError, match=r"Slurm refuses .* invalid partition specified"):
        check_job_shape(RolloutsSettings().slurm_job_shape())
    monkeypatch.delenv("ROLLOUTS_SLURM_PARTITION")
    monkeypatch.setenv("ROLLOUTS_SLURM_CORES", "512")
    with pytest.raises(ConfigError, match="Requested node configuration is not available"):
        check_job_shape(RolloutsSettings().slurm_job_shape())
    monkeypatch.setenv("ROLLOUTS_SLURM_MEMORY", "lots")
    with pytest.raises(ConfigError, match="ROLLOUTS_SLURM_MEMORY='lots' is not a size"):
        check_job_shape(RolloutsSettings().slurm_job_shape())
