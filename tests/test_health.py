"""Live health of a run, as a user watching from another terminal sees it: what is in flight, how
fast answers come and how long they take, what fails, and which requests are stalled."""

from __future__ import annotations

import asyncio
import math
import os
import pty
import random
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName

from flows.artifacts import CARD_LINE_CHARS
from reference_agent.server import write_tasks
from rollouts.attempts import STALL_MIN_S
from rollouts.attempts import AttemptObserver as HealthRecorder
from rollouts.health import (
    OLDEST_SHOWN,
    PUBLISH_EVERY_S,
    merge_health,
    percentile,
    read_health,
)
from rollouts.run_state import run_dir_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(recorder: HealthRecorder, clock: FakeClock, latencies: list[float],
           agent: str = "a", failure: str | None = None) -> None:  # fmt: skip
    """Attempts one after another, each taking its latency."""
    for i, seconds in enumerate(latencies):
        ticket = recorder.begin((agent, i, 0), f"http://{agent}:1/run", 1)
        clock.now += seconds
        recorder.end(ticket, failure)


@pytest.mark.fast
def test_percentiles_match_the_exact_ones_and_merge_over_processes() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    first, second = HealthRecorder(clock=clock), HealthRecorder(clock=clock)
    a = [rng.lognormvariate(math.log(0.2), 0.5) for _ in range(1500)]
    b = [rng.lognormvariate(math.log(0.5), 0.3) for _ in range(1500)]
    record(first, clock, [x / 100 for x in a])  # fast clock: all within the minute window
    record(second, clock, [x / 100 for x in b])
    health = merge_health([first.snapshot(), second.snapshot()], time.time())
    (agent,) = health.agents
    union = sorted(x / 100 for x in a + b)
    for q, got in ((0.5, agent.p50_s), (0.95, agent.p95_s), (0.99, agent.p99_s)):
        exact = union[math.ceil(q * len(union)) - 1]
        assert got == pytest.approx(exact, rel=0.02), q
    assert agent.answered == agent.sent == agent.answers_last_min == 3000
    assert health.processes == 2


@pytest.mark.fast
def test_only_the_last_minute_counts_and_failures_are_kept_by_class() -> None:
    clock = FakeClock()
    recorder = HealthRecorder(clock=clock)
    record(recorder, clock, [0.01] * 100)
    record(recorder, clock, [0.01] * 3, failure="http_500")
    record(recorder, clock, [5.0] * 2, failure="timeout")  # no answer: not a latency
    recorder.snapshot()  # as published every 2 s
    clock.now += 61.0  # a minute later: nothing recent
    record(recorder, clock, [0.4] * 10)
    (t,) = recorder.snapshot()["targets"]
    assert (t["answers_last_min"], t["failed_last_min"]) == (10, 0)
    assert t["failures"] == {"http_500": 3, "timeout": 2}
    assert (t["sent"], t["answered"], t["in_flight"]) == (115, 110, 0)
    assert percentile({int(k): n for k, n in t["latency_hist"].items()}, 0.5) == pytest.approx(
        0.4, rel=0.01
    )


@pytest.mark.fast
def test_stalled_requests_by_default_after_ten_p95_at_least_the_floor() -> None:
    clock = FakeClock()
    recorder = HealthRecorder(clock=clock)
    assert recorder.snapshot()["stalled"] == []
    tickets = [recorder.begin(("a", i, 0), "http://a:1/run", 1) for i in range(8)]
    clock.now += 100.0
    # No answer yet: nothing to compare with, so nothing is called stalled; oldest first.
    doc = recorder.snapshot()
    assert doc["stalled_total"] == 0
    assert [o.task_index for o in doc["oldest"]] == list(range(OLDEST_SHOWN))
    record(recorder, clock, [2.0] * 20)  # p95 2 s: threshold 20 s
    late = recorder.begin(("a", 99, 1), "http://a:1/run", 3)
    clock.now += 15.0
    doc = recorder.snapshot()
    stalled = {(s.task_index, s.rollout_index) for s in doc["stalled"]}
    assert stalled == {(i, 0) for i in range(8)} and doc["stalled_total"] == 8
    assert all(s.stall_after_s == pytest.approx(20.0, rel=0.02) for s in doc["stalled"])
    clock.now += 6.0
    assert (99, 1) in {
        (s.task_index, s.rollout_index) for s in recorder.snapshot()["stalled"]
    }
    for t in [*tickets, late]:
        recorder.end(t, None)
    assert recorder.snapshot()["stalled"] == []
    # fast answers: the floor, not 10 x 10 ms
    fast = HealthRecorder(clock=clock)
    record(fast, clock, [0.01] * 50)
    fast.begin(("a", 1, 0), "http://a:1/run", 1)
    clock.now += STALL_MIN_S - 0.5
    assert fast.snapshot()["stalled"] == []
    clock.now += 1.0
    assert len(fast.snapshot()["stalled"]) == 1


@pytest.mark.fast
def test_the_health_file_stays_small_however_many_requests() -> None:
    clock = FakeClock()
    recorder = HealthRecorder(stall_after_s=1.0, clock=clock)
    rng = random.Random(1)
    record(recorder, clock, [rng.lognormvariate(-3, 1.0) / 1000 for _ in range(100_000)])
    for i in range(5000):
        recorder.begin(("a", i, 0), "http://a:1/run", 1)
    clock.now += 10.0
    doc = recorder.snapshot()
    assert doc["stalled_total"] == 5000 and len(doc["stalled"]) == 50
    assert len(orjson.dumps(doc)) < 40_000


def status_json(out: Path, cwd: Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "rollouts_cli", "status", str(out), "--json", "--sample-s", "0"],
        check=False, capture_output=True, cwd=cwd,
    )  # fmt: skip
    assert res.returncode in (0, 2), res.stderr  # 2: not started yet
    return orjson.loads(res.stdout)


def start_collection(tmp_path: Path, out: Path, n: int, parallel: int, env: dict[str, str],
                     *flags: str) -> subprocess.Popen[bytes]:  # fmt: skip
    """`rollouts collect` of ``n`` tasks into ``out`` in the background; ``flags`` name the agent
    (and anything else). Its stderr (the console's warnings) is piped."""
    inp = tmp_path / "tasks.jsonl"
    write_tasks(inp, n, seed=3)
    return subprocess.Popen(
        [sys.executable, "-m", "rollouts_cli", "collect", "--input", str(inp), "--output",
         str(out), "--chunk-size", "250", "--num-samples-in-parallel", str(parallel), *flags],
        cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(condition: Any, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, "the collection ended before the condition held"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_live_figures_against_an_agent_of_known_latency(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    # Median 200 ms (lognormal, sigma 0.5: p95 455 ms), 3 % HTTP 500.
    agent = start_agent("--latency-ms", "200", "--latency-sigma", "0.5", "--p-500", "0.03",
                        "--seed", "3")  # fmt: skip
    out = tmp_path / "healthcheck.jsonl"
    proc = start_collection(tmp_path, out, 3000, 32, {"PREFECT_API_URL": prefect_api},
                            "--agent-url", agent.url)  # fmt: skip
    try:

        def enough_answers() -> dict[str, Any] | None:
            status = status_json(out, tmp_path)
            health = status["health"]
            return status if health and health["agents"][0]["answered"] >= 400 else None

        status = wait_for(enough_answers, proc)
        health = status["health"]
        (a,) = health["agents"]
        assert health["processes"] == 1 and health["replicas"] == []
        assert a["agent"] == agent.url and a["url"] is None
        assert 0 < a["in_flight"] <= 32 and health["in_flight"] == a["in_flight"]
        assert a["sent"] == a["answered"] + sum(a["failures"].values()) + a["in_flight"]
        assert set(a["failures"]) == {"http_500"} and a["failures"]["http_500"] > 0
        assert 400 <= a["answers_last_min"] <= a["answered"]
        # The agent's own latencies are the truth: the median of what it drew.
        assert a["p50_s"] == pytest.approx(0.200, rel=0.20)
        assert a["p95_s"] == pytest.approx(0.455, rel=0.30)
        assert a["p50_s"] < a["p95_s"] <= a["p99_s"]
        ages = [o["age_s"] for o in health["oldest"]]
        assert ages == sorted(ages, reverse=True) and 0 < ages[0] < 5.0
        assert health["stalled"] == [] and health["stalled_total"] == 0
        assert_progress_artifact_has_the_headline(out)
    finally:
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    assert status_json(out, tmp_path)["health"] is None  # nothing collects now


def assert_progress_artifact_has_the_headline(out: Path) -> None:
    """The Prefect UI's progress artifact of the running flow carries the same figures."""

    async def descriptions() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"/{out.stem}"))
            )
            artifacts = await client.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
            )
            return [a.description or "" for a in artifacts if a.type == "progress"]

    deadline = time.monotonic() + 15
    while True:
        found = [d for d in asyncio.run(descriptions()) if "in flight" in d]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found, "no progress artifact with the live figures"
    first, *rest = found[0].split("\n\n")
    # The first line fits a grid card of the UI; then one rate (rollouts/s, its window said)
    # and the live health of the last minute.
    assert re.fullmatch(r"\d+/3000 written, \d+ failed(, ETA \d+m\d\ds)?", first), first
    assert len(first) <= CARD_LINE_CHARS
    assert re.match(r"[\d.]+ rollouts/s \(last \d+ s\); \d+ in flight, p50 .+, p95 .+, "
                    r"p99 .+ \(last minute\)", rest[0]), rest  # fmt: skip
    assert "/min" not in found[0]


def test_a_hung_request_is_listed_as_stalled_within_the_warning_time_and_logged_once(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "50", "--p-hang", "0.02", "--hang-s", "60",
                        "--seed", "1")  # fmt: skip
    out = tmp_path / "stalls.jsonl"
    warn_s = 1.5
    proc = start_collection(tmp_path, out, 400, 16, {
        "PREFECT_API_URL": prefect_api, "ROLLOUTS_STALL_WARN_S": str(warn_s),
        "ROLLOUTS_REQUEST_TIMEOUT_S": "6",
    }, "--agent-url", agent.url)  # fmt: skip
    first_seen: dict[tuple[int, int, int], float] = {}  # (task, rollout, attempt) -> age
    listed_by_the_command = False
    run_dir = run_dir_for(out, None)
    try:
        while proc.poll() is None:
            # Read the published files directly, every 50 ms, so that no publication (every
            # 2 s) is missed; the command shows the same list (checked once below).
            health = read_health(run_dir)
            for s in health.stalled if health else []:
                first_seen.setdefault((s.task_index, s.rollout_index, s.attempt), s.age_s)
            if first_seen and not listed_by_the_command:
                listed = (status_json(out, tmp_path)["health"] or {}).get("stalled", [])
                listed_by_the_command = bool(listed)
            time.sleep(0.05)
    finally:
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert proc.wait(120) == 0, stderr
    hung = {(r["_ng_task_index"], r["_ng_rollout_index"]) for r in agent.requests()
            if r["outcome"] == "hang"}  # fmt: skip
    assert hung, "the agent's seed should hang some requests"
    assert listed_by_the_command
    assert {(t, r) for t, r, _ in first_seen} == hung  # every hung one, and only those
    for key, age in first_seen.items():
        # listed once past the threshold, by the next publication (every 2 s) and reading
        assert warn_s < age <= warn_s + PUBLISH_EVERY_S + 1.0, key
    logged = [line for line in stderr.splitlines() if "stalled: task" in line]
    assert sorted(logged) == sorted(set(logged))
    for t, r in hung:  # once per rollout, even when a retry hung again
        assert sum(f"stalled: task {t} rollout {r}:" in line for line in logged) == 1


def test_several_processes_publish_one_merged_view(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "100")
    out = tmp_path / "two.jsonl"
    proc = start_collection(tmp_path, out, 1500, 12, {"PREFECT_API_URL": prefect_api},
                            "--agent-url", agent.url, "--processes", "2")  # fmt: skip
    try:

        def both_processes() -> dict[str, Any] | None:
            health = status_json(out, tmp_path)["health"]
            return health if health and health["processes"] == 2 else None

        health = wait_for(both_processes, proc, timeout_s=90)
        (a,) = health["agents"]
        assert 0 < a["in_flight"] <= 12  # the run's budget, over both processes
        assert a["p50_s"] == pytest.approx(0.100, rel=0.3)
    finally:
        assert proc.wait(180) == 0
    # Each process closed its file when its last chunk ended (kept: the run's record).
    files = run_dir_for(out, None).glob("health.*")
    assert [orjson.loads(p.read_bytes())["closed"] for p in files] == [True, True]


def test_an_agent_with_replicas_has_a_row_per_replica(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    fast, slow = start_agent("--latency-ms", "50"), start_agent("--latency-ms", "300")
    out = tmp_path / "replicated.jsonl"
    agents_env = orjson.dumps({"calc": [fast.url, slow.url]}).decode()
    proc = start_collection(tmp_path, out, 1500, 16, {"PREFECT_API_URL": prefect_api,
                            "ROLLOUTS_AGENTS": agents_env}, "--agent-name", "calc")  # fmt: skip
    try:

        def answered_by_both() -> dict[str, Any] | None:
            health = status_json(out, tmp_path)["health"]
            ok = health and len(health["replicas"]) == 2
            return health if ok and min(r["answered"] for r in health["replicas"]) > 20 else None

        health = wait_for(answered_by_both, proc)
    finally:
        assert proc.wait(120) == 0
    (agent,) = health["agents"]
    replicas = {r["url"]: r for r in health["replicas"]}
    assert agent["agent"] == "calc" and set(replicas) == {fast.url, slow.url}
    assert agent["in_flight"] == sum(r["in_flight"] for r in replicas.values())
    assert agent["answered"] == sum(r["answered"] for r in replicas.values())
    assert replicas[fast.url]["p50_s"] == pytest.approx(0.050, rel=0.5)
    assert replicas[slow.url]["p50_s"] == pytest.approx(0.300, rel=0.2)


def read_until(fd: int, seconds: float, enough: Any = lambda data: False) -> bytes:
    """What ``fd`` gives within ``seconds``, or until ``enough(data)``."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not enough(data):
        ready, _, _ = select.select([fd], [], [], min(left, 0.1))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            data += chunk
    return data


def test_watch_redraws_in_place_and_ends_cleanly_on_ctrl_c(
    tmp_path: Path, start_agent: Any, prefect_api: str
) -> None:
    agent = start_agent("--latency-ms", "100")
    out = tmp_path / "watched.jsonl"
    proc = start_collection(tmp_path, out, 1500, 16, {"PREFECT_API_URL": prefect_api},
                            "--agent-url", agent.url)  # fmt: skip
    try:
        wait_for(lambda: (status_json(out, tmp_path)["health"] or {}).get("agents"), proc)
        master, slave = pty.openpty()
        watch = subprocess.Popen(
            [sys.executable, "-m", "rollouts_cli", "status", str(out), "--watch",
             "--interval", "0.3"],
            cwd=tmp_path, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
            env={**os.environ, "COLUMNS": "140", "LINES": "60"},
        )  # fmt: skip
        os.close(slave)
        try:
            # Ctrl-C once three frames are on the screen, as a user would after watching a
            # while (not during start-up: CPython itself can hang in an import on SIGINT).
            screen = read_until(master, 30.0,
                                lambda data: data.count(b"watched.jsonl: running") >= 3)  # fmt: skip
            watch.send_signal(signal.SIGINT)
            # Keep reading, as a terminal does: a pty holds a few KB, and the last frame and
            # the cursor's return are written on the way out.
            screen += read_until(master, 15.0, lambda _: watch.poll() is not None)
            code = watch.wait(5)
            screen += read_until(master, 0.3)
            stderr = watch.stderr.read().decode() if watch.stderr else ""
        finally:
            watch.kill()
            os.close(master)
    finally:
        assert proc.wait(120) == 0
    assert code == 0 and "Traceback" not in stderr and stderr == ""
    text = screen.decode(errors="replace")
    assert "in flight" in text and "p50" in text and "answers/s" in text and "/min" not in text
    assert "over the last minute" in text and "rollouts/s (last " in text
    # redrawn in place: the cursor moves up over the last frame instead of scrolling a new one
    assert text.count("\x1b[2K") > 10 and "\x1b[1A" in text
    assert text.count("watched.jsonl: running") >= 3, text[-3000:]  # redrawn, frame after frame
    assert screen.rstrip().endswith(b"\x1b[?25h") or b"\x1b[?25h" in screen[-200:]  # cursor back


def test_watch_as_json_lines_ends_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "none.jsonl"
    # Started as a script's background job is: with SIGINT ignored, which it inherits.
    command = shlex.join([sys.executable, "-m", "rollouts_cli", "status", str(out), "--watch",
                          "--json", "--interval", "0.2"])  # fmt: skip
    watch = subprocess.Popen(
        ["sh", "-c", f"trap '' INT; exec {command}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert watch.stdout is not None
    first = read_until(watch.stdout.fileno(), 30.0, lambda data: data.count(b"\n") >= 3)
    watch.send_signal(signal.SIGINT)
    try:
        stdout, stderr = watch.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        state = Path(f"/proc/{watch.pid}/status").read_text()
        wchan = Path(f"/proc/{watch.pid}/wchan").read_text()
        watch.kill()
        raise AssertionError(f"no exit after Ctrl-C: wchan {wchan}\n{state}") from None
    assert watch.returncode == 0 and stderr == b""
    lines = [orjson.loads(line) for line in (first + stdout).splitlines()]
    assert len(lines) >= 3 and {line["state"] for line in lines} == {"not started"}


@pytest.mark.fast
def test_a_large_run_lists_only_its_unfinished_chunks() -> None:
    from rich.console import Console

    from rollouts.status import ChunkStatus, RunStatus
    from rollouts_cli.report import status_view

    chunks = [ChunkStatus(i, 100, 100 if i < 17 else 40, 0, "h:1") for i in range(20)]
    status = RunStatus("out.jsonl", "/rd", 2000, 1820, 0, chunks, phase="running", holder="h:1")
    console = Console(width=120, record=True)
    console.print(status_view(status))
    text = console.export_text()
    shown = {int(line.split()[1]) for line in text.splitlines() if line.startswith("│ 000")}
    assert shown == {17, 18, 19}
    assert "17 of 20 chunks finished" in text
