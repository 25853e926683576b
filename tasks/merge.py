"""Merge stage as a Prefect task. Cached on the chunk files' state; the flow refreshes the
cache when an output file has gone missing."""

from __future__ import annotations

import asyncio
from typing import Any

from rollouts.chunks import ChunkFiles
from rollouts.collect import DispatchPlan
from rollouts.merge import MergeReport, merge_chunks
from rollouts.models import ChunkSpec, as_given_or_absolute
from rollouts.storage import local_or_url
from tasks.cache_policies import cached_stage
from tasks.split import file_identity


def _merge_identity(inputs: dict[str, Any]) -> Any:
    specs: list[ChunkSpec] = inputs["chunks"]
    return {
        "chunks": [
            (s.cache_identity(), [file_identity(p) for p in ChunkFiles.of(s).outputs])
            for s in specs
        ],
        "output": as_given_or_absolute(inputs["output_path"]),
        "failures": as_given_or_absolute(inputs["failures_path"]),
        "num_repeats": inputs["plan"].num_repeats,
        "report": 2,  # MergeReport's fields; a cached older report lacks retryable_samples
    }


@cached_stage("merge", _merge_identity)
async def merge_task(
    chunks: list[ChunkSpec], plan: DispatchPlan, output_path: str, failures_path: str
) -> MergeReport:
    return await asyncio.to_thread(
        merge_chunks,
        chunks,
        num_repeats=plan.num_repeats,
        agent_of=plan.agent_of_ref,
        output_path=local_or_url(output_path),  # a URL: an object in a bucket
        failures_path=local_or_url(failures_path),
    )
