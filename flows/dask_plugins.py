"""Dask worker plugins (imported on workers: keep this module's imports light)."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from rollouts.dispatchers import request_stop_everywhere, stop_worker_dispatchers

CLOSING = (Status.closing, Status.closing_gracefully, Status.closed)


class StopChunksOnClose(WorkerPlugin):
    """When the worker closes (its Slurm job cancelled, preempted or retiring before its
    walltime; a `dask worker` stopped), its chunks stop as on SIGTERM: no rollout starts,
    those in flight get their grace, and what finished is written before the process goes.
    The chunks that were not finished run again on other workers, which wait for the chunk's
    writer lock (rollouts/run_state.py) until this one has let go.

    ``close_on_sigterm`` (Slurm workers): Slurm signals every process of a cancelled or
    preempted job, so a nanny's worker process gets SIGTERM itself and would die at once,
    mid-request; it closes instead, and Dask gives its chunks to other workers. Local workers
    only stop their chunks: their SIGTERM is the whole command's, whose flow stops too."""

    name = "rollouts-stop-chunks-on-close"

    def __init__(self, close_on_sigterm: bool = False) -> None:
        self.close_on_sigterm = close_on_sigterm

    def setup(self, worker: Any) -> None:
        if worker.nanny is None or threading.current_thread() is not threading.main_thread():
            return  # no nanny: `dask worker`'s own SIGTERM handling closes this process
        loop = asyncio.get_running_loop()
        close = self.close_on_sigterm

        def on_sigterm(signum: int, frame: Any) -> None:
            request_stop_everywhere()
            if close:
                loop.call_soon_threadsafe(
                    lambda: asyncio.ensure_future(worker.close(reason="SIGTERM"))
                )

        signal.signal(signal.SIGTERM, on_sigterm)

    async def teardown(self, worker: Any) -> None:
        # Also called when a later run registers this plugin again on a shared cluster: only
        # a worker that is going away stops its chunks.
        if worker.status not in CLOSING:
            return
        await asyncio.to_thread(stop_worker_dispatchers)
        # Prefect sends logs in batches every 2 s: a worker whose job ends at the end of the
        # run (the cluster cancels it) would otherwise take its chunks' last lines with it.
        from prefect.logging.handlers import APILogWorker

        await asyncio.to_thread(APILogWorker.drain_all, timeout=5)
