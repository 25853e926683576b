"""Slurm worker jobs without a cluster: the job script they are submitted with, the settings
refused before anything starts, and the one-writer-per-chunk lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rollouts.chunks import ChunkFiles
from rollouts.errors import ConfigError
from rollouts.models import CollectConfig
from rollouts.request import collecting_processes
from rollouts.run_state import chunk_writer_lock
from rollouts.settings import RolloutsSettings
from rollouts.slurm import walltime_s


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


@pytest.mark.usefixtures("slurm_cluster")  # the shape is checked with sbatch --test-only
def test_the_job_script_has_the_shape_from_settings_and_never_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script dask-jobqueue would submit, built by the flow's own path (SlurmWorkers) from
    ROLLOUTS_SLURM_* as a user sets them, with an agent key set and a Prefect API URL that
    carries a password: neither reaches the script, which Slurm stores."""
    from dask_jobqueue import SLURMCluster

    from flows.dask_runner import SlurmWorkers

    monkeypatch.setenv("ROLLOUTS_SLURM_WALLTIME", "02:00:00")
    monkeypatch.setenv("ROLLOUTS_SLURM_CORES", "2")
    monkeypatch.setenv("ROLLOUTS_SLURM_MEMORY", "1GB")
    monkeypatch.setenv("ROLLOUTS_SLURM_PROCESSES", "2")
    monkeypatch.setenv("ROLLOUTS_SLURM_JOB_EXTRA", "--nice=10\n--comment=rollouts")
    monkeypatch.setenv("ROLLOUTS_SLURM_PYTHON", sys.executable)
    monkeypatch.setenv("ROLLOUTS_AGENT_API_KEY", "sk-never-in-a-job-script")
    api = "http://alice:pw-never-in-a-job-script@127.0.0.1:4200/api"
    workers = SlurmWorkers(RolloutsSettings(), 3, "0123456789abcdef", tmp_path, api)
    built: dict[str, Any] = {}
    workers.task_runner(lambda **kwargs: built.update(kwargs), chunks_at_once=4)
    with SLURMCluster(**built["cluster_kwargs"]) as cluster:
        script = cluster.job_script()
    assert built["adapt_kwargs"]["maximum_jobs"] == 3
    for line in ("#SBATCH -J rollouts-01234567", "#SBATCH -t 02:00:00",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --mem=954M", "#SBATCH --nice=10",
                 "#SBATCH --comment=rollouts", "export PREFECT_RESULTS_LOCAL_STORAGE_PATH="):  # fmt: skip
        assert line in script, script
    assert script.count(f"{sys.executable} -m distributed.cli.dask_worker") == 1
    # 2 processes of 2 chunk threads each (4 chunks over 3 jobs x 2 processes: 1 each, twice);
    # retiring 10 min (10% of 2 h, at most 10 min) before the walltime, +/- 60 s
    assert "--nworkers 2 --nanny" in script and "--nthreads 2" in script
    assert "--lifetime 6600s --lifetime-stagger 60s" in script
    assert "never-in-a-job-script" not in script
    assert "PREFECT_API_URL" not in script  # it carries a password: the environment has it


@pytest.mark.fast
def test_a_chunk_has_one_writer_a_second_waits_until_the_first_is_done(tmp_path: Path) -> None:
    """As when Dask gives a chunk to a new worker while the old one still drains: the new
    attempt starts writing only once the other process has let go (or died)."""
    files = ChunkFiles.at(tmp_path, 3)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(files.writer_lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True)\n"
         "time.sleep(1.0)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"

    async def second_writer() -> None:
        async with chunk_writer_lock(files, lambda: None):
            pass

    asyncio.run(second_writer())
    assert holder.poll() is not None  # it entered only after the holder was gone
    assert holder.wait() == 0


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
    from flows.dask_runner import check_job_shape

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


@pytest.mark.fast
def test_a_stopped_run_does_not_wait_for_a_chunk_another_process_writes(tmp_path: Path) -> None:
    """A stop (signal, deadline, cancel) ends the wait for a chunk's writer lock at once."""
    from rollouts.errors import RunStopped

    files = ChunkFiles.at(tmp_path, 4)
    files.status.write_text('{"worker": "w1:42"}')  # written by the holder once it holds it
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, time\n"
         f"fd = os.open({str(files.writer_lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True)\n"
         "time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        reasons: list[str | None] = [None, None, "SIGTERM"]

        async def waiter() -> None:
            async with chunk_writer_lock(files, lambda: reasons.pop(0) if reasons else "SIGTERM"):
                raise AssertionError("entered while another process held the chunk")

        started = time.monotonic()
        expected = r"chunk 00004: stopped \(SIGTERM\) while waiting for w1:42"
        with pytest.raises(RunStopped, match=expected):
            asyncio.run(waiter())
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()
