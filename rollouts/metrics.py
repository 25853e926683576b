"""Per-agent aggregate metrics in NeMo Gym's ``<stem>_aggregate_metrics.json`` shape.

Memory stays bounded at millions of rollouts: the rollouts file is streamed once and only the
numeric fields are kept, one ``array('d')`` per field (NaN where a row lacks the field), plus the
task index and an agent code per row. Row bodies are never held. pandas computes the statistics,
and the per-task ``group_level_metrics`` are computed in chunks of tasks and streamed into the
output file instead of being built as one big list.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from rollouts.nemo_gym import (
    AGENT_REF,
    NG_FAILURE_TERMINAL,
    NG_ROLLOUT_INDEX,
    NG_TASK_INDEX,
    RESPONSE,
    REWARD,
)
from rollouts.storage import Location, Writer, exists, iter_lines, local_or_url, open_output

#: The statistics NeMo Gym reports for every numeric field, in output order.
STATS: tuple[str, ...] = ("mean", "max", "min", "median", "std")

# Row keys that identify a rollout rather than measure it.
_INDEX_KEYS = frozenset({NG_TASK_INDEX, NG_ROLLOUT_INDEX})
# Tasks per groupby pass: bounds the per-chunk frames and value lists (~6 numbers per task
# and field), a few MB per chunk.
_GROUP_CHUNK = 16_384
_NAN = float("nan")


@dataclass(frozen=True)
class AgentSummary:
    agent: str
    expected: int  # rollouts expected for this agent (tasks x repeats)
    succeeded: int
    failed: int  # final failures in the failures file (not those a rerun retries)
    mean_reward: float | None
    pass_at_k: dict[int, float]  # empty unless rewards are binary and repeats > 1


@dataclass(frozen=True)
class MetricsSummary:
    agents: list[AgentSummary]
    metrics_path: Location


class _Columns:
    """Compact columnar store of the numeric fields of every rollout."""

    def __init__(self) -> None:
        self.n = 0
        self.agent_code = array("i")
        self.task = array("q")
        self.values: dict[str, array[float]] = {}
        # Fields that ever held a float: the others report max/min as ints, like pandas would.
        self.float_fields: set[str] = set()
        self.agent_names: list[str] = []
        self._codes: dict[str, int] = {}

    def add(self, agent: str, task: int, row: dict[str, Any]) -> None:
        code = self._codes.get(agent)
        if code is None:
            code = self._codes[agent] = len(self.agent_names)
            self.agent_names.append(agent)
        fields = self._numeric_fields(row)
        for key, column in self.values.items():
            column.append(fields.pop(key, _NAN))
        for key, value in fields.items():
            # First sighting of this field: earlier rows lack it.
            column = array("d", [_NAN]) * self.n
            column.append(value)
            self.values[key] = column
        self.agent_code.append(code)
        self.task.append(task)
        self.n += 1

    def _numeric_fields(self, row: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        response = row.get(RESPONSE)
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            # NeMo Gym lifts the token counts to the top level; nested details dicts are skipped.
            self._collect(usage.items(), out)
        # Top-level fields second, so they win over a lifted usage field of the same name.
        self._collect(((k, v) for k, v in row.items() if k not in _INDEX_KEYS), out)
        return out

    def _collect(self, items: Iterable[tuple[str, Any]], out: dict[str, float]) -> None:
        for key, value in items:
            kind = type(value)
            if kind is float:
                out[key] = value
                self.float_fields.add(key)
            elif kind is int or kind is bool:
                # bool is 0/1, as NeMo Gym counts it.
                out[key] = float(value)


def _agent_name(row: dict[str, Any], path: Location, line: int) -> str:
    ref = row.get(AGENT_REF)
    name = ref.get("name") if isinstance(ref, dict) else None
    if isinstance(name, str):
        return name
    # Our writers always add agent_ref; without it the row cannot be attributed.
    raise ValueError(f"{path}:{line}: row has no agent_ref.name")


def _iter_rows(path: Location) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in iter_lines(path):
        yield line, orjson.loads(raw)


def _read_rollouts(path: Location) -> _Columns:
    columns = _Columns()
    for line, row in _iter_rows(path):
        task = row.get(NG_TASK_INDEX)
        if type(task) is not int:
            raise ValueError(f"{path}:{line}: row has no integer _ng_task_index")
        columns.add(_agent_name(row, path, line), task, row)
    return columns


def _count_failures(path: Location | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    if path is None or not exists(path):
        return counts
    for line, row in _iter_rows(path):
        if row.get(NG_FAILURE_TERMINAL) is False:
            continue  # retried on the next run: missing, not failed
        name = _agent_name(row, path, line)
        counts[name] = counts.get(name, 0) + 1
    return counts


def _json_number(value: Any) -> float | int | None:
    """A Python number for JSON: NaN and infinities become None (null), numpy scalars plain."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    as_float = float(value)
    return as_float if math.isfinite(as_float) else None


def _field_stats(values: np.ndarray, integral: bool) -> dict[str, float | int | None] | None:
    """pandas' mean/max/min/median/std over the non-missing values; None when there are none."""
    series = pd.Series(values, copy=False)
    count = int(series.count())
    if count == 0:
        return None
    stats: dict[str, float | int | None] = {
        "mean": _json_number(series.mean()),
        "max": _json_number(series.max()),
        "min": _json_number(series.min()),
        "median": _json_number(series.median()),
        # Sample std is NaN for one value; NeMo Gym reports 0 there.
        "std": 0.0 if count == 1 else _json_number(series.std()),
    }
    if integral:
        for stat in ("max", "min"):
            if stats[stat] is not None:
                stats[stat] = int(stats[stat])  # type: ignore[arg-type]
    return stats


def _k_values(num_repeats: int) -> list[int]:
    ks: list[int] = []
    k = 1
    while k <= num_repeats:
        ks.append(k)
        k *= 2
    if ks[-1] != num_repeats:
        ks.append(num_repeats)
    return ks


def _pass_at_k(n: np.ndarray, c: np.ndarray, num_repeats: int) -> dict[int, float]:
    """Unbiased pass@k, ``1 - C(n-c, k) / C(n, k)`` per task, averaged over tasks with n >= k."""
    # Only a handful of distinct (n, c) pairs exist, so compute each one exactly once.
    pairs, weights = np.unique(np.stack([n, c], axis=1), axis=0, return_counts=True)
    pair_list: list[tuple[list[int], int]] = list(
        zip(pairs.tolist(), weights.tolist(), strict=True)
    )
    result: dict[int, float] = {}
    for k in _k_values(num_repeats):
        total = 0.0
        tasks = 0
        for (n_i, c_i), weight in pair_list:
            if n_i < k:
                continue
            total += weight * (1.0 - math.comb(n_i - c_i, k) / math.comb(n_i, k))
            tasks += weight
        if tasks:
            result[k] = total / tasks
    return result


class _AgentView:
    """One agent's rows, ordered by task, with task boundaries."""

    def __init__(self, columns: _Columns, code: int) -> None:
        codes = np.frombuffer(columns.agent_code, dtype=np.int32)
        task = np.frombuffer(columns.task, dtype=np.int64)
        rows = np.flatnonzero(codes == code)
        tasks = task[rows]
        if tasks.size > 1 and bool(np.any(tasks[1:] < tasks[:-1])):
            # The file should be sorted; if it is not, group correctly anyway.
            order = np.argsort(tasks, kind="stable")
            rows, tasks = rows[order], tasks[order]
        self.rows = rows
        self.tasks = tasks
        if tasks.size:
            self.starts = np.flatnonzero(np.concatenate(([True], tasks[1:] != tasks[:-1])))
        else:
            self.starts = np.zeros(0, dtype=np.int64)

    def column(self, values: array[float]) -> np.ndarray:
        return np.frombuffer(values, dtype=np.float64)[self.rows]


def _write_group_entries(
    out: Writer,
    columns: _Columns,
    view: _AgentView,
    fields: list[str],
    num_repeats: int,
) -> None:
    """Write the group_level_metrics entries (comma-separated, no brackets), chunk by chunk."""
    n_rows = view.tasks.size
    n_groups = view.starts.size
    for g0 in range(0, n_groups, _GROUP_CHUNK):
        g1 = min(g0 + _GROUP_CHUNK, n_groups)
        r0 = int(view.starts[g0])
        r1 = int(view.starts[g1]) if g1 < n_groups else n_rows
        tasks = view.tasks[r0:r1]
        bounds = np.append(view.starts[g0:g1], r1)
        sizes = np.diff(bounds).tolist()
        task_ids = view.tasks[bounds[:-1]].tolist()
        rows = view.rows[r0:r1]

        # Per field: per-task counts and, stat-major, the per-task values.
        counts: list[list[int]] = []
        keyed: list[tuple[str, int, list[Any]]] = []
        if fields:
            frame = pd.DataFrame(
                {f: np.frombuffer(columns.values[f], dtype=np.float64)[rows] for f in fields},
                copy=False,
            )
            # Rows are contiguous by task, so sort=False keeps ascending task order cheaply.
            agg = frame.groupby(tasks, sort=False).agg(["count", *STATS])
            per_stat: dict[str, list[tuple[int, list[Any]]]] = {s: [] for s in STATS}
            for idx, field in enumerate(fields):
                count = agg[(field, "count")].to_numpy()
                counts.append(count.tolist())
                for stat in STATS:
                    vals = agg[(field, stat)].to_numpy(dtype=np.float64)
                    if stat == "std":
                        vals = np.where(count == 1, 0.0, vals)
                    if stat in ("max", "min") and field not in columns.float_fields:
                        per_stat[stat].append(
                            (idx, np.where(np.isnan(vals), 0, vals).astype(np.int64).tolist())
                        )
                    else:
                        # Any remaining NaN/inf is written as null by orjson.
                        per_stat[stat].append((idx, vals.tolist()))
            for stat in STATS:
                for idx, values in per_stat[stat]:
                    keyed.append((f"{stat}/{fields[idx]}", idx, values))

        for j, task in enumerate(task_ids):
            entry: dict[str, Any] = {
                NG_TASK_INDEX: task,
                "num_rollouts": sizes[j],
                "expected_num_rollouts": num_repeats,
            }
            for key, idx, values in keyed:
                # A field none of this task's rollouts has is left out, not written as null.
                if counts[idx][j]:
                    entry[key] = values[j]
            # Straight to the buffered file: orjson's result buffers are several KB each, so
            # collecting them per chunk would cost far more than the JSON itself.
            out.write(b"\n" if g0 == 0 and j == 0 else b",\n")
            out.write(orjson.dumps(entry))


def _agent_pass_at_k(view: _AgentView, rewards: np.ndarray, num_repeats: int) -> dict[int, float]:
    present = ~np.isnan(rewards)
    observed = rewards[present]
    if observed.size == 0 or not bool(np.all((observed == 0.0) | (observed == 1.0))):
        return {}  # pass@k only means something for binary rewards
    # Rollouts without a reward cannot be judged, so n counts only the rewarded ones.
    n = np.add.reduceat(present.astype(np.int64), view.starts)
    c = np.add.reduceat((rewards == 1.0).astype(np.int64), view.starts)
    return _pass_at_k(n, c, num_repeats)


def write_aggregate_metrics(
    rollouts_path: Location,
    failures_path: Location | None,
    metrics_path: Location,
    *,
    num_repeats: int,
    expected_by_agent: dict[str, int],
) -> MetricsSummary:
    """Compute per-agent metrics from the (sorted) rollouts file and write them atomically.
    Each location is a local path or a URL (rollouts/storage.py): an object is streamed, and
    the metrics object appears whole or not at all.

    The output is a JSON array, one entry per agent sorted by name:
    ``{"agent_ref", "agent_metrics", "key_metrics", "group_level_metrics"}``.
    """
    rollouts_path = local_or_url(rollouts_path)
    metrics_path = local_or_url(metrics_path)
    # No rollouts file at all (every attempt failed) still yields per-agent counts.
    columns = _read_rollouts(rollouts_path) if exists(rollouts_path) else _Columns()
    failed = _count_failures(local_or_url(failures_path) if failures_path is not None else None)
    names = sorted(set(columns.agent_names) | set(failed) | set(expected_by_agent))
    codes = {name: code for code, name in enumerate(columns.agent_names)}

    summaries: list[AgentSummary] = []
    # Overflowing sums become inf/NaN and are written as null; numpy need not warn about them.
    with np.errstate(over="ignore", invalid="ignore"), open_output(metrics_path) as out:
        out.write(b"[")
        for position, name in enumerate(names):
            code = codes.get(name)
            view = _AgentView(columns, code) if code is not None else None
            succeeded = int(view.rows.size) if view is not None else 0

            agent_metrics: dict[str, Any] = {
                "num_expected_rollouts": int(expected_by_agent.get(name, 0)),
                "num_succeeded_rollouts": succeeded,
                "num_failed_rollouts": failed.get(name, 0),
            }
            per_field: dict[str, dict[str, float | int | None]] = {}
            pass_at_k: dict[int, float] = {}
            if view is not None:
                for field, values in columns.values.items():
                    stats = _field_stats(view.column(values), field not in columns.float_fields)
                    if stats is not None:
                        per_field[field] = stats
                if REWARD in per_field and num_repeats > 1:
                    rewards = view.column(columns.values[REWARD])
                    pass_at_k = _agent_pass_at_k(view, rewards, num_repeats)
            for stat in STATS:
                for field, stats in per_field.items():
                    agent_metrics[f"{stat}/{field}"] = stats[stat]
            for k, value in pass_at_k.items():
                agent_metrics[f"pass@{k}"] = value
            key_metrics = {k: v for k, v in agent_metrics.items() if k.startswith("mean/")}

            head = {
                AGENT_REF: {"name": name},
                "agent_metrics": agent_metrics,
                "key_metrics": key_metrics,
            }
            out.write(b"\n" if position == 0 else b",\n")
            # Open the head object, then stream the (possibly huge) group list into it.
            out.write(orjson.dumps(head)[:-1] + b',"group_level_metrics":[')
            if view is not None:
                _write_group_entries(out, columns, view, list(per_field), num_repeats)
            out.write(b"]}")

            mean_reward = per_field.get(REWARD, {}).get("mean")
            summaries.append(
                AgentSummary(
                    agent=name,
                    expected=agent_metrics["num_expected_rollouts"],
                    succeeded=succeeded,
                    failed=agent_metrics["num_failed_rollouts"],
                    mean_reward=float(mean_reward) if mean_reward is not None else None,
                    pass_at_k=pass_at_k,
                )
            )
        out.write(b"\n]\n")
    return MetricsSummary(agents=summaries, metrics_path=metrics_path)
