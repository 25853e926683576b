"""Chunk collection in several processes: a local Dask cluster (`processes`), a remote one,
or workers that are Slurm jobs (`slurm_jobs`, dask-jobqueue), through prefect-dask (the
`[dask]` and `[slurm]` extras).

The flow stays where it is; chunk tasks go to Dask workers. Every worker must see the run's
work directory and Prefect's result storage (a shared filesystem): `check_shared_storage`
refuses, before any request is sent, a cluster where one cannot. A worker that leaves (a
Slurm job cancelled, preempted or retiring before its walltime) stops its chunks gracefully;
Dask runs them again elsewhere, and they resume from the rows written (the chunk's writer
lock keeps the two attempts apart: rollouts/run_state.py).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollouts.collect import DispatchPlan
from rollouts.dispatchers import WorkerPlan, request_worker_stop, share_budget
from rollouts.errors import ConfigError, SharedStorageError, WorkersUnavailable
from rollouts.models import ChunkSpec, CollectConfig
from rollouts.settings import TEMPORARY_API_ENV, RolloutsSettings
from rollouts.slurm import JobShape, cluster_kwargs, job_name, record_jobs, run_jobs
from rollouts.stopping import Stopper

if TYPE_CHECKING:
    from prefect import State

PROBE_NAME = ".rollouts-probe"


def dask_enabled(settings: RolloutsSettings, processes: int, slurm_jobs: int | None) -> bool:
    return bool(settings.dask_address) or processes > 1 or slurm_jobs is not None


def prepare_worker_environment(
    settings: RolloutsSettings, api_url: str, slurm_jobs: int | None
) -> None:
    """Workers must talk to this run's Prefect API and share its result storage.

    A local cluster's worker processes inherit this process's environment: point them at the
    API in use (even an ephemeral one). Workers elsewhere (a remote cluster, Slurm jobs) need
    a Prefect server they can reach: say so before anything starts.
    """
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if settings.dask_address or slurm_jobs is not None:
        if not current.api.url or current.api.url == os.environ.get(TEMPORARY_API_ENV):
            where = "Slurm worker jobs" if slurm_jobs is not None else "Dask workers"
            raise ConfigError(
                f"{where} need a Prefect server they can reach: set PREFECT_API_URL (e.g. "
                "`make server`) here and on every worker. This run uses a temporary local API."
            )
        return
    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(
        Path(current.results.local_storage_path).expanduser()
    )


def make_task_runner(
    settings: RolloutsSettings, processes: int, chunks_at_once: int, slurm: SlurmWorkers | None
) -> Any:
    try:
        from prefect_dask.task_runners import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "more than one process (--processes) or a Dask cluster (--dask-address) needs the "
            "[dask] extra, which is not installed: pip install -e '.[dask]'"
        ) from None
    if slurm is not None:
        return slurm.task_runner(DaskTaskRunner, chunks_at_once)
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # A chunk task holds its thread until its last rollout is in, but its chunk slot only while
    # it dispatches: twice the threads of the slots, so chunks finishing their stragglers never
    # keep the next ones from filling the process's share of the budget.
    threads = 2 * chunks_per_process(chunks_at_once, processes)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": processes, "threads_per_worker": threads,
                        "processes": True, "dashboard_address": None}
    )  # fmt: skip


def probe_shared_storage(
    run_dir: str, marker: str, results_marker: str | None, api_url: str
) -> str | None:
    """Runs on each worker: the problem it has with the shared paths, or None."""
    from prefect.settings import get_current_settings

    where = f"{socket.gethostname()}:{os.getpid()}"
    worker_api = get_current_settings().api.url
    if not worker_api or worker_api.rstrip("/") != api_url.rstrip("/"):
        return (
            f"worker {where} uses Prefect API {worker_api or '(a temporary local one)'}, not "
            f"this run's {api_url}: set PREFECT_API_URL on the workers"
        )
    if not (Path(run_dir) / marker).exists():
        return f"worker {where} cannot see the work directory {run_dir}"
    if results_marker is not None:
        storage = Path(get_current_settings().results.local_storage_path).expanduser()
        if not (storage / results_marker).exists():
            return (
                f"worker {where} does not share the flow's Prefect result storage (its "
                f"PREFECT_RESULTS_LOCAL_STORAGE_PATH is {storage})"
            )
    return None


def check_shared_storage(client: Any, run_dir: Path, run_id: str, api_url: str) -> list[str]:
    """Refuse a cluster whose workers cannot see the work dir or result storage.

    Returns the workers' names.
    """
    from prefect.settings import get_current_settings

    marker = f"{PROBE_NAME}-{run_id}"
    (run_dir / marker).write_text(run_id)
    storage = Path(get_current_settings().results.local_storage_path).expanduser()
    storage.mkdir(parents=True, exist_ok=True)
    (storage / marker).write_text(run_id)
    try:
        answers: dict[str, str | None] = client.run(
            probe_shared_storage, str(run_dir), marker, marker, api_url
        )
    finally:
        for path in (run_dir / marker, storage / marker):
            path.unlink(missing_ok=True)
    if not answers:
        raise SharedStorageError("the Dask cluster has no workers")
    problems = sorted(p for p in answers.values() if p)
    if problems:
        raise SharedStorageError(
            "; ".join(problems)
            + ". Every Dask worker must see ROLLOUTS_WORK_DIR and PREFECT_RESULTS_LOCAL_STORAGE_PATH"
            " at the same paths (a shared filesystem); see docs/scaling.md, 'Scale past one machine'."
        )
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(str(w["name"]) for a, w in workers.items() if a in answers)


def chunks_per_process(chunks_at_once: int, processes: int) -> int:
    return math.ceil(chunks_at_once / processes)


def worker_plan(
    settings: RolloutsSettings, config: CollectConfig, workers: list[str], run_id: str,
    slurm: SlurmWorkers | None = None,
) -> WorkerPlan:  # fmt: skip
    """Each worker's share of the run's requests in flight and of its chunks at once (a
    remote cluster's threads are its operator's choice: no chunk limit there). Slurm workers
    come and go: each takes the share of one of the most there can be at once."""
    if slurm is not None:
        slots = slurm.max_workers
        share = settings.dask_worker_in_flight or min(
            share_budget(config.in_flight_ceiling, [str(i) for i in range(slots)]).values()
        )
        per_process = chunks_per_process(config.max_parallel_chunks, slots)
        return WorkerPlan(run_id, {}, per_process, config.adaptive, other_workers=share)
    if settings.dask_worker_in_flight:
        budgets = dict.fromkeys(workers, settings.dask_worker_in_flight)
    else:
        budgets = share_budget(config.in_flight_ceiling, workers)
    chunks = (
        None if settings.dask_address
        else chunks_per_process(config.max_parallel_chunks, len(workers))
    )  # fmt: skip
    return WorkerPlan(run_id, budgets, chunks, config.adaptive)


def collect_on_dask(
    chunk_task: Any, chunks: list[ChunkSpec], plan: DispatchPlan, run_id: str, run_dir: Path,
    settings: RolloutsSettings, config: CollectConfig, processes: int, stop: Stopper,
) -> list[State[Any]]:  # fmt: skip
    """Run the chunk tasks on Dask workers (prefect-dask): a local cluster of ``processes``,
    the one at ROLLOUTS_DASK_ADDRESS, or ``slurm_jobs`` Slurm jobs. Each worker has its own
    client and budget share.
    Workers enforce the run's deadline themselves; a stop asked of the flow is relayed."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    prepare_worker_environment(settings, api_url, config.slurm_jobs)
    slurm = (
        None if config.slurm_jobs is None
        else SlurmWorkers(settings, config.slurm_jobs, run_id, run_dir, api_url)
    )  # fmt: skip
    if slurm is not None:
        slurm.configure_dask()
    with make_task_runner(settings, processes, config.max_parallel_chunks, slurm) as runner:
        worker = checked_workers(runner.client, settings, config, run_id, run_dir, api_url, slurm)
        futures = [
            runner.submit(chunk_task, parameters={"spec": spec, "plan": plan, "dispatch": worker,
                                                  "stop_plan": stop.plan,
                                                  "retry": bool(config.retry_failure_classes)})
            for spec in chunks
        ]  # fmt: skip
        wait_relaying_stop(futures, stop, lambda: runner.client.run(
            request_worker_stop, run_id, stop.plan, stop.reason))  # fmt: skip
        return [future.state for future in futures]


def checked_workers(
    client: Any, settings: RolloutsSettings, config: CollectConfig, run_id: str, run_dir: Path,
    api_url: str, slurm: SlurmWorkers | None,
) -> WorkerPlan:  # fmt: skip
    """Before any chunk is submitted: a worker to check (Slurm: the first job), every worker
    checked (shared storage, the same API), the stop plugin on each; their plan."""
    from prefect import get_run_logger

    from flows.dask_plugins import StopChunksOnClose

    if slurm is not None:
        slurm.wait_for_first_worker(client)
    workers = check_shared_storage(client, run_dir, run_id, api_url)
    plan = worker_plan(settings, config, workers, run_id, slurm)
    client.register_plugin(
        StopChunksOnClose(close_on_sigterm=slurm is not None), name=StopChunksOnClose.name
    )
    get_run_logger().info("collecting %s", placement(settings, slurm, workers, plan))
    return plan


STOPPED_WAIT_MARGIN_S = 30.0  # beyond the grace: for the workers to write and report


def wait_relaying_stop(futures: list[Any], stop: Stopper, relay: Callable[[], Any]) -> None:
    """Wait for every future; once ``stop`` is asked to stop (a signal, a cancellation, read
    from this thread), ``relay`` it to the workers once. After a stop the wait is bounded
    (the grace and a margin): chunks whose workers went away without answering count as not
    finished, and the run ends as stopped instead of waiting for workers that are gone."""
    relayed_at: float | None = None
    for future in futures:
        while not future.wrapped_future.done():
            future.wait(timeout=0.2)
            if stop.reason is not None and relayed_at is None:
                relay()
                relayed_at = time.monotonic()
            if relayed_at is not None and (
                time.monotonic() - relayed_at > stop.grace_s() + STOPPED_WAIT_MARGIN_S
            ):
                return


def placement(
    settings: RolloutsSettings, slurm: SlurmWorkers | None, workers: list[str], plan: WorkerPlan
) -> str:
    """Where chunks run, for the log."""
    if slurm is not None:
        return (
            f"in Slurm jobs {job_name(plan.run_id)} (1 to {slurm.jobs}, "
            f"{slurm.shape.processes} processes each), requests in flight per process: "
            f"{plan.other_workers}"
        )
    where = f"on Dask at {settings.dask_address}" if settings.dask_address else "locally"
    shares = ", ".join(str(b) for b in plan.budgets.values())
    return f"{where}: {len(workers)} processes, requests in flight each: {shares}"


def check_job_shape(shape: JobShape) -> None:
    """Ask Slurm whether it would take a worker job of this shape (``sbatch --test-only``:
    nothing is submitted), so that a wrong partition, account or size is refused at once
    instead of leaving the run waiting for a job that never starts."""
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "slurm_jobs (--slurm-jobs) submits worker jobs with sbatch, which is not on PATH: "
            "run the command where Slurm's client commands are (a login node)"
        )
    from dask.utils import parse_bytes  # the [slurm] extra's, as dask-jobqueue reads it

    try:
        mem_mib = math.ceil(parse_bytes(shape.memory) / 2**20)
    except ValueError:
        raise ConfigError(
            f"ROLLOUTS_SLURM_MEMORY={shape.memory!r} is not a size (e.g. 2GB, 1536MiB)"
        ) from None
    args = ["sbatch", "--test-only", f"--time={shape.walltime}",
            f"--cpus-per-task={shape.cores}", f"--mem={mem_mib}M", *shape.job_extra]  # fmt: skip
    if shape.partition:
        args.append(f"--partition={shape.partition}")
    if shape.account:
        args.append(f"--account={shape.account}")
    try:
        done = subprocess.run([*args, "--wrap=true"], capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return  # a slow controller is no verdict: the run's own wait reports a job that waits
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise ConfigError(
            f"Slurm refuses the worker jobs' shape (ROLLOUTS_SLURM_*): {said} "
            f"(checked with: {' '.join(args)})"
        )


def import_dask_jobqueue() -> None:
    """Import dask-jobqueue without the SIGINT handler it installs when imported (its
    runner module calls ``signal.signal(SIGINT, sys.exit)``): that would replace our graceful
    Ctrl-C, and it fails outright off the main thread, where a subflow may run."""
    if "dask_jobqueue" in sys.modules:
        return
    install, importer = signal.signal, threading.current_thread()

    def install_elsewhere(signum: int, handler: Any) -> Any:
        # Only the importing thread's installs are skipped: the main thread may install its
        # own handlers meanwhile (another dataset's run starting).
        if threading.current_thread() is importer:
            return signal.getsignal(signum)
        return install(signum, handler)

    signal.signal = install_elsewhere  # type: ignore[assignment]
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        raise ConfigError(
            "slurm_jobs (--slurm-jobs) needs the [slurm] extra, which is not installed: "
            "pip install -e '.[slurm]'"
        ) from None
    finally:
        signal.signal = install


class SlurmWorkers:
    """The run's worker jobs: dask-jobqueue's SLURMCluster, adaptive between 1 and ``jobs``."""

    def __init__(
        self, settings: RolloutsSettings, jobs: int, run_id: str, run_dir: Path, api_url: str
    ) -> None:
        self.settings, self.jobs, self.run_id, self.run_dir = settings, jobs, run_id, run_dir
        self.api_url = api_url
        self.shape = settings.slurm_job_shape()
        self.log_dir = run_dir / "slurm"

    @property
    def max_workers(self) -> int:
        return self.jobs * self.shape.processes

    def task_runner(self, runner_class: Any, chunks_at_once: int) -> Any:
        check_job_shape(self.shape)
        import_dask_jobqueue()
        from prefect.settings import get_current_settings

        self.log_dir.mkdir(parents=True, exist_ok=True)
        record_jobs(self.run_dir, self.run_id, self.log_dir)
        storage = Path(get_current_settings().results.local_storage_path).expanduser()
        env = {"PREFECT_API_URL": self.api_url, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(storage)}
        threads = 2 * chunks_per_process(chunks_at_once, self.max_workers)  # as a local worker
        return runner_class(
            cluster_class="dask_jobqueue.SLURMCluster",
            cluster_kwargs=cluster_kwargs(self.shape, self.run_id, threads, self.log_dir, env),
            # Every waiting chunk is worth a worker: a short target duration (5 s by default:
            # as many workers as finish the waiting work in it).
            adapt_kwargs={"minimum_jobs": 1, "maximum_jobs": self.jobs, "target_duration": "1s"},
        )

    @staticmethod
    def configure_dask() -> None:
        """Dask settings for adaptive job clusters, set for the process and never restored:
        several datasets' clusters live at once on threads of one process, and a setting
        restored under a living cluster breaks it (Dask reads some of them late)."""
        import dask

        # Until a chunk has finished, Dask guesses a task takes 0.5 s: the adaptive cluster
        # would see a few seconds of work and ask for one job. A chunk takes minutes. A
        # worker gone (its job cancelled) is given up after 5 s (15 by default), and its job
        # replaced while chunks wait.
        dask.config.set({"distributed.scheduler.unknown-task-duration": "10m",
                         "distributed.deploy.lost-worker-timeout": "5s"})  # fmt: skip
        # dask-jobqueue's cluster logs through the `distributed` logger, which Prefect's
        # console handler shows at INFO: workers joining and leaving are not the run's news.
        logging.getLogger("distributed").setLevel(logging.ERROR)

    def wait_for_first_worker(self, client: Any) -> None:
        """The checks need a worker: wait for the first job, or say why Slurm keeps it."""
        timeout = self.settings.slurm_start_timeout_s
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            jobs = run_jobs(self.run_dir) or []
            states = "; ".join(f"job {j.job_id} {j.state} ({j.node})" for j in jobs)
            raise WorkersUnavailable(
                f"no Slurm worker job of {job_name(self.run_id)} started within {timeout:g} s "
                f"(ROLLOUTS_SLURM_START_TIMEOUT_S): {states or 'squeue lists none'}; job logs "
                f"in {self.log_dir}. Nothing was sent; rerun the same command to resume."
            ) from None

