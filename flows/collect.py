"""The `collect-rollouts` flow: split -> collect per chunk -> merge -> metrics.

Rerunning it with the same parameters resumes: finished chunks are cache hits, an unfinished
chunk skips the rollouts already written.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.states import Failed, State
from pydantic import BaseModel, ValidationError

from flows.ui import artifact_key, own_run_context, rounded, run_name, title
from rollouts.agent_client import check_agents_reachable, resolve_agent_urls
from rollouts.collect import DispatchPlan
from rollouts.dask_support import (
    check_shared_storage,
    dask_enabled,
    make_task_runner,
    prepare_worker_environment,
    worker_in_flight,
)
from rollouts.dispatchers import close_dispatcher, open_dispatcher
from rollouts.errors import ConfigError, IncompleteRun, RolloutsError
from rollouts.models import ChunkSpec, CollectConfig
from rollouts.progress import update_progress_artifact_forever
from rollouts.run_state import OutputPaths, prepare_run_dir, run_dir_for, run_lock
from rollouts.settings import RolloutsSettings
from rollouts.split import validate_input
from rollouts.status import StatusReader
from tasks.collect import collect_chunk_task
from tasks.merge import merge_task
from tasks.metrics import metrics_task
from tasks.split import split_task

if TYPE_CHECKING:  # rollouts.metrics pulls in pandas: 0.4 s the first request need not wait
    from rollouts.metrics import AgentSummary


class CollectSummary(BaseModel):
    """What a collection produced; the CLI prints it, the UI shows it as the flow's result."""

    output: str
    failures: str
    metrics: str
    expected: int
    succeeded: int
    failed: int
    missing: int
    chunks: int
    chunks_from_cache: int
    agents: list[dict[str, Any]]
    missing_examples: list[tuple[int, int]] = []


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return run_name(f"collect-{Path(params['output_jsonl_fpath']).stem}")


@flow(name="collect-rollouts", flow_run_name=_flow_run_name, validate_parameters=True)
async def collect_rollouts(
    input_jsonl_fpath: Annotated[str, title("Input tasks (JSONL)")],
    output_jsonl_fpath: Annotated[str, title("Output rollouts (JSONL)")],
    agent_name: Annotated[str | None, title("Agent name")] = None,
    agent_url: Annotated[str | None, title("Agent URL")] = None,
    limit: Annotated[int | None, title("Row limit")] = None,
    num_repeats: Annotated[int, title("Rollouts per task")] = 1,
    num_samples_in_parallel: Annotated[int, title("Requests in flight")] = 64,
    responses_create_params: Annotated[
        dict[str, Any] | None, title("Sampling overrides (Responses API)")
    ] = None,
    num_repeats_add_seed: Annotated[bool, title("Seed each repeat")] = False,
    chunk_size: Annotated[int, title("Tasks per chunk")] = 10_000,
    max_parallel_chunks: Annotated[int, title("Chunks at once")] = 4,
    fresh: Annotated[bool, title("Start fresh")] = False,
) -> CollectSummary | State:
    """Collect rollouts of one dataset from one agent into NeMo Gym-compatible files.

    Args:
        input_jsonl_fpath: Input tasks, one JSON object per line.
        output_jsonl_fpath: Rollouts JSONL to write (sorted, written atomically); failures
            and metrics files are written next to it.
        agent_name: Optional (text). Agent to resolve through ROLLOUTS_AGENTS or the head
            server; empty: each row's agent_ref names its agent.
        agent_url: Optional (text). Agent base URL, used as is (no name resolution).
        limit: Optional (integer). Collect only the first N input rows; empty: all rows.
        num_repeats: Rollouts per task.
        num_samples_in_parallel: Requests in flight at once, for the whole run.
        responses_create_params: Optional (object). Shallow overrides of each request's
            Responses API create parameters, e.g. {"temperature": 0.2}.
        num_repeats_add_seed: Put {"seed": rollout_index} into metadata.extra_body of each
            request, so repeats differ reproducibly.
        chunk_size: Tasks per chunk; a chunk is one cached, resumable task run.
        max_parallel_chunks: Chunks dispatching requests at once.
        fresh: Discard the previous run state of this output and start over.
    """
    # Called from a task (collect-multi-dataset), this flow's artifacts and logs must still
    # belong to this flow run, not to the calling task.
    with own_run_context():
        try:
            config = CollectConfig(
                input_jsonl_fpath=input_jsonl_fpath,
                output_jsonl_fpath=output_jsonl_fpath,
                agent_name=agent_name,
                agent_url=agent_url,
                limit=limit,
                num_repeats=num_repeats,
                num_samples_in_parallel=num_samples_in_parallel,
                responses_create_params=responses_create_params or {},
                num_repeats_add_seed=num_repeats_add_seed,
                chunk_size=chunk_size,
                max_parallel_chunks=max_parallel_chunks,
                fresh=fresh,
            )
        except ValidationError as e:
            error = ConfigError(_validation_message(e))
            get_run_logger().error("%s", error)
            return Failed(message=str(error), data=error)
        try:
            check_auto_resume_budget(RolloutsSettings())
            return await run_collection(config)
        except RolloutsError as e:
            # A user-facing failure: its message says what to do; a traceback would only bury it.
            get_run_logger().error("%s", e)
            return Failed(message=str(e), data=e)


def collect_on_dask(
    chunk_task: Any,
    chunks: list[ChunkSpec],
    plan: DispatchPlan,
    run_id: str,
    run_dir: Path,
    settings: RolloutsSettings,
    run_in_flight: int,
) -> list[State]:
    """Run the chunk tasks on Dask workers (prefect-dask); each worker has its own budget."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    prepare_worker_environment(settings, api_url)
    runner = make_task_runner(settings)
    with runner:
        n_workers = check_shared_storage(runner.client, run_dir, run_id, api_url)
        per_worker = worker_in_flight(settings, run_in_flight, n_workers)
        get_run_logger().info(
            "collecting on Dask: %d workers, %d requests in flight each", n_workers, per_worker
        )
        futures = [
            runner.submit(chunk_task, parameters={"spec": spec, "plan": plan, "run_id": run_id,
                                                  "worker_in_flight": per_worker})
            for spec in chunks
        ]  # fmt: skip
        for future in futures:
            future.wait()
        return [future.state for future in futures]


def check_auto_resume_budget(settings: RolloutsSettings) -> None:
    """Stop a run that keeps crashing: the resume automation reschedules it, this bounds it."""
    from prefect.runtime import flow_run

    runs = int(flow_run.run_count or 1)
    if runs > settings.max_auto_resumes + 1:
        raise RolloutsError(
            f"this flow run already started {runs - 1} times and was resumed "
            f"{runs - 2} times after crashes (ROLLOUTS_MAX_AUTO_RESUMES="
            f"{settings.max_auto_resumes}); not resuming again. Find the cause in its logs, "
            "then run it again by hand: everything written so far is kept."
        )


def _validation_message(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}"
        for err in e.errors()
    )


async def run_collection(
    config: CollectConfig, settings: RolloutsSettings | None = None
) -> CollectSummary:
    logger = get_run_logger()
    settings = settings or RolloutsSettings()
    paths = OutputPaths.for_output(config.output_jsonl_fpath)
    run_dir = run_dir_for(config.output_jsonl_fpath, settings.work_dir)

    with run_lock(run_dir, config.output_jsonl_fpath):
        if config.fresh:
            await asyncio.to_thread(
                validate_input, Path(config.input_jsonl_fpath), limit=config.limit,
                require_agent_ref=config.agent_identity is None,
            )  # fmt: skip
        run_id = prepare_run_dir(config, run_dir)
        split = await split_task(
            input_path=config.input_jsonl_fpath,
            run_dir=str(run_dir),
            run_id=run_id,
            chunk_size=config.chunk_size,
            limit=config.limit,
            require_agent_ref=config.agent_identity is None,
        )
        logger.info(
            "%d tasks x %d repeats in %d chunks (run state %s)",
            split.n_tasks, config.num_repeats, len(split.chunks), run_dir,
        )  # fmt: skip
        names = [] if config.agent_url else (
            [config.agent_name] if config.agent_name else split.agent_names
        )  # fmt: skip
        plan = DispatchPlan(
            agent_urls=resolve_agent_urls(names, settings),
            agent_name=config.agent_name,
            agent_url=config.agent_url,
            num_repeats=config.num_repeats,
            overrides=config.responses_create_params,
            add_seed=config.num_repeats_add_seed,
        )

        reader = StatusReader(config.output_jsonl_fpath, settings.work_dir)
        if (await asyncio.to_thread(reader.read)).state != "complete":
            # A dead address would otherwise spend every attempt and chunk retry first.
            await check_agents_reachable(plan.agents_in_use(), settings.connect_timeout_s)
        progress_id = await acreate_progress_artifact(
            progress=0.0, description=f"collecting {paths.rollouts.name}"
        )
        progress_updates = asyncio.create_task(
            update_progress_artifact_forever(reader, progress_id)
        )
        chunk_task = collect_chunk_task.with_options(
            retries=settings.chunk_retries, retry_delay_seconds=settings.chunk_retry_delay_s
        )
        # Prefect and pandas leave a large, long-lived heap; full collections over it stall the
        # event loop while requests wait. Freezing it keeps the collector's GC work small.
        gc.freeze()
        try:
            if dask_enabled(settings):
                states = await asyncio.to_thread(
                    collect_on_dask, chunk_task, split.chunks, plan, run_id, run_dir, settings,
                    config.num_samples_in_parallel,
                )  # fmt: skip
            else:
                open_dispatcher(
                    run_id, settings, config.num_samples_in_parallel, config.max_parallel_chunks
                )
                try:
                    # Awaited together on this event loop, chunk tasks share one dispatcher.
                    states = await asyncio.gather(
                        *(chunk_task(s, plan, run_id, return_state=True) for s in split.chunks)
                    )
                finally:
                    await close_dispatcher(run_id)
        finally:
            progress_updates.cancel()
        from_cache = sum(1 for s in states if s.name == "Cached")
        crashed = [s for s in states if not s.is_completed()]
        for state in crashed:
            # A chunk stopped by something a rerun alone will not fix (a full disk): say that,
            # rather than the rollouts it left missing.
            error = await state.aresult(raise_on_failure=False)
            if isinstance(error, RolloutsError) and not isinstance(error, IncompleteRun):
                raise error

        outputs_missing = not (paths.rollouts.exists() and paths.failures.exists())
        merge = await merge_task.with_options(refresh_cache=outputs_missing)(
            chunks=split.chunks,
            plan=plan,
            output_path=str(paths.rollouts),
            failures_path=str(paths.failures),
        )
        metrics = await metrics_task.with_options(refresh_cache=not paths.metrics.exists())(
            rollouts_path=str(paths.rollouts),
            failures_path=str(paths.failures),
            metrics_path=str(paths.metrics),
            num_repeats=config.num_repeats,
            expected_by_agent=merge.expected_by_agent,
        )

    summary = CollectSummary(
        output=str(paths.rollouts),
        failures=str(paths.failures),
        metrics=str(paths.metrics),
        expected=merge.expected,
        succeeded=merge.succeeded,
        failed=merge.failed,
        missing=merge.missing,
        chunks=len(split.chunks),
        chunks_from_cache=from_cache,
        agents=[_agent_dict(a) for a in metrics.agents],
        missing_examples=merge.missing_examples,
    )
    await publish_artifacts(summary, progress_id, reader)
    logger.info(
        "%d/%d rollouts written, %d failed, %d missing; %d of %d chunks from cache; %s",
        summary.succeeded, summary.expected, summary.failed, summary.missing,
        from_cache, len(split.chunks), paths.rollouts,
    )  # fmt: skip
    if merge.missing:
        examples = ", ".join(f"({t}, {r})" for t, r in merge.missing_examples[:5])
        classes = "; ".join(
            _failure_class_line(cls, n, merge.retryable_samples.get(cls), plan)
            for cls, n in sorted(merge.retryable_classes.items())
        )
        untraced = merge.missing - merge.retryable_failed
        why = f"last failures: {classes}" if classes else ""
        if untraced:
            why += (
                f"{'; ' if why else ''}{untraced} with no failure recorded (answers the agent "
                "marked _ng_no_persist, or requests never sent)"
            )
        raise IncompleteRun(
            f"{merge.missing} of {merge.expected} rollouts are neither written nor failed for "
            f"good (e.g. (task, rollout) {examples}); {why}; {len(crashed)} chunk(s) did not "
            "finish. Rerun the same command to retry them: everything already written is kept."
        )
    return summary


def _failure_class_line(
    failure_class: str, count: int, sample: tuple[str, str] | None, plan: DispatchPlan
) -> str:
    """`connection_error: 5 (e.g. agent 'x' at http://h:p: <its error>)`."""
    if sample is None:
        return f"{failure_class}: {count}"
    agent, error = sample
    url = plan.agent_url or plan.agent_urls.get(agent)
    who = f"agent {agent!r} at {url}" if url and url != agent else f"agent {agent}"
    return f"{failure_class}: {count} (e.g. {who}: {error})"


async def publish_artifacts(
    summary: CollectSummary, progress_id: Any, reader: StatusReader
) -> None:
    """The run's final progress, metrics and chunk tables, a markdown summary, in the UI."""
    done = summary.succeeded + summary.failed
    await aupdate_progress_artifact(
        artifact_id=progress_id,
        progress=100.0 * done / summary.expected if summary.expected else 100.0,
        description=f"{summary.succeeded}/{summary.expected} written, {summary.failed} failed",
    )
    rows = [
        {"agent": a["agent"], "expected": a["expected"], "written": a["succeeded"],
         "failed": a["failed"], "mean_reward": rounded(a["mean_reward"]),
         **{f"pass@{k}": rounded(v) for k, v in a["pass_at_k"].items()}}
        for a in summary.agents
    ]  # fmt: skip
    await acreate_table_artifact(
        table=rows, key=artifact_key(summary.output, "metrics"), description="Rollout metrics"
    )
    status = await asyncio.to_thread(reader.read)
    await acreate_table_artifact(
        table=[
            {
                "chunk": c.index,
                "expected": c.expected,
                "done": c.done,
                "failed": c.failed,
                "worker": c.worker,
            }
            for c in status.chunks
        ],
        key=artifact_key(summary.output, "chunks"),
        description="Chunks and the worker (host:pid) that collected each",
    )
    lines = [
        f"# Rollouts: {Path(summary.output).name}",
        "",
        "| Rollouts | Count |",
        "|---|---|",
        f"| expected | {summary.expected} |",
        f"| written | {summary.succeeded} |",
        f"| failed for good | {summary.failed} |",
        f"| missing | {summary.missing} |",
        f"| chunks (from cache) | {summary.chunks} ({summary.chunks_from_cache}) |",
    ]
    for a in summary.agents:
        mean = "-" if a["mean_reward"] is None else f"{a['mean_reward']:.4f}"
        passk = ", ".join(f"pass@{k} {v:.3f}" for k, v in a["pass_at_k"].items()) or "-"
        lines.append(f"| reward ({a['agent']}) | mean {mean}; {passk} |")
    lines += ["", f"- rollouts: `{summary.output}`", f"- failures: `{summary.failures}`",
              f"- metrics: `{summary.metrics}`"]  # fmt: skip
    await acreate_markdown_artifact(
        markdown="\n".join(lines),
        key=artifact_key(summary.output, "summary"),
        description="Collection summary",
    )


def _agent_dict(a: AgentSummary) -> dict[str, Any]:
    return {
        "agent": a.agent,
        "expected": a.expected,
        "succeeded": a.succeeded,
        "failed": a.failed,
        "mean_reward": a.mean_reward,
        "pass_at_k": {str(k): v for k, v in a.pass_at_k.items()},
    }
