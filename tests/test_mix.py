"""The balanced mix as a plain function: exact quotas, determinism, groups, shortfall."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import orjson
import pytest
from conftest import read_jsonl, write_jsonl

from rollouts.mix import (
    MixRequest,
    MixShortfall,
    MixSource,
    largest_remainder,
    mix_sources,
    plan_rows,
)

pytestmark = pytest.mark.fast  # the stage alone: `make test-fast`


def rollouts(n_tasks: int, repeats: int, tag: str) -> list[dict]:
    return [
        {"_ng_task_index": t, "_ng_rollout_index": r, "reward": float((t + r) % 2), "tag": tag}
        for t in range(n_tasks)
        for r in range(repeats)
    ]


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    return {
        "high_quality": write_jsonl(tmp_path / "hq.jsonl", rollouts(1000, 1, "hq")),
        "exploration": write_jsonl(tmp_path / "ex.jsonl", rollouts(400, 1, "ex")),
        "hard": write_jsonl(tmp_path / "hard.jsonl", rollouts(100, 3, "hard")),
    }


def request(sources: dict[str, Path], out: Path, **kw: object) -> MixRequest:
    props = {"high_quality": 0.6, "exploration": 0.3, "hard": 0.1}
    return MixRequest(
        sources=[MixSource(name=n, path=str(p), proportion=props[n]) for n, p in sources.items()],
        output=str(out),
        **{"total": 1000, "seed": 0, "keep_groups": False, **kw},
    )


def test_largest_remainder_sums_exactly_and_favours_the_largest_fractions() -> None:
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    q = largest_remainder(1001, {"x": 0.6, "y": 0.3, "z": 0.1})
    assert sum(q.values()) == 1001 and q == {"x": 601, "y": 300, "z": 100}
    assert sum(largest_remainder(7, {"a": 0.333, "b": 0.333, "c": 0.334}).values()) == 7


def test_exact_counts_and_every_row_keeps_its_fields_plus_mix_source(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    result = mix_sources(request(sources, tmp_path / "mix.jsonl"))
    rows = read_jsonl(tmp_path / "mix.jsonl")
    assert Counter(r["_mix_source"] for r in rows) == {
        "high_quality": 600, "exploration": 300, "hard": 100,
    }  # fmt: skip
    assert result.rows == 1000
    tag = {"high_quality": "hq", "exploration": "ex", "hard": "hard"}
    assert all(r["tag"] == tag[r["_mix_source"]] and "reward" in r for r in rows)
    assert (
        len({(r["_mix_source"], r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows}) == 1000
    )
    manifest = orjson.loads((tmp_path / "mix_manifest.json").read_bytes())
    assert manifest["seed"] == 0
    assert manifest["sources"]["hard"]["target"] == 100
    assert manifest["sources"]["hard"]["available"] == 300
    assert manifest["sources"]["exploration"]["selected"] == 300
    assert len(manifest["sources"]["high_quality"]["sha256"]) == 64


def test_same_seed_is_byte_identical_other_seed_differs_and_order_is_shuffled(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    mix_sources(request(sources, tmp_path / "a.jsonl", seed=7))
    mix_sources(request(sources, tmp_path / "b.jsonl", seed=7))
    mix_sources(request(sources, tmp_path / "c.jsonl", seed=8))
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    assert a != (tmp_path / "c.jsonl").read_bytes()
    first_hundred = [r["_mix_source"] for r in read_jsonl(tmp_path / "a.jsonl")[:100]]
    assert len(set(first_hundred)) > 1  # not source after source


def test_keep_groups_selects_whole_groups_close_to_the_quota(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    result = mix_sources(request(sources, tmp_path / "g.jsonl", keep_groups=True, total=1001))
    rows = read_jsonl(tmp_path / "g.jsonl")
    hard = Counter(r["_ng_task_index"] for r in rows if r["_mix_source"] == "hard")
    assert set(hard.values()) == {3}  # every selected task with all its 3 rollouts
    # quota 100 rollouts of groups of 3: 99 or 102 are the closest; 99 is closer
    assert result.per_source["hard"].selected == 99
    assert result.per_source["hard"].deviation_from_quota == -1
    assert result.rows == len(rows) == 1001  # the largest source gives the missing row
    assert result.per_source["high_quality"].deviation_from_quota == 1
    # the rows of one group are adjacent in the output
    positions: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r["_mix_source"] == "hard":
            positions.setdefault(r["_ng_task_index"], []).append(i)
    assert all(p[-1] - p[0] == 2 for p in positions.values())


def test_keep_groups_defaults_on_when_a_source_has_repeats(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    result = mix_sources(request(sources, tmp_path / "d.jsonl", keep_groups=None))
    manifest = orjson.loads(result.manifest.read_bytes())
    assert manifest["keep_groups"] is True


def test_shortfall_error_names_source_available_and_needed(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    with pytest.raises(MixShortfall, match=r"hard: 300 available, 500 needed"):
        mix_sources(request(sources, tmp_path / "e.jsonl", total=5000))
    assert not (tmp_path / "e.jsonl").exists()


def test_shortfall_redistribute_fills_from_the_others_in_proportion(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    # targets 900 / 450 / 150; exploration has 400: its 50 go 6:1 to the others (943 / 157)
    result = mix_sources(request(sources, tmp_path / "r.jsonl", total=1500,
                                 shortfall="redistribute"))  # fmt: skip
    sel = {n: v.selected for n, v in result.per_source.items()}
    assert sel == {"high_quality": 943, "exploration": 400, "hard": 157}
    assert orjson.loads(result.manifest.read_bytes())["total_written"] == 1500
    # asking for more than all there is gives all there is
    result = mix_sources(request(sources, tmp_path / "r2.jsonl", total=1800,
                                 shortfall="redistribute"))  # fmt: skip
    sel = {n: v.selected for n, v in result.per_source.items()}
    assert sel == {"high_quality": 1000, "exploration": 400, "hard": 300}


def test_shortfall_redistribute_shares_the_deficit_by_weight(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", rollouts(10, 1, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rollouts(1000, 1, "b"))
    c = write_jsonl(tmp_path / "c.jsonl", rollouts(1000, 1, "c"))
    req = MixRequest(
        sources=[MixSource(name="a", path=str(a), proportion=0.5),
                 MixSource(name="b", path=str(b), proportion=0.3),
                 MixSource(name="c", path=str(c), proportion=0.2)],
        output=str(tmp_path / "m.jsonl"), total=100, shortfall="redistribute",
    )  # fmt: skip
    sel = {n: v.selected for n, v in mix_sources(req).per_source.items()}
    # a gives its 10; the 90 left go 3:2 to b and c
    assert sel == {"a": 10, "b": 54, "c": 36}


def test_shortfall_allow_short_writes_fewer_and_says_so(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    result = mix_sources(request(sources, tmp_path / "s.jsonl", total=1000,
                                 shortfall="allow_short", keep_groups=False))  # fmt: skip
    assert result.rows == 1000
    result = mix_sources(request(sources, tmp_path / "s2.jsonl", total=2000,
                                 shortfall="allow_short"))  # fmt: skip
    hq = result.per_source["high_quality"]
    assert hq.target == 1200 and hq.selected == 1000 and hq.shortfall == 200
    assert len(read_jsonl(tmp_path / "s2.jsonl")) == result.rows == 1000 + 400 + 200


def test_200_sources_each_get_their_exact_quota(tmp_path: Path) -> None:
    # Source numbers once lived in a signed byte: source 128 and up overflowed.
    weights = {f"s{i:03d}": 1.0 + (i % 7) for i in range(200)}
    paths = {n: write_jsonl(tmp_path / f"{n}.jsonl", rollouts(60, 1, n)) for n in weights}
    req = MixRequest(
        sources=[MixSource(name=n, path=str(paths[n]), proportion=w) for n, w in weights.items()],
        output=str(tmp_path / "mix.jsonl"),
        total=5000,
        seed=3,
        keep_groups=False,
    )
    result = mix_sources(req)
    quotas = largest_remainder(5000, weights)
    rows = read_jsonl(tmp_path / "mix.jsonl")
    assert result.rows == len(rows) == 5000
    assert Counter(r["_mix_source"] for r in rows) == quotas
    assert all(q > 0 for q in quotas.values()) and len(quotas) == 200  # every source present
    assert all(r["tag"] == r["_mix_source"] for r in rows)  # rows come from their own source
    assert all(result.per_source[n].selected == quotas[n] for n in weights)


# ------------------------------------------------ the total, across sources, or why not


def grouped(sizes: list[int], tag: str) -> list[dict]:
    """One task per size, with that many rollouts (a group smaller than the repeats is a task
    some of whose rollouts failed)."""
    return [
        {"_ng_task_index": t, "_ng_rollout_index": r, "reward": 1.0, "tag": tag}
        for t, size in enumerate(sizes)
        for r in range(size)
    ]


def demo_sources(tmp_path: Path, hq: int = 300, ex: int = 200, hard: int = 60) -> dict[str, Path]:
    """`make demo`'s shape: two datasets of one rollout per task, one of three."""
    return {
        "high_quality": write_jsonl(tmp_path / "hq.jsonl", rollouts(hq, 1, "hq")),
        "exploration": write_jsonl(tmp_path / "ex.jsonl", rollouts(ex, 1, "ex")),
        "hard": write_jsonl(tmp_path / "hard.jsonl", rollouts(hard, 3, "hard")),
    }


def whole_groups(rows: list[dict], source: Path, name: str) -> bool:
    """Every task of ``name`` in the mix has all its rows of the source file."""
    in_source = Counter(r["_ng_task_index"] for r in read_jsonl(source))
    in_mix = Counter(r["_ng_task_index"] for r in rows if r["_mix_source"] == name)
    return all(in_source[t] == n for t, n in in_mix.items())


def test_the_demo_mix_writes_exactly_400_another_source_giving_the_row_hard_cannot(
    tmp_path: Path,
) -> None:
    sources = demo_sources(tmp_path)
    result = mix_sources(request(sources, tmp_path / "mix.jsonl", total=400, keep_groups=None))
    rows = read_jsonl(tmp_path / "mix.jsonl")
    assert result.rows == len(rows) == 400
    # hard's 40 are not whole groups of 3: 39, and the largest source gives the missing row
    assert Counter(r["_mix_source"] for r in rows) == {
        "high_quality": 241, "exploration": 120, "hard": 39}  # fmt: skip
    assert all(whole_groups(rows, sources[n], n) for n in sources)
    hq, ex, hard = (result.per_source[n] for n in ("high_quality", "exploration", "hard"))
    assert hard.note == "whole groups of 3 make 39 or 42, not 40"
    assert hq.note == "for hard's whole groups"
    assert ex.note == "" and result.note == ""
    manifest = orjson.loads(result.manifest.read_bytes())
    assert (manifest["total_requested"], manifest["total_written"], manifest["note"]) == (
        400, 400, "")  # fmt: skip
    assert manifest["sources"]["hard"]["note"] == hard.note
    # deterministic: the same seed, the same bytes
    again = mix_sources(request(sources, tmp_path / "again.jsonl", total=400, keep_groups=None))
    assert again.output.read_bytes() == result.output.read_bytes()


def test_when_the_others_have_no_row_to_spare_the_groups_round_up_and_they_give_way(
    tmp_path: Path,
) -> None:
    # high_quality and exploration have exactly their quotas: hard cannot stop at 39, it takes
    # 42 and the two others give one row each
    sources = demo_sources(tmp_path, hq=240, ex=120)
    result = mix_sources(request(sources, tmp_path / "mix.jsonl", total=400, keep_groups=None))
    rows = read_jsonl(tmp_path / "mix.jsonl")
    assert result.rows == len(rows) == 400
    assert Counter(r["_mix_source"] for r in rows) == {
        "high_quality": 239, "exploration": 119, "hard": 42}  # fmt: skip
    assert all(whole_groups(rows, sources[n], n) for n in sources)
    assert result.per_source["exploration"].note == ("for hard's whole groups")


def test_groups_of_several_sizes_reach_the_total_exactly(tmp_path: Path) -> None:
    # hard: 3 rollouts per task, some tasks with 1 or 2 of them failed; exploration: pairs
    sizes = [3, 2, 3, 3, 1, 3, 2, 3, 3, 3] * 6
    sources = {
        "high_quality": write_jsonl(tmp_path / "hq.jsonl", rollouts(50, 4, "hq")),
        "exploration": write_jsonl(tmp_path / "ex.jsonl", rollouts(100, 2, "ex")),
        "hard": write_jsonl(tmp_path / "hard.jsonl", grouped(sizes, "hard")),
    }
    for total in (97, 101, 150, 173):
        out = tmp_path / f"mix{total}.jsonl"
        result = mix_sources(request(sources, out, total=total, keep_groups=True, seed=total))
        rows = read_jsonl(out)
        assert result.rows == len(rows) == total, result.per_source
        assert all(whole_groups(rows, sources[n], n) for n in sources)
        assert result.note == ""
        for s in result.per_source.values():
            assert abs(s.deviation_from_quota) <= 4 and bool(s.note) == bool(s.deviation_from_quota)


def test_when_no_combination_of_whole_groups_makes_the_total_it_says_why_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollouts_cli.main import main

    for key in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DO_NOT_TRACK"):  # main sets them
        monkeypatch.setenv(key, os.environ.get(key, "WARNING" if "LEVEL" in key else "1"))
    a = write_jsonl(tmp_path / "a.jsonl", rollouts(100, 3, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rollouts(100, 3, "b"))
    out = tmp_path / "m.jsonl"
    code = main(["mix", "--source", f"a={a}:0.4", "--source", f"b={b}:0.6", "--total", "100",
                 "--output", str(out), "--keep-groups"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    why = ("99 rows, not 100: no combination of whole groups makes 100 rows (every group has a "
           "multiple of 3 rows); the closest are 99 and 102")  # fmt: skip
    assert printed.count(why) == 1 and f"mix: {why}" in printed.splitlines()
    assert (
        "a: 39 selected (target 40, 300 available, shortfall 0, -1 vs quota: whole groups "
        "of 3 make 39 or 42, not 40)" in printed
    )
    assert len(read_jsonl(out)) == 99
    manifest = orjson.loads((tmp_path / "m_manifest.json").read_bytes())
    assert manifest["note"] == why and manifest["total_written"] == 99
    assert manifest["sources"]["b"]["note"] == ""  # b's 60 are whole groups


def test_a_short_source_and_whole_groups_are_both_said(tmp_path: Path) -> None:
    sources = demo_sources(tmp_path, hard=10)  # hard has 30 rows, its target is 40
    result = mix_sources(request(sources, tmp_path / "s.jsonl", total=400, keep_groups=None,
                                 shortfall="allow_short"))  # fmt: skip
    assert result.rows == 390 and result.per_source["hard"].selected == 30
    assert result.note == ("390 rows, not 400: the sources have fewer rows than asked "
                           "(hard: 30 of 40)")  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_reaches_the_total_whenever_whole_groups_can(seed: int) -> None:
    """Against brute force over every combination, on small random sources."""
    import itertools
    import random

    rng = random.Random(seed)
    names = ["a", "b", "c"][: rng.randint(1, 3)]
    sizes = {n: {s: rng.randint(0, 3) for s in rng.sample([1, 2, 3, 4, 5, 7], rng.randint(1, 2))}
             for n in names}  # fmt: skip
    available = {n: sum(s * c for s, c in sizes[n].items()) for n in names}
    quotas = {n: rng.randint(0, available[n]) for n in names}

    def makes(counts: dict[int, int]) -> set[int]:
        out = {0}
        for size, count in counts.items():
            out = {m + size * k for m in out for k in range(count + 1)}
        return out

    options = [sorted(makes(sizes[n])) for n in names]
    best = min(
        (combo for combo in itertools.product(*options)),
        key=lambda c: (abs(sum(c) - sum(quotas.values())), sum(c) > sum(quotas.values()),
                       sum(abs(x - quotas[n]) for x, n in zip(c, names, strict=True))),
    )  # fmt: skip
    plan = plan_rows(quotas, sizes)
    assert plan.total == sum(best) == sum(plan.rows.values())
    assert all(plan.rows[n] in makes(sizes[n]) for n in names)
    away = sum(abs(plan.rows[n] - quotas[n]) for n in names)
    assert away == sum(abs(x - quotas[n]) for x, n in zip(best, names, strict=True))
    assert (plan.groups_note == "") == (plan.total == sum(quotas.values()))


def test_the_multi_summary_says_why_in_the_mix_table_and_once_below_it(tmp_path: Path) -> None:
    from rich.console import Console

    from rollouts.summary import MultiSummary
    from rollouts_cli.report import print_multi_summary

    a = write_jsonl(tmp_path / "a.jsonl", rollouts(100, 3, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rollouts(100, 3, "b"))
    req = MixRequest(
        sources=[MixSource(name="a", path=str(a), proportion=0.4),
                 MixSource(name="b", path=str(b), proportion=0.6)],
        output=str(tmp_path / "m.jsonl"), total=100,
    )  # fmt: skip
    result = mix_sources(req)
    summary = MultiSummary(
        datasets={}, mix_output=str(result.output), mix_manifest=str(result.manifest),
        mix_rows=result.rows, mix_total=req.total, mix_note=result.note,
        mix_sources=result.per_source,
    )  # fmt: skip
    console = Console(record=True, width=200)
    print_multi_summary(summary, console)
    text = console.export_text()
    assert text.count(result.note) == 1 and f"mix: {result.note}" in text.splitlines()
    assert result.note.startswith("99 rows, not 100: no combination of whole groups")
    (a_row,) = [line for line in text.splitlines() if line.startswith("│ a ")]
    assert "-1 │ whole groups of 3 make 39 or 42, not 40" in a_row
