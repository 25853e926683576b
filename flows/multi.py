"""The `collect-multi-dataset` flow: one collect-rollouts subflow per dataset, concurrently,
each with its own sampling settings, then an exact balanced mix."""

from __future__ import annotations

import asyncio
from typing import Annotated, cast

from prefect import State, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from flows.artifacts import DatasetsProgress, publish_mix, publish_multi_summary
from flows.collect import collect_rollouts
from flows.stopping import stop_signals
from flows.ui import output_label, run_name, title
from rollouts.errors import (
    STOP_EXIT_CODES,
    ExitCode,
    IncompleteRun,
    RolloutsError,
    combined_exit_code,
)
from rollouts.mix import mix_manifest
from rollouts.models import DatasetConfig, MultiDatasetConfig
from rollouts.request import check_multi_storage
from rollouts.run import must_refresh
from rollouts.run_state import started_from
from rollouts.settings import RolloutsSettings
from rollouts.storage import local_or_url
from rollouts.summary import STOPPED_AT_DEADLINE, CollectSummary, MultiSummary
from tasks.mix import mix_task

__all__ = ["MultiSummary", "collect_multi_dataset"]


class DatasetFailed(RolloutsError):
    """One dataset's collection did not complete; its subflow's message says why, and its exit
    code is the subflow's own (rollouts/errors.py ``ExitCode``: DEADLINE, INCOMPLETE where a
    rerun is the fix, USAGE where the user must change something first)."""

    def __init__(self, message: str, exit_code: int = RolloutsError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type[DatasetFailed], tuple[str, int]]:
        return type(self), (str(self), self.exit_code)  # kept when Prefect pickles the state


@task(name="collect-dataset", task_run_name="collect-dataset-{dataset.name}", cache_policy=NO_CACHE)
async def collect_dataset_task(dataset: DatasetConfig) -> CollectSummary:
    """Run one dataset's collect-rollouts subflow. A task, so that datasets run concurrently."""
    with started_from("multi-dataset run"):  # its conflicts name what works here: no `fresh`
        state = await collect_rollouts.with_options(flow_run_name=dataset_run_name(dataset))(
            **dataset.collect_parameters(), return_state=True
        )
    if state.name == STOPPED_AT_DEADLINE:  # no mix of a partial set
        raise DatasetFailed(f"{dataset.name}: {state.message}", STOP_EXIT_CODES["deadline"])
    if not state.is_completed():
        cause = await state.aresult(raise_on_failure=False)
        code = cause.exit_code if isinstance(cause, RolloutsError) else IncompleteRun.exit_code
        raise DatasetFailed(f"{dataset.name}: {state.message}", code)
    # Completed and not StoppedAtDeadline: finished_state returned the summary itself.
    return cast(CollectSummary, await state.aresult())


def dataset_run_name(dataset: DatasetConfig) -> str:
    """A dataset's subflow run: `out/train_hard (hard-T0.4-x3)`."""
    return f"{output_label(dataset.output)} ({dataset.run_label()})"


def _multi_run_name() -> str:
    """The mix output's folder and stem (`out/train_mixed`), or without a mix the first
    dataset's folder and the dataset names (`out/hard+easy`)."""
    from prefect.runtime import flow_run

    try:
        config = MultiDatasetConfig.model_validate(flow_run.parameters["config"])
    except (KeyError, ValidationError):
        return run_name("multi-dataset")  # the flow itself reports the bad config
    if config.mix is not None:
        return run_name(output_label(config.mix.output))
    folder = output_label(config.datasets[0].output).rpartition("/")[0]
    return run_name(f"{folder}/" + "+".join(d.name for d in config.datasets))


@flow(
    name="collect-multi-dataset",
    flow_run_name=_multi_run_name,
    # Prefect's own annotation (TaskRunner[PrefectFuture[Any]], invariant) refuses its own
    # thread-pool runner, whose futures are a subclass.
    task_runner=ThreadPoolTaskRunner(max_workers=32),  # type: ignore[arg-type]
)
async def collect_multi_dataset(
    config: Annotated[MultiDatasetConfig, title("Datasets and mix")],
) -> MultiSummary | State:
    """Collect every dataset (resumable, each its own subflow), then mix them.

    Args:
        config: The datasets to collect, each with its own agent and sampling settings, and
            optionally how to mix their rollouts into one training set.
    """
    try:
        check_multi_storage(config)  # a mix in a bucket: refused before any dataset starts
        work_dir = RolloutsSettings().work_dir
        async with DatasetsProgress(config, work_dir) as progress:
            result = MultiSummary(datasets=await collect_datasets(config))
        if config.mix is not None:
            await mix_datasets(config, result)
            await progress.show(f"mix: {result.mix_rows} rollouts into {result.mix_output}")
        await publish_multi_summary(result, config)
        return result
    except RolloutsError as e:
        get_run_logger().error("%s", e)
        return Failed(message=str(e), data=e)


async def collect_datasets(config: MultiDatasetConfig) -> dict[str, CollectSummary]:
    """Every dataset's subflow, concurrently; refuses (no mix) when one did not complete."""
    # Prefect 3 runs async subflows awaited together one after another (PrefectHQ/prefect
    # #15415). Each subflow is called from its own submitted task instead: its own thread and
    # event loop, so datasets collect concurrently, each with its own HTTP client and budget.
    with stop_signals():  # SIGINT / SIGTERM stop every dataset's subflow, as a single run
        futures = [collect_dataset_task.submit(d) for d in config.datasets]
        await asyncio.to_thread(wait, futures)
    failed = [f.state for f in futures if not f.state.is_completed()]
    if failed:
        causes = [await s.aresult(raise_on_failure=False) for s in failed]
        detail = "; ".join(str(c) for c in causes)
        raise DatasetFailed(
            f"{len(failed)} dataset(s) did not complete, no mix written. {detail}",
            combined_exit_code(getattr(c, "exit_code", ExitCode.INCOMPLETE) for c in causes),
        )
    # Prefect types an async task's future as giving the coroutine; it gives what was awaited.
    return {d.name: cast(CollectSummary, f.result())
            for d, f in zip(config.datasets, futures, strict=True)}  # fmt: skip


async def mix_datasets(config: MultiDatasetConfig, result: MultiSummary) -> None:
    """The mix of the collected datasets into ``result``, and its artifacts on this run."""
    assert config.mix is not None
    out = local_or_url(config.mix.output)
    fresh_mix = mix_task.with_options(refresh_cache=must_refresh(out, mix_manifest(out)))
    # Prefect types an async task's return_state call as the state; it is awaited for it.
    mix_state = await fresh_mix(config.mix_request(), return_state=True)  # type: ignore[misc]
    mixed = await mix_state.aresult()  # raises the mix's error: a RolloutsError is reported
    # INFO: the run's log in the UI; the console has the note once, in the summary.
    get_run_logger().info("mixed %d rollouts into %s%s", mixed.rows, mixed.output,
                          f" ({mixed.note})" if mixed.note else "")  # fmt: skip
    result.mix_output, result.mix_manifest = str(mixed.output), str(mixed.manifest)
    result.mix_rows, result.mix_sources = mixed.rows, mixed.per_source
    result.mix_total, result.mix_note = config.mix.total, mixed.note
    result.mix_from_cache = mix_state.name == "Cached"
    await publish_mix(result, config.mix.output)
