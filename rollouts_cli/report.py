"""The end-of-run summary printed by the CLI."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from rollouts.health import clock_text, describe_attempt, rate_number, seconds_text
from rollouts.slurm import SlurmJob
from rollouts.status import RunStatus

if TYPE_CHECKING:
    from rollouts.health import ReplicaStatus, RunHealth
    from rollouts.summary import CollectSummary, MultiSummary


def _console() -> Console:
    # Not a terminal (a log file, CI): rich would assume 80 columns and cut the pass@k column.
    return Console(width=None if sys.stdout.isatty() else 110)


def print_summary(summary: CollectSummary, console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title="rollouts", show_header=True)
    table.add_column("agent", overflow="fold", min_width=12)
    for col in ("expected", "written", "failed", "mean reward"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("pass@k", no_wrap=True)
    for a in summary.agents:
        mean = a.mean_reward
        passk = "  ".join(f"@{k} {v:.3f}" for k, v in a.pass_at_k.items())
        table.add_row(
            a.agent, str(a.expected), str(a.succeeded), str(a.failed),
            "-" if mean is None else f"{mean:.4f}", passk or "-",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{summary.succeeded}/{summary.expected} written, {summary.failed} failed, "
        f"{summary.missing} missing; {summary.chunks_from_cache}/{summary.chunks} chunks from cache"
    )
    console.print(f"rollouts: {summary.output}")
    console.print(f"failures: {summary.failures}")
    console.print(f"metrics:  {summary.metrics}")


def print_multi_summary(summary: MultiSummary, console: Console | None = None) -> None:
    console = console or _console()
    for name, ds in summary.datasets.items():
        console.rule(name)
        print_summary(ds, console)
    if summary.mix_output is None:
        return
    console.rule("mix")
    table = Table(show_header=True)
    for col in ("source", "proportion", "target", "available", "selected", "shortfall",
                "vs quota"):  # fmt: skip
        table.add_column(col, justify="left" if col == "source" else "right")
    notes = any(s.note for s in summary.mix_sources.values())
    if notes:
        table.add_column("why", overflow="fold", min_width=20)
    for name, s in summary.mix_sources.items():
        table.add_row(name, f"{s.proportion:g}", str(s.target), str(s.available),
                      str(s.selected), str(s.shortfall), f"{s.deviation_from_quota:+d}",
                      *([s.note or "-"] if notes else []))  # fmt: skip
    console.print(table)
    cached = " (mix from cache)" if summary.mix_from_cache else ""
    console.print(f"{summary.mix_rows} rows -> {summary.mix_output}{cached}")
    if summary.mix_note:
        console.print(f"mix: {summary.mix_note}", highlight=False, soft_wrap=True)
    console.print(f"manifest: {summary.mix_manifest}")


def print_status(status: RunStatus, console: Console | None = None) -> None:
    (console or _console()).print(status_view(status))


def status_view(status: RunStatus) -> RenderableType:
    """What `rollouts status` shows (and `--watch` redraws): chunks, the figures per agent and
    URL (live while collecting, with each replica's state; else each replica's counts),
    totals."""
    if status.phase == "not started":
        return Text(f"no collection state for {status.output} (looked in {status.run_dir})")
    # The output and its state on a line of their own: a table's title is cut to the table's
    # width, and a narrow chunk table (a short host name) cut the output's path.
    parts: list[RenderableType] = [Text(f"{status.output}: {status.state}", style="italic"),
                                   chunk_table(status)]  # fmt: skip
    if status.slurm_jobs is not None:
        parts.append(slurm_jobs_table(status.slurm_jobs))
    live: set[tuple[str, str | None]] = set()
    if status.health is not None:
        parts += health_view(status.health, status.replicas)
        live = {(t.agent, t.url) for t in status.health.replicas}
    counted = [r for r in status.replicas if (r.agent, r.url) not in live]
    if counted:  # replicas no live process sends to
        parts.append(replica_table(counted, status.running))
    pct = 100.0 * (status.done + status.failed) / status.expected if status.expected else 0.0
    parts.append(Text(
        f"{status.done}/{status.expected} done, {status.failed} failed ({pct:.1f}%); "
        f"{rollouts_rate(status)}; ETA {clock_text(status.eta_s)}"
    ))  # fmt: skip
    return Group(*parts)


def rollouts_rate(status: RunStatus) -> str:
    """`174.7 rollouts/s (last 30 s)`: per second, as the live table's answers, and over
    which window (the two windows differ: each says its own)."""
    if not status.rate_per_s or not status.rate_window_s:
        return "rollouts/s -"
    return f"{rate_number(status.rate_per_s)} rollouts/s (last {status.rate_window_s:.0f} s)"


MAX_CHUNK_ROWS = 12


def chunk_table(status: RunStatus) -> Table:
    """Every chunk of a small run; of a large one, only those not finished (compact)."""
    chunks = status.chunks
    caption = None
    if len(chunks) > MAX_CHUNK_ROWS:
        open_chunks = [c for c in chunks if c.done + c.failed < c.expected]
        finished = len(chunks) - len(open_chunks)
        chunks = open_chunks[:MAX_CHUNK_ROWS]
        caption = f"{finished} of {len(status.chunks)} chunks finished" + (
            f"; {len(open_chunks) - len(chunks)} more not shown" if len(open_chunks) > len(chunks)
            else "")  # fmt: skip
    table = Table(caption=caption)
    for col in ("chunk", "expected", "done", "failed", "worker"):
        table.add_column(col, justify="left" if col == "worker" else "right")
    for c in chunks:
        worker = (c.worker or "-") + (f" (Slurm job {c.slurm_job})" if c.slurm_job else "")
        table.add_row(f"{c.index:05d}", str(c.expected), str(c.done), str(c.failed), worker)
    return table


def slurm_jobs_table(jobs: list[SlurmJob]) -> Table:
    """The run's worker jobs as squeue lists them (running, waiting, completing)."""
    table = Table(title=f"Slurm worker jobs: {len(jobs)}")
    for col in ("job", "state", "node (or why waiting)", "time"):
        table.add_column(col)
    for j in jobs:
        table.add_row(j.job_id, j.state, j.node, j.elapsed)
    return table


def health_view(health: RunHealth, replicas: Sequence[ReplicaStatus] = ()) -> list[RenderableType]:
    """The live table, then what is stalled or oldest. The table is the one of per-URL figures
    while collecting: each agent, then each of its replicas (a column says whether the router
    took one out, once one was), then what is stalled or oldest."""
    table = Table(title=f"live: {health.processes} process{'es' if health.processes > 1 else ''}, "
                  f"updated {health.updated_s_ago:.0f} s ago; rates and latencies over the "
                  "last minute")  # fmt: skip
    table.add_column("agent", no_wrap=True)  # a URL cut short is no URL
    for col in ("in flight", "answers/s", "failed/s", "p50", "p95", "p99"):
        table.add_column(col, justify="right", no_wrap=True)
    states = {(r.agent, r.url): r for r in replicas}
    ever_out = any(r.ejected or r.ejections for r in replicas)
    if ever_out:
        table.add_column("state", max_width=6)
    # narrower beside a state column, so that the table still fits 110 columns
    table.add_column("failed attempts", overflow="fold", min_width=8 if ever_out else 12)
    for a in health.agents:
        for t in [a, *(r for r in health.replicas if r.agent == a.agent)]:
            failures = ", ".join(f"{k} {n}" for k, n in sorted(t.failures.items())) or "-"
            replica = states.get((t.agent, t.url)) if t.url is not None else None
            state = [replica.state if replica is not None else ""] if ever_out else []
            table.add_row(t.agent if t.url is None else f"  {t.url}", str(t.in_flight),
                          rate_number(t.answers_per_s), rate_number(t.failed_per_s),
                          seconds_text(t.p50_s), seconds_text(t.p95_s), seconds_text(t.p99_s),
                          *state, failures)  # fmt: skip
    parts: list[RenderableType] = [table]
    if health.stalled_total:
        parts.append(Text(f"stalled: {health.stalled_total} in flight longer than "
                          f"{seconds_text(health.stalled[0].stall_after_s)}", style="bold red"))  # fmt: skip
        parts += [Text(f"  {describe_attempt(a)}") for a in health.stalled[:10]]
        if health.stalled_total > 10:
            parts.append(Text(f"  ... and {health.stalled_total - 10} more (--json lists 50)"))
    elif health.oldest:
        parts.append(Text("oldest in flight: " + "; ".join(
            f"{seconds_text(a.age_s)} (task {a.task_index} rollout {a.rollout_index})"
            for a in health.oldest[:3])))  # fmt: skip
    return parts


def replica_table(replicas: list[ReplicaStatus], running: bool) -> Table:
    """Requests per replica of each replicated agent, over every process of the run (shown
    when no process collects now: else the live table has the replicas)."""
    table = Table(title="replicas")
    table.add_column("agent / replica", no_wrap=True)  # a URL cut short is no URL
    for col in ("sent", "answered", "in flight"):
        table.add_column(col, justify="right")
    table.add_column("state", no_wrap=True)
    table.add_column("failed", overflow="fold", min_width=12)
    for r in replicas:
        failed = ", ".join(f"{k} {n}" for k, n in sorted(r.failed.items())) or "-"
        state = ("out" if r.ejected else "live") if running else "-"
        if r.ejections:
            state += f" (out {r.ejections}x)"
        table.add_row(f"{r.agent} {r.url}", str(r.sent), str(r.answered), str(r.in_flight),
                      state, failed)  # fmt: skip
    return table
