"""What a run shows in the Prefect UI: a live progress artifact, then a markdown summary and the
failures, metrics and chunk tables; for a multi-dataset run its own progress over the datasets,
a summary of every dataset and the mix.

The UI titles an artifact card with its key (words first, `train-failures-4fc14c`) and shows
the first line of its description under it: that line says what the artifact is, in words.
Paths are absolute (a deployment's relative paths are the worker's directory's).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from flows.ui import artifact_key, output_label, rounded
from rollouts.failures import FailureReport, retry_command
from rollouts.health import (
    ReplicaStatus,
    RunHealth,
    RunLatency,
    clock_text,
    describe_attempt,
    rate_number,
    read_health,
    seconds_text,
)
from rollouts.models import DatasetConfig, MultiDatasetConfig, as_given_or_absolute
from rollouts.run import StatusSource
from rollouts.status import RunStatus, StatusReader
from rollouts.summary import CollectSummary, MultiSummary, RunFigures

PROGRESS_EVERY_S = 3.0
# Stalls are looked for more often than the artifact is updated: a stalled attempt is listed
# only until it times out (request_timeout_s), which can be a few seconds after it is listed.
STALLS_EVERY_S = 1.0
CARD_LINE_CHARS = 45  # what a grid card of the UI shows of a description's first line
MAX_ERROR_CHARS = 300
MIX_COLUMNS = ("proportion", "target", "available", "selected", "shortfall",
               "deviation_from_quota", "note")  # fmt: skip


def absolute(path: str | Path | None) -> str:
    """A local path made absolute, a URL as given."""
    return as_given_or_absolute(str(path)) if path else "-"


class LiveProgress:
    """One progress artifact, updated every few seconds from the run state while collecting
    (one asyncio task, so updates never land out of order), with the live health. Each stalled
    rollout is logged once, in the run's log. It also times the collection for the run's
    figures (``RunFigures``)."""

    def __init__(self, reader: StatusSource, output: str | Path) -> None:
        self.reader, self.output = reader, output
        self.artifact_id: Any = None
        self._updates: asyncio.Task[None] | None = None
        self._stalls_logged: set[tuple[str, int, int]] = set()
        self.finished_before = 0  # rollouts finished before this run collected
        self.started = self.ended = 0.0

    async def __aenter__(self) -> LiveProgress:
        self.artifact_id = await acreate_progress_artifact(
            progress=0.0, description=f"Collecting {output_label(self.output)}"
        )
        status = await asyncio.to_thread(self.reader.read)
        self.finished_before = status.done + status.failed
        self.started = time.monotonic()
        self._updates = asyncio.create_task(self._update_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ended = time.monotonic()
        if self._updates is not None:
            self._updates.cancel()

    async def _update_forever(self) -> None:
        shown_at = time.monotonic()
        while True:
            await asyncio.sleep(STALLS_EVERY_S)
            # The health files alone each second; the whole status only for the artifact.
            health = await asyncio.to_thread(read_health, self.reader.run_dir)
            if health is not None:
                self.log_new_stalls(health)
            if time.monotonic() - shown_at < PROGRESS_EVERY_S:
                continue
            shown_at = time.monotonic()
            status = await asyncio.to_thread(self.reader.read)
            if status.expected:
                await aupdate_progress_artifact(
                    artifact_id=self.artifact_id, progress=percent(status),
                    description=live_description(status),
                )  # fmt: skip

    def figures(
        self, summary: CollectSummary, started_at: float, latency: RunLatency | None
    ) -> RunFigures:
        """This run's figures: its duration from ``started_at`` (wall clock), the rollouts it
        finished per second of collecting, its answers' latency."""
        return RunFigures(
            duration_s=round(time.time() - started_at, 3),
            collecting_s=round(max(0.0, (self.ended or time.monotonic()) - self.started), 3),
            rollouts=max(0, summary.succeeded + summary.failed - self.finished_before),
            answered=latency.answered if latency else 0,
            failed_attempts=latency.failed_attempts if latency else 0,
            p50_s=latency.p50_s if latency else None, p95_s=latency.p95_s if latency else None,
            p99_s=latency.p99_s if latency else None,
        )  # fmt: skip

    async def show_final(self, summary: CollectSummary, replicas: Sequence[ReplicaStatus]) -> None:
        done = summary.succeeded + summary.failed
        await aupdate_progress_artifact(
            artifact_id=self.artifact_id,
            progress=100.0 * done / summary.expected if summary.expected else 100.0,
            description=final_description(summary, replicas),
        )

    def log_new_stalls(self, health: RunHealth) -> None:
        """A warning per stalled rollout, the first time it is seen stalled."""
        for a in health.stalled:
            key = (a.agent, a.task_index, a.rollout_index)
            if key not in self._stalls_logged:
                self._stalls_logged.add(key)
                get_run_logger().warning(
                    "stalled: %s; in flight longer than %s (ROLLOUTS_STALL_WARN_S)",
                    describe_attempt(a), seconds_text(a.stall_after_s),
                )  # fmt: skip


def percent(status: RunStatus) -> float:
    return 100.0 * (status.done + status.failed) / status.expected if status.expected else 0.0


def live_description(status: RunStatus) -> str:
    """The first line fits a grid card (what a user needs: how far, what failed, how long
    still); then one rate (rollouts per second, its window said), the health, the replicas."""
    first = f"{status.done}/{status.expected} written, {status.failed} failed"
    if status.health is not None and status.health.stalled_total:
        first += f", {status.health.stalled_total} stalled"
    if status.eta_s is not None:
        first += f", ETA {clock_text(status.eta_s)}"
    live = []
    if status.rate_per_s and status.rate_window_s:
        live.append(f"{rate_number(status.rate_per_s)} rollouts/s (last "
                    f"{status.rate_window_s:.0f} s)")  # fmt: skip
    if status.health is not None:
        live.append(f"{status.health.headline()} (last minute)")
    lines = [first, "; ".join(live)] + [replica_line(r) for r in status.replicas]
    return "\n\n".join(line for line in lines if line)


def final_description(summary: CollectSummary, replicas: Sequence[ReplicaStatus] = ()) -> str:
    """`400/400 written, 9 failed, in 0m12s`, then this run's rate and latencies."""
    first = f"{summary.succeeded}/{summary.expected} written, {summary.failed} failed"
    if summary.missing:
        first += f", {summary.missing} missing"
    lines = [first]
    if summary.figures is not None:
        lines[0] += f", in {clock_text(summary.figures.duration_s)}"
        lines.append(f"This run: {summary.figures.line()}")
    lines += [replica_line(r) for r in replicas]
    return "\n\n".join(lines)


def replica_line(r: ReplicaStatus) -> str:
    """One replica in a line: `http://a:8000 410 answered, 8 in flight, 3 failed (out)`."""
    failed = sum(r.failed.values())
    return (f"{r.url} {r.answered} answered, {r.in_flight} in flight, {failed} failed"
            + (" (out)" if r.ejected else ""))  # fmt: skip


async def publish_collection(
    summary: CollectSummary, status: RunStatus, failures: FailureReport
) -> None:
    """The artifacts of one collection, always the same ones in the same order: summary,
    failures, metrics, chunks (and replicas where an agent has several)."""
    label = output_label(summary.output)
    await acreate_markdown_artifact(
        markdown=collection_markdown(summary, failures),
        key=artifact_key(summary.output, "summary"),
        description=f"Summary of {label}: counts, rewards, this run's rate and latency, "
        f"what failed and how to send it again\n\n`{absolute(summary.output)}`",
    )
    await acreate_table_artifact(
        table=failure_rows(failures),
        key=artifact_key(summary.output, "failures"),
        description=f"Failures of {label} by class\n\n{failures_advice(failures)}",
    )
    await acreate_table_artifact(
        table=metric_rows(summary), key=artifact_key(summary.output, "metrics"),
        description=f"Rewards of {label} per agent\n\n`{absolute(summary.metrics)}`",
    )  # fmt: skip
    await acreate_table_artifact(
        table=chunk_rows(status), key=artifact_key(summary.output, "chunks"),
        description=f"Chunks of {label} and the worker (host:pid) that collected each",
    )  # fmt: skip
    if status.replicas:
        await acreate_table_artifact(
            table=[replica_row(r) for r in status.replicas],
            key=artifact_key(summary.output, "replicas"),
            description=f"Replicas of {label}: requests per replica of each replicated agent, "
            "over all processes",
        )


def metric_rows(summary: CollectSummary) -> list[dict[str, Any]]:
    return [
        {"agent": a.agent, "expected": a.expected, "written": a.succeeded, "failed": a.failed,
         "mean_reward": rounded(a.mean_reward),
         **{f"pass@{k}": rounded(v) for k, v in a.pass_at_k.items()}}
        for a in summary.agents
    ]  # fmt: skip


def chunk_rows(status: RunStatus) -> list[dict[str, Any]]:
    return [
        {"chunk": c.index, "expected": c.expected, "done": c.done, "failed": c.failed,
         "worker": c.worker}
        for c in status.chunks
    ]  # fmt: skip


def failure_rows(report: FailureReport) -> list[dict[str, Any]]:
    """Per class: how many, final or gave up, an example error, and how to send it again
    (the command, and the flow parameter for a run from the UI)."""
    output = absolute(report.output)
    return [
        {"class": c.failure_class, "rollouts": c.count, "final": c.terminal,
         "gave up": c.gave_up, "example error": short_error(c.first_error),
         "retry command": retry_command(output, [c.failure_class]),
         "retry_failure_classes": json.dumps([c.failure_class])}
        for c in report.by_count()
    ]  # fmt: skip


def short_error(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "..."


def failures_advice(report: FailureReport) -> str:
    """What to do about the failures, in markdown: the triage command, then the retry."""
    output = absolute(report.output)
    if not report.total:
        return f"No failures (`{absolute(report.failures_path)}` is empty)."
    lines = [f"{report.total} rollouts failed. Per class and agent, with their keys: "
             f"`rollouts failures {output}`."]  # fmt: skip
    gave_up, final = report.gave_up_classes(), report.final_classes()
    if gave_up:
        lines.append(f"Gave up ({', '.join(gave_up)}): a rerun of this run, with the same "
                     "parameters, sends them again.")  # fmt: skip
    if final:
        lines.append(
            f"Final ({', '.join(final)}): once their cause is fixed, send them again with "
            f"`{retry_command(output, final)}`, or run this flow (its deployment) with the same "
            f"parameters and **Retry failure classes** (`retry_failure_classes`) set to "
            f"`{json.dumps(final)}`."
        )
    return "\n\n".join(lines)


def replica_row(r: ReplicaStatus) -> dict[str, Any]:
    return {"agent": r.agent, "replica": r.url, "sent": r.sent, "answered": r.answered,
            "failed": ", ".join(f"{k} {n}" for k, n in sorted(r.failed.items())) or "-",
            "taken out": r.ejections}  # fmt: skip


def collection_markdown(summary: CollectSummary, failures: FailureReport) -> str:
    lines = [
        f"# Rollouts: {output_label(summary.output)}",
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
        mean = "-" if a.mean_reward is None else f"{a.mean_reward:.4f}"
        passk = ", ".join(f"pass@{k} {v:.3f}" for k, v in a.pass_at_k.items()) or "-"
        lines.append(f"| reward ({a.agent}) | mean {mean}; {passk} |")
    lines += figures_markdown(summary.figures)
    lines += ["", "## Failures", "", failures_advice(failures)]
    lines += ["", "## Files", "", f"- rollouts: `{absolute(summary.output)}`",
              f"- failures: `{absolute(summary.failures)}`",
              f"- metrics: `{absolute(summary.metrics)}`"]  # fmt: skip
    return "\n".join(lines)


def figures_markdown(figures: RunFigures | None) -> list[str]:
    if figures is None:
        return []
    latency = (f"p50 {seconds_text(figures.p50_s)}, p95 {seconds_text(figures.p95_s)}, "
               f"p99 {seconds_text(figures.p99_s)} ({figures.answered} answers)"
               if figures.answered else "- (nothing sent in this run)")  # fmt: skip
    return [
        "", "## This run", "", "| Figure | Value |", "|---|---|",
        f"| duration | {clock_text(figures.duration_s)} (collecting "
        f"{clock_text(figures.collecting_s)}) |",
        f"| rollouts/s | {rate_number(figures.rollouts_per_s)} ({figures.rollouts} rollouts "
        "finished in this run, per second of collecting) |",
        f"| latency | {latency} |",
        f"| failed attempts | {figures.failed_attempts} |",
    ]  # fmt: skip


# A multi-dataset run: its own progress over every dataset, its summary, the mix.


def multi_output(config: MultiDatasetConfig) -> str:
    """What names a multi-dataset run's artifacts: its mix, else its first dataset."""
    return config.mix.output if config.mix is not None else config.datasets[0].output


class DatasetsProgress:
    """The multi-dataset run's own progress artifact: every dataset's run state, summed, and a
    line per dataset, updated every few seconds while the datasets collect."""

    def __init__(self, config: MultiDatasetConfig, work_dir: Path | None) -> None:
        self.config = config
        self.readers = {d.name: StatusReader(d.output, work_dir) for d in config.datasets}
        self.artifact_id: Any = None
        self._updates: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DatasetsProgress:
        self.artifact_id = await acreate_progress_artifact(
            progress=0.0, description=f"Collecting {len(self.readers)} datasets for "
            f"{output_label(multi_output(self.config))}",
        )  # fmt: skip
        self._updates = asyncio.create_task(self._update_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._updates is not None:
            self._updates.cancel()
            await asyncio.gather(self._updates, return_exceptions=True)
        await self.show()  # where the datasets ended, whether or not they all completed

    async def _update_forever(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            await self.show()

    async def show(self, mix_line: str = "") -> None:
        statuses = {n: await asyncio.to_thread(r.read) for n, r in self.readers.items()}
        expected = sum(s.expected for s in statuses.values())
        done = sum(s.done + s.failed for s in statuses.values())
        await aupdate_progress_artifact(
            artifact_id=self.artifact_id,
            progress=100.0 * done / expected if expected else 0.0,
            description=datasets_description(statuses, mix_line),
        )


def datasets_description(statuses: dict[str, RunStatus], mix_line: str = "") -> str:
    written = sum(s.done for s in statuses.values())
    failed = sum(s.failed for s in statuses.values())
    expected = sum(s.expected for s in statuses.values())
    finished = sum(1 for s in statuses.values() if s.phase == "complete")
    first = f"{written}/{expected} written, {failed} failed, {finished}/{len(statuses)} datasets"
    lines = [first] + [
        f"{name}: {s.done}/{s.expected} written, {s.failed} failed ({s.state})"
        for name, s in statuses.items()
    ]
    return "\n\n".join([*lines, *([mix_line] if mix_line else [])])


async def publish_mix(result: MultiSummary, mix_output: str) -> None:
    """The mix per source as a table, on the multi run."""
    rows = [
        {"source": name, **{c: rounded(getattr(source, c)) for c in MIX_COLUMNS}}
        for name, source in result.mix_sources.items()
    ]
    await acreate_table_artifact(
        table=rows,
        key=artifact_key(mix_output, "mix"),
        description=f"Mix of {output_label(mix_output)} per source: target proportion, quota "
        f"what was selected and why it differs\n\n`{absolute(mix_output)}`",
    )


async def publish_multi_summary(result: MultiSummary, config: MultiDatasetConfig) -> None:
    """Every dataset as the CLI prints it (temperature, repeats, counts, mean reward, pass@k)
    and what the run wrote, as markdown on the multi run."""
    output = multi_output(config)
    await acreate_markdown_artifact(
        markdown=multi_markdown(result, config),
        key=artifact_key(output, "multi-summary"),
        description=f"Summary of {output_label(output)}: every dataset's sampling, counts and "
        "rewards, and the mix",
    )


def multi_markdown(result: MultiSummary, config: MultiDatasetConfig) -> str:
    lines = [
        f"# Multi-dataset collection: {output_label(multi_output(config))}",
        "",
        "| Dataset | Temperature | Repeats | Expected | Written | Failed | Missing "
        "| Mean reward | pass@k |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in config.datasets:
        s = result.datasets.get(d.name)
        if s is not None:
            lines.append(f"| {d.name} | {temperature(d)} | {d.num_repeats} | {s.expected} | "
                         f"{s.succeeded} | {s.failed} | {s.missing} | {mean_rewards(s)} | "
                         f"{pass_at_k(s)} |")  # fmt: skip
    lines += ["", "## Files", ""]
    lines += [f"- {d.name}: `{absolute(d.output)}`" for d in config.datasets]
    if result.mix_output is not None:
        cached = " (from cache)" if result.mix_from_cache else ""
        lines += [f"- mix: `{absolute(result.mix_output)}` ({result.mix_rows} rollouts{cached})",
                  *([f"- {result.mix_note}"] if result.mix_note else []),
                  f"- manifest: `{absolute(result.mix_manifest)}`"]  # fmt: skip
    return "\n".join(lines)


def temperature(d: DatasetConfig) -> str:
    t = d.responses_create_params.get("temperature")
    return "agent's default" if t is None else f"{t:g}" if isinstance(t, float | int) else str(t)


def mean_rewards(s: CollectSummary) -> str:
    def mean(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    if len(s.agents) == 1:
        return mean(s.agents[0].mean_reward)
    return "; ".join(f"{a.agent} {mean(a.mean_reward)}" for a in s.agents) or "-"


def pass_at_k(s: CollectSummary) -> str:
    per_agent = [
        (a.agent, ", ".join(f"@{k} {v:.3f}" for k, v in a.pass_at_k.items())) for a in s.agents
    ]
    if len(per_agent) == 1:
        return per_agent[0][1] or "-"
    return "; ".join(f"{agent} {text or '-'}" for agent, text in per_agent) or "-"
