"""Failure triage and retry by failure class: `rollouts failures`, `rollouts retry`, and the
flow parameter `retry_failure_classes`, against real agent processes and the real flow."""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import read_jsonl, write_jsonl

from reference_agent.server import FAILURE_CLASS, write_tasks
from rollouts.chunks import ChunkFiles
from rollouts.failures import FailuresUnreadable, summarize_failures
from rollouts.models import ChunkSpec
from rollouts.retry import read_retry, reopen_failures
from rollouts.run_state import OutputPaths, RunState, run_dir_for
from rollouts_cli.main import UsageError, build_parser, collect_params, main, retry_params

Key = tuple[int, int]


@pytest.fixture(autouse=True)
def quiet_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` sets Prefect's console settings in os.environ: restore them after each test."""
    for key in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DO_NOT_TRACK"):
        monkeypatch.setenv(key, os.environ.get(key, "WARNING" if "LEVEL" in key else "1"))


def run_collect(**params: Any) -> Any:
    from flows.collect import collect_rollouts

    return asyncio.run(collect_rollouts(**params, return_state=True))


def keys_of(rows: list[dict[str, Any]]) -> list[Key]:
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def sent(agent: Any) -> Counter[Key]:
    return Counter((q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests())


def collect_with_faults(tmp_path: Path, agent: Any, n: int, repeats: int) -> Path:
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, n, seed=5)
    out = tmp_path / "out.jsonl"
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out), num_repeats=repeats, chunk_size=4)  # fmt: skip
    assert state.is_completed(), state.message
    return out


def restart(agent: Any, start_agent: Any, *flags: str) -> Any:
    """The same agent URL (so the run's own parameters reach it), other faults."""
    agent.stop()
    return start_agent("--port", agent.url.rsplit(":", 1)[1], *flags)


# ------------------------------------------------------------------ retry moves exactly those


def test_retry_by_class_moves_exactly_the_retried_rollouts(
    tmp_path: Path, start_agent: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    first = start_agent("--fail-class-tasks", "3", "--fail-400-tasks", "1,6")
    n, repeats = 10, 2
    out = collect_with_faults(tmp_path, first, n, repeats)
    paths = OutputPaths.for_output(out)
    declared = {(3, r) for r in range(repeats)}
    bad_400 = {(t, r) for t in (1, 6) for r in range(repeats)}
    assert set(keys_of(read_jsonl(paths.failures))) == declared | bad_400
    kept_before = [f for f in read_jsonl(paths.failures) if (f["_ng_task_index"]) == 3]

    # The 400s' cause is fixed, the agent-declared failures' is not.
    healthy = restart(first, start_agent, "--fail-class-tasks", "3")
    capsys.readouterr()
    assert main(["retry", str(out), "--failure-class", "http_400"]) == 0
    printed = capsys.readouterr().out

    assert sent(healthy) == dict.fromkeys(bad_400, 1)  # only the retried keys, once each
    rows = read_jsonl(paths.rollouts)
    expected_ok = sorted({(t, r) for t in range(n) for r in range(repeats)} - declared)
    assert keys_of(rows) == expected_ok  # sorted, no duplicates, the 400s now in
    assert read_jsonl(paths.failures) == kept_before  # the other class untouched
    (metrics,) = orjson.loads(paths.metrics.read_bytes())
    m = metrics["agent_metrics"]
    assert (m["num_succeeded_rollouts"], m["num_failed_rollouts"]) == (len(expected_ok), 2)
    assert f"{len(expected_ok)}/{n * repeats} written, 2 failed, 0 missing" in printed
    chunks = run_dir_for(out, None) / "chunks"
    assert not list(chunks.glob("*.retry.json"))  # the retry is over
    for f in chunks.glob("*.failures.jsonl"):  # exactly once: no failure row of a moved key
        assert not set(keys_of(read_jsonl(f))) & bad_400

    # A plain rerun afterwards: complete, nothing sent, nothing changes.
    before = paths.rollouts.read_bytes()
    assert main(["retry", str(out), "--failure-class", "http_400"]) == 0
    assert sum(sent(healthy).values()) == len(bad_400) and paths.rollouts.read_bytes() == before


def test_a_retried_rollout_that_fails_again_stays_with_its_attempts_added(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", "1")
    agent = start_agent("--fail-400-tasks", "2", "--p-500", "1")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 4, seed=5)
    out = tmp_path / "out.jsonl"
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out))  # fmt: skip
    assert state.is_failed()  # the 500s gave up: incomplete
    fails = {tuple(k): f for k, f in zip(keys_of(read_jsonl(OutputPaths.for_output(out).failures)),
             read_jsonl(OutputPaths.for_output(out).failures), strict=True)}  # fmt: skip
    assert fails[(2, 0)]["_ng_failure_class"] == "http_400" and fails[(2, 0)]["attempts"] == 1
    assert {fails[(t, 0)]["_ng_failure_class"] for t in (0, 1, 3)} == {"http_500"}
    assert {fails[(t, 0)]["attempts"] for t in (0, 1, 3)} == {2}
    before = len(agent.requests())

    assert main(["retry", str(out), "--failure-class", "http_500"]) == 1  # fails again
    again = {(f["_ng_task_index"], f["_ng_rollout_index"]): f
             for f in read_jsonl(OutputPaths.for_output(out).failures)}  # fmt: skip
    # 2 before + 2 per try, over the retry's own chunk retry
    assert {again[(t, 0)]["attempts"] for t in (0, 1, 3)} == {2 + 2 + 2}
    assert again[(2, 0)] == fails[(2, 0)]  # not retried: untouched
    retried = Counter(
        (q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests()[before:]
    )
    assert retried == dict.fromkeys([(0, 0), (1, 0), (3, 0)], 4)
    assert set(keys_of(read_jsonl(out))) == set()

    before = len(agent.requests())
    capsys.readouterr()
    assert main(["retry", str(out), "--failure-class", "http_400"]) == 1  # 500s still missing
    # the missing 500s were not the retry's: its chunk finished (and was not retried)
    err = capsys.readouterr().err
    assert "3 of 4 rollouts are neither" in err and "; 0 chunk(s) did not finish" in err
    assert f"rollouts failures {out}` shows what is still missing" in err
    last = {(f["_ng_task_index"], f["_ng_rollout_index"]): f
            for f in read_jsonl(OutputPaths.for_output(out).failures)}  # fmt: skip
    assert last[(2, 0)]["attempts"] == 2 and last[(2, 0)]["_ng_failure_terminal"] is True
    # only the http_400 key was sent, not the missing 500s, and its chunk was not retried
    assert [(q["_ng_task_index"], q["_ng_rollout_index"]) for q in agent.requests()[before:]] == [
        (2, 0)]  # fmt: skip

    # A plain rerun afterwards resends the 500s: no retry's result answers from the cache.
    healthy = restart(agent, start_agent, "--fail-400-tasks", "2")
    state = run_collect(agent_url=agent.url, input_jsonl_fpath=str(inp),
                        output_jsonl_fpath=str(out))  # fmt: skip
    assert state.is_completed(), state.message
    assert sent(healthy) == dict.fromkeys([(0, 0), (1, 0), (3, 0)], 1)


# ------------------------------------------------------------------------------- triage


def test_failures_command_counts_by_class_and_agent(
    tmp_path: Path, start_agent: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = start_agent("--fail-class-tasks", "3,7", "--fail-400-tasks", "1")
    out = collect_with_faults(tmp_path, agent, 10, 2)
    capsys.readouterr()

    assert main(["failures", str(out), "--json"]) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["total"] == 6
    assert list(report["classes"]) == [FAILURE_CLASS, "http_400"]  # most first
    declared, http_400 = report["classes"][FAILURE_CLASS], report["classes"]["http_400"]
    assert (declared["count"], declared["terminal"], declared["gave_up"]) == (4, 4, 0)
    assert declared["agents"] == {agent.url: 4}
    assert declared["keys"] == [[3, 0], [3, 1], [7, 0], [7, 1]]
    assert http_400["count"] == 2 and "HTTP 400" in http_400["first_error"]

    assert main(["failures", str(out), "--examples", "1"]) == 0
    text = capsys.readouterr().out
    assert FAILURE_CLASS in text and "http_400: HTTP 400" in text and "3,0" in text
    assert f"rollouts retry {out} --failure-class {FAILURE_CLASS} --failure-class http_400" in text


def test_failures_offers_one_retry_for_every_final_class_and_it_works(
    tmp_path: Path, start_agent: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    first = start_agent("--fail-class-tasks", "3", "--fail-400-tasks", "1,6")
    n, repeats = 10, 2
    out = collect_with_faults(tmp_path, first, n, repeats)
    capsys.readouterr()

    assert main(["failures", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        f"final (a rerun leaves them; retry them once their cause is fixed): http_400, "
        f"{FAILURE_CLASS}" in lines
    )
    (command,) = [line.strip() for line in lines if line.strip().startswith("rollouts retry")]
    assert command == (f"rollouts retry {out} --failure-class http_400 "
                       f"--failure-class {FAILURE_CLASS}")  # fmt: skip

    # Both causes fixed: the printed command, run as printed, sends both classes again.
    healthy = restart(first, start_agent)
    argv = shlex.split(command)
    assert argv[0] == "rollouts" and main(argv[1:]) == 0
    failed_before = {(t, r) for t in (1, 3, 6) for r in range(repeats)}
    assert sent(healthy) == dict.fromkeys(failed_before, 1)
    paths = OutputPaths.for_output(out)
    assert keys_of(read_jsonl(paths.rollouts)) == [(t, r) for t in range(n) for r in range(repeats)]
    assert read_jsonl(paths.failures) == []


@pytest.mark.fast
def test_failures_summary_streams_and_refuses_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.jsonl"
    rows = [{"_ng_task_index": i, "_ng_rollout_index": 0, "_ng_failure_class": c,
             "_ng_failure_terminal": c != "timeout", "error": f"{c} #{i}",
             "agent_ref": {"name": "ab"[i % 2]}}
            for i, c in enumerate(["timeout"] * 7 + ["http_500"] * 2)]  # fmt: skip
    write_jsonl(tmp_path / "x_failures.jsonl", rows)
    report = summarize_failures(out, examples=3)
    t = report.classes["timeout"]
    assert (t.count, t.gave_up, t.terminal, t.first_error) == (7, 7, 0, "timeout #0")
    assert t.keys == [(0, 0), (1, 0), (2, 0)] and t.agents == {"a": 4, "b": 3}
    assert report.classes["http_500"].terminal == 2 and report.total == 9

    assert main(["failures", str(tmp_path / "none.jsonl")]) == 2
    assert "no failures file" in capsys.readouterr().err
    (tmp_path / "x_failures.jsonl").write_bytes(b"")
    assert main(["failures", str(out)]) == 0 and "no failures" in capsys.readouterr().out
    (tmp_path / "x_failures.jsonl").write_bytes(b'{"a": 1}\n')
    with pytest.raises(FailuresUnreadable, match=r"x_failures.jsonl:1: not a failure row"):
        summarize_failures(out)


# ---------------------------------------------------------------- reopen: crash-safe, idempotent


def chunk(run_dir: Path, index: int, task_min: int, task_max: int) -> ChunkSpec:
    files = ChunkFiles.of_run(run_dir, index)
    files.tasks.parent.mkdir(parents=True, exist_ok=True)
    return ChunkSpec(index=index, tasks_path=str(files.tasks), n_tasks=task_max - task_min + 1,
                     content_sha256="c", run_id="r", task_min=task_min, task_max=task_max,
                     contiguous=True)  # fmt: skip


def failure(t: int, cls: str, attempts: int = 1) -> dict[str, Any]:
    return {"_ng_task_index": t, "_ng_rollout_index": 0, "_ng_failure_class": cls,
            "_ng_failure_terminal": cls == "http_400", "attempts": attempts}  # fmt: skip


@pytest.mark.fast
def test_reopen_moves_the_last_failure_of_each_chosen_key_and_is_idempotent(
    tmp_path: Path,
) -> None:
    spec = chunk(tmp_path, 0, 0, 4)
    files = ChunkFiles.of(spec)
    # key 0: timeout then http_400 (last: http_400, not chosen); 1: timeout twice; 2: written
    # after a timeout; 3: http_500; 4: timeout in another run's repeat range (r=0 only here).
    write_jsonl(files.failures, [failure(0, "timeout"), failure(1, "timeout", 3),
                                 failure(0, "http_400"), failure(1, "timeout", 5),
                                 failure(2, "timeout"), failure(3, "http_500", 2)])  # fmt: skip
    write_jsonl(files.rollouts, [{"_ng_task_index": 2, "_ng_rollout_index": 0}])
    report = reopen_failures(tmp_path, [spec], 1, ["timeout", "http_500"])
    assert report.by_class == {"timeout": 1, "http_500": 1} and report.chunks == [0]
    assert report.describe() == "retrying 2 rollouts that failed with timeout (1), http_500 (1)"
    reopened = read_retry(files)
    assert {k: e.attempts for k, e in reopened.items()} == {(1, 0): 5, (3, 0): 2}
    left = read_jsonl(files.failures)
    assert [(f["_ng_task_index"], f["_ng_failure_class"]) for f in left] == [
        (0, "timeout"), (0, "http_400"), (2, "timeout")]  # fmt: skip
    # Run again (a crash after the rewrite): the same keys, carried over; nothing else moves.
    retry_doc, failures_doc = files.retry.read_bytes(), files.failures.read_bytes()
    again = reopen_failures(tmp_path, [spec], 1, ["timeout", "http_500"])
    assert again.by_class == report.by_class
    assert files.retry.read_bytes() == retry_doc and files.failures.read_bytes() == failures_doc
    # A crash between retry.json and the rewrite: the rows are still there; same outcome.
    write_jsonl(files.failures, [*left, failure(1, "timeout", 5), failure(3, "http_500", 2)])
    reopen_failures(tmp_path, [spec], 1, ["timeout", "http_500"])
    assert files.retry.read_bytes() == retry_doc and files.failures.read_bytes() == failures_doc
    assert reopen_failures(tmp_path, [chunk(tmp_path, 1, 5, 6)], 1, ["timeout"]).describe() == (
        "no failed rollouts with timeout to retry; merging the output as it is")  # fmt: skip


# ------------------------------------------------------------------------ refusals, params


@pytest.mark.fast
def test_retry_refuses_a_run_without_stored_parameters(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    with pytest.raises(UsageError, match="no collection state for"):
        retry_params(str(out), ["timeout"])
    run_dir = run_dir_for(out, None)
    run_dir.mkdir(parents=True)
    RunState(run_id="r", result_params={"num_repeats": 1}, chunk_size=5).write(run_dir)
    with pytest.raises(UsageError, match="predates stored parameters"):
        retry_params(str(out), ["timeout"])
    plus = collect_params(build_parser().parse_args(
        ["collect", "--input", "a", "--output", "b", "+retry_failure_classes=[timeout]"]))  # fmt: skip
    flag = collect_params(build_parser().parse_args(
        ["collect", "--input", "a", "--output", "b", "--retry-failure-class", "timeout"]))  # fmt: skip
    assert plus["retry_failure_classes"] == flag["retry_failure_classes"] == ["timeout"]


def test_retry_refuses_while_a_collection_holds_the_output(
    tmp_path: Path, start_agent: Any, prefect_api: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rollouts.errors import RunLocked

    agent = start_agent("--latency-ms", "100")
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, 60, seed=5)
    out = tmp_path / "slow.jsonl"
    params = {"agent_url": agent.url, "input_jsonl_fpath": str(inp),
              "output_jsonl_fpath": str(out), "num_samples_in_parallel": 2}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", *(f"+{k}={v}" for k, v in params.items())],
        env={**os.environ, "PREFECT_API_URL": prefect_api}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not agent.requests():  # running: it holds the lock and has stored its parameters
        assert proc.poll() is None and time.monotonic() < deadline, "the collection never ran"
        time.sleep(0.05)

    assert main(["retry", str(out), "--failure-class", "timeout"]) == 2
    err = capsys.readouterr().err
    # refused by the command itself, before Prefect starts, naming the holder
    assert f"being collected by {socket.gethostname()}:{proc.pid} right now; retry once" in err
    # A deployment calling the flow with the parameter is refused by the run's lock.
    refused = run_collect(**params, retry_failure_classes=["timeout"])
    assert refused.is_failed() and isinstance(refused.result(raise_on_failure=False), RunLocked)

    assert proc.wait(120) == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    assert keys_of(read_jsonl(out)) == [(t, 0) for t in range(60)]
    assert sent(agent) == dict.fromkeys([(t, 0) for t in range(60)], 1)


def test_the_flow_parameter_retries_like_the_command(tmp_path: Path, start_agent: Any) -> None:
    first = start_agent("--fail-400-tasks", "2,5")
    out = collect_with_faults(tmp_path, first, 8, 1)
    params = {"agent_url": first.url, "input_jsonl_fpath": str(tmp_path / "tasks.jsonl"),
              "output_jsonl_fpath": str(out), "chunk_size": 4}  # fmt: skip
    healthy = restart(first, start_agent)

    nothing = run_collect(**params, retry_failure_classes=["timeout"])  # no such failures
    assert nothing.is_completed() and healthy.requests() == []
    assert nothing.result().failed == 2

    state = run_collect(**params, retry_failure_classes=["http_400"])  # as a deployment would
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary.succeeded, summary.failed, summary.missing) == (8, 0, 0)
    assert sent(healthy) == {(2, 0): 1, (5, 0): 1}
    assert keys_of(read_jsonl(out)) == [(t, 0) for t in range(8)]
    assert read_jsonl(OutputPaths.for_output(out).failures) == []


def test_a_chunk_complete_before_a_retry_is_collected_again_after_it(
    tmp_path: Path, start_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk was complete and cached (all its failures final); its retried rollouts then
    gave up: a plain rerun must send them, not answer the chunk from the cache."""
    monkeypatch.setenv("ROLLOUTS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("ROLLOUTS_CHUNK_RETRIES", "0")
    first = start_agent("--fail-400-tasks", "1")
    out = collect_with_faults(tmp_path, first, 4, 1)
    params = {"agent_url": first.url, "input_jsonl_fpath": str(tmp_path / "tasks.jsonl"),
              "output_jsonl_fpath": str(out), "chunk_size": 4}  # fmt: skip
    down = restart(first, start_agent, "--p-500", "1")
    assert run_collect(**params, retry_failure_classes=["http_400"]).is_failed()
    assert sent(down) == {(1, 0): 1}
    (row,) = read_jsonl(OutputPaths.for_output(out).failures)
    assert (row["_ng_failure_class"], row["attempts"]) == ("http_500", 2)

    healthy = restart(down, start_agent)
    state = run_collect(**params)
    assert state.is_completed(), state.message
    assert sent(healthy) == {(1, 0): 1}
    assert keys_of(read_jsonl(out)) == [(t, 0) for t in range(4)]
