"""What a collection produced, as typed results, and the one message for rollouts left missing.

The CLI prints these, the Prefect UI shows them as a run's result and artifacts; they hold counts
and paths, never rollout bodies.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from pydantic import BaseModel

from rollouts.errors import IncompleteRun, RunStopped
from rollouts.health import clock_text, rate_number, seconds_text
from rollouts.mix import SourceSelection
from rollouts.status import RunStatus

if TYPE_CHECKING:
    from rollouts.collect import DispatchPlan
    from rollouts.failures import FailureReport
    from rollouts.merge import MergeReport
    from rollouts.metrics import AgentSummary


class AgentResult(BaseModel):
    """One agent's counts and reward statistics in a collection."""

    agent: str
    expected: int
    succeeded: int
    failed: int
    mean_reward: float | None
    pass_at_k: dict[str, float] = {}

    @classmethod
    def of(cls, a: AgentSummary) -> AgentResult:
        return cls(
            agent=a.agent, expected=a.expected, succeeded=a.succeeded, failed=a.failed,
            mean_reward=a.mean_reward, pass_at_k={str(k): v for k, v in a.pass_at_k.items()},
        )  # fmt: skip


class RunFigures(BaseModel):
    """How one flow run of a collection went: how long, how fast, how long answers took."""

    duration_s: float  # from the flow run's start to its summary
    collecting_s: float  # of which collecting
    rollouts: int  # finished (written or failed for good) in this run, not before it
    answered: int = 0  # answers received in this run (attempts), over all its processes
    failed_attempts: int = 0
    p50_s: float | None = None  # latency of this run's answers
    p95_s: float | None = None
    p99_s: float | None = None

    @property
    def rollouts_per_s(self) -> float | None:
        return self.rollouts / self.collecting_s if self.rollouts and self.collecting_s else None

    def line(self) -> str:
        """`in 0m12s, 40.1 rollouts/s, p50 203 ms, p95 457 ms, p99 653 ms` (the rate over the
        time spent collecting, the latencies over this run's answers)."""
        latency = (f", p50 {seconds_text(self.p50_s)}, p95 {seconds_text(self.p95_s)}, "
                   f"p99 {seconds_text(self.p99_s)}" if self.answered else "")  # fmt: skip
        rate = rate_number(self.rollouts_per_s)
        return f"in {clock_text(self.duration_s)}, {rate} rollouts/s{latency}"


class CollectSummary(BaseModel):
    """What one collection produced; the CLI prints it, the UI shows it as the flow's result."""

    output: str
    failures: str
    metrics: str
    expected: int
    succeeded: int
    failed: int
    missing: int
    chunks: int
    chunks_from_cache: int
    agents: list[AgentResult]
    missing_examples: list[tuple[int, int]] = []
    stopped: str | None = None  # "deadline": stopped at max_duration with rollouts missing
    figures: RunFigures | None = None  # this flow run's duration, rate and latency


class MultiSummary(BaseModel):
    """Every dataset's collection, then the mix (when the config has one)."""

    datasets: dict[str, CollectSummary]
    mix_output: str | None = None
    mix_manifest: str | None = None
    mix_rows: int | None = None
    mix_total: int | None = None  # the rows the config asked for
    mix_note: str = ""  # why mix_rows is not mix_total ("" where it is)
    mix_sources: dict[str, SourceSelection] = {}
    mix_from_cache: bool = False


STOPPED_AT_DEADLINE = "StoppedAtDeadline"  # the Prefect state name of a run cut by its deadline
STOP_CAUSES = {
    "deadline": "at the deadline",
    "SIGINT": "by Ctrl-C (SIGINT)",
    "SIGTERM": "by SIGTERM",
    "cancelled": "by a cancellation of its flow run",
    "lease lost": "because it lost its lease on the output in the bucket (another run took it, "
    "or the store could not be reached to renew it)",
}


def deadline_message(summary: CollectSummary) -> str:
    """The state message and CLI line of a run its deadline cut."""
    return (
        f"stopped at deadline, {summary.missing} missing, resumable: {summary.succeeded} of "
        f"{summary.expected} rollouts written (merged, sorted, into {summary.output}), "
        f"{summary.failed} failed. Rerun the same command to continue (it gets its own "
        "max_duration from its start)."
    )


def stopped_run(reason: str, status: RunStatus) -> RunStopped:
    """A run a signal or a cancellation stopped before its rollouts were all in."""
    missing = status.expected - status.done - status.failed
    return RunStopped(
        f"stopped {STOP_CAUSES.get(reason, reason)}: {status.done} of {status.expected} "
        f"rollouts written, {status.failed} failed, {missing} missing; everything written is "
        "kept (in the run state; the output is merged when the run completes). Rerun the same "
        "command to continue: it sends only the missing ones.",
        reason,
    )


def incomplete_run(
    merge: MergeReport, plan: DispatchPlan, chunks_unfinished: int, chunk_error: str | None = None
) -> IncompleteRun:
    """Why rollouts are still missing: how many, examples, and per failure class the agent's
    URL and an example error, so a dead agent is named; ``chunk_error``: the exception that
    ended the first unfinished chunk, if it was not ours."""
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
    return IncompleteRun(
        f"{merge.missing} of {merge.expected} rollouts are neither written nor failed for "
        f"good (e.g. (task, rollout) {examples}); {why}; {chunks_unfinished} chunk(s) did not "
        f"finish{f' (the first ended with {chunk_error})' if chunk_error else ''}. Rerun the "
        "same command to retry them: everything already written is kept."
    )


def _failure_class_line(
    failure_class: str, count: int, sample: tuple[str, str] | None, plan: DispatchPlan
) -> str:
    """`connection_error: 5 (e.g. agent 'x' at http://h:p: <its error>)`."""
    if sample is None:
        return f"{failure_class}: {count}"
    agent, error = sample
    if error.startswith("replica "):  # a replicated agent's error names the replica itself
        return f"{failure_class}: {count} (e.g. agent {agent!r}, {error})"
    url = plan.agent_url or plan.agent_urls.get(agent)
    who = f"agent {agent!r} at {url}" if url and url != agent else f"agent {agent}"
    return f"{failure_class}: {count} (e.g. {who}: {error})"


def unexpected_errors_message(report: FailureReport, output: str) -> str | None:
    """The one line for the rollouts that failed with ``unexpected_error`` (None: none did):
    how many, the first error, and what to run once its cause is fixed."""
    from rollouts.agent_client import UNEXPECTED_ERROR

    failures = report.classes.get(UNEXPECTED_ERROR)
    if failures is None:
        return None
    quoted = shlex.quote(output)
    return (
        f"{failures.count} rollout(s) failed with {UNEXPECTED_ERROR}, final and not retried: "
        "an exception in the request path that no failure class covers, a bug or a "
        f"misconfiguration. `rollouts failures {quoted}` lists them; once the cause is fixed, "
        f"`rollouts retry {quoted} --failure-class {UNEXPECTED_ERROR}` sends them again. "
        f"First error: {failures.first_error}"
    )
