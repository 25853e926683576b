"""Reference agent server: a SIMULATOR of a NeMo Gym agent, for demos, tests and benchmarks.

Nothing here calls a model. The server speaks the NeMo Gym agent protocol (``POST /run``,
``POST /aggregate_metrics``, plus ``GET /health`` and ``GET /stats``, its load figures) over a
small verifiable task family, integer arithmetic with exact answers ("What is 17 + 25?"), so a
collector can be exercised end to end without GPUs:

* The simulated policy reads the question from the last user message, computes the true answer
  and returns it with probability ``clamp(0.95 - 0.45 * temperature, 0.05, 0.95)``; otherwise it
  returns a nearby wrong integer. The draw is seeded from a hash of
  ``(seed, _ng_task_index, _ng_rollout_index, temperature)``, so reruns give identical answers.
* A built-in verifier compares the answer to the row's ``expected_answer``: ``reward`` is 1.0 or
  0.0. A row without ``expected_answer`` gets reward 0.0.
* Latency is fixed (``latency_s``) or lognormal (median ``latency_s``, shape ``latency_sigma``).
* Faults can be injected (all off by default): HTTP 500, HTTP 429 with ``Retry-After``, connection
  reset (TCP RST, no response), hang, HTTP 400 for chosen task indices, and a hard process exit
  (``os._exit(3)``) after N ``/run`` requests. Fault and latency draws use a server-wide RNG seeded
  from ``seed`` (not the per-rollout key), so a retried rollout can succeed.
* Agent-declared failures for chosen task indices (NeMo Gym's sentinel keys in a 200 answer):
  ``fail_class_tasks`` answer with ``_ng_failure_class`` (``FAILURE_CLASS``) and
  ``_ng_failure_terminal: true``; ``no_persist_tasks`` answer with ``_ng_no_persist: true``.
* ``responses_create_params`` is validated like real agents do (pydantic ``extra="forbid"``): an
  unknown key gives 422 naming it; ``input`` is required.
* With an API key configured, ``/run`` and ``/aggregate_metrics`` require
  ``Authorization: Bearer <key>`` (``/health`` stays open for probes). The key is read from the
  environment variable ``ROLLOUTS_AGENT_API_KEY`` by the CLI and is never logged. With
  ``ROLLOUTS_REFERENCE_AGENT_BASIC_AUTH=USER:PASSWORD`` they require that basic auth instead
  (either, when both are set), as a proxy in front of an agent would. The request log records
  which scheme each request used (``auth``: ``Bearer``, ``Basic USER``), never the secret.

Order of checks for one ``/run`` request: crash-after, auth (401), body JSON (400),
``responses_create_params`` (422), ``fail_400_tasks`` (400), ``fail_class_tasks`` and
``no_persist_tasks`` (200 with the sentinel keys), injected faults (500 / 429 / reset /
hang, exclusive bands of one uniform draw, so each ``p_*`` is its exact marginal rate), then the
latency sleep and the 200 answer. The optional request log gets one line per ``/run`` request as
soon as its outcome is decided (before the fault is acted on and before any sleep).

Crash semantics: with ``crash_after=N`` the first N ``/run`` requests are handled normally; the
process exits with code 3 upon receiving request N+1 (which gets no response; it is logged with
outcome ``"crash"`` first).

Run it: ``python -m reference_agent --port 8765 --latency-ms 50`` (or ``rollouts serve-agent``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import math
import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from aiohttp import web

from reference_agent.args import FAILURE_CLASS, add_serve_agent_arguments
from reference_agent.capacity import ProcessorSharing
from rollouts.fdlimit import raise_open_file_limit
from rollouts.models import RESPONSES_CREATE_PARAMS_KEYS
from rollouts.nemo_gym import (
    NG_FAILURE_CLASS,
    NG_FAILURE_TERMINAL,
    NG_NO_PERSIST,
    NG_ROLLOUT_INDEX,
    NG_TASK_INDEX,
    RESPONSE,
    RESPONSES_CREATE_PARAMS,
    REWARD,
)

API_KEY_ENV = "ROLLOUTS_AGENT_API_KEY"
# USER:PASSWORD: require basic auth, as a proxy in front of an agent would (the collector sends
# it for an agent URL with credentials in it: http://USER:PASSWORD@host:port).
BASIC_AUTH_ENV = "ROLLOUTS_REFERENCE_AGENT_BASIC_AUTH"
MODEL_NAME = "reference-simulator"

# OpenAI Responses API create params; anything else is rejected like NeMo Gym's pydantic model
# with extra="forbid" would. One list for the collector's check and this simulator.
ALLOWED_CREATE_PARAMS: frozenset[str] = RESPONSES_CREATE_PARAMS_KEYS

_OPS = ("+", "-", "*")
_QUESTION_RE = re.compile(r"What is\s+(-?\d+)\s*([-+*])\s*(-?\d+)")
_INTEGER_RE = re.compile(r"-?\d+")
_WRONG_OFFSETS = (-10, -3, -2, -1, 1, 2, 3, 10)
_JSON = "application/json"


# --------------------------------------------------------------------------------------------
# Task family
# --------------------------------------------------------------------------------------------


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def make_task(index: int, rng: random.Random) -> dict[str, Any]:
    """One arithmetic task row; ``index`` picks the operator round-robin so the mix is balanced."""
    op = _OPS[index % len(_OPS)]
    if op == "*":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
    question = f"{a} {op} {b}"
    prompt = f"What is {question}? Answer with the number only."
    return {
        RESPONSES_CREATE_PARAMS: {
            "input": [{"role": "user", "content": prompt, "type": "message"}]
        },
        "question": question,
        "expected_answer": str(_apply(a, op, b)),
    }


def generate_tasks(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` task rows, identical for the same ``seed`` (no ``_ng_task_index``: the collector adds it)."""
    rng = random.Random(seed)
    for index in range(n):
        yield make_task(index, rng)


def write_tasks(path: Path, n: int, seed: int = 0) -> None:
    """Write ``generate_tasks(n, seed)`` as compact JSONL; replaced atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.writelines(orjson.dumps(row) + b"\n" for row in generate_tasks(n, seed))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class AgentSimConfig:
    latency_s: float = 0.0
    latency_sigma: float = 0.0  # 0 = fixed latency; > 0 = lognormal, median latency_s
    seed: int = 0
    request_log: Path | None = None
    api_key: str | None = None
    basic_auth: str | None = None  # USER:PASSWORD
    p_500: float = 0.0
    p_429: float = 0.0
    retry_after_s: float = 1.0
    p_reset: float = 0.0
    p_hang: float = 0.0
    hang_s: float = 3600.0
    fail_400_tasks: frozenset[int] = frozenset()
    fail_class_tasks: frozenset[int] = frozenset()
    no_persist_tasks: frozenset[int] = frozenset()
    crash_after: int | None = None
    capacity: int | None = None  # processor sharing above K in service (capacity.py)
    reject_above: int | None = None  # 429 while this many are in service
    capacity_schedule: tuple[tuple[float, int], ...] = ()  # (seconds after first /run, K)

    def __post_init__(self) -> None:
        probabilities = {
            "p_500": self.p_500, "p_429": self.p_429, "p_reset": self.p_reset,
            "p_hang": self.p_hang,
        }  # fmt: skip
        for name, value in probabilities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        # The faults are exclusive bands of one draw, so together they cannot exceed 1.
        if sum(probabilities.values()) > 1.0 + 1e-9:
            raise ValueError("p_500 + p_429 + p_reset + p_hang must not exceed 1")
        for name in ("latency_s", "latency_sigma", "retry_after_s", "hang_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.crash_after is not None and self.crash_after < 0:
            raise ValueError("crash_after must be >= 0")
        for name in ("capacity", "reject_above"):
            if (getattr(self, name) or 1) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.capacity_schedule and self.capacity is None:
            raise ValueError("capacity_schedule needs a capacity to start from")
        self.fail_400_tasks = frozenset(self.fail_400_tasks)
        self.fail_class_tasks = frozenset(self.fail_class_tasks)
        self.no_persist_tasks = frozenset(self.no_persist_tasks)
        if self.request_log is not None:
            self.request_log = Path(self.request_log)

    def __repr__(self) -> str:
        # Keep the key and password out of any log line or traceback that prints the config.
        hidden = {"api_key": "***" if self.api_key else None,
                  "basic_auth": "***" if self.basic_auth else None}  # fmt: skip
        fields = ", ".join(
            f"{name}={hidden[name] if name in hidden else getattr(self, name)!r}"
            for name in self.__dataclass_fields__
        )
        return f"AgentSimConfig({fields})"


# --------------------------------------------------------------------------------------------
# Simulated policy and verifier
# --------------------------------------------------------------------------------------------


def correct_probability(temperature: float) -> float:
    """Chance that the simulated policy answers correctly at this temperature."""
    return min(0.95, max(0.05, 0.95 - 0.45 * temperature))


def _rollout_digest(seed: int, task_index: Any, rollout_index: Any, temperature: float) -> bytes:
    # blake2b over a canonical encoding: stable across processes, unlike the salted hash().
    key = orjson.dumps([seed, task_index, rollout_index, temperature])
    return hashlib.blake2b(key, digest_size=16).digest()


def _text_of(content: Any) -> str:
    """Plain text of a message ``content`` (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(input_value: Any) -> str:
    """Text of the last user message of a Responses ``input`` (a string is one user message)."""
    if isinstance(input_value, str):
        return input_value
    if isinstance(input_value, list):
        for item in reversed(input_value):
            if isinstance(item, dict) and item.get("role") == "user":
                return _text_of(item.get("content"))
    return ""


def _all_input_text(params: dict[str, Any]) -> str:
    items = params.get("input")
    if isinstance(items, str):
        texts = [items]
    else:
        texts = [_text_of(i.get("content")) for i in items or () if isinstance(i, dict)]
    instructions = params.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    return " ".join(texts)


def simulate_answer(question_text: str, temperature: float, rng: random.Random) -> str:
    """What the simulated model says: the true result or, with the temperature's odds, a near miss."""
    match = _QUESTION_RE.search(question_text)
    if match is None:
        return "I cannot answer that."
    truth = _apply(int(match[1]), match[2], int(match[3]))
    if rng.random() < correct_probability(temperature):
        return str(truth)
    return str(truth + rng.choice(_WRONG_OFFSETS))


def extract_answer(text: str) -> str:
    """The verifier's reading of a reply: its last integer, or "" when there is none."""
    found = _INTEGER_RE.findall(text)
    return found[-1] if found else ""


def verify(extracted: str, expected: Any) -> float:
    if expected is None or extracted == "":
        return 0.0
    return 1.0 if extracted == str(expected).strip() else 0.0


def _response_object(digest: bytes, text: str, params: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Response-like object holding one assistant message."""
    input_tokens = len(_all_input_text(params).split())
    output_tokens = len(text.split())
    return {
        "id": f"resp_{digest.hex()}",
        "object": "response",
        "created_at": int(time.time()),
        "model": MODEL_NAME,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "output": [
            {
                "id": f"msg_{digest.hex()}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def run_rollout(row: dict[str, Any], temperature: float, seed: int) -> dict[str, Any]:
    """The full /run answer for a validated row: the row echoed, plus response/reward/answer."""
    params = row[RESPONSES_CREATE_PARAMS]
    digest = _rollout_digest(seed, row.get(NG_TASK_INDEX), row.get(NG_ROLLOUT_INDEX), temperature)
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    text = simulate_answer(last_user_text(params.get("input")), temperature, rng)
    extracted = extract_answer(text)
    out = dict(row)  # echo every task field (and whatever indices came in) untouched
    out[RESPONSE] = _response_object(digest, text, params)
    out[REWARD] = verify(extracted, row.get("expected_answer"))
    out["extracted_answer"] = extracted
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples of which c are correct."""
    if k <= 0 or k > n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """mean/reward, num_rollouts, pass@1 and pass@k over rollouts grouped by ``_ng_task_index``.

    k is the number of rollouts per task (the smallest group when groups differ, so the estimator
    is defined for every task). A rollout counts as correct when its reward is above 0.5. Rows
    without ``_ng_task_index`` are each their own task. Undefined values (no rows) are null.
    """
    rewards = [float(row.get(REWARD) or 0.0) for row in rows]
    groups: dict[Any, list[float]] = {}
    for position, (row, reward) in enumerate(zip(rows, rewards, strict=True)):
        task = row.get(NG_TASK_INDEX)
        key = ("row", position) if task is None else ("task", task)
        groups.setdefault(key, []).append(reward)
    if not rows:
        return {"mean/reward": None, "num_rollouts": 0, "pass@1": None, "pass@k": None}
    k = min(len(g) for g in groups.values())
    per_task = [(len(g), sum(1 for r in g if r > 0.5)) for g in groups.values()]
    return {
        "mean/reward": sum(rewards) / len(rewards),
        "num_rollouts": len(rows),
        "pass@1": sum(pass_at_k(n, c, 1) for n, c in per_task) / len(per_task),
        "pass@k": sum(pass_at_k(n, c, k) for n, c in per_task) / len(per_task),
    }


# --------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------


def _json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json_response({"error": message, **extra}, status=status)


def _validate_create_params(params: Any) -> tuple[float | None, web.Response | None]:
    """(effective temperature, None) when valid, else (None, a 422 response)."""
    if not isinstance(params, dict):
        return None, _error(422, "responses_create_params is required and must be an object")
    unknown = sorted(params.keys() - ALLOWED_CREATE_PARAMS)
    if unknown:
        detail = [
            {"type": "extra_forbidden", "loc": ["body", RESPONSES_CREATE_PARAMS, key],
             "msg": "Extra inputs are not permitted"}
            for key in unknown
        ]  # fmt: skip
        names = ", ".join(repr(key) for key in unknown)
        return None, _error(422, f"unknown key in responses_create_params: {names}", detail=detail)
    if not isinstance(params.get("input"), str | list):
        return None, _error(422, "responses_create_params.input is required (string or list)")
    temperature = params.get("temperature")
    if temperature is None:
        return 1.0, None
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        return None, _error(422, "responses_create_params.temperature must be a number")
    return float(temperature), None


def _set_linger_zero(request: web.Request) -> None:
    # SO_LINGER(on, 0) turns the close into a TCP RST: the client sees "connection reset".
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _auth_scheme(request: web.Request) -> str | None:
    """What the request's Authorization header is, without its secret (for the request log):
    `Bearer`, `Basic USER`, another scheme's name, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return scheme or None
    try:
        user = base64.b64decode(value, validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return "Basic (not base64)"
    return f"Basic {user}"


class _ReferenceAgent:
    """Per-app state (counters, RNGs, log file); its bound methods are the route handlers."""

    def __init__(self, config: AgentSimConfig) -> None:
        self.config = config
        self.requests_seen = 0
        # Separate streams so enabling faults does not change the latency sequence.
        self._fault_rng = random.Random(f"faults:{config.seed}")
        self._latency_rng = random.Random(f"latency:{config.seed}")
        self._log: IO[bytes] | None = None
        # Either credential opens the door when both are set.
        self._expected_auth = [f"Bearer {config.api_key}".encode()] if config.api_key else []
        if config.basic_auth:
            token = base64.b64encode(config.basic_auth.encode()).decode()
            self._expected_auth.append(f"Basic {token}".encode())
        c = config
        self._fault_bands = (
            (c.p_500, "500"), (c.p_429, "429"), (c.p_reset, "reset"), (c.p_hang, "hang"),
        )  # fmt: skip
        self._any_fault = any(p > 0 for p, _ in self._fault_bands)
        self._server = ProcessorSharing(config.capacity) if config.capacity else None
        self._schedule = list(config.capacity_schedule)
        self._schedule_start: float | None = None  # the first /run
        self._in_service = 0  # requests between their decision and their answer
        # Load figures for GET /stats (benchmarks read them after a run).
        self._in_flight = 0
        self._peak_in_flight = 0
        self._first_received: float | None = None
        self._last_answered: float | None = None

    async def log_file_ctx(self, app: web.Application) -> Any:
        """cleanup_ctx: the request log is opened once per server run and closed on shutdown."""
        path = self.config.request_log
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered binary: every line is one O_APPEND write(2), so it survives SIGKILL
            # and is readable while the server runs.
            self._log = await asyncio.to_thread(open, path, "ab", buffering=0)
        yield
        if self._log is not None:
            self._log.close()
            self._log = None

    def _authorized(self, request: web.Request) -> bool:
        if not self._expected_auth:
            return True
        given = request.headers.get("Authorization", "").encode()
        return any(hmac.compare_digest(given, expected) for expected in self._expected_auth)

    def _draw_fault(self) -> str | None:
        if not self._any_fault:
            return None
        u = self._fault_rng.random()
        for probability, outcome in self._fault_bands:
            if u < probability:
                return outcome
            u -= probability
        return None

    def _latency(self) -> float:
        c = self.config
        if c.latency_s <= 0:
            return 0.0
        if c.latency_sigma <= 0:
            return c.latency_s
        return self._latency_rng.lognormvariate(math.log(c.latency_s), c.latency_sigma)

    def _write_log(
        self, body: Any, temperature: float | None, outcome: str, authorized: bool,
        auth: str | None = None,
    ) -> None:  # fmt: skip
        if self._log is None:
            return
        row = body if isinstance(body, dict) else {}
        record = {
            "time": time.time(),
            NG_TASK_INDEX: row.get(NG_TASK_INDEX),
            NG_ROLLOUT_INDEX: row.get(NG_ROLLOUT_INDEX),
            "temperature": temperature,
            "outcome": outcome,
            "authorized": authorized,
            "auth": auth,
        }
        self._log.write(orjson.dumps(record) + b"\n")

    def _decide(self, body: Any, authorized: bool) -> tuple[str, float | None, web.Response | None]:
        """(outcome, temperature, early response) for one /run request, before acting on it."""
        if not authorized:
            return "401", None, _error(401, "missing or invalid credentials")
        if not isinstance(body, dict):
            return "400", None, _error(400, "request body must be a JSON object")
        temperature, invalid = _validate_create_params(body.get(RESPONSES_CREATE_PARAMS))
        if invalid is not None:
            return "422", None, invalid
        task_index = body.get(NG_TASK_INDEX)
        if isinstance(task_index, int) and task_index in self.config.fail_400_tasks:
            return "400", temperature, _error(400, "simulated bad request for this task")
        if isinstance(task_index, int) and task_index in self.config.fail_class_tasks:
            return "fail_class", temperature, None
        if isinstance(task_index, int) and task_index in self.config.no_persist_tasks:
            return "no_persist", temperature, None
        reject_above = self.config.reject_above
        if reject_above is not None and self._in_service >= reject_above:
            return "429", temperature, None  # over capacity: the client must back off
        return self._draw_fault() or "ok", temperature, None

    def _follow_schedule(self) -> None:
        now = time.monotonic()
        if self._schedule_start is None:
            self._schedule_start = now
        while self._schedule and now - self._schedule_start >= self._schedule[0][0]:
            _, capacity = self._schedule.pop(0)
            assert self._server is not None
            self._server.set_capacity(capacity)

    async def run(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        if self._first_received is None:
            self._first_received = time.time()
        try:
            return await self._run(request)
        finally:
            self._in_flight -= 1
            self._last_answered = time.time()  # the answer is written right after this

    async def _run(self, request: web.Request) -> web.StreamResponse:
        self.requests_seen += 1
        crash = self.config.crash_after is not None and self.requests_seen > self.config.crash_after
        raw = await request.read()
        authorized = self._authorized(request)
        auth = _auth_scheme(request)
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if crash:
            self._write_log(body, None, "crash", authorized, auth)
            os._exit(3)  # simulate a dead agent: no cleanup, no response
        if self._server is not None:
            self._follow_schedule()
        outcome, temperature, early = self._decide(body, authorized)
        self._write_log(body, temperature, outcome, authorized, auth)
        if early is not None:
            return early
        self._in_service += 1
        try:
            return await self._act(request, body, outcome, temperature)
        finally:
            self._in_service -= 1

    async def _act(
        self, request: web.Request, body: dict[str, Any], outcome: str, temperature: float | None
    ) -> web.StreamResponse:
        if outcome == "500":
            return _error(500, "simulated internal server error")
        if outcome == "429":
            seconds = float(self.config.retry_after_s)  # an int has no is_integer() on 3.11
            # Integral values as HTTP delta-seconds ("1"); fractions kept for fast test clients.
            retry_after = str(int(seconds)) if seconds.is_integer() else str(seconds)
            return _json_response(
                {"error": "simulated rate limit"}, status=429, headers={"Retry-After": retry_after}
            )
        if outcome == "reset":
            _set_linger_zero(request)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never reaches the client: the socket is gone
        delay = self.config.hang_s if outcome == "hang" else self._latency()
        if self._server is not None and outcome != "hang":
            await self._server.serve(delay)  # slower for everyone once over capacity
        elif delay > 0:
            await asyncio.sleep(delay)
        assert temperature is not None  # set for every outcome that reaches here
        answer = run_rollout(body, temperature, self.config.seed)
        if outcome == "fail_class":
            # Shaped like a real agent's failure payload: a reward of 0 that must never count.
            answer |= {REWARD: 0.0, NG_FAILURE_CLASS: FAILURE_CLASS,
                       NG_FAILURE_TERMINAL: True, "error": "simulated agent failure"}  # fmt: skip
        elif outcome == "no_persist":
            answer[NG_NO_PERSIST] = True
        return _json_response(answer)

    async def aggregate(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or invalid credentials")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "request body must be JSON")
        rows = body.get("verify_responses") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return _error(400, "body must be {'verify_responses': [objects]}")
        try:
            return _json_response(aggregate_metrics(rows))
        except (TypeError, ValueError):
            return _error(400, "every reward must be a number")

    async def health(self, request: web.Request) -> web.Response:
        return _json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        """/run requests so far, in flight now and at most, first received, last answered."""
        return _json_response({
            "requests": self.requests_seen, "in_flight": self._in_flight,
            "peak_in_flight": self._peak_in_flight, "first_received": self._first_received,
            "last_answered": self._last_answered,
        })  # fmt: skip


def build_app(config: AgentSimConfig) -> web.Application:
    """The aiohttp application of the reference agent (run it with any aiohttp runner)."""
    agent = _ReferenceAgent(config)
    # Task rows with long prompts exceed aiohttp's 1 MiB default; real agents have no such cap.
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.cleanup_ctx.append(agent.log_file_ctx)
    app.router.add_post("/run", agent.run)
    app.router.add_post("/aggregate_metrics", agent.aggregate)
    app.router.add_get("/health", agent.health)
    app.router.add_get("/stats", agent.stats)
    return app


# --------------------------------------------------------------------------------------------
# Serving and CLI
# --------------------------------------------------------------------------------------------


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(host: str, port: int, config: AgentSimConfig) -> None:
    # Every open connection is a file descriptor: take all the process may have (a soft
    # limit of 1,024 would refuse connections past it while thousands are in flight).
    raise_open_file_limit()
    runner = web.AppRunner(
        build_app(config),
        access_log=None,  # per-request logging would dominate the cost at zero latency
        handler_cancellation=True,  # a client giving up on a hang frees its handler
        shutdown_timeout=2.0,
    )
    await runner.setup()
    try:
        # Thousands of clients connect at once: a queue as long as the kernel allows
        # (net.core.somaxconn caps it silently; 4,096 on recent Linux).
        site = web.TCPSite(runner, host, port, backlog=65535)
        await site.start()
        actual_port = runner.addresses[0][1]
        print(f"reference agent listening on {_format_url(host, actual_port)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_agent(host: str, port: int, config: AgentSimConfig) -> None:
    """Serve until SIGINT/SIGTERM. Prints ``reference agent listening on http://HOST:PORT`` once
    bound (port 0 picks a free port; the line shows the real one)."""
    asyncio.run(_serve(host, port, config))


def config_from_args(args: argparse.Namespace) -> AgentSimConfig:
    """AgentSimConfig from parsed flags plus the API key from the environment."""
    return AgentSimConfig(
        latency_s=args.latency_ms / 1000.0,
        latency_sigma=args.latency_sigma,
        seed=args.seed,
        request_log=args.request_log,
        api_key=os.environ.get(API_KEY_ENV) or None,
        basic_auth=os.environ.get(BASIC_AUTH_ENV) or None,
        p_500=args.p_500,
        p_429=args.p_429,
        retry_after_s=args.retry_after_s,
        p_reset=args.p_reset,
        p_hang=args.p_hang,
        hang_s=args.hang_s,
        fail_400_tasks=args.fail_400_tasks,
        fail_class_tasks=args.fail_class_tasks,
        no_persist_tasks=args.no_persist_tasks,
        crash_after=args.crash_after,
        capacity=args.capacity,
        reject_above=args.reject_above,
        capacity_schedule=args.capacity_schedule,
    )


def serve_agent_from_args(args: argparse.Namespace) -> None:
    try:
        config = config_from_args(args)
    except ValueError as exc:  # e.g. fault probabilities adding up to more than 1
        raise SystemExit(f"reference agent: {exc}") from exc
    serve_agent(args.host, args.port, config)


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m reference_agent``: parse the flags, serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m reference_agent",
        description="Reference NeMo Gym agent SIMULATOR (arithmetic tasks; no model involved).",
    )
    add_serve_agent_arguments(parser)
    serve_agent_from_args(parser.parse_args(None if argv is None else list(argv)))
