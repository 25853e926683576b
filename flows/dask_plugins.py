"""Dask worker plugins (imported on workers: keep this module's imports light)."""

from __future__ import annotations

import asyncio
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from rollouts.dispatchers import stop_worker_dispatchers


class StopChunksOnClose(WorkerPlugin):
    """When the worker closes (its Slurm job cancelled, preempted or retiring before its
    walltime; a `dask worker` stopped), its chunks stop as on SIGTERM: no rollout starts,
    those in flight get their grace, and what finished is written before the process goes.
    Dask has already given those chunks to other workers, which wait for their writer lock."""

    name = "rollouts-stop-chunks-on-close"

    async def teardown(self, worker: Any) -> None:
        await asyncio.to_thread(stop_worker_dispatchers)
