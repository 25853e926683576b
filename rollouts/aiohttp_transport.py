"""A minimal httpx transport over one aiohttp ``ClientSession``: httpx's interface, aiohttp's wire.

httpx-aiohttp's general adapter streams every answer through an async iterator, builds a fresh
``ClientTimeout`` and re-parses the URL on each request. Agents answer one JSON document per
``POST /run``, so this transport does only what that needs: it sends the body httpx built, reads
the whole answer and hands it to httpx already read. aiohttp's errors become httpx's, with the
aiohttp error as ``__cause__`` (``agent_client._classify_transport_error`` reads it):

- connection refused, DNS, TLS: ``httpx.ConnectError``;
- no connection in time: ``httpx.ConnectTimeout``; no data in time: ``httpx.ReadTimeout``;
- the server closed the connection or sent no valid HTTP: ``httpx.RemoteProtocolError``;
- a broken body or socket: ``httpx.ReadError``.

Credentials in a URL (``http://user:pw@host``) are sent as httpx sends them: the
``Authorization`` header httpx made of them, never in the URL.

Not for streaming: ``client.stream(...)`` gets the answer once it is whole.
"""

from __future__ import annotations

import ssl

import aiohttp
import httpx
import yarl

_MAX_CACHED_URLS = 1024

# Most specific first: the first class an error is an instance of picks its httpx class.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # an answer that is not HTTP
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (TimeoutError, httpx.ReadTimeout),  # aiohttp.SocketTimeoutError and the like
    (aiohttp.ClientError, httpx.ReadError),  # resets and other socket errors
)


def _as_httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    kind = next(to for frm, to in _ERRORS if isinstance(exc, frm))
    return kind(str(exc) or type(exc).__name__, request=request)


class AiohttpSessionTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests on one aiohttp session with at most ``max_connections`` connections.

    The session (and its ``TCPConnector``; aiohttp sets ``TCP_NODELAY``) is made on the first
    request, inside the running event loop, and closed by ``aclose``. No proxies from the
    environment (``trust_env=False``), no cookie jar, no decompression (httpx decodes).
    """

    def __init__(self, max_connections: int, keepalive_expiry_s: float = 5.0) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry_s = keepalive_expiry_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}
        self._urls: dict[str, yarl.URL] = {}

    def _open(self) -> aiohttp.ClientSession:
        # The same CA bundle httpx would use (certifi), as with httpx-aiohttp before.
        tls: ssl.SSLContext = httpx.create_ssl_context(trust_env=False)
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, keepalive_timeout=self._keepalive_expiry_s, ssl=tls
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
        return self._session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        phases = request.extensions.get("timeout") or {}
        key = (phases.get("connect"), phases.get("read"), phases.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            # httpx's phases in aiohttp's terms; no total (the caller keeps its own deadline).
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], sock_read=key[1], connect=key[2]
            )
            self._timeouts[key] = timeout
        return timeout

    def _url(self, request: httpx.Request) -> yarl.URL:
        text = str(request.url)
        url = self._urls.get(text)
        if url is None:
            if len(self._urls) >= _MAX_CACHED_URLS:
                self._urls.clear()
            # Credentials in the URL: httpx has already made them an Authorization header
            # (as its own transport, aiohttp never sees them twice; it refuses both at once).
            wire = request.url.copy_with(userinfo=b"") if request.url.userinfo else request.url
            url = self._urls[text] = yarl.URL(str(wire), encoded=True)  # httpx encoded it
        return url

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        try:
            data: object = request.content
        except httpx.RequestNotRead:  # a streamed body: aiohttp frames it itself
            data = request.stream
            request.headers.pop("transfer-encoding", None)
        try:
            async with session.request(
                request.method,
                self._url(request),
                headers=request.headers.multi_items(),
                data=data or None,
                allow_redirects=False,
                timeout=self._timeout(request),
            ) as resp:
                content = await resp.read()
                status, raw_headers, reason = resp.status, resp.raw_headers, resp.reason
                encoded = "Content-Encoding" in resp.headers
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _as_httpx_error(e, request) from e
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("ascii", "replace")
        if encoded:  # compressed: httpx decodes it, as it reads it
            return httpx.Response(
                status, headers=raw_headers, content=content, request=request,
                extensions=extensions,
            )  # fmt: skip
        response = httpx.Response(
            status, headers=raw_headers, stream=httpx.ByteStream(content), request=request,
            extensions=extensions,
        )  # fmt: skip
        # Already read and nothing to decode: hand httpx the bytes as read. Its own way (a
        # decoder chain over the stream) costs about 0.02 ms of CPU per answer. Private, with
        # no public equivalent (tests/test_library_internals.py fails if httpx moves it).
        response._content = content
        return response

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
