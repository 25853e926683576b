"""The end-of-run summary printed by the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from flows.collect import CollectSummary


def print_summary(summary: CollectSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="rollouts", show_header=True)
    table.add_column("agent", overflow="fold")
    for col in ("expected", "written", "failed", "mean reward"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("pass@k", no_wrap=True)
    for a in summary.agents:
        mean = a["mean_reward"]
        passk = "  ".join(f"@{k} {v:.3f}" for k, v in a["pass_at_k"].items())
        table.add_row(
            a["agent"], str(a["expected"]), str(a["succeeded"]), str(a["failed"]),
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
