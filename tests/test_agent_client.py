"""AgentClient on its own: no server, no Prefect, an ``httpx.MockTransport`` as the agent.

Retries, backoff, Retry-After, the total deadline, NeMo Gym's sentinel routing and the slot
contract (at most ``max_in_flight`` requests on the wire, none held while backing off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest

from rollouts.agent_client import AgentClient, Outcome, RetryPolicy
from rollouts.settings import RolloutsSettings
from rollouts.urls import AgentCredentials

URL = "http://agent.test/run"
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]

pytestmark = pytest.mark.fast  # no server, no Prefect: `make test-fast`

FAST = RetryPolicy(max_attempts=3, backoff_base_s=0.001, backoff_max_s=0.001)


def ok(answer: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps(answer or {"reward": 1.0}))


def run(
    handler: Handler,
    policy: RetryPolicy = FAST,
    max_in_flight: int = 4,
    body: bytes = b"{}",
) -> Outcome:
    async def go() -> Outcome:
        client = AgentClient(policy, max_in_flight, transport=httpx.MockTransport(handler))
        try:
            return await client.run(URL, body)
        finally:
            await client.aclose()

    return asyncio.run(go())


class Script:
    """A handler answering from a list, one response (or exception) per request, then ``ok``."""

    def __init__(self, *steps: httpx.Response | Exception) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        step = self.steps.pop(0) if self.steps else ok()
        if isinstance(step, Exception):
            raise step
        return step


def test_success_posts_the_body_once() -> None:
    agent = Script(ok({"reward": 0.5, "response": {"id": "r"}}))
    out = run(agent, body=b'{"x": 1}')
    assert (out.kind, out.attempts) == ("ok", 1)
    assert out.answer == {"reward": 0.5, "response": {"id": "r"}}
    (req,) = agent.requests
    assert (req.method, str(req.url), req.content) == ("POST", URL, b'{"x": 1}')
    assert req.headers["content-type"] == "application/json"


def test_api_key_is_sent_as_bearer_token() -> None:
    agent = Script()

    async def go() -> None:
        client = AgentClient(FAST, 1, "s3cret", transport=httpx.MockTransport(agent))
        await client.run(URL, b"{}")
        await client.aclose()

    asyncio.run(go())
    assert agent.requests[0].headers["authorization"] == "Bearer s3cret"


def send_once(url: str, agent: Script, api_key: str | None = None,
              credentials: AgentCredentials | None = None) -> Outcome:  # fmt: skip
    async def go() -> Outcome:
        client = AgentClient(FAST, 1, api_key, transport=httpx.MockTransport(agent),
                             credentials=credentials)  # fmt: skip
        try:
            return await client.run(url, b"{}")
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_credentials_in_an_agent_url_are_sent_as_basic_auth_not_in_the_url() -> None:
    settings = RolloutsSettings(agents={"a": "http://alice:p%40ss@agent.test:8000/"})
    url = settings.replicas_of("a")[0] + "/run"
    assert url == "http://alice:***@agent.test:8000/run"  # all the rest of the code sees
    agent = Script()
    out = send_once(url, agent, credentials=settings.agent_credentials())
    assert out.kind == "ok"
    (req,) = agent.requests
    assert str(req.url) == "http://agent.test:8000/run"
    assert req.headers["authorization"] == httpx.BasicAuth("alice", "p@ss")._auth_header
    assert "p@ss" not in repr(settings) + repr(settings.agent_credentials())


def test_the_api_key_wins_over_credentials_in_the_url() -> None:
    settings = RolloutsSettings(agents={"a": "http://alice:pw@agent.test:8000"})
    agent = Script()
    send_once(settings.replicas_of("a")[0] + "/run", agent, "s3cret",
              settings.agent_credentials())  # fmt: skip
    assert str(agent.requests[0].url) == "http://agent.test:8000/run"
    assert agent.requests[0].headers.get_list("authorization") == ["Bearer s3cret"]
    send_once("http://alice:***@agent.test:8000/run", agent, "s3cret")  # no password here
    assert agent.requests[1].headers.get_list("authorization") == ["Bearer s3cret"]


def test_an_unexpected_exception_is_one_final_classified_failure() -> None:
    """Whatever the transport raises that no class covers: one attempt, classified, final."""
    agent = Script(RuntimeError("the transport broke"), RuntimeError("again"))
    out = run(agent)
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "unexpected_error", True, 1,
    )  # fmt: skip
    assert out.error == "RuntimeError: the transport broke"
    assert len(agent.requests) == 1


def test_a_password_this_process_lacks_is_a_classified_failure_naming_the_setting() -> None:
    agent = Script()
    out = send_once("http://alice:***@agent.test:8000/run", agent)
    assert (out.failure_class, out.terminal, out.attempts) == ("unexpected_error", True, 1)
    assert out.error == (
        "MissingCredentials: no password for http://alice:***@agent.test:8000/run in this "
        "process's ROLLOUTS_AGENTS: every process that collects (Dask workers too) needs the "
        "same ROLLOUTS_AGENTS"
    )
    assert agent.requests == []


def test_5xx_is_retried_until_an_answer() -> None:
    agent = Script(httpx.Response(503, text="busy"), httpx.Response(500, text="oops"))
    out = run(agent)
    assert (out.kind, out.attempts) == ("ok", 3)
    assert len(agent.requests) == 3


def test_5xx_every_time_gives_up_retryable() -> None:
    out = run(Script(*[httpx.Response(502, text="bad gateway")] * 3))
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "http_502", False, 3,
    )  # fmt: skip
    assert out.error is not None and out.error.startswith("gave up after 3 attempts: HTTP 502")


def test_429_waits_for_retry_after() -> None:
    agent = Script(httpx.Response(429, headers={"retry-after": "0.2"}, text="slow down"))
    out = run(agent)
    assert (out.kind, out.attempts) == ("ok", 2)
    gap = agent.times[1] - agent.times[0]
    assert 0.2 <= gap < 1.0, gap  # backoff alone is at most 1 ms


def test_connection_error_is_retried_then_given_up() -> None:
    agent = Script(*[httpx.ConnectError("connection refused")] * 3)
    out = run(agent)
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "connection_error", False, 3,
    )  # fmt: skip
    assert len(agent.requests) == 3
    assert "ConnectError: connection refused" in (out.error or "")


def test_connection_error_then_answer() -> None:
    out = run(Script(httpx.ConnectError("reset")))
    assert (out.kind, out.attempts) == ("ok", 2)


@pytest.mark.parametrize("status", [400, 404, 422])
def test_4xx_other_than_429_is_terminal_at_once(status: int) -> None:
    agent = Script(httpx.Response(status, text="no such thing"))
    out = run(agent)
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", f"http_{status}", True, 1,
    )  # fmt: skip
    assert len(agent.requests) == 1
    assert out.error == f"HTTP {status}: no such thing"


def test_answer_that_is_not_a_json_object_is_retried() -> None:
    agent = Script(httpx.Response(200, text="<html>"), httpx.Response(200, text="[1, 2]"))
    out = run(agent)
    assert (out.kind, out.attempts) == ("ok", 3)
    last = run(Script(*[httpx.Response(200, text="[]")] * 3))
    assert (last.kind, last.failure_class, last.terminal) == ("failed", "invalid_response", False)


def test_failure_class_without_terminal_is_retried_then_given_up() -> None:
    answer = {"_ng_failure_class": "judge_down", "error": "judge timed out", "reward": 0.0}
    agent = Script(*[ok(answer)] * 3)
    out = run(agent)
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "judge_down", False, 3,
    )  # fmt: skip
    assert out.answer == answer
    assert out.error == "gave up after 3 attempts: judge timed out"


def test_failure_class_with_terminal_stops_at_once() -> None:
    answer = {"_ng_failure_class": "bad_task", "_ng_failure_terminal": True, "error": "no"}
    agent = Script(ok(answer))
    out = run(agent)
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "bad_task", True, 1,
    )  # fmt: skip
    assert len(agent.requests) == 1


def test_failure_class_then_answer() -> None:
    out = run(Script(ok({"_ng_failure_class": "flaky"})))
    assert (out.kind, out.attempts) == ("ok", 2)


def test_null_failure_class_is_an_ordinary_answer() -> None:
    out = run(Script(ok({"reward": 1.0, "_ng_failure_class": None})))
    assert (out.kind, out.attempts) == ("ok", 1)


@pytest.mark.parametrize(
    ("answer", "failure_class"),
    [({"reward": 1.0, "_ng_no_persist": True}, "no_persist"),
     ({"_ng_no_persist": True, "_ng_failure_class": "skipped"}, "skipped")],
)  # fmt: skip
def test_no_persist_is_stored_nowhere_and_not_retried(
    answer: dict[str, Any], failure_class: str
) -> None:
    agent = Script(ok(answer))
    out = run(agent)
    assert (out.kind, out.failure_class, out.attempts, out.answer) == (
        "no_persist", failure_class, 1, answer,
    )  # fmt: skip
    assert len(agent.requests) == 1


def test_total_deadline_cuts_a_slow_answer() -> None:
    async def slow(_: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return ok()

    policy = RetryPolicy(max_attempts=2, backoff_base_s=0.001, request_timeout_s=0.1)
    t0 = time.monotonic()
    out = run(slow, policy)
    elapsed = time.monotonic() - t0
    assert (out.kind, out.failure_class, out.terminal, out.attempts) == (
        "failed", "timeout", False, 2,
    )  # fmt: skip
    assert 0.2 <= elapsed < 1.0, elapsed


class Wire:
    """An agent that records how many requests it holds at once, per URL and in total."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.now = 0
        self.peak = 0
        self.events: list[tuple[str, str]] = []  # (what, path)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.events.append(("start", request.url.path))
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.now -= 1
        if request.url.path == "/limited" and not any(
            e == ("start", "/limited") for e in self.events[:-1]
        ):
            return httpx.Response(429, headers={"retry-after": "0.15"})
        return ok()


def test_at_most_max_in_flight_requests_on_the_wire() -> None:
    wire = Wire(delay_s=0.01)

    async def go() -> list[Outcome]:
        client = AgentClient(FAST, 3, transport=httpx.MockTransport(wire))
        try:
            return await asyncio.gather(*(client.run(URL, b"{}") for _ in range(20)))
        finally:
            await client.aclose()

    outs = asyncio.run(go())
    assert all(o.kind == "ok" for o in outs)
    assert wire.peak == 3
    assert len(wire.events) == 20


def test_a_rollout_backing_off_holds_no_slot() -> None:
    # One place on the wire. The first rollout is told to come back in 0.15 s; while it waits,
    # the other rollouts must get the wire, and it comes back after all of them.
    wire = Wire(delay_s=0.005)

    async def go() -> list[Outcome]:
        client = AgentClient(FAST, 1, transport=httpx.MockTransport(wire))
        try:
            first = asyncio.create_task(client.run("http://agent.test/limited", b"{}"))
            await asyncio.sleep(0)  # it takes the only place
            rest = [asyncio.create_task(client.run(URL, b"{}")) for _ in range(5)]
            return [await first, *await asyncio.gather(*rest)]
        finally:
            await client.aclose()

    t0 = time.monotonic()
    outs = asyncio.run(go())
    assert time.monotonic() - t0 < 1.0
    assert [o.kind for o in outs] == ["ok"] * 6
    assert outs[0].attempts == 2
    assert wire.peak == 1
    paths = [p for _, p in wire.events]
    assert paths == ["/limited", *["/run"] * 5, "/limited"]


def test_reserved_slot_is_used_by_run_and_freed_once() -> None:
    wire = Wire(delay_s=0.0)

    async def go() -> None:
        client = AgentClient(FAST, 1, transport=httpx.MockTransport(wire))
        try:
            slot = await client.reserve()
            # The only place is taken: a second reservation waits.
            waiting = asyncio.create_task(client.reserve())
            await asyncio.sleep(0.01)
            assert not waiting.done()
            out = await client.run(URL, b"{}", slot=slot)
            assert out.kind == "ok"
            slot.release()  # idempotent: run already freed it, this frees nothing more
            second = await asyncio.wait_for(waiting, 1)
            # One place only, held by ``second``: nothing else may get it.
            third = asyncio.create_task(client.reserve())
            await asyncio.sleep(0.01)
            assert not third.done()
            second.release()
            (await asyncio.wait_for(third, 1)).release()
        finally:
            await client.aclose()

    asyncio.run(go())


def test_slot_of_a_task_cancelled_before_it_ran_comes_back() -> None:
    # The dispatch loop's pattern: reserve, start a task with the slot, release when it ends.
    async def go() -> None:
        client = AgentClient(FAST, 1, transport=httpx.MockTransport(Script()))
        try:
            slot = await client.reserve()
            task = asyncio.create_task(client.run(URL, b"{}", slot=slot))
            task.add_done_callback(slot.release)
            task.cancel()  # before it ever ran: run() never sees the slot
            with pytest.raises(asyncio.CancelledError):
                await task
            (await asyncio.wait_for(client.reserve(), 1)).release()
        finally:
            await client.aclose()

    asyncio.run(go())
