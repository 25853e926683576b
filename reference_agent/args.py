"""The reference agent's command-line flags, apart from the server: `rollouts --help` and every
other subcommand build their parser without importing aiohttp's web server (0.3 s)."""

from __future__ import annotations

import argparse
from pathlib import Path

FAILURE_CLASS = "simulated_agent_failure"  # what fail_class_tasks answers carry


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1]: {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _task_indices(text: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text}") from exc


def _capacity_schedule(text: str) -> tuple[tuple[float, int], ...]:
    """`30:32,60:64` -> ((30.0, 32), (60.0, 64)): from 30 s after the first /run, capacity 32."""
    try:
        steps = tuple(
            (float(at), int(k)) for at, k in (part.split(":") for part in text.split(",") if part)
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected SECONDS:CAPACITY,...: {text}") from exc
    if any(at < 0 or k < 1 for at, k in steps):
        raise argparse.ArgumentTypeError(f"seconds >= 0 and capacities >= 1: {text}")
    return tuple(sorted(steps))


def add_serve_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference agent's CLI flags (the API key comes from $ROLLOUTS_AGENT_API_KEY only, a
    required basic auth from $ROLLOUTS_REFERENCE_AGENT_BASIC_AUTH=USER:PASSWORD only)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    add("--port", type=int, default=8765, help="port; 0 picks a free one (default: %(default)s)")
    add("--latency-ms", type=_non_negative, default=0.0, help="(median) latency per /run")
    add("--latency-sigma", type=_non_negative, default=0.0, help="lognormal sigma; 0 = fixed")
    add("--seed", type=int, default=0, help="seed of the simulated policy, faults and latency")
    add("--request-log", type=Path, default=None, metavar="PATH", help="JSONL log of /run requests")
    add("--p-500", type=_probability, default=0.0, help="probability of an HTTP 500")
    add("--p-429", type=_probability, default=0.0, help="probability of an HTTP 429")
    add("--retry-after-s", type=_non_negative, default=1.0, help="Retry-After of the 429s")
    add("--p-reset", type=_probability, default=0.0, help="probability of a connection reset")
    add("--p-hang", type=_probability, default=0.0, help="probability of a hang")
    add("--hang-s", type=_non_negative, default=3600.0, help="duration of a hang in seconds")
    add("--fail-400-tasks", type=_task_indices, default=frozenset(), metavar="I,J,...",
        help="_ng_task_index values that always get HTTP 400")  # fmt: skip
    add("--fail-class-tasks", type=_task_indices, default=frozenset(), metavar="I,J,...",
        help=f"_ng_task_index values answered 200 with _ng_failure_class={FAILURE_CLASS} "
             "and _ng_failure_terminal=true (an agent-declared, final failure)")  # fmt: skip
    add("--no-persist-tasks", type=_task_indices, default=frozenset(), metavar="I,J,...",
        help="_ng_task_index values answered 200 with _ng_no_persist=true (store nowhere)")  # fmt: skip
    add("--capacity", type=int, default=None, metavar="K",
        help="serve K requests at full speed; with more in flight all share it, so latency "
             "grows in proportion (default: no limit)")  # fmt: skip
    add("--reject-above", type=int, default=None, metavar="N",
        help="answer 429 (Retry-After: --retry-after-s) while N requests are in service")  # fmt: skip
    add("--capacity-schedule", type=_capacity_schedule, default=(), metavar="S:K,...",
        help="change the capacity to K at S seconds after the first /run, e.g. 30:32")  # fmt: skip
    add("--crash-after", type=int, default=None, metavar="N",
        help="serve N /run requests, then exit with code 3 on receiving the next one")  # fmt: skip
