"""Metrics stage as a Prefect task, cached on the merged files' state."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from rollouts.models import as_given_or_absolute
from rollouts.storage import local_or_url
from tasks.cache_policies import cached_stage
from tasks.split import file_identity

if TYPE_CHECKING:
    from rollouts.metrics import MetricsSummary


def _metrics_identity(inputs: dict[str, Any]) -> Any:
    return {
        "rollouts": file_identity(inputs["rollouts_path"]),
        "failures": file_identity(inputs["failures_path"]),
        "metrics": as_given_or_absolute(inputs["metrics_path"]),
        "num_repeats": inputs["num_repeats"],
        "expected_by_agent": inputs["expected_by_agent"],
    }


@cached_stage("metrics", _metrics_identity)
async def metrics_task(
    rollouts_path: str,
    failures_path: str,
    metrics_path: str,
    num_repeats: int,
    expected_by_agent: dict[str, int],
) -> MetricsSummary:
    # Imported here: pandas costs 0.4 s, which the flow's first request should not wait for.
    from rollouts.metrics import write_aggregate_metrics

    return await asyncio.to_thread(
        write_aggregate_metrics,
        local_or_url(rollouts_path),  # a URL: an object in a bucket
        local_or_url(failures_path),
        local_or_url(metrics_path),
        num_repeats=num_repeats,
        expected_by_agent=expected_by_agent,
    )
