"""What `rollouts failures` prints: the failures by class and agent, and the retry to run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rollouts import failures
from rollouts.failures import FailureReport
from rollouts_cli.report import _console

MAX_ERROR_CHARS = 300


def retry_command(report: FailureReport, classes: list[str]) -> str:
    return failures.retry_command(report.output, classes)


def print_failures(report: FailureReport, console: Console | None = None) -> None:
    console = console or _console()
    if not report.total:
        console.print(f"no failures ({report.failures_path} is empty)")
        return
    agents = report.agents()
    table = Table(title=f"{report.total} failures: {report.failures_path}")
    table.add_column("class", no_wrap=True)
    for col in ("count", "final", "gave up"):
        table.add_column(col, justify="right", no_wrap=True)
    for a in agents:
        table.add_column(a, justify="right", overflow="fold")
    table.add_column("first keys (task, rollout)", overflow="fold", min_width=12)
    for c in report.by_count():
        keys = " ".join(f"{t},{r}" for t, r in c.keys)
        table.add_row(c.failure_class, str(c.count), str(c.terminal), str(c.gave_up),
                      *(str(c.agents.get(a, 0)) for a in agents), keys)  # fmt: skip
    console.print(table)
    for c in report.by_count():
        error = c.first_error if len(c.first_error) <= MAX_ERROR_CHARS else (
            c.first_error[:MAX_ERROR_CHARS] + "...")  # fmt: skip
        # Text, not markup: an error's own brackets must print as they are.
        console.print(Text.assemble((c.failure_class, "bold"), ": ", error or "(no error text)"),
                      soft_wrap=True)  # fmt: skip
    gave_up = [c.failure_class for c in report.by_count() if c.gave_up]
    console.print(
        "gave up (a plain rerun of the collection sends them again): "
        + (", ".join(gave_up) or "none")
    )
    console.print("to send a class again (final ones too, once their cause is fixed):")
    console.print(f"  {retry_command(report, [report.by_count()[0].failure_class])}",
                  highlight=False, soft_wrap=True)  # fmt: skip
