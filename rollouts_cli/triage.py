"""What `rollouts failures` prints: the failures by class and agent, and the retry to run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rollouts.failures import FailureReport, retry_command
from rollouts_cli.report import _console

MAX_ERROR_CHARS = 300


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
    gave_up = report.gave_up_classes()
    console.print(
        "gave up (a plain rerun of the collection sends them again): "
        + (", ".join(gave_up) or "none")
    )
    final = report.final_classes()  # one retry covers them all
    console.print("final (a rerun leaves them; retry them once their cause is fixed): "
                  + (", ".join(final) or "none"), highlight=False, soft_wrap=True)  # fmt: skip
    if not final:
        console.print("to send the ones that gave up again, without the rest of the collection:")
    console.print(f"  {retry_command(report.output, final or gave_up)}", highlight=False,
                  soft_wrap=True)  # fmt: skip
