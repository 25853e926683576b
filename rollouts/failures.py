"""Triage of a collection's failures file: what failed, how often, where, and how.

One streaming pass over ``<stem>_failures.jsonl`` (one row per rollout that did not succeed:
its last failure); memory grows with the classes and agents, not with the rows.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from rollouts.errors import RolloutsError
from rollouts.models import RolloutKey
from rollouts.nemo_gym import AGENT_REF, NG_FAILURE_CLASS, NG_FAILURE_TERMINAL, key_of
from rollouts.run_state import OutputPaths
from rollouts.storage import exists, iter_lines, local_or_url


class FailuresUnreadable(RolloutsError):
    """No failures file to summarize, or one that is not ours."""


@dataclass
class ClassFailures:
    failure_class: str
    count: int = 0
    terminal: int = 0  # final: the agent or HTTP said so; a plain rerun leaves them
    gave_up: int = 0  # attempts spent; a plain rerun sends them again
    agents: Counter[str] = field(default_factory=Counter)
    first_error: str = ""
    keys: list[RolloutKey] = field(default_factory=list)  # the first few

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count, "terminal": self.terminal, "gave_up": self.gave_up,
            "agents": dict(self.agents.most_common()), "first_error": self.first_error,
            "keys": [list(k) for k in self.keys],
        }  # fmt: skip


@dataclass
class FailureReport:
    output: str
    failures_path: str
    total: int = 0
    classes: dict[str, ClassFailures] = field(default_factory=dict)

    def by_count(self) -> list[ClassFailures]:
        return sorted(self.classes.values(), key=lambda c: (-c.count, c.failure_class))

    def final_classes(self) -> list[str]:
        """Classes with final failures, most first: a plain rerun leaves these."""
        return [c.failure_class for c in self.by_count() if c.terminal]

    def gave_up_classes(self) -> list[str]:
        """Classes with rollouts that gave up, most first: a plain rerun sends them again."""
        return [c.failure_class for c in self.by_count() if c.gave_up]

    def agents(self) -> list[str]:
        totals: Counter[str] = Counter()
        for c in self.classes.values():
            totals.update(c.agents)
        return [a for a, _ in totals.most_common()]

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output, "failures": self.failures_path, "total": self.total,
            "classes": {c.failure_class: c.to_json() for c in self.by_count()},
        }  # fmt: skip


def retry_command(output: str | Path, classes: list[str]) -> str:
    """The `rollouts retry` that sends the rollouts of ``classes`` again."""
    flags = " ".join(f"--failure-class {shlex.quote(c)}" for c in classes)
    return f"rollouts retry {shlex.quote(str(output))} {flags}"


def summarize_failures(output: str | Path, examples: int = 5) -> FailureReport:
    """Counts by class (terminal and given up) and agent, the first error and the first
    ``examples`` keys of each class, from the failures file of the collection into ``output``."""
    path = OutputPaths.for_output(output).failures
    if not exists(path):
        where = "" if exists(local_or_url(output)) else f", nor {output} itself"
        raise FailuresUnreadable(
            f"no failures file {path}{where}: nothing was merged for this output yet. Give the "
            "output file of a collection (its --output), after a run has ended."
        )
    report = FailureReport(output=str(output), failures_path=str(path))
    for number, line in iter_lines(path):
        try:
            row = orjson.loads(line)
            task, rollout = key_of(row)
            key = (int(task), int(rollout))  # a file given by hand may hold anything
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise FailuresUnreadable(
                f"{path}:{number}: not a failure row of a collection ({e}); "
                "is this the failures file of a `rollouts collect` output?"
            ) from None
        name = str(row.get(NG_FAILURE_CLASS))
        c = report.classes.get(name)
        if c is None:
            c = report.classes[name] = ClassFailures(name, first_error=str(row.get("error", "")))
        c.count += 1
        if row.get(NG_FAILURE_TERMINAL) is True:  # as merge and metrics count them
            c.terminal += 1
        else:
            c.gave_up += 1
        c.agents[str((row.get(AGENT_REF) or {}).get("name", "-"))] += 1
        if len(c.keys) < examples:
            c.keys.append(key)
        report.total += 1
    return report
