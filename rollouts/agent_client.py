"""Talking to agents: one POST /run per attempt, real deadlines, retries with backoff.

The HTTP client is chosen here and nowhere else. httpx is the interface; its default transport
is CPU-bound far below what an agent fleet needs (shared/docs/http-client-notes.md), so requests
go through aiohttp underneath, on our own minimal transport (rollouts/aiohttp_transport.py:
httpx-aiohttp's general adapter cost about 0.1 ms more CPU per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import httpx
import orjson
import yaml

from rollouts.aiohttp_transport import AiohttpSessionTransport
from rollouts.attempts import AttemptObserver, RolloutTag
from rollouts.concurrency import AdaptiveConcurrency, InFlightLimit
from rollouts.errors import AgentResolutionError, AgentUnreachable
from rollouts.nemo_gym import NG_FAILURE_CLASS, NG_FAILURE_TERMINAL, NG_NO_PERSIST
from rollouts.settings import RolloutsSettings
from rollouts.urls import AgentCredentials, redact

if TYPE_CHECKING:
    from rollouts.agent_limits import AgentLimits
    from rollouts.replicas import ReplicaGroup, ReplicaRouter

MAX_ERROR_CHARS = 500
MAX_RETRY_AFTER_S = 300.0
# An exception nothing else classifies, raised anywhere on a request's path (building it, the
# transport, reading the answer): a bug or a misconfiguration. Final: every attempt would meet it
# again, so retrying it would only multiply the same failure (docs/health.md, "Failure classes").
UNEXPECTED_ERROR = "unexpected_error"

OutcomeKind = Literal["ok", "failed", "no_persist"]
_READ = httpx.ByteStream(b"")  # what an answer's stream becomes once its body is read


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, s: RolloutsSettings) -> RetryPolicy:
        return cls(
            max_attempts=s.max_attempts,
            backoff_base_s=s.backoff_base_s,
            backoff_max_s=s.backoff_max_s,
            request_timeout_s=s.request_timeout_s,
            connect_timeout_s=s.connect_timeout_s,
        )

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter after failed attempt number ``attempt``."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


@dataclass
class Outcome:
    """The end of one rollout: an answer, a failure (terminal or budget exhausted), or neither."""

    kind: OutcomeKind
    answer: dict[str, Any] | None = None
    failure_class: str | None = None
    error: str | None = None
    terminal: bool = False
    attempts: int = 0


@dataclass
class _Attempt:
    """One failed attempt: its class, message, whether to retry, and a server-requested delay."""

    failure_class: str
    error: str
    retryable: bool
    retry_after_s: float | None = None
    answer: dict[str, Any] | None = field(default=None)


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _classify_transport_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(exc, httpx.TimeoutException) and isinstance(
        cause, aiohttp.ServerTimeoutError | asyncio.TimeoutError
    ):
        return "timeout"
    return "connection_error"


def _short(text: str) -> str:
    """An error text as stored and shown: no URL's password in it, at most MAX_ERROR_CHARS."""
    text = redact(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def _limits(max_in_flight: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)


def default_transport(max_in_flight: int) -> httpx.AsyncBaseTransport:
    """The transport every AgentClient uses unless given another: aiohttp under httpx."""
    return AiohttpSessionTransport(max_in_flight)


class _NoCookies(httpx.Cookies):
    """A cookie store that keeps nothing an answer sets."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class Slot:
    """One place on the wire, reserved by ``AgentClient.reserve`` for a rollout's first attempt.

    ``AgentClient.run(..., slot=slot)`` sends that attempt in it and frees it. Releasing is
    idempotent and ``release`` takes (and ignores) a task, so a caller that hands the slot to a
    task also passes ``slot.release`` to ``task.add_done_callback``: a task cancelled before it
    ever ran never reaches ``run`` and would otherwise keep its slot for good.
    """

    __slots__ = ("_places",)

    def __init__(self, places: InFlightLimit) -> None:
        self._places: InFlightLimit | None = places

    def release(self, _task: object = None) -> None:
        places, self._places = self._places, None
        if places is not None:
            places.release()


class AgentClient:
    """Posts rollouts to agents with a hard per-request deadline and bounded retries.

    The client alone accounts for its places on the wire: at most ``max_in_flight`` requests
    are on it at once, each attempt takes a place and frees it when its answer is in, and a
    rollout waiting out a backoff holds none, so one slow or failing rollout never idles the
    agent. A caller that must not start more work than the wire can take (the chunk dispatch
    loop: a million-row chunk must not become a million tasks) waits in ``reserve`` before
    starting each rollout and hands the slot to ``run``.

    ``transport`` carries the requests; None: ``default_transport`` (tests pass an
    ``httpx.MockTransport``). ``replicas``: spreads the attempts to a replicated agent over
    its URLs (rollouts/replicas.py). ``observer``: told when each attempt starts and ends
    and when each rollout ends (rollouts/attempts.py); None: the router's, or one of its own.
    The router and the adaptive controller read it. ``credentials``: the passwords of agent URLs that
    carry one; the URLs ``run`` gets are redacted (``http://user:***@host``), and each request
    goes to the URL without them, with basic auth, unless ``api_key`` is set (then its bearer
    header alone). ``agent_limits``: the limits on requests in flight to agents shared with
    other processes and runs (rollouts/agent_limits.py): an attempt to such an agent also
    takes one of the slots this process holds of its limit (by the agent of its ``tag``).
    """

    def __init__(
        self,
        policy: RetryPolicy,
        max_in_flight: int,
        api_key: str | None = None,
        *,
        adaptive: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
        replicas: ReplicaRouter | None = None,
        observer: AttemptObserver | None = None,
        credentials: AgentCredentials | None = None,
        agent_limits: AgentLimits | None = None,
    ) -> None:
        self.policy = policy
        self._credentials = credentials or AgentCredentials(())
        self._bearer = bool(api_key)
        self.replicas = replicas
        if observer is None:
            observer = replicas.observer if replicas is not None else AttemptObserver()
        elif replicas is not None:
            replicas.observer = observer  # one observer of every attempt, routed or not
        self.observer = observer
        self._places = InFlightLimit(max_in_flight)
        self.agent_limits = agent_limits
        if agent_limits is not None:
            agent_limits.follow_budget(self._places)
        # adaptive: max_in_flight is the ceiling; the controller moves the limit under it
        self.concurrency = (
            AdaptiveConcurrency(self._places, ceiling=max_in_flight) if adaptive else None
        )
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            transport=transport or default_transport(max_in_flight),
            headers=headers,
            timeout=httpx.Timeout(policy.request_timeout_s, connect=policy.connect_timeout_s),
            limits=_limits(max_in_flight),
        )
        # Agents set no cookies we want, and httpx parses every answer's through urllib's
        # cookie machinery (about 0.02 ms CPU per request). httpx 0.28 offers no switch: its
        # `cookies` setter copies into a plain Cookies, so the private store is replaced
        # (tests/test_library_internals.py fails if httpx moves it).
        self._http._cookies = _NoCookies()
        # What httpx's build_request would merge into every request, merged once.
        self._extensions = {"timeout": self._http.timeout.as_dict()}
        self._urls: dict[str, tuple[httpx.URL, httpx.Headers]] = {}

    def _request(self, url: str, body: bytes) -> httpx.Request:
        """``POST url`` with the client's headers and timeouts (``AsyncClient.build_request``
        without re-parsing the URL and re-merging headers for each of a million requests)."""
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= 1024:
                self._urls.clear()
            target = self._urls[url] = self._target(url)
        parsed, headers = target
        return httpx.Request(
            "POST", parsed, headers=headers, content=body, extensions=self._extensions
        )

    def _target(self, url: str) -> tuple[httpx.URL, httpx.Headers]:
        """Where a request to ``url`` goes, and with which headers: credentials in the URL
        become basic auth (none when the API key's bearer header is sent)."""
        parsed = httpx.URL(url)
        if self._bearer:  # the key's header alone: the URL's credentials are not used
            return parsed.copy_with(userinfo=b"") if parsed.userinfo else parsed, self._http.headers
        parsed, authorization = self._credentials.split(parsed)
        if authorization is None:
            return parsed, self._http.headers
        headers = self._http.headers.copy()
        headers["authorization"] = authorization
        return parsed, headers

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _attempt(
        self, url: str, group: ReplicaGroup | None, body: bytes, tag: RolloutTag | None,
        attempt: int,
    ) -> tuple[dict[str, Any] | _Attempt, float]:  # fmt: skip
        """One attempt, on the replica chosen now if ``url`` is a routed agent's (so a retry
        may go to another one), told to the observer; with its duration."""
        observer = self.observer
        if group is None:
            ticket = observer.begin(tag, url, attempt)
            where = None
        else:
            replica = group.pick()
            url, where = replica.run_url, replica.url
            ticket = observer.track(replica, tag, attempt)
        failure_class: str | None = "cancelled"
        try:
            result = await self._send(url, body)
            if isinstance(result, dict):
                failure_class = None
            else:
                failure_class = result.failure_class
                if where is not None:
                    result.error = f"replica {where}: {result.error}"  # which one failed
        finally:
            latency = observer.end(ticket, failure_class)
        return result, latency

    async def _send(self, url: str, body: bytes) -> dict[str, Any] | _Attempt:
        """One request and its answer, classified. Nothing raised on the way escapes: an
        exception no other class covers is an ``unexpected_error``, final (see its comment)."""
        try:
            return await self._exchange(url, body)
        except Exception as e:  # every exception becomes a classified failure
            return _Attempt(UNEXPECTED_ERROR, _short(f"{type(e).__name__}: {e}"), False)

    async def _exchange(self, url: str, body: bytes) -> dict[str, Any] | _Attempt:
        request = self._request(url, body)
        try:
            # httpx timeouts are per phase; asyncio.timeout makes the deadline total, so a
            # trickling or hung agent can never stall a rollout past request_timeout_s.
            async with asyncio.timeout(self.policy.request_timeout_s):
                resp = await self._http.send(request)
        except TimeoutError:
            return _Attempt("timeout", f"no answer within {self.policy.request_timeout_s}s", True)
        except httpx.TransportError as e:
            kind = _classify_transport_error(e)
            return _Attempt(kind, _short(f"{type(e).__name__}: {e}"), True)
        # httpx binds the answer's stream to the answer (a reference cycle), so every answer,
        # its request and both bodies would wait for the cyclic GC instead of being freed when
        # this returns; with thousands in flight those passes cost seconds. Read, so unbind.
        resp.stream = _READ
        status = resp.status_code
        if status == 429:
            return _Attempt(
                "rate_limited",
                _short(f"HTTP 429: {resp.text}"),
                True,
                _retry_after_seconds(resp.headers.get("retry-after")),
            )
        if status >= 500:
            return _Attempt(f"http_{status}", _short(f"HTTP {status}: {resp.text}"), True)
        if status >= 400 or status < 200 or status >= 300:
            return _Attempt(f"http_{status}", _short(f"HTTP {status}: {resp.text}"), False)
        try:
            answer = orjson.loads(resp.content)
        except orjson.JSONDecodeError as e:
            return _Attempt("invalid_response", _short(f"answer is not JSON: {e}"), True)
        if not isinstance(answer, dict):
            return _Attempt("invalid_response", "answer is not a JSON object", True)
        # NeMo Gym's routing: `_ng_no_persist` (with or without a class) is stored nowhere; a
        # non-null `_ng_failure_class` is a failure; a null one is an ordinary answer.
        if answer.get(NG_FAILURE_CLASS) is not None or answer.get(NG_NO_PERSIST) is True:
            return _Attempt(
                str(answer.get(NG_FAILURE_CLASS) or "no_persist"),
                _short(str(answer.get("error", "agent reported a failure"))),
                retryable=answer.get(NG_FAILURE_TERMINAL) is not True,
                answer=answer,
            )
        return answer

    async def reserve(self) -> Slot:
        """Wait for a free place on the wire and hold it for one rollout's first attempt."""
        await self._places.acquire()
        return Slot(self._places)

    async def run(
        self, url: str, body: bytes, *, slot: Slot | None = None, tag: RolloutTag | None = None
    ) -> Outcome:
        """Send one rollout until it succeeds, fails terminally, or the budget runs out.

        ``slot``: a place from ``reserve`` for the first attempt, freed by this call once the
        attempt is over, whatever happens; None: wait for one here. Every later attempt, after
        its backoff, waits for a place of its own. ``tag``: which rollout this is, for the
        live health (rollouts/attempts.py, rollouts/health.py); its agent's shared limit, if
        it has one, gives each attempt a slot too.
        """
        started = time.monotonic()
        last: _Attempt | None = None
        group = self.replicas.group_for(url) if self.replicas is not None else None
        concurrency = self.concurrency
        shared = (
            self.agent_limits.slots(tag[0])
            if self.agent_limits is not None and tag is not None else None
        )  # fmt: skip
        for attempt in range(1, self.policy.max_attempts + 1):
            place = slot if slot is not None else await self.reserve()
            slot = None
            try:
                if shared is not None:
                    # Waited for holding this process's place: the wait counts as its demand.
                    await shared.acquire()
                try:
                    sent = concurrency.sent() if concurrency is not None else 0
                    result, latency = await self._attempt(url, group, body, tag, attempt)
                finally:
                    if shared is not None:
                        shared.release()
            finally:
                place.release()
            if concurrency is not None:
                concurrency.observe(
                    sent, latency, None if isinstance(result, dict) else result.failure_class
                )
            if isinstance(result, dict):
                outcome = Outcome("ok", answer=result, attempts=attempt)
                break
            last = result
            if result.answer is not None and result.answer.get(NG_NO_PERSIST) is True:
                outcome = Outcome(
                    "no_persist", answer=result.answer, failure_class=result.failure_class,
                    error=result.error, attempts=attempt,
                )  # fmt: skip
                break
            if not result.retryable:
                outcome = Outcome(
                    "failed", answer=result.answer, failure_class=result.failure_class,
                    error=result.error, terminal=True, attempts=attempt,
                )  # fmt: skip
                break
            if attempt < self.policy.max_attempts:
                delay = self.policy.backoff(attempt)
                if result.retry_after_s is not None:
                    delay = max(delay, min(result.retry_after_s, MAX_RETRY_AFTER_S))
                await asyncio.sleep(delay)
        else:
            assert last is not None
            outcome = Outcome(
                "failed", answer=last.answer, failure_class=last.failure_class,
                error=f"gave up after {self.policy.max_attempts} attempts: {last.error}",
                terminal=False, attempts=self.policy.max_attempts,
            )  # fmt: skip
        # The whole rollout's time, backoffs included: the stopper's drain margin.
        self.observer.rollout_ended(time.monotonic() - started)
        return outcome


def resolve_agent_urls(
    names: list[str], settings: RolloutsSettings, http: httpx.Client | None = None
) -> dict[str, str]:
    """Map agent names to base URLs: ROLLOUTS_AGENTS first, then the NeMo Gym head server,
    asked through ``http`` (None: a client of its own, for this one request)."""
    # A replicated agent resolves to its first replica: the client routes each attempt among
    # them (rollouts/replicas.py).
    urls = {n: settings.replicas_of(n)[0] for n in names if n in settings.agents}
    missing = [n for n in names if n not in urls]
    if not missing:
        return urls
    if not settings.head_server_url:
        raise AgentResolutionError(
            f'unknown agent {missing[0]!r}: set ROLLOUTS_AGENTS=\'{{"{missing[0]}": '
            '"http://host:port"}\', point ROLLOUTS_HEAD_SERVER_URL at a NeMo Gym head server, '
            "or pass agent_url"
        )
    head = settings.head_server_url.rstrip("/")
    client = http if http is not None else httpx.Client()
    try:
        resp = client.get(f"{head}/global_config_dict_yaml", timeout=settings.connect_timeout_s)
        resp.raise_for_status()
        text = resp.json()
        config = yaml.safe_load(text) if isinstance(text, str) else text
    except (httpx.HTTPError, ValueError, yaml.YAMLError) as e:
        raise AgentResolutionError(
            redact(f"could not read the agent config from the head server {head}: {e}")
        ) from None
    finally:
        if http is None:
            client.close()
    head = redact(head)
    for name in missing:
        servers = (config or {}).get(name, {}).get("responses_api_agents") or {}
        entry = next(iter(servers.values()), None) if isinstance(servers, dict) else None
        if not entry or "host" not in entry or "port" not in entry:
            known = sorted(
                k for k, v in (config or {}).items()
                if isinstance(v, dict) and "responses_api_agents" in v
            )  # fmt: skip
            raise AgentResolutionError(
                f"agent {name!r} is not in the head server's config ({head}); "
                f"agents it knows: {', '.join(known) or 'none'}"
            )
        urls[name] = f"http://{entry['host']}:{entry['port']}"
    return urls


async def _connect_problem(url: str, timeout_s: float) -> str | None:
    """Why ``url``'s host:port accepts no TCP connection (refused, DNS, timeout), or None.

    A connection is the whole test: an agent busy with a full load still accepts one, and any
    HTTP answer it would give (404 included) says no more than that.
    """
    parsed = httpx.URL(url)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except socket.gaierror as e:
        return f"host name {host!r} not found (DNS: {e.strerror or e})"
    except TimeoutError:
        return f"no connection within {timeout_s:g} s (timeout)"
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def check_agents_reachable(
    agents: Mapping[str, str | Sequence[str]], timeout_s: float
) -> list[str]:
    """Refuse, before any rollout is sent, when an agent's address accepts no connection.

    ``agents`` maps a label (the agent name, or the URL itself) to its base URL, or to the URLs
    of its replicas. Without this a dead address costs the whole retry budget (every attempt of
    every rollout, every chunk retry) before the run says anything. A replicated agent passes
    when one replica accepts a connection: the others are taken out at their first failures
    and probed back in (rollouts/replicas.py). Returns those down replicas, one line each.
    """
    groups = {label: [urls] if isinstance(urls, str) else list(urls)
              for label, urls in agents.items()}  # fmt: skip
    urls = sorted({u for group in groups.values() for u in group})
    problems = await asyncio.gather(*(_connect_problem(u, timeout_s) for u in urls))
    down = {u: p for u, p in zip(urls, problems, strict=True) if p is not None}
    lines: list[str] = []
    tolerated: list[str] = []
    for label, group in sorted(groups.items()):
        dead = [u for u in group if u in down]
        for url in dead:
            who = f"agent {label!r} at {url}" if label != url else f"agent {url}"
            if len(group) > 1:
                who = f"replica {url} of agent {label!r}"
            (tolerated if len(dead) < len(group) else lines).append(f"{who}: {down[url]}")
    if not lines:
        return tolerated
    raise AgentUnreachable(
        "cannot reach the agent, nothing was sent: "
        + "; ".join(lines)
        + ". Start it or fix its address (ROLLOUTS_AGENTS, ROLLOUTS_HEAD_SERVER_URL or "
        "--agent-url), then rerun the same command."
    )
