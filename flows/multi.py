"""The `collect-multi-dataset` flow: one collect-rollouts subflow per dataset, concurrently,
each with its own sampling settings, then an exact balanced mix."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ValidationError

from flows.collect import CollectSummary, collect_rollouts
from flows.ui import artifact_key, rounded, run_name, title
from rollouts.errors import RolloutsError
from rollouts.mix import MixRequest, MixSource
from rollouts.models import DatasetConfig, MultiDatasetConfig
from tasks.mix import mix_task


class MultiSummary(BaseModel):
    datasets: dict[str, CollectSummary]
    mix_output: str | None = None
    mix_manifest: str | None = None
    mix_rows: int | None = None
    mix_sources: dict[str, dict[str, Any]] = {}
    mix_from_cache: bool = False


class DatasetFailed(RolloutsError):
    """One dataset's collection did not complete; its subflow's message says why."""


@task(name="collect-dataset", task_run_name="collect-dataset-{dataset.name}", cache_policy=NO_CACHE)
async def collect_dataset_task(dataset: DatasetConfig) -> CollectSummary:
    """Run one dataset's collect-rollouts subflow. A task, so that datasets run concurrently."""
    state = await collect_rollouts.with_options(flow_run_name=dataset.run_label())(
        **dataset.collect_parameters(), return_state=True
    )
    if not state.is_completed():
        raise DatasetFailed(f"{dataset.name}: {state.message}")
    return await state.aresult()


def _multi_run_name() -> str:
    """``multi-<mix output stem>``, or ``multi-<dataset names>`` without a mix."""
    from prefect.runtime import flow_run

    try:
        config = MultiDatasetConfig.model_validate(flow_run.parameters["config"])
    except (KeyError, ValidationError):
        return run_name("multi-dataset")  # the flow itself reports the bad config
    if config.mix is not None:
        return run_name(f"multi-{Path(config.mix.output).stem}")
    return run_name("multi-" + "+".join(d.name for d in config.datasets))


@flow(
    name="collect-multi-dataset",
    flow_run_name=_multi_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=32),
)
async def collect_multi_dataset(
    config: Annotated[MultiDatasetConfig, title("Datasets and mix")],
) -> MultiSummary | State:
    """Collect every dataset (resumable, each its own subflow), then mix them.

    Args:
        config: The datasets to collect, each with its own agent and sampling settings, and
            optionally how to mix their rollouts into one training set.
    """
    logger = get_run_logger()
    # Prefect 3 runs async subflows awaited together one after another (PrefectHQ/prefect
    # #15415). Each subflow is called from its own submitted task instead: its own thread and
    # event loop, so datasets collect concurrently, each with its own HTTP client and budget.
    futures = [collect_dataset_task.submit(d) for d in config.datasets]
    await asyncio.to_thread(wait, futures)
    failed = [f.state for f in futures if not f.state.is_completed()]
    if failed:
        detail = "; ".join(str(s.result(raise_on_failure=False)) for s in failed)
        logger.error("%d dataset(s) did not complete: %s", len(failed), detail)
        return Failed(
            message=f"{len(failed)} dataset(s) did not complete, no mix written. {detail}"
        )
    summaries = {d.name: f.result() for d, f in zip(config.datasets, futures, strict=True)}
    result = MultiSummary(datasets=summaries)
    if config.mix is None:
        return result

    outputs = {d.name: d.output for d in config.datasets}
    keep_groups = config.mix.keep_groups
    if keep_groups is None:
        keep_groups = any(d.num_repeats > 1 for d in config.datasets)
    request = MixRequest(
        sources=[
            MixSource(name=name, path=outputs[name], proportion=p)
            for name, p in config.mix.proportions.items()
        ],
        output=config.mix.output,
        total=config.mix.total,
        seed=config.mix.seed,
        keep_groups=keep_groups,
        shortfall=config.mix.shortfall,
    )
    out = Path(config.mix.output)
    manifest = out.with_name(f"{out.stem}_manifest.json")
    fresh_mix = mix_task.with_options(refresh_cache=not (out.exists() and manifest.exists()))
    mix_state = await fresh_mix(request, return_state=True)
    if not mix_state.is_completed():
        error = await mix_state.aresult(raise_on_failure=False)
        if not isinstance(error, RolloutsError):
            raise error
        logger.error("%s", error)
        return Failed(message=str(error), data=error)
    mixed = await mix_state.aresult()
    logger.info("mixed %d rollouts into %s", mixed.rows, mixed.output)
    result.mix_output = str(mixed.output)
    result.mix_manifest = str(mixed.manifest)
    result.mix_rows = mixed.rows
    result.mix_sources = mixed.per_source
    result.mix_from_cache = mix_state.name == "Cached"
    await publish_mix_artifacts(result, config.mix.output)
    return result


MIX_COLUMNS = ("proportion", "target", "available", "selected", "shortfall",
               "deviation_from_quota")  # fmt: skip


async def publish_mix_artifacts(result: MultiSummary, mix_output: str) -> None:
    """The mix per source as a table, and what the run wrote as markdown, on the multi run."""
    rows = [
        {"source": name, **{c: rounded(source.get(c)) for c in MIX_COLUMNS}}
        for name, source in result.mix_sources.items()
    ]
    await acreate_table_artifact(
        table=rows,
        key=artifact_key(mix_output, "mix"),
        description="Mix per source: target proportion, quota and what was selected",
    )
    lines = [
        f"# Multi-dataset collection: {Path(mix_output).name}",
        "",
        "| Dataset | Expected | Written | Failed | Missing | Output |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {s.expected} | {s.succeeded} | {s.failed} | {s.missing} | `{s.output}` |"
            for name, s in result.datasets.items()
        ),
        "",
        f"- mix: `{result.mix_output}` ({result.mix_rows} rollouts)",
        f"- manifest: `{result.mix_manifest}`",
    ]
    await acreate_markdown_artifact(
        markdown="\n".join(lines),
        key=artifact_key(mix_output, "multi-summary"),
        description="Datasets collected and the mix written",
    )
