"""The `collect-rollouts` flow: split -> collect per chunk -> merge -> metrics.

The run's sequence and decisions are rollouts/run.py's; this binds its stages to Prefect tasks,
artifacts and the flow run's stop controls. Rerunning it with the same parameters resumes:
finished chunks are cache hits, an unfinished chunk skips the rollouts already written.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import State, flow, get_run_logger
from prefect.states import Completed, Failed

from flows.artifacts import LiveProgress, publish_collection
from flows.dispatch import collect_chunks
from flows.stopping import stop_controls, stopped_state
from flows.ui import collect_run_name, form_field, own_run_context, run_name
from rollouts.collect import DispatchPlan
from rollouts.errors import RolloutsError, RunStopped
from rollouts.failures import FailureReport
from rollouts.models import CollectConfig, CountOrAuto, SplitResult
from rollouts.request import RunRequest, checked_request
from rollouts.run import (
    ChunkOutcome,
    Progress,
    RunLog,
    RunStages,
    StatusSource,
    check_resume_budget,
    collect_run,
    deadline_outcome,
)
from rollouts.run_state import OutputPaths
from rollouts.settings import RolloutsSettings
from rollouts.status import RunStatus
from rollouts.stopping import Stopper
from rollouts.storage import Location
from rollouts.summary import STOPPED_AT_DEADLINE, CollectSummary
from tasks.merge import merge_task
from tasks.metrics import metrics_task
from tasks.split import split_task

if TYPE_CHECKING:  # numpy loads with the metrics step, not at start-up
    from rollouts.merge import MergeReport
    from rollouts.metrics import MetricsSummary

__all__ = ["CollectSummary", "collect_rollouts", "run_collection"]


def _flow_run_name() -> str:
    """`out/train`, `out/train: retry timeout` (the runs list shows the flow's name beside it)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return run_name(
        collect_run_name(params["output_jsonl_fpath"], params.get("retry_failure_classes"))
    )


def _form(name: str) -> Any:
    return form_field(CollectConfig, name)


@flow(name="collect-rollouts", flow_run_name=_flow_run_name, validate_parameters=True)
async def collect_rollouts(
    input_jsonl_fpath: Annotated[str, _form("input_jsonl_fpath")],
    output_jsonl_fpath: Annotated[str, _form("output_jsonl_fpath")],
    agent_name: Annotated[str | None, _form("agent_name")] = None,
    agent_url: Annotated[str | None, _form("agent_url")] = None,
    limit: Annotated[int | None, _form("limit")] = None,
    num_repeats: Annotated[int, _form("num_repeats")] = 1,
    num_samples_in_parallel: Annotated[CountOrAuto, _form("num_samples_in_parallel")] = 64,
    max_in_flight: Annotated[int, _form("max_in_flight")] = 1024,
    responses_create_params: Annotated[
        dict[str, Any] | None, _form("responses_create_params")
    ] = None,
    num_repeats_add_seed: Annotated[bool, _form("num_repeats_add_seed")] = False,
    chunk_size: Annotated[int, _form("chunk_size")] = 10_000,
    max_parallel_chunks: Annotated[int, _form("max_parallel_chunks")] = 4,
    processes: Annotated[CountOrAuto, _form("processes")] = 1,
    slurm_jobs: Annotated[int | None, _form("slurm_jobs")] = None,
    max_duration: Annotated[str | None, _form("max_duration")] = None,
    fresh: Annotated[bool, _form("fresh")] = False,
    retry_failure_classes: Annotated[list[str] | None, _form("retry_failure_classes")] = None,
) -> CollectSummary | State:
    """Collect rollouts of one dataset from one agent into NeMo Gym-compatible files."""
    params = {k: v for k, v in locals().items() if v is not None}
    # Called from a task (collect-multi-dataset), this flow's artifacts and logs must still
    # belong to this flow run, not to the calling task.
    with own_run_context():
        try:
            # Checked here unless `rollouts collect` checked it before starting this run.
            request = checked_request(params)
            check_auto_resume_budget(RolloutsSettings())
            return finished_state(await run_collection(request))
        except RunStopped as e:  # a signal or a cancellation: its own state, not a failure
            get_run_logger().warning("%s", e)
            return await stopped_state(e)
        except RolloutsError as e:
            # A user-facing failure: its message says what to do; a traceback would only bury it.
            get_run_logger().error("%s", e)
            return Failed(message=str(e), data=e)


def finished_state(summary: CollectSummary) -> CollectSummary | State:
    """A run its deadline cut ends Completed, named StoppedAtDeadline, with the summary of
    what it wrote: not a failure, and the CLI exits ``ExitCode.DEADLINE``."""
    message = deadline_outcome(summary)
    if message is None:
        return summary
    get_run_logger().warning("%s", message)
    return Completed(name=STOPPED_AT_DEADLINE, message=message, data=summary)


def check_auto_resume_budget(settings: RolloutsSettings) -> None:
    """Stop a run that keeps crashing: the resume automation reschedules it, this bounds it."""
    from prefect.runtime import flow_run

    check_resume_budget(int(flow_run.run_count or 1), settings)


async def run_collection(
    request: RunRequest, settings: RolloutsSettings | None = None
) -> CollectSummary:
    """The run of ``request`` (rollouts/run.py), its stages bound to Prefect. A deadline, a
    signal or a cancellation stops collecting early (rollouts/stopping.py, flows/stopping.py)."""
    settings = settings or RolloutsSettings()
    return await collect_run(request, settings, PrefectStages(request, settings))


class PrefectStages(RunStages):
    """A run's stages as Prefect tasks, the UI's artifacts and this flow run's stop controls."""

    def __init__(self, request: RunRequest, settings: RolloutsSettings) -> None:
        self.request, self.settings = request, settings

    @property
    def log(self) -> RunLog:
        return get_run_logger()

    def stop_controls(self, stop: Stopper) -> AbstractAsyncContextManager[object]:
        return stop_controls(stop)

    async def split(self, config: CollectConfig, run_dir: Path, run_id: str) -> SplitResult:
        return await split_task(
            input_path=config.input_jsonl_fpath, run_dir=str(run_dir), run_id=run_id,
            chunk_size=config.chunk_size, limit=config.limit,
            require_agent_ref=config.agent_identity is None,
        )  # fmt: skip

    def progress(
        self, reader: StatusSource, output: Location
    ) -> AbstractAsyncContextManager[Progress]:
        return LiveProgress(reader, output)

    async def collect(
        self, split: SplitResult, plan: DispatchPlan, run_dir: Path, stop: Stopper
    ) -> list[ChunkOutcome]:
        request = self.request
        return await collect_chunks(
            split, plan, run_dir, request.config, self.settings, request.processes, stop
        )

    async def merge(
        self, split: SplitResult, plan: DispatchPlan, paths: OutputPaths, refresh: bool
    ) -> MergeReport:
        return await merge_task.with_options(refresh_cache=refresh)(
            chunks=split.chunks, plan=plan, output_path=str(paths.rollouts),
            failures_path=str(paths.failures),
        )  # fmt: skip

    async def metrics(
        self, paths: OutputPaths, num_repeats: int, expected_by_agent: dict[str, int],
        refresh: bool,
    ) -> MetricsSummary:  # fmt: skip
        return await metrics_task.with_options(refresh_cache=refresh)(
            rollouts_path=str(paths.rollouts), failures_path=str(paths.failures),
            metrics_path=str(paths.metrics), num_repeats=num_repeats,
            expected_by_agent=expected_by_agent,
        )  # fmt: skip

    async def publish(
        self, summary: CollectSummary, status: RunStatus, failures: FailureReport
    ) -> None:
        await publish_collection(summary, status, failures)
