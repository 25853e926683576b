"""Tests for rollouts.metrics: NeMo Gym's aggregate-metrics shape on small hand-checkable files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from rollouts import metrics
from rollouts.metrics import STATS, AgentSummary, MetricsSummary, write_aggregate_metrics

pytestmark = pytest.mark.fast  # the stage alone: `make test-fast`


def _row(
    task: int,
    rollout: int,
    agent: str = "a",
    reward: float | None = None,
    usage: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if reward is not None:
        row["reward"] = reward
    if usage is not None:
        row["response"] = {"id": "resp", "output": [], "usage": usage}
    row.update(extra)
    row["_ng_task_index"] = task
    row["_ng_rollout_index"] = rollout
    row["agent_ref"] = {"name": agent}
    return row


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def _strict_load(path: Path) -> Any:
    """json.loads that refuses NaN/Infinity, which are not JSON."""

    def reject(token: str) -> Any:
        raise AssertionError(f"non-JSON constant {token} in output")

    return json.loads(path.read_text(), parse_constant=reject)


def _run(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    *,
    num_repeats: int = 2,
    expected: dict[str, int] | None = None,
    failures: list[dict[str, Any]] | None = None,
) -> tuple[MetricsSummary, list[dict[str, Any]]]:
    rollouts = _write_jsonl(tmp_path / "out.jsonl", rows)
    failures_path = None
    if failures is not None:
        failures_path = _write_jsonl(tmp_path / "out_failures.jsonl", failures)
    metrics_path = tmp_path / "out_aggregate_metrics.json"
    summary = write_aggregate_metrics(
        rollouts,
        failures_path,
        metrics_path,
        num_repeats=num_repeats,
        expected_by_agent=expected if expected is not None else {},
    )
    return summary, _strict_load(metrics_path)


def _pandas_stats(values: list[float]) -> dict[str, float]:
    """What NeMo Gym computes: pandas stats, sample std, 0 for a single value."""
    series = pd.Series(values, dtype="float64")
    std = float(series.std()) if len(values) > 1 else 0.0
    return {
        "mean": float(series.mean()),
        "max": float(series.max()),
        "min": float(series.min()),
        "median": float(series.median()),
        "std": std,
    }


def _stat_keys(entry: dict[str, Any]) -> set[str]:
    return {k for k in entry if "/" in k}


def test_stats_are_pandas_stats(tmp_path: Path) -> None:
    rewards = [0.5, 0.25, 1.0, 0.75, 0.0]
    rows = [_row(i // 2, i % 2, reward=r) for i, r in enumerate(rewards)]
    _, out = _run(tmp_path, rows)

    agent_metrics = out[0]["agent_metrics"]
    expected = _pandas_stats(rewards)
    for stat in STATS:
        assert agent_metrics[f"{stat}/reward"] == pytest.approx(expected[stat], rel=1e-12)
    # Hand-checked: mean 2.5/5, median of sorted [0, .25, .5, .75, 1], sample std sqrt(0.625/4).
    assert agent_metrics["mean/reward"] == 0.5
    assert agent_metrics["median/reward"] == 0.5
    assert agent_metrics["std/reward"] == pytest.approx(math.sqrt(0.625 / 4))
    assert agent_metrics["max/reward"] == 1.0
    assert agent_metrics["min/reward"] == 0.0


def test_single_row_std_is_zero(tmp_path: Path) -> None:
    _, out = _run(tmp_path, [_row(0, 0, reward=0.7)])
    entry = out[0]
    assert entry["agent_metrics"]["std/reward"] == 0
    assert entry["agent_metrics"]["mean/reward"] == 0.7
    assert entry["group_level_metrics"][0]["std/reward"] == 0


def test_usage_lifted_and_nested_details_skipped(tmp_path: Path) -> None:
    rows = [
        _row(
            0,
            0,
            reward=1.0,
            usage={
                "input_tokens": 10,
                "output_tokens": 4,
                "total_tokens": 14,
                "output_tokens_details": {"reasoning_tokens": 2},
                "input_tokens_details": {"cached_tokens": 0},
            },
        ),
        _row(
            0,
            1,
            reward=0.0,
            usage={"input_tokens": 20, "output_tokens": 8, "total_tokens": 28},
        ),
    ]
    _, out = _run(tmp_path, rows)
    am = out[0]["agent_metrics"]
    assert am["mean/input_tokens"] == 15
    assert am["mean/output_tokens"] == 6
    assert am["mean/total_tokens"] == 21
    assert am["std/output_tokens"] == pytest.approx(_pandas_stats([4, 8])["std"])
    # Integer fields keep integer max/min, as pandas gives on an int column.
    assert am["max/input_tokens"] == 20 and isinstance(am["max/input_tokens"], int)
    assert am["min/total_tokens"] == 14 and isinstance(am["min/total_tokens"], int)
    for key in am:
        assert "details" not in key and "reasoning_tokens" not in key and "cached" not in key
        assert not key.endswith("/response") and not key.endswith("/usage")


def test_booleans_count_as_01_strings_and_indices_ignored(tmp_path: Path) -> None:
    rows = [
        _row(0, 0, reward=1.0, correct=True, answer="42", meta={"x": 1}, score=3),
        _row(0, 1, reward=0.0, correct=False, answer="41", meta={"x": 2}, score=5),
        _row(1, 0, reward=1.0, correct=True, answer="7", meta={"x": 3}, score=4),
    ]
    _, out = _run(tmp_path, rows)
    am = out[0]["agent_metrics"]
    assert am["mean/correct"] == pytest.approx(2 / 3)
    assert am["max/correct"] == 1 and am["min/correct"] == 0
    assert am["median/score"] == 4
    fields = {k.split("/", 1)[1] for k in am if "/" in k}
    assert fields == {"reward", "correct", "score"}


def test_missing_field_uses_rows_that_have_it(tmp_path: Path) -> None:
    rows = [
        _row(0, 0, reward=1.0, extra_score=2.0),
        _row(0, 1, reward=0.0),
        _row(1, 0, reward=1.0, extra_score=6.0),
        _row(1, 1),  # no reward at all
        _row(2, 0, reward=0.0),
    ]
    _, out = _run(tmp_path, rows)
    entry = out[0]
    am = entry["agent_metrics"]
    assert am["mean/extra_score"] == 4.0
    assert am["std/extra_score"] == pytest.approx(_pandas_stats([2.0, 6.0])["std"])
    assert am["mean/reward"] == pytest.approx(0.5)
    assert am["median/reward"] == 0.5

    groups = {g["_ng_task_index"]: g for g in entry["group_level_metrics"]}
    assert groups[0]["mean/extra_score"] == 2.0 and groups[0]["std/extra_score"] == 0
    # Task 2 has no extra_score at all: the key is absent rather than null.
    assert "mean/extra_score" not in groups[2]
    assert groups[1]["mean/reward"] == 1.0 and groups[1]["num_rollouts"] == 2


def test_two_agents_sorted_and_separate(tmp_path: Path) -> None:
    rows = [
        _row(0, 0, agent="zeta", reward=1.0),
        _row(0, 0, agent="alpha", reward=0.2),
        _row(0, 1, agent="zeta", reward=0.0),
        _row(0, 1, agent="alpha", reward=0.4),
        _row(1, 0, agent="alpha", reward=0.6, only_alpha=1),
    ]
    summary, out = _run(tmp_path, rows, num_repeats=2, expected={"alpha": 4, "zeta": 2, "idle": 6})
    assert [e["agent_ref"]["name"] for e in out] == ["alpha", "idle", "zeta"]
    alpha, idle, zeta = out
    assert alpha["agent_metrics"]["mean/reward"] == pytest.approx(0.4)
    assert alpha["agent_metrics"]["num_succeeded_rollouts"] == 3
    assert alpha["agent_metrics"]["num_expected_rollouts"] == 4
    assert zeta["agent_metrics"]["mean/reward"] == 0.5
    assert "mean/only_alpha" in alpha["agent_metrics"]
    assert not any("only_alpha" in k for k in zeta["agent_metrics"])
    assert [g["_ng_task_index"] for g in alpha["group_level_metrics"]] == [0, 1]
    assert [g["_ng_task_index"] for g in zeta["group_level_metrics"]] == [0]

    # An agent with nothing collected still gets an entry with its counts.
    assert idle["agent_metrics"] == {
        "num_expected_rollouts": 6,
        "num_succeeded_rollouts": 0,
        "num_failed_rollouts": 0,
    }
    assert idle["key_metrics"] == {} and idle["group_level_metrics"] == []

    assert [a.agent for a in summary.agents] == ["alpha", "idle", "zeta"]
    assert summary.agents[1] == AgentSummary("idle", 6, 0, 0, None, {})
    assert summary.agents[0].mean_reward == pytest.approx(0.4)


def test_entry_shape_and_key_metrics(tmp_path: Path) -> None:
    rows = [_row(0, 0, reward=1.0, usage={"input_tokens": 3}), _row(0, 1, reward=0.0)]
    _, out = _run(tmp_path, rows, num_repeats=2, expected={"a": 2})
    entry = out[0]
    assert list(entry) == ["agent_ref", "agent_metrics", "key_metrics", "group_level_metrics"]
    assert entry["agent_ref"] == {"name": "a"}
    am = entry["agent_metrics"]
    assert entry["key_metrics"] == {k: v for k, v in am.items() if k.startswith("mean/")}
    assert set(entry["key_metrics"]) == {"mean/reward", "mean/input_tokens"}


def test_group_level_entries_per_task(tmp_path: Path) -> None:
    rewards = {0: [1.0, 0.0, 0.5], 3: [0.25], 7: [0.0, 1.0]}
    rows = [
        _row(task, i, reward=r, usage={"output_tokens": 10 * (i + 1)})
        for task, rs in rewards.items()
        for i, r in enumerate(rs)
    ]
    _, out = _run(tmp_path, rows, num_repeats=3)
    groups = out[0]["group_level_metrics"]
    assert [g["_ng_task_index"] for g in groups] == [0, 3, 7]
    for group in groups:
        task_rewards = rewards[group["_ng_task_index"]]
        assert list(group)[:3] == ["_ng_task_index", "num_rollouts", "expected_num_rollouts"]
        assert group["num_rollouts"] == len(task_rewards)
        assert group["expected_num_rollouts"] == 3
        expected = _pandas_stats(task_rewards)
        for stat in STATS:
            assert group[f"{stat}/reward"] == pytest.approx(expected[stat], rel=1e-12)
        tokens = _pandas_stats([10.0 * (i + 1) for i in range(len(task_rewards))])
        assert group["mean/output_tokens"] == pytest.approx(tokens["mean"])
        assert group["std/output_tokens"] == pytest.approx(tokens["std"])
        assert _stat_keys(group) == {f"{s}/{f}" for s in STATS for f in ("reward", "output_tokens")}


def test_group_chunks_stream_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [_row(t, r, reward=float((t + r) % 2), n=t * r) for t in range(7) for r in range(2)]
    _, whole = _run(tmp_path, rows)
    monkeypatch.setattr(metrics, "_GROUP_CHUNK", 2)
    _, chunked = _run(tmp_path, rows)
    assert chunked == whole
    assert [g["_ng_task_index"] for g in chunked[0]["group_level_metrics"]] == list(range(7))


def test_unsorted_input_still_grouped_by_task(tmp_path: Path) -> None:
    rows = [_row(2, 0, reward=1.0), _row(0, 0, reward=0.0), _row(2, 1, reward=0.0)]
    _, out = _run(tmp_path, rows)
    groups = out[0]["group_level_metrics"]
    assert [(g["_ng_task_index"], g["num_rollouts"]) for g in groups] == [(0, 1), (2, 2)]


def test_pass_at_k_hand_computed(tmp_path: Path) -> None:
    # One task, 4 rollouts, 1 correct: 1 - C(3,k)/C(4,k) = 1/4, 1/2, 1.
    rows = [_row(0, i, reward=1.0 if i == 2 else 0.0) for i in range(4)]
    summary, out = _run(tmp_path, rows, num_repeats=4)
    am = out[0]["agent_metrics"]
    assert am["pass@1"] == 0.25
    assert am["pass@2"] == 0.5
    assert am["pass@4"] == 1.0
    assert summary.agents[0].pass_at_k == {1: 0.25, 2: 0.5, 4: 1.0}
    assert "pass@1" not in out[0]["key_metrics"]


def test_pass_at_k_averages_tasks_and_skips_short_ones(tmp_path: Path) -> None:
    rows = [_row(0, i, reward=1.0 if i == 0 else 0.0) for i in range(3)]  # c=1, n=3
    rows += [_row(1, i, reward=0.0) for i in range(3)]  # c=0, n=3
    rows += [_row(2, 0, reward=1.0)]  # n=1: only counts for k=1
    summary, _ = _run(tmp_path, rows, num_repeats=3)
    # k=1: (1/3 + 0 + 1) / 3; k=2: (1 - C(2,2)/C(3,2) + 0) / 2 = (2/3) / 2; k=3: (1 + 0) / 2.
    assert summary.agents[0].pass_at_k == pytest.approx({1: 4 / 9, 2: 1 / 3, 3: 0.5})


def test_pass_at_k_ks_are_powers_of_two_and_repeats(tmp_path: Path) -> None:
    rows = [_row(0, i, reward=float(i % 2)) for i in range(6)]
    summary, _ = _run(tmp_path, rows, num_repeats=6)
    assert sorted(summary.agents[0].pass_at_k) == [1, 2, 4, 6]
    assert summary.agents[0].pass_at_k[1] == pytest.approx(0.5)


def test_no_pass_at_k_for_non_binary_rewards(tmp_path: Path) -> None:
    rows = [_row(0, 0, reward=1.0), _row(0, 1, reward=0.5)]
    summary, out = _run(tmp_path, rows, num_repeats=2)
    assert summary.agents[0].pass_at_k == {}
    assert not any(k.startswith("pass@") for k in out[0]["agent_metrics"])


def test_no_pass_at_k_with_one_repeat(tmp_path: Path) -> None:
    rows = [_row(0, 0, reward=1.0), _row(1, 0, reward=0.0)]
    summary, out = _run(tmp_path, rows, num_repeats=1)
    assert summary.agents[0].pass_at_k == {}
    assert not any(k.startswith("pass@") for k in out[0]["agent_metrics"])


def test_boolean_rewards_count_as_binary(tmp_path: Path) -> None:
    rows = [_row(0, 0, reward=True), _row(0, 1, reward=False)]  # type: ignore[arg-type]
    summary, _ = _run(tmp_path, rows, num_repeats=2)
    assert summary.agents[0].pass_at_k == {1: 0.5, 2: 1.0}


def test_failure_counts(tmp_path: Path) -> None:
    rows = [_row(0, 0, agent="a", reward=1.0), _row(0, 0, agent="b", reward=0.0)]
    failures = [
        {
            "_ng_failure_class": "timeout",
            "_ng_task_index": 0,
            "_ng_rollout_index": 1,
            "agent_ref": {"name": "a"},
        },
        {
            "_ng_failure_class": "http_500",
            "_ng_task_index": 1,
            "_ng_rollout_index": 0,
            "agent_ref": {"name": "a"},
            "reward": 0.0,
        },
        {
            "_ng_failure_class": "timeout",
            "_ng_task_index": 1,
            "_ng_rollout_index": 1,
            "agent_ref": {"name": "c"},
        },
    ]
    summary, out = _run(tmp_path, rows, failures=failures, expected={"a": 4, "b": 4, "c": 4})
    by_name = {e["agent_ref"]["name"]: e["agent_metrics"] for e in out}
    assert by_name["a"]["num_failed_rollouts"] == 2
    assert by_name["b"]["num_failed_rollouts"] == 0
    assert by_name["c"]["num_failed_rollouts"] == 1
    # Failures are never counted as reward 0.
    assert by_name["a"]["mean/reward"] == 1.0
    assert by_name["a"]["num_succeeded_rollouts"] == 1
    assert [(s.agent, s.expected, s.succeeded, s.failed) for s in summary.agents] == [
        ("a", 4, 1, 2),
        ("b", 4, 1, 0),
        ("c", 4, 0, 1),
    ]


def test_missing_or_absent_failures_file(tmp_path: Path) -> None:
    rollouts = _write_jsonl(tmp_path / "r.jsonl", [_row(0, 0, reward=1.0)])
    for failures_path in (None, tmp_path / "does_not_exist.jsonl"):
        summary = write_aggregate_metrics(
            rollouts, failures_path, tmp_path / "m.json", num_repeats=1, expected_by_agent={}
        )
        assert summary.agents[0].failed == 0
        assert summary.metrics_path == tmp_path / "m.json"


def test_nan_and_inf_are_written_as_null(tmp_path: Path) -> None:
    # The sum overflows: mean is inf and std NaN, neither of which JSON can hold.
    rows = [_row(0, 0, reward=1.0, big=1.7e308), _row(0, 1, reward=0.0, big=1.7e308)]
    summary, out = _run(tmp_path, rows)
    am = out[0]["agent_metrics"]
    assert am["mean/big"] is None
    assert am["max/big"] == 1.7e308
    assert out[0]["key_metrics"]["mean/big"] is None
    assert summary.agents[0].mean_reward == 0.5
    raw = (tmp_path / "out_aggregate_metrics.json").read_bytes()
    assert b"NaN" not in raw and b"Infinity" not in raw


def test_empty_rollouts_file_is_valid_json(tmp_path: Path) -> None:
    summary, out = _run(tmp_path, [], expected={"a": 3})
    assert out == [
        {
            "agent_ref": {"name": "a"},
            "agent_metrics": {
                "num_expected_rollouts": 3,
                "num_succeeded_rollouts": 0,
                "num_failed_rollouts": 0,
            },
            "key_metrics": {},
            "group_level_metrics": [],
        }
    ]
    assert summary.agents[0].mean_reward is None
    _, nothing = _run(tmp_path, [])
    assert nothing == []


def test_existing_metrics_file_replaced_whole(tmp_path: Path) -> None:
    metrics_path = tmp_path / "out_aggregate_metrics.json"
    metrics_path.write_bytes(b"x" * 100_000)  # longer than the new content
    _run(tmp_path, [_row(0, 0, reward=1.0)])
    assert _strict_load(metrics_path)[0]["agent_metrics"]["mean/reward"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out_aggregate_metrics.json"]


def test_failed_run_leaves_previous_metrics_untouched(tmp_path: Path) -> None:
    metrics_path = tmp_path / "out_aggregate_metrics.json"
    metrics_path.write_bytes(b'["previous"]')
    bad = _row(0, 0, reward=1.0)
    del bad["agent_ref"]
    with pytest.raises(ValueError, match="agent_ref"):
        _run(tmp_path, [bad])
    assert metrics_path.read_bytes() == b'["previous"]'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out_aggregate_metrics.json"]


def test_rows_without_numeric_fields_still_grouped(tmp_path: Path) -> None:
    rows = [_row(0, 0, answer="x"), _row(0, 1, answer="y"), _row(1, 0)]
    summary, out = _run(tmp_path, rows)
    assert out[0]["key_metrics"] == {}
    assert out[0]["group_level_metrics"] == [
        {"_ng_task_index": 0, "num_rollouts": 2, "expected_num_rollouts": 2},
        {"_ng_task_index": 1, "num_rollouts": 1, "expected_num_rollouts": 2},
    ]
    assert summary.agents[0].mean_reward is None


def test_missing_rollouts_file_counts_failures(tmp_path: Path) -> None:
    failures = _write_jsonl(
        tmp_path / "f.jsonl",
        [
            {
                "_ng_failure_class": "x",
                "_ng_task_index": 0,
                "_ng_rollout_index": 0,
                "agent_ref": {"name": "a"},
            }
        ],
    )
    summary = write_aggregate_metrics(
        tmp_path / "absent.jsonl",
        failures,
        tmp_path / "m.json",
        num_repeats=1,
        expected_by_agent={"a": 1},
    )
    assert summary.agents == [AgentSummary("a", 1, 0, 1, None, {})]
    assert _strict_load(tmp_path / "m.json")[0]["group_level_metrics"] == []
