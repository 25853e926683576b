"""Replicas of one agent name: settings, routing, taking out and probing back in, the counts.

The router and client alone (no processes, no Prefect); tests/test_replicas_run.py runs three
real agents through the command.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

from rollouts.agent_client import (
    AgentClient,
    RetryPolicy,
    check_agents_reachable,
    resolve_agent_urls,
)
from rollouts.collect import DispatchPlan
from rollouts.errors import AgentUnreachable, ConfigError
from rollouts.health import Publication, read_health, read_replica_stats
from rollouts.replicas import Probe, ReplicaRouter, agents_to_check
from rollouts.settings import RolloutsSettings
from rollouts.summary import _failure_class_line

pytestmark = pytest.mark.fast

A, B, C = "http://a.test:1", "http://b.test:2", "http://c.test:3"
FAST = RetryPolicy(max_attempts=5, backoff_base_s=0.001, backoff_max_s=0.001)


async def never_back(url: str) -> str | None:
    return "connection refused"


def router(
    eject_after: int = 3, probe: Probe = never_back, probe_max_s: float = 30.0
) -> ReplicaRouter:
    return ReplicaRouter({"calc": [A, B, C]}, eject_after=eject_after, probe=probe,
                         probe_max_s=probe_max_s)  # fmt: skip


def test_agents_take_a_url_or_a_list_of_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"calc": [A, B + "/"], "one": C}).decode())
    settings = RolloutsSettings()
    assert settings.replicas_of("calc") == [A, B]
    assert settings.replicas_of("one") == [C]
    # the plan (a task input, cache identity) holds one URL per name: the first replica's
    assert resolve_agent_urls(["calc", "one"], settings) == {"calc": A, "one": C}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"calc": []}, "agent 'calc': expected a URL or a non-empty list"),
        ({"calc": 5}, "agent 'calc': expected a URL or a non-empty list"),
        ({"calc": [A, "b.test:2"]}, "agent 'calc': 'b.test:2' is not an http(s)://host:port URL"),
        ({"calc": [A, A + "/"]}, "agent 'calc': a URL is listed twice"),
        ([A], "ROLLOUTS_AGENTS must be a JSON object"),
    ],
)
def test_a_bad_agents_value_is_refused_naming_the_agent(
    monkeypatch: pytest.MonkeyPatch, value: object, says: str
) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps(value).decode())
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
        RolloutsSettings()


def test_the_replica_with_fewest_in_flight_is_picked_ties_round_robin() -> None:
    group = router()._groups["calc"]
    first = [group.pick().url for _ in range(3)]
    assert first == [A, B, C]
    group.done(group.replicas[1], None)  # B answered: now it has the fewest
    assert group.pick().url == B
    for r in group.replicas:  # drain: all at 0 in flight
        while r.in_flight:
            group.done(r, None)
    assert [group.pick().url for _ in range(3)] == [C, A, B]  # round-robin goes on after B


def test_a_replica_is_taken_out_after_n_connection_errors_or_timeouts_in_a_row() -> None:
    group = router(eject_after=3)._groups["calc"]
    a = group.replicas[0]

    async def go() -> None:
        for failure in ("connection_error", "timeout", "http_500", "connection_error",
                        "connection_error"):  # fmt: skip
            a.in_flight += 1
            group.done(a, failure)
        assert not a.ejected  # the 500 was an answer: the count started again
        a.in_flight += 1
        group.done(a, "timeout")
        assert a.ejected and a.ejections == 1
        assert {group.pick().url for _ in range(4)} == {B, C}

    asyncio.run(go())
    assert a.failed == {"connection_error": 3, "timeout": 2, "http_500": 1}


def test_the_last_live_replica_is_never_taken_out() -> None:
    group = router(eject_after=1)._groups["calc"]

    async def go() -> None:
        for r in group.replicas:
            r.in_flight += 1
            group.done(r, "connection_error")

    asyncio.run(go())
    assert [r.ejected for r in group.replicas] == [True, True, False]
    assert group.pick().url == C  # requests still go somewhere, and fail as with one URL


def test_a_replica_taken_out_is_probed_back_in_once_it_accepts_connections() -> None:
    probes: list[float] = []

    async def back_on_third(url: str) -> str | None:
        probes.append(time.monotonic())
        return None if len(probes) >= 3 else "connection refused"

    r = router(eject_after=1, probe=back_on_third, probe_max_s=0.05)

    async def go() -> None:
        group = r._groups["calc"]
        a = group.replicas[0]
        a.in_flight += 1
        group.done(a, "connection_error")
        assert a.ejected
        while a.ejected:
            await asyncio.sleep(0.01)
        assert a.errors_in_a_row == 0 and group.pick().url == A  # fewest in flight: A again
        await r.aclose()

    asyncio.run(go())
    assert len(probes) == 3


def test_each_attempt_picks_a_replica_so_a_retry_goes_to_a_live_one(tmp_path: Path) -> None:
    seen: list[str] = []

    def agent(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.scheme}://{request.url.host}:{request.url.port}")
        if request.url.host == "a.test":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, content=b'{"reward": 1.0}')

    r = router(eject_after=2)

    async def go() -> list[str]:
        client = AgentClient(FAST, 8, transport=httpx.MockTransport(agent), replicas=r)
        r.use({"calc": A})
        async with Publication(r.observer).collecting(tmp_path):  # as a dispatcher's chunks do
            outcomes = await asyncio.gather(*(client.run(A + "/run", b"{}") for _ in range(30)))
        await client.aclose()
        await r.aclose()
        return [o.kind for o in outcomes]

    assert asyncio.run(go()) == ["ok"] * 30
    a, b, c = r._groups["calc"].replicas
    assert a.ejected and a.sent == a.failed["connection_error"] >= 2
    assert b.answered + c.answered == 30 and b.answered > 5 and c.answered > 5
    assert seen.count(A) == a.sent
    # the counts reached the run dir, in the process's one health file, and status reads them
    (health,) = tmp_path.glob("health.*.json")
    summed = {s.url: s for s in read_replica_stats(tmp_path, running=True)}
    assert list(summed) == [A, B, C]
    # Its process is done (the file is closed): counted, but nothing of it is out now.
    assert not summed[A].ejected and summed[A].failed == {"connection_error": a.sent}
    assert summed[A].ejections == a.ejections == 1
    assert summed[B].answered + summed[C].answered == 30
    doc = orjson.loads(health.read_bytes())
    assert doc["worker"] and doc["closed"]
    targets = [(t["url"], t["replica"], t["ejected"]) for t in doc["targets"]]
    assert targets == [(A, True, True), (B, True, False), (C, True, False)]


def test_a_url_not_of_a_replicated_agent_and_a_run_level_url_are_not_routed() -> None:
    r = router()

    async def go() -> None:
        r.use({})  # a run with --agent-url resolves no name
        assert r.group_for(A + "/run") is None
        r.use({"calc": B})  # not this agent's first replica
        assert r.group_for(B + "/run") is None
        r.use({"calc": A})
        assert r.group_for(A + "/run") is r._groups["calc"]
        await r.aclose()

    asyncio.run(go())


def test_status_sums_processes_and_ignores_in_flight_of_stale_ones(tmp_path: Path) -> None:
    def target(url: str, in_flight: int, ejected: bool, replica: bool) -> dict[str, object]:
        return {"agent": "calc" if replica else url, "url": url, "in_flight": in_flight,
                "sent": 10 + in_flight, "answered": 8, "answers_last_min": 0,
                "failed_last_min": 0, "window_s": 60.0, "failures": {"timeout": 2},
                "latency_hist": {}, "run_answered": 0, "run_failed": 0, "run_latency_hist": {},
                "replica": replica, "ejected": ejected, "ejections": int(replica)}  # fmt: skip

    def write(name: str, age_s: float, in_flight: int, ejected: bool, closed: bool) -> None:
        doc = {"worker": name, "updated_at": time.time() - age_s, "window_s": 60.0,
               "targets": [target(A, in_flight, ejected, True), target(B, 1, False, False)],
               "oldest": [], "stalled": [], "stalled_total": 0, "run_started_at": None,
               "closed": closed}  # fmt: skip
        (tmp_path / f"health.{name}.json").write_bytes(orjson.dumps(doc))

    write("h_1", 0, 3, False, closed=False)
    write("h_2", 60, 5, True, closed=False)  # a process of an earlier, interrupted invocation
    write("h_3", 600, 0, False, closed=True)  # one of an earlier invocation that ended
    live = read_health(tmp_path)
    assert live is not None and live.processes == 1  # the closed and the stale are not live
    (s,) = read_replica_stats(tmp_path, running=True)  # B is no replica: not listed
    assert (s.url, s.sent, s.answered, s.failed, s.ejections) == (A, 38, 24, {"timeout": 6}, 3)
    assert (s.in_flight, s.ejected) == (3, False)
    (done,) = read_replica_stats(tmp_path, running=False)
    assert (done.in_flight, done.ejected, done.sent) == (0, False, 38)


def _listening() -> tuple[socket.socket, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_preflight_passes_with_one_replica_up_and_names_the_down_ones() -> None:
    server, up = _listening()
    down = _closed_port_url()
    try:
        lines = asyncio.run(check_agents_reachable({"calc": [down, up]}, 2.0))
        assert len(lines) == 1 and lines[0].startswith(f"replica {down} of agent 'calc'")
        with pytest.raises(AgentUnreachable, match=f"replica {down} of agent 'calc'"):
            asyncio.run(check_agents_reachable({"calc": [down, _closed_port_url()]}, 2.0))
        assert asyncio.run(check_agents_reachable({"one": up}, 2.0)) == []
    finally:
        server.close()


def test_preflight_checks_what_requests_may_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROLLOUTS_AGENTS", orjson.dumps({"calc": [A, B, C]}).decode())
    settings = RolloutsSettings()
    assert agents_to_check({"calc": A}, None, settings) == {"calc": [A, B, C]}
    assert agents_to_check({"calc": A}, A, settings) == {"calc": [A]}  # --agent-url: just it


def test_a_failure_names_the_replica_it_happened_on_and_the_run_message_keeps_it() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    r = router()

    async def go() -> str | None:
        client = AgentClient(FAST, 2, transport=httpx.MockTransport(refuse), replicas=r)
        r.use({"calc": A})
        outcome = await client.run(A + "/run", b"{}")
        await client.aclose()
        await r.aclose()
        return outcome.error

    error = asyncio.run(go())
    assert error is not None and error.startswith("gave up after 5 attempts: replica http://")
    line = _failure_class_line("connection_error", 3, ("calc", f"replica {B}: boom"),
                               DispatchPlan(agent_urls={"calc": A}, agent_name="calc"))  # fmt: skip
    assert line == f"connection_error: 3 (e.g. agent 'calc', replica {B}: boom)"
