"""The collector's own httpx transport over aiohttp, against a real aiohttp server on 127.0.0.1.

What AgentClient relies on: the body and headers (Authorization) arrive as sent, the answer
comes back whole (and decoded), and each way of failing becomes the httpx error (and failure
class) it was under httpx-aiohttp: a refused connection is a ``connection_error`` naming the
address, a silent agent past the deadline a ``timeout``.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
from aiohttp import web

from rollouts.agent_client import AgentClient, RetryPolicy, _classify_transport_error
from rollouts.aiohttp_transport import AiohttpSessionTransport

pytestmark = pytest.mark.fast  # a local aiohttp server only: no Prefect

ONCE = RetryPolicy(max_attempts=1, request_timeout_s=5.0, connect_timeout_s=2.0)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/run", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/run"
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_body_headers_and_answer_round_trip() -> None:
    seen: list[tuple[bytes, str | None, str | None]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((body, request.headers.get("authorization"), request.headers.get("host")))
        return web.json_response({"echo": orjson.loads(body), "reward": 1.0})

    async def go() -> None:
        async with serving(echo) as url:
            client = AgentClient(ONCE, 4, api_key="s3cret", transport=AiohttpSessionTransport(4))
            try:
                outs = await asyncio.gather(
                    *(client.run(url, orjson.dumps({"i": i})) for i in range(20))
                )
            finally:
                await client.aclose()
        assert [o.kind for o in outs] == ["ok"] * 20
        assert sorted(o.answer["echo"]["i"] for o in outs if o.answer) == list(range(20))

    asyncio.run(go())
    assert len(seen) == 20
    assert {auth for _, auth, _ in seen} == {"Bearer s3cret"}
    assert all(host and host.startswith("127.0.0.1:") for _, _, host in seen)


def test_credentials_in_the_url_arrive_once_as_basic_auth() -> None:
    """As httpx's own transport: the URL's user and password become one Authorization header
    (aiohttp, given them in the URL as well, refused every request with a ValueError)."""
    seen: list[tuple[str | None, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((request.headers.get("authorization"), str(request.url)))
        return web.json_response({"reward": 1.0})

    async def go() -> httpx.Response:
        async with serving(echo) as url, httpx.AsyncClient(
            transport=AiohttpSessionTransport(2)
        ) as http:
            return await http.post(url.replace("http://", "http://alice:pw@"), content=b"{}")

    assert asyncio.run(go()).status_code == 200
    ((auth, url),) = seen
    assert auth == httpx.BasicAuth("alice", "pw")._auth_header
    assert "alice" not in url


def test_a_compressed_answer_is_decoded_and_status_and_headers_kept() -> None:
    async def gz(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            body=gzip.compress(b'{"slow": "down"}'),
            headers={"content-encoding": "gzip", "retry-after": "7"},
            content_type="application/json",
        )

    async def go() -> httpx.Response:
        async with serving(gz) as url, httpx.AsyncClient(
            transport=AiohttpSessionTransport(2)
        ) as http:
            return await http.post(url, content=b"{}")

    resp = asyncio.run(go())
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "7"
    assert resp.json() == {"slow": "down"}
    assert resp.reason_phrase == "Too Many Requests"


def test_a_refused_connection_is_a_connection_error_naming_the_address() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/run"

    async def go() -> BaseException:
        async with httpx.AsyncClient(transport=AiohttpSessionTransport(2)) as http:
            with pytest.raises(httpx.ConnectError) as info:
                await http.post(url, content=b"{}")
            return info.value

    err = asyncio.run(go())
    assert _classify_transport_error(err) == "connection_error"
    assert f"127.0.0.1:{port}" in str(err)

    async def via_client() -> str | None:
        client = AgentClient(ONCE, 2, transport=AiohttpSessionTransport(2))
        try:
            out = await client.run(url, b"{}")
        finally:
            await client.aclose()
        assert out.failure_class == "connection_error"
        return out.error

    error = asyncio.run(via_client()) or ""
    assert error.startswith("gave up after 1 attempts: ConnectError: ")
    assert f"127.0.0.1:{port}" in error


def test_a_silent_agent_is_a_read_timeout_classified_timeout() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # past every deadline below (0.2 s, 0.3 s)
        return web.json_response({})

    async def go() -> BaseException:
        async with serving(hang) as url:
            timeout = httpx.Timeout(5.0, read=0.2)
            async with httpx.AsyncClient(
                transport=AiohttpSessionTransport(2), timeout=timeout
            ) as http:
                with pytest.raises(httpx.ReadTimeout) as info:
                    await http.post(url, content=b"{}")
                return info.value

    assert _classify_transport_error(asyncio.run(go())) == "timeout"

    async def total_deadline() -> str | None:
        async with serving(hang) as url:
            policy = RetryPolicy(max_attempts=1, request_timeout_s=0.3)
            client = AgentClient(policy, 2, transport=AiohttpSessionTransport(2))
            try:
                out = await client.run(url, b"{}")
            finally:
                await client.aclose()
        assert out.failure_class == "timeout"
        return out.error

    assert "no answer within 0.3s" in (asyncio.run(total_deadline()) or "")


def test_an_agent_that_drops_the_connection_is_a_connection_error() -> None:
    async def drop(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()
        return web.json_response({})

    async def go() -> BaseException:
        async with serving(drop) as url, httpx.AsyncClient(
            transport=AiohttpSessionTransport(2)
        ) as http:
            with pytest.raises(httpx.TransportError) as info:
                await http.post(url, content=b"{}")
            return info.value

    err = asyncio.run(go())
    assert isinstance(err, httpx.RemoteProtocolError | httpx.ReadError)
    assert _classify_transport_error(err) == "connection_error"
    assert str(err)


def test_an_uncompressed_answer_reads_as_content_text_and_json() -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    async def go() -> tuple[httpx.Response, str | None]:
        async with serving(busy) as url:
            async with httpx.AsyncClient(transport=AiohttpSessionTransport(2)) as http:
                resp = await http.post(url, content=b"{}")
            client = AgentClient(ONCE, 2, transport=AiohttpSessionTransport(2))
            try:
                out = await client.run(url, b"{}")
            finally:
                await client.aclose()
        return resp, out.error

    resp, error = asyncio.run(go())
    assert resp.status_code == 503
    assert resp.content == b'{"error": "busy"}'
    assert resp.json() == {"error": "busy"}
    assert resp.headers["content-type"].startswith("application/json")
    assert error == 'gave up after 1 attempts: HTTP 503: {"error": "busy"}'
