"""What a run shows in the Prefect UI: a live progress artifact, then metrics and chunk tables,
a markdown summary, and for a multi-dataset run the mix."""

from __future__ import annotations

import asyncio
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

from flows.ui import artifact_key, rounded
from rollouts.health import RunHealth, describe_attempt, seconds_text
from rollouts.replicas import ReplicaStatus
from rollouts.status import RunStatus, StatusReader
from rollouts.summary import CollectSummary, MultiSummary

PROGRESS_EVERY_S = 3.0
MIX_COLUMNS = ("proportion", "target", "available", "selected", "shortfall",
               "deviation_from_quota", "note")  # fmt: skip


class LiveProgress:
    """One progress artifact, updated every few seconds from the run state while collecting
    (one asyncio task, so updates never land out of order), with the live health's headline.
    Each stalled rollout is logged once, in the run's log."""

    def __init__(self, reader: StatusReader, output: Path) -> None:
        self.reader, self.output = reader, output
        self.artifact_id: Any = None
        self._updates: asyncio.Task[None] | None = None
        self._stalls_logged: set[tuple[str, int, int]] = set()

    async def __aenter__(self) -> LiveProgress:
        self.artifact_id = await acreate_progress_artifact(
            progress=0.0, description=f"collecting {self.output.name}"
        )
        self._updates = asyncio.create_task(self._update_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._updates is not None:
            self._updates.cancel()

    async def _update_forever(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            status = await asyncio.to_thread(self.reader.read)
            if status.expected:
                await self.show(status.done, status.failed, status.expected, status.replicas,
                                status.health)  # fmt: skip
            if status.health is not None:
                self.log_new_stalls(status.health)

    async def show(
        self, written: int, failed: int, expected: int, replicas: Sequence[ReplicaStatus] = (),
        health: RunHealth | None = None,
    ) -> None:  # fmt: skip
        await aupdate_progress_artifact(
            artifact_id=self.artifact_id,
            progress=100.0 * (written + failed) / expected if expected else 100.0,
            description=f"{written}/{expected} written, {failed} failed"
            + (f"; {health.headline()}" if health is not None else "")
            + "".join(f"; {replica_line(r)}" for r in replicas),
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


def replica_line(r: ReplicaStatus) -> str:
    """One replica in a line: `http://a:8000 410 answered, 8 in flight, 3 failed (out)`."""
    failed = sum(r.failed.values())
    return (f"{r.url} {r.answered} answered, {r.in_flight} in flight, {failed} failed"
            + (" (out)" if r.ejected else ""))  # fmt: skip


async def publish_collection(summary: CollectSummary, status: RunStatus) -> None:
    """The final metrics and chunk tables and the markdown summary of one collection."""
    rows = [
        {"agent": a.agent, "expected": a.expected, "written": a.succeeded, "failed": a.failed,
         "mean_reward": rounded(a.mean_reward),
         **{f"pass@{k}": rounded(v) for k, v in a.pass_at_k.items()}}
        for a in summary.agents
    ]  # fmt: skip
    await acreate_table_artifact(
        table=rows, key=artifact_key(summary.output, "metrics"), description="Rollout metrics"
    )
    chunks = [
        {"chunk": c.index, "expected": c.expected, "done": c.done, "failed": c.failed,
         "worker": c.worker}
        for c in status.chunks
    ]  # fmt: skip
    await acreate_table_artifact(
        table=chunks,
        key=artifact_key(summary.output, "chunks"),
        description="Chunks and the worker (host:pid) that collected each",
    )
    if status.replicas:
        await acreate_table_artifact(
            table=[replica_row(r) for r in status.replicas],
            key=artifact_key(summary.output, "replicas"),
            description="Requests per replica of each replicated agent, over all processes",
        )
    await acreate_markdown_artifact(
        markdown=collection_markdown(summary),
        key=artifact_key(summary.output, "summary"),
        description="Collection summary",
    )


def replica_row(r: ReplicaStatus) -> dict[str, Any]:
    return {"agent": r.agent, "replica": r.url, "sent": r.sent, "answered": r.answered,
            "failed": ", ".join(f"{k} {n}" for k, n in sorted(r.failed.items())) or "-",
            "taken out": r.ejections}  # fmt: skip


def collection_markdown(summary: CollectSummary) -> str:
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
        mean = "-" if a.mean_reward is None else f"{a.mean_reward:.4f}"
        passk = ", ".join(f"pass@{k} {v:.3f}" for k, v in a.pass_at_k.items()) or "-"
        lines.append(f"| reward ({a.agent}) | mean {mean}; {passk} |")
    lines += ["", f"- rollouts: `{summary.output}`", f"- failures: `{summary.failures}`",
              f"- metrics: `{summary.metrics}`"]  # fmt: skip
    return "\n".join(lines)


async def publish_mix(result: MultiSummary, mix_output: str) -> None:
    """The mix per source as a table, and what the run wrote as markdown, on the multi run."""
    rows = [
        {"source": name, **{c: rounded(getattr(source, c)) for c in MIX_COLUMNS}}
        for name, source in result.mix_sources.items()
    ]
    await acreate_table_artifact(
        table=rows,
        key=artifact_key(mix_output, "mix"),
        description="Mix per source: target proportion, quota, what was selected and why it "
        "differs",
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
        *([f"- {result.mix_note}"] if result.mix_note else []),
        f"- manifest: `{result.mix_manifest}`",
    ]
    await acreate_markdown_artifact(
        markdown="\n".join(lines),
        key=artifact_key(mix_output, "multi-summary"),
        description="Datasets collected and the mix written",
    )
